"""Does the map put features that do the same thing together? The 10-NN purity of the atlas's stored
map: over the features with at least 60% of their activation mass from one source (a language, code,
Shakespeare), the share of their 10 nearest map neighbours (2-D Euclidean) whose main source is the
same. Judged in the same run against two baselines: the stored map with its points shuffled (chance)
and the decoder layout (ingest/feature_map.py, ``map_layout=decoder``) computed now with the atlas's
own neighbours and seed.

    .venv/bin/python scripts/map_check.py --atlas atlas --out map_check.json

Nothing is written to the atlas.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from featureatlas.ingest.feature_map import feature_map
from featureatlas.store.atlas import Atlas
from scipy.spatial import cKDTree

SHUFFLES = 5  # shuffled layouts averaged for the chance level


def features(atlas: Atlas) -> dict[str, np.ndarray]:
    """``feature_id``, ``xy`` (the stored map) and unit ``decoder`` rows, in feature-id order."""
    table = atlas.features.search().select(["feature_id", "map_x", "map_y", "decoder"]).limit(atlas.features.count_rows())
    t = table.to_arrow().sort_by("feature_id")
    decoder = t["decoder"].combine_chunks()
    return {"feature_id": t["feature_id"].to_numpy(),
            "xy": np.stack([t["map_x"].to_numpy(), t["map_y"].to_numpy()], 1).astype(np.float64),
            "decoder": decoder.flatten().to_numpy().reshape(len(t), -1)}


def main_sources(atlas: Atlas, ids: np.ndarray, threshold: float) -> np.ndarray:
    """Each feature's source when it holds at least ``threshold`` of the feature's activation mass,
    else None."""
    rows = atlas.query("select feature_id, source, mass / sum(mass) over (partition by feature_id) as share from "
                       "(select feature_id, source, sum(value) as mass from activations join documents using (doc_id) "
                       "group by all) qualify share >= ?", [threshold], time_limit_ms=600_000).rows
    main = {f: s for f, s, _ in rows}
    return np.array([main.get(int(f)) for f in ids], dtype=object)


def purity(xy: np.ndarray, main: np.ndarray, k: int) -> dict[str, Any]:
    """The share of the dominated features' ``k`` nearest neighbours in ``xy`` that share their
    main source: over all of them, and by source."""
    _, near = cKDTree(xy).query(xy, k + 1)
    near = near[:, 1:]  # itself first
    dominated = np.flatnonzero([m is not None for m in main])
    same = main[near[dominated]] == main[dominated, None]
    by_source = {s: round(float(same[main[dominated] == s].mean()), 4) for s in sorted(set(main[dominated]))}
    return {"purity": round(float(same.mean()), 4), "by_source": by_source}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--atlas", default="atlas")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--k", type=int, default=10, help="map neighbours per feature")
    p.add_argument("--threshold", type=float, default=0.6, help="share of activation mass that makes a source a feature's")
    args = p.parse_args()

    atlas = Atlas(Path(args.atlas))
    config = atlas.manifest.get("config", {})
    f = features(atlas)
    main_source = main_sources(atlas, f["feature_id"], args.threshold)
    rng = np.random.default_rng(0)
    shuffled = [purity(f["xy"][rng.permutation(len(f["xy"]))], main_source, args.k)["purity"] for _ in range(SHUFFLES)]
    stored = purity(f["xy"], main_source, args.k)
    t0 = time.perf_counter()
    decoder_xy = feature_map(f["decoder"], neighbors=config.get("map", {}).get("map_neighbors", 15),
                             seed=config.get("run", {}).get("seed", 0))
    decoder_seconds = round(time.perf_counter() - t0, 1)
    result = {
        "atlas": str(args.atlas),
        "stored_layout": config.get("map", {}).get("map_layout", "decoder"),
        "features": int(len(f["xy"])), "k": args.k, "threshold": args.threshold,
        "dominated": {s: int((main_source == s).sum()) for s in sorted(set(main_source) - {None})},
        "stored": stored,
        "shuffled": {"purity": round(float(np.mean(shuffled)), 4), "runs": shuffled},
        "decoder": {**purity(decoder_xy, main_source, args.k), "seconds": decoder_seconds},
    }
    result["lift_over_shuffled"] = round(stored["purity"] / max(result["shuffled"]["purity"], 1e-9), 2)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
