"""Does steering work, what does it cost, does it slow the server? Every baseline is measured in the same run.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/bench_steer.py --atlas atlas --out steer.json [--no-load ...]

PASSIVE because with libgomp's default spin-wait a forward pass ran 16x slower on a 2-core box that
another process was using. Aimed at 5-8 minutes on 2 cores; a shared machine takes longer.

A seeded sample of live features (density <= 5%) and the top search hit of a few concept queries,
each clamped to each value (times its corpus max) on neutral prompts, greedy. Measured: *effect*, the
feature's max activation over the generated tokens when the plain model reads prompt + continuation
back, over its corpus max, and the MiniLM cosine of its label to the text, steered vs default;
*fluency cost*, the continuation's cross-entropy (nats/token) under the plain model; a *language
check* of the "French" and "Python" hits (detectors below), and of their top two hits steered
together; *speed*, ``steer`` tokens/s (steered rows only, with and without the default rows beside
them) and the loop with no edits, against HF ``generate``, taking turns; *load* (``--load``), GET
/api/features/{id} latency on ``featureatlas serve`` while 8 clients POST /api/steer, against the
same GETs idle. Writes JSON and a plot.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from bench_search import serving
from featureatlas.api.service import AtlasService
from featureatlas.ingest.embed import embed
from featureatlas.ingest.labels import intervention
from featureatlas.ingest.probe import Probe
from featureatlas.ingest.steer import Edit, left_padded, logits_of, steer
from featureatlas.store.atlas import Atlas
from featureatlas.store.search import kind_index

PROMPTS = list(intervention.PROMPTS)  # the neutral prompts the intervention label score steers on
QUERIES = ["French language text", "Python code", "Shakespeare plays", "numbers and digits"]
MAX_DENSITY = 0.05  # denser features fire on everything: no concept to steer towards
ENOUGH = 0.8  # share of steered continuations the language check asks for (8 of 10)
FRENCH_KIND = "source:wiki-fr"  # ingest/labels/kinds/: the features whose mass lies in French text
FRENCH_CANDIDATE = "French text (kind)"
SPEED_VALUE = 5.0  # the clamp timed in the speed test and sent by the load clients
PLOT = Path(__file__).resolve().parents[1] / "docs/steer/steer_effect_fluency.png"

# Detectors, simple and fixed before the first full run. French: >= 3 French function words or words
# with French accents, and more of them than English and Spanish (also in the corpus) function words.
FR = set("le la les des du une et est que qui dans pour pas sur au aux avec ce cette il elle nous vous ils sont "
         "par plus ne se son sa ses leur été être très mais ou où".split())
OTHER = set("the a an of and is in to that it for on with as was are be this by at from or have not you he she they we "
            "el los las del es por con para como y su al".split())
# Code: >= 3 of these distinct signals.
CODE = [re.compile(p, re.M) for p in (r"\bdef \w+\s*\(", r"^\s*(import|from)\s+[\w.]+", r"\breturn\b", r"\bprint\(",
                                       r"\bself\.", r"\w\s*=\s*[\w\"'\[({]", r"\w\([^)]*\)", r":\s*$", r"^( {4}|\t)\S",
                                       r"\b(None|True|False|elif|lambda)\b")]


def is_french(text: str) -> bool:
    words = re.findall(r"[a-zà-ÿœ]+", text.lower())
    fr = sum(w in FR or bool(re.search(r"[éèêëàâîïôûùçœ]", w)) for w in words)
    return fr >= 3 and fr > sum(w in OTHER for w in words)


def is_code(text: str) -> bool:
    return sum(bool(p.search(text)) for p in CODE) >= 3


def french_mass(atlas: Atlas, n: int) -> list[int]:
    """The ``n`` features of the kind "French text" ranked first by the kind search signal (most of their
    mass in French, over the most French tokens); none on an atlas labelled before kinds."""
    index = kind_index(atlas)
    return [f for f, _ in index.ranked.get(FRENCH_KIND, [])[:n]] if index else []


def pick_features(atlas: Atlas, n: int, seed: int, queries: list[str], french: int = 0) -> dict[int, str]:
    """feature -> why it is here (the query it answers, a French candidate, or "sample")."""
    out = {AtlasService(atlas).search(q, k=1)["hits"][0]["feature_id"]: q for q in queries}
    out.update({f: FRENCH_CANDIDATE for f in french_mass(atlas, french) if f not in out})
    live = [r[0] for r in atlas.query("select feature_id from features where max_activation > 0 and density <= ? "
                                      "order by feature_id", [MAX_DENSITY]).rows if r[0] not in out]
    return {**out, **{int(f): "sample" for f in np.random.default_rng(seed).choice(live, n, replace=False)}}


class Reader:
    """The plain model reading prompt + continuation back, once per distinct text: (cross-entropy of
    the continuation in nats/token, [d_sae] each feature's max activation over its tokens)."""

    def __init__(self, model, sae, layer: int):  # noqa: ANN001 (SubjectModel, SAE)
        self.model, self.sae, self.layer, self.seen = model, sae, layer, {}

    @torch.no_grad()
    def __call__(self, prompt: list[int], gen: list[int]) -> tuple[float, np.ndarray]:
        key = (*prompt, -1, *gen)
        if key in self.seen:
            return self.seen[key]
        if not gen:  # end of text at once: nothing to read
            return float("nan"), np.zeros(self.sae.d_sae, np.float32)
        resid: list[torch.Tensor] = []
        hook = self.model.blocks[self.layer].register_forward_hook(
            lambda _m, _i, out: resid.append(out[0] if isinstance(out, tuple) else out))
        try:  # no edits: the plain model; this hook only reads the residual of the same pass
            logits = logits_of(self.model, self.sae, self.layer, prompt + gen, [], {})
        finally:
            hook.remove()
        n = len(prompt)
        logp = torch.log_softmax(logits[n - 1 : -1], -1).gather(1, torch.tensor(gen)[:, None])
        acts = self.sae.activations(resid[0][0, n:].to(self.sae.W_dec.dtype)).amax(0)
        self.seen[key] = (float(-logp.mean()), acts.float().cpu().numpy())
        return self.seen[key]


def sweep(atlas: Atlas, loaded: tuple, features: dict[int, str], values: list[float], ids: list[list[int]],
          new_tokens: int) -> list[dict]:
    """One row per (feature, value): the continuations and their effect and fluency metrics."""
    model, sae, layer = loaded
    info, read, rows = atlas.summaries(list(features)), Reader(model, sae, layer), []
    for f, why in features.items():
        top = info[f]["max_activation"]
        for v in values:
            t0 = time.perf_counter()
            run = steer(model, sae, layer, ids, [Edit(f, v)], {f: top}, max_new_tokens=new_tokens)
            st, de = ([read(p, c.token_ids) for p, c in zip(ids, side)] for side in (run.steered, run.default))
            vec = embed([info[f]["label"]] + [c.text for c in run.steered + run.default], name="minilm")
            cos = vec[1:] @ vec[0]
            rows.append({
                "feature": f, "kind": "sample" if why == "sample" else "concept", "query": why, "value": v,
                "effect_steered": float(np.mean([a[f] for _, a in st]) / top),
                "effect_default": float(np.mean([a[f] for _, a in de]) / top),
                "label_cos_steered": float(cos[: len(ids)].mean()), "label_cos_default": float(cos[len(ids):].mean()),
                "ce_steered": float(np.nanmean([c for c, _ in st])), "ce_default": float(np.nanmean([c for c, _ in de])),
                "french": [sum(map(is_french, (c.text for c in s))) for s in (run.steered, run.default)],
                "code": [sum(map(is_code, (c.text for c in s))) for s in (run.steered, run.default)],
                "steered_text": [c.text for c in run.steered], "default_text": [c.text for c in run.default],
                "seconds": round(time.perf_counter() - t0, 2)})
            r = rows[-1]
            print(f"  feature {f} ({why}) x{v:g}: effect {r['effect_steered']:.2f} vs {r['effect_default']:.2f}, "
                  f"CE {r['ce_steered']:.2f} vs {r['ce_default']:.2f} ({r['seconds']:.0f} s)", flush=True)
    return rows


def table(rows: list[dict]) -> list[dict]:
    """Per value, each metric's mean over features."""
    keys = [k for k in (rows[0] if rows else {}) if k.startswith(("effect", "label_cos", "ce_"))]
    at = {v: [x for x in rows if x["value"] == v] for v in sorted({x["value"] for x in rows})}
    return [{"value": v, "features": len(r), **{k: float(np.nanmean([x[k] for x in r])) for k in keys}} for v, r in at.items()]


def language(rows: list[dict], prompts: list[str], query: str, kind: str) -> dict:
    """The lowest value where >= ENOUGH of the steered continuations pass the detector (or the best one)."""
    mine = [r for r in rows if r["query"] == query]
    if not mine:
        return {"query": query, "skipped": "not among the features"}
    ok = [r for r in mine if r[kind][0] >= ENOUGH * len(prompts)]
    pick = min(ok, key=lambda r: r["value"]) if ok else max(mine, key=lambda r: (r[kind][0], r["value"]))
    return {"query": query, "feature": pick["feature"], "detector": kind, "reached": bool(ok), "value": pick["value"],
            "note": None if ok else f"no value made {ENOUGH:.0%} of continuations pass; shown: the one with most "
                                    "passing (the strongest of those tied)",
            "passing_by_value": {r["value"]: r[kind][0] for r in mine}, "steered_passing": pick[kind][0],
            "default_passing": pick[kind][1], "of": len(prompts),
            "continuations": [{"prompt": p, "default": d, "steered": s}
                              for p, d, s in zip(prompts, pick["default_text"], pick["steered_text"])]}


def combined(atlas: Atlas, loaded: tuple, ids: list[list[int]], query: str, kind: str, top: int, values: list[float],
             new_tokens: int) -> dict:
    """The language check with the query's ``top`` search hits steered together, each at the same value:
    a concept a small model spreads over several features may need more than one."""
    model, sae, layer = loaded
    hits = [h["feature_id"] for h in AtlasService(atlas).search(query, k=top)["hits"]]
    maxima = {f: s["max_activation"] for f, s in atlas.summaries(hits).items()}
    detect = is_french if kind == "french" else is_code
    out = {"query": query, "features": hits, "passing_by_value": {}, "continuations": {}}
    for v in values:
        run = steer(model, sae, layer, ids, [Edit(f, v) for f in hits], maxima, max_new_tokens=new_tokens)
        out["passing_by_value"][v] = sum(detect(c.text) for c in run.steered)
        out["continuations"][v] = [c.text for c in run.steered]
    return out


def speed(loaded: tuple, ids: list[list[int]], edit: Edit, top: float, new_tokens: int, repeats: int) -> dict:
    """Generated tokens/s, the three ways taking turns so machine noise hits each alike."""
    model, sae, layer = loaded
    pad = model.pad_id
    batch, mask = left_padded(ids, pad)  # as ``steer`` pads
    width = batch.shape[1]

    def hf() -> tuple[int, list[list[int]]]:
        out = model.model.generate(input_ids=batch.to(model.device), attention_mask=mask.to(model.device),
                                   max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                   pad_token_id=pad)[:, width:]
        return out.numel(), out.tolist()

    def ours(default: bool, steered: bool) -> tuple[int, list[list[int]]]:
        run = steer(model, sae, layer, ids, [edit], {edit.feature: top}, max_new_tokens=new_tokens, default=default,
                    steered=steered)
        return sum(len(c.token_ids) for c in (run.steered if steered else run.default)), [c.token_ids for c in run.default]

    # steer: what /api/steer runs (default and steered rows, counting the steered ones); steer_only:
    # steered rows alone; steer_unsteered: the same loop, no edits
    ways = {"hf_generate": hf, "steer": lambda: ours(True, True), "steer_only": lambda: ours(False, True),
            "steer_unsteered": lambda: ours(True, False)}
    rates: dict[str, list[float]] = {k: [] for k in ways}
    out = {}
    for i in range(repeats + 1):  # round 0 warms up and is not counted
        for name in list(ways)[i % len(ways):] + list(ways)[: i % len(ways)]:
            t0 = time.perf_counter()
            n, out[name] = ways[name]()
            if i:
                rates[name].append(n / (time.perf_counter() - t0))
    med = {k: float(np.median(v)) for k, v in rates.items()}
    same = sum(h[: len(o)] == o for h, o in zip(out["hf_generate"], out["steer_unsteered"]))
    return {"tokens_per_s": med, "runs": rates, "ratio_steered_vs_hf": med["steer"] / med["hf_generate"],
            "ratio_steered_only_vs_hf": med["steer_only"] / med["hf_generate"],
            "ratio_unsteered_vs_hf": med["steer_unsteered"] / med["hf_generate"],
            "default_rows_equal_hf_greedy": f"{same}/{len(ids)}", "edit": vars(edit)}


def call(url: str, body: dict | None = None, timeout: float = 300) -> tuple[int, float]:
    """(HTTP status, milliseconds) of a GET, or of a JSON POST of ``body``."""
    t0 = time.perf_counter()
    try:
        data = json.dumps(body).encode() if body is not None else None
        with urllib.request.urlopen(urllib.request.Request(url, data, {"Content-Type": "application/json"}),
                                    timeout=timeout) as r:
            code = (r.read(), r.status)[1]
    except urllib.error.HTTPError as e:
        code = e.code
    return code, (time.perf_counter() - t0) * 1000


def stats(got: list[tuple[int, float]]) -> dict:
    ms = [m for c, m in got if c == 200]
    return {"requests": len(got), "status_503": sum(c == 503 for c, _ in got), "errors": sum(c not in (200, 503) for c, _ in got),
            **({"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "max_ms": max(ms)} if ms else {})}


def latencies(base: str, live: list[int], rng: np.random.Generator, done: Callable[[], bool]) -> dict:
    """GET a random live feature in a loop until ``done()``."""
    got = []
    while not done():
        got.append(call(f"{base}/api/features/{int(rng.choice(live))}"))
    return stats(got)


def load_test(atlas_dir: str, live: list[int], edit: Edit, new_tokens: int, clients: int, seconds: float) -> dict:
    """GET latency on the real server idle (``seconds`` / 3), then while ``clients`` steer (``seconds``)."""
    rng = np.random.default_rng(0)
    body = lambda i: {"prompt": PROMPTS[i % len(PROMPTS)], "max_new_tokens": new_tokens,  # noqa: E731
                      "features": [{"id": edit.feature, "value": edit.value, "mode": edit.mode}]}
    with serving(Path(atlas_dir)) as (base, _):
        assert call(f"{base}/api/steer", body(0))[0] == 200  # loads the model
        for _ in range(20):  # warms the tables and the page cache
            call(f"{base}/api/features/{int(rng.choice(live))}")
        end = time.monotonic() + seconds / 3
        idle = latencies(base, live, rng, lambda: time.monotonic() > end)
        end, steers = time.monotonic() + seconds, []

        def client(i: int) -> None:
            while time.monotonic() < end:
                steers.append(call(f"{base}/api/steer", body(i)))
                i += clients

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        [t.start() for t in threads]
        busy = latencies(base, live, rng, lambda: not any(t.is_alive() for t in threads))
        return {"get_idle": idle, "get_under_load": busy, "steer_under_load": stats(steers), "clients": clients}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for kind, colour in (("concept", "C0"), ("sample", "C1")):
        if not (t := table([r for r in rows if r["kind"] == kind])):
            continue
        for metric, style, name in (("effect", "o-", "activation / corpus max"), ("label_cos", "s--", "label cosine")):
            xs, ys = [x["ce_steered"] for x in t], [x[f"{metric}_steered"] for x in t]
            ax.plot(xs, ys, style, c=colour, label=f"{kind} features: {name}")
            ax.plot(t[0]["ce_default"], np.mean([x[f"{metric}_default"] for x in t]), "*", c=colour, ms=12)
            for x, y, r in zip(xs, ys, t):
                ax.annotate(f"x{r['value']:g}", (x, y), fontsize=7)
    ax.set_xlabel("cross-entropy of the continuation under the plain model (nats/token)")
    ax.set_ylabel("effect (steered; * = default, unsteered)")
    ax.set_title("Clamp steering: effect against cost to fluency (means over features, prompts)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def report(result: dict) -> None:
    print("\n| value | effect steered | effect default | label cos steered | label cos default | CE steered | CE default |")
    print("|---|---|---|---|---|---|---|")
    for r in result["table"]:
        print(f"| {r['value']:g} | {r['effect_steered']:.3f} | {r['effect_default']:.3f} | {r['label_cos_steered']:.3f} | "
              f"{r['label_cos_default']:.3f} | {r['ce_steered']:.2f} | {r['ce_default']:.2f} |")
    s = result["speed"]
    print(f"\nspeed, tokens/s: {', '.join(f'{k} {v:.1f}' for k, v in s['tokens_per_s'].items())}; steered/HF "
          f"{s['ratio_steered_vs_hf']:.2f} with the default rows, {s['ratio_steered_only_vs_hf']:.2f} alone (target >= 0.8), "
          f"unsteered/HF {s['ratio_unsteered_vs_hf']:.2f}; default rows "
          f"= HF greedy: {s['default_rows_equal_hf_greedy']}")
    for lang in result["language"].values():
        print(f"{lang['query']}: " + (lang.get("skipped") or f"feature {lang['feature']} x{lang['value']:g}: "
              f"{lang['steered_passing']}/{lang['of']} steered, {lang['default_passing']}/{lang['of']} default pass "
              f"({'reached' if lang['reached'] else 'NOT reached'}; by value {lang['passing_by_value']})"))
    for f, curve in result.get("french_curves", {}).items():
        print(f"French curve of feature {f}: steered continuations passing by value {curve}")
    for kind, c in result["combined"].items():
        print(f"{c['query']}, top {len(c['features'])} hits {c['features']} together: {kind} passing by value "
              f"{c['passing_by_value']} of {len(c['continuations'][next(iter(c['continuations']))])}")
    for name in ("get_idle", "get_under_load", "steer_under_load"):
        if g := result.get("load", {}).get(name):
            print(f"{name}: {g['requests']} requests, p50 {g.get('p50_ms', 0):.0f} ms, p99 {g.get('p99_ms', 0):.0f} ms, "
                  f"max {g.get('max_ms', 0):.0f} ms, {g['status_503']} 503s, {g['errors']} other errors")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--atlas", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--features", type=int, default=6, help="randomly sampled live features, besides the query hits")
    p.add_argument("--queries", nargs="*", default=QUERIES)
    p.add_argument("--values", type=float, nargs="+", default=[0, 1, 2, 3, 5, 10])
    p.add_argument("--prompts", type=int, default=len(PROMPTS), help="how many of the built-in prompts")
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds of the speed test")
    p.add_argument("--load", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--load-seconds", type=float, default=30)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", type=Path, default=PLOT)
    p.add_argument("--combine", type=int, default=2, help="also steer the top N hits of the language queries together")
    p.add_argument("--combine-values", type=float, nargs="+", default=[1, 1.5, 2])
    p.add_argument("--french-candidates", type=int, default=0,
                   help="also sweep this many features with the most mass in French text (their curves in the JSON)")
    p.add_argument("--threads", type=int, help="torch threads in this process (default: torch's; not the server's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0, atlas, prompts = time.perf_counter(), Atlas(args.atlas), PROMPTS[: args.prompts]
    probe = Probe(atlas)
    loaded = probe.load()
    ids = [probe.prompt_ids(x) for x in prompts]
    features = pick_features(atlas, args.features, args.seed, args.queries, args.french_candidates)
    rows = sweep(atlas, loaded, features, args.values, ids, args.new_tokens)
    info = atlas.summaries(list(features))
    edit = Edit(next(iter(features)), SPEED_VALUE)
    result = {
        "atlas": args.atlas, "settings": {**vars(args), "plot": str(args.plot), "mode": "clamp", "temperature": 0,
                                          "prompts": prompts, "threads": torch.get_num_threads(),
                                          "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")},
        "features": [{"id": f, "query": q, **info[f]} for f, q in features.items()],
        "table": table(rows),
        "language": {"french": language(rows, prompts, "French language text", "french"),
                     "python": language(rows, prompts, "Python code", "code")},
        # each French candidate's curve: steered continuations passing the French detector, by value
        "french_curves": {r["feature"]: {x["value"]: x["french"][0] for x in rows if x["feature"] == r["feature"]}
                          for r in rows if r["query"] in (FRENCH_CANDIDATE, "French language text")},
        "combined": {kind: combined(atlas, loaded, ids, q, kind, args.combine, args.combine_values, args.new_tokens)
                     for kind, q in (("french", "French language text"), ("code", "Python code"))} if args.combine > 1 else {},
        "speed": speed(loaded, ids, edit, info[edit.feature]["max_activation"], args.new_tokens, args.repeats),
        # the default rows should not depend on what the steered rows of their batch do: 1 here
        "distinct_default_sets": len({tuple(r["default_text"]) for r in rows}), "rows": rows}
    if args.load:
        live = [r[0] for r in atlas.query("select feature_id from features where max_activation > 0").rows]
        result["load"] = load_test(args.atlas, live, edit, args.new_tokens, args.clients, args.load_seconds)
    result["seconds"] = time.perf_counter() - t0
    Path(args.out).write_text(json.dumps(result, indent=1, ensure_ascii=False))
    plot(rows, args.plot)
    report(result)
    print(f"{args.out}, {args.plot} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
