"""Search and neighbour latency over HTTP, and ANN recall, on synthetic atlases of 100k and 1M features.

    .venv/bin/python scripts/bench_search.py --out search.json [--sizes 100000 1000000]

For each size it publishes a synthetic atlas through the real writer (``store.publish``: the same
tables and indexes as an ingest), starts ``featureatlas serve`` on loopback, and measures p50/p99 of
``/api/search?mode=label`` (query embedding included) and ``/api/features/{id}/neighbors``, plus
recall@10 of the indexed neighbours against exact brute force, and brute-force numpy latency, in
the same run. Decoders are clustered (a unit vector near one of sqrt(n) centres), not uniform:
real dictionaries have structure, and uniform random vectors in 576 dimensions have no meaningful
nearest neighbours at all.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import torch
from featureatlas.ingest.embed import embed
from featureatlas.ingest.sae import SAE
from featureatlas.store.dictionaries import dictionaries_table
from featureatlas.store.publish import publish, write_duckdb, write_lance
from featureatlas.store.schema import (
    ACTIVATIONS,
    DOCUMENTS,
    EXAMPLES,
    FAMILIES,
    FEATURES,
    LABEL_CANDIDATES,
    TOKENS,
    WINDOWS,
    vector_matrix,
)

D_MODEL = 576
# Requests before timing starts (their latencies are reported apart, as cold_*).
WARMUP = 20
WORDS = (
    "bridge river city music code python function loop king queen war battle love poem chemistry element atom "
    "planet star galaxy ocean island mountain desert forest animal bird fish insect plant flower tree disease "
    "medicine doctor law court judge money bank market trade ship train car road airport computer network "
    "language french spanish english number date year month day night sun moon rain snow fire water earth "
    "church religion god temple painting sculpture film theatre actor novel author history empire republic"
).split()


def synthetic_features(n: int, seed: int = 0) -> tuple[pa.Table, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((int(np.sqrt(n)), D_MODEL)).astype(np.float32)
    assign = rng.integers(0, len(centres), n)
    decoder = centres[assign] + 0.6 * rng.standard_normal((n, D_MODEL)).astype(np.float32)
    # The map UMAP would draw: one blob per centre (UMAP itself would take hours at 1M points here).
    xy = rng.uniform(-1, 1, (len(centres), 2))[assign] + 0.4 / np.sqrt(len(centres)) * rng.standard_normal((n, 2))
    decoder /= np.linalg.norm(decoder, axis=1, keepdims=True)
    word_emb = embed(WORDS)
    picks = rng.integers(0, len(WORDS), (n, 3))
    labels = [" ".join(WORDS[i] for i in row) for row in picks]
    label_emb = word_emb[picks].mean(1) + 0.05 * rng.standard_normal((n, word_emb.shape[1])).astype(np.float32)
    label_emb /= np.linalg.norm(label_emb, axis=1, keepdims=True)
    dim = label_emb.shape[1]
    fixed = lambda a, d: pa.FixedSizeListArray.from_arrays(a.astype(np.float32).ravel(), d)  # noqa: E731
    density = rng.beta(0.5, 200, n)
    table = pa.table({
        "feature_id": np.arange(n, dtype=np.int32),
        "decoder": fixed(decoder, D_MODEL),
        "label": labels,
        "description": labels,
        "label_source": ["synthetic"] * n,
        "label_score": rng.random(n).astype(np.float32),
        "label_scores": pa.array([[]] * n, pa.list_(pa.struct([("scorer", pa.string()), ("score", pa.float32())]))),
        "single_token": np.zeros(n, bool),
        "label_embedding": fixed(label_emb, dim),
        "kind": pa.nulls(n, pa.string()),
        "kinds": pa.array([[]] * n, FEATURES.arrow().field("kinds").type),
        "context_embedding": fixed(label_emb, dim),
        "density": density,
        "n_active": (density * 1e6).astype(np.int64),
        "n_windows": (density * 1e5).astype(np.int64),
        "mean_activation": rng.random(n).astype(np.float32),
        "max_activation": (rng.random(n) * 10 + 1).astype(np.float32),
        "top_tokens": pa.array([[w] for w in labels], pa.list_(pa.string())),
        "logit_positive": pa.array([[]] * n, pa.list_(pa.struct([("token", pa.string()), ("value", pa.float32())]))),
        "logit_negative": pa.array([[]] * n, pa.list_(pa.struct([("token", pa.string()), ("value", pa.float32())]))),
        "histogram": pa.array([[]] * n, pa.list_(pa.int64())),
        "map_x": xy[:, 0].astype(np.float32),
        "map_y": xy[:, 1].astype(np.float32),
    })
    return table, decoder


def tied_dictionary(decoder: np.ndarray) -> SAE:
    """A TopK dictionary whose decoder rows are ``decoder`` and whose encoder is their transpose:
    an atlas holds its dictionary (``Atlas`` refuses to open one without), a synthetic one too."""
    sae = SAE(D_MODEL, len(decoder), 32)
    with torch.no_grad():
        sae.W_dec.copy_(torch.from_numpy(decoder.copy()))  # Arrow hands out a read-only view
        sae.W_enc.copy_(sae.W_dec.T)
    return sae


def build_atlas(root: Path, features: pa.Table, examples: pa.Table | None = None, dictionary: SAE | None = None) -> None:
    """Publish ``features`` (and ``examples``) as an atlas, with ``dictionary`` or else ``tied_dictionary``
    of the features' decoder rows."""
    examples = examples if examples is not None else EXAMPLES.arrow().empty_table()
    n = features.num_rows
    manifest = {"format": 1, "dictionary": {"d_sae": n, "d_in": D_MODEL, "k": 32, "architecture": "topk"},
                "config": {},
                "model": {"name": "synthetic"}, "hook": {"layer": 15}, "synthetic": True}

    def build(staging: Path) -> dict[str, int]:
        sae = dictionary if dictionary is not None else tied_dictionary(vector_matrix(features["decoder"]))
        sae.save(staging / "dictionary")
        del sae
        versions = write_lance(staging / "lance", features, examples, WINDOWS.arrow().empty_table(), D_MODEL)
        write_duckdb(staging / "analytics.duckdb", {
            **{t.name: t.arrow().empty_table() for t in (DOCUMENTS, TOKENS, WINDOWS, ACTIVATIONS, LABEL_CANDIDATES, FAMILIES)},
            "features": features, "dictionaries": dictionaries_table(manifest),
        })
        return versions

    publish(root, build, manifest)


def reuse(root: Path) -> np.ndarray:
    """The decoder matrix of an atlas built by an earlier run, in feature order."""
    from featureatlas.store.atlas import Atlas

    features = Atlas(root).features
    table = features.search().select(["feature_id", "decoder"]).limit(features.count_rows()).to_arrow()
    order = np.argsort(table["feature_id"].to_numpy())
    flat = table["decoder"].combine_chunks().flatten().to_numpy()
    return flat.reshape(-1, D_MODEL)[order]


def timed(client: httpx.Client, url: str, params: dict | None = None) -> tuple[float, dict]:
    t0 = time.perf_counter()
    r = client.get(url, params=params)
    ms = (time.perf_counter() - t0) * 1000
    r.raise_for_status()
    return ms, r.json()


@contextmanager
def serving(root: Path, *, host: str = "127.0.0.1", log: Path | None = None,
            extra_env: dict[str, str] | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """``featureatlas serve`` on a free port of ``host``, as a subprocess (its output to ``log``, or
    nowhere); yields its base URL and process once /healthz answers, and stops it on exit. The
    benchmarks' one way to run a server. ``OMP_WAIT_POLICY=PASSIVE``: spinning torch threads would
    starve the read-only routes on a small machine."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    base = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE", **(extra_env or {})}
    with open(log or os.devnull, "w") as out:  # a session of its own: Ctrl-C reaches the script, which stops it
        server = subprocess.Popen(
            [sys.executable, "-m", "featureatlas.api.cli", "serve", "--atlas", str(root), "--host", host, "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start" + (f"; its log: {log}" if log else ""))
            time.sleep(0.2)
        yield base, server
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def measure(root: Path, decoder: np.ndarray, requests: int, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    with serving(root) as (base, _):
        with httpx.Client(base_url=base, timeout=30) as client:
            ids = rng.integers(0, len(decoder), requests)
            queries = [" ".join(rng.choice(WORDS, 2)) for _ in range(requests)]
            # The server builds its map in the background when it starts (~40 s of a core at 1M
            # features): asking for it waits for that, so the timed requests do not share the cores.
            client.get("/api/map/head", timeout=600)
            cold = {"neighbors": [], "search": []}
            for i in range(WARMUP):  # warm the page cache, the index and the embedder
                cold["neighbors"].append(timed(client, f"/api/features/{int(rng.integers(len(decoder)))}/neighbors")[0])
                cold["search"].append(timed(client, "/api/search", {"q": queries[i], "mode": "label"})[0])
            neigh_ms, search_ms, found = [], [], []
            for i, q in zip(ids, queries):
                ms, body = timed(client, f"/api/features/{int(i)}/neighbors", {"k": 10})
                neigh_ms.append(ms)
                found.append({n["feature_id"] for n in body["neighbors"]})
                ms, _ = timed(client, "/api/search", {"q": q, "mode": "label", "k": 10})
                search_ms.append(ms)
    # The exact answers after the server is gone: a brute-force product over a million decoders
    # takes both cores for ~200 ms, and between requests it had been the tail it measured.
    recalls, brute_ms = [], []
    for i, got in zip(ids, found):
        t0 = time.perf_counter()
        sims = decoder @ decoder[i]
        sims[i] = -2
        exact = np.argpartition(-sims, 10)[:10]
        brute_ms.append((time.perf_counter() - t0) * 1000)
        recalls.append(len(got & set(exact.tolist())) / 10)
    pct = lambda xs, p: float(np.percentile(xs, p))  # noqa: E731
    return {
        "neighbors_p50_ms": pct(neigh_ms, 50), "neighbors_p99_ms": pct(neigh_ms, 99),
        "search_p50_ms": pct(search_ms, 50), "search_p99_ms": pct(search_ms, 99),
        "recall_at_10": float(np.mean(recalls)), "bruteforce_p50_ms": pct(brute_ms, 50), "requests": requests,
        "cold_neighbors_max_ms": max(cold["neighbors"]), "cold_search_max_ms": max(cold["search"]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--workdir", help="keep the synthetic atlases here and reuse them on later runs (default: a temp folder)")
    p.add_argument("--out")
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        for n in args.sizes:
            root = work / f"atlas-{n}"
            t0 = time.perf_counter()
            if (root / "manifest.json").is_file():
                decoder = reuse(root)
            else:
                features, decoder = synthetic_features(n)
                build_atlas(root, features)
            build_s = time.perf_counter() - t0
            results[str(n)] = {**measure(root, decoder, args.requests), "build_s": build_s}
            del decoder
            print(f"{n:>9,} features: " + ", ".join(f"{k}={v:.3g}" for k, v in results[str(n)].items()), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
