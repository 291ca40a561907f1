"""How each ingest stage's cost grows with the number of features: wall time and peak memory per
stage at several dictionary widths, and each stage's growth exponent (seconds ∝ F^a).

    .venv/bin/python scripts/bench_scale.py --base atlas --sizes 16384 65536 262144 1048576 --out scale.json

Sizes already in ``--out`` are kept and the exponents refitted with them, so sizes can be measured
in separate runs. Intervention is left out (``--intervention-features 0``) unless asked for: it
steers a fixed sample of features whatever the width. Encode is reported against the dense matmul
limit at each width (``encode_fraction_of_limit``).

Each width F gets a randomly initialised TopK dictionary (``SAE.initialized``: unit decoder rows, the
encoder their transpose) saved in our SAELens layout and loaded through the normal ``--dictionary``
path, so training is left out (the issue's budget excludes it) and every stage after it runs as a
user's would. A random dictionary fires as often as a trained one (TopK: k features a token), so
the stages see the same amount of work; its labels are of course meaningless. The corpus, windows
and harvest stages do not depend on F: they are reused from ``--base``'s cache through hard links
(no copy, nothing recomputed). Each build is a child process, so its peak RSS (``wait4``) is its
own. Stage times come from the manifest the ingest writes; ``publish`` is the rest of the wall time
(publishing, plus a few seconds of start-up and model loading). The exponent is a least-squares
line in log-log space over the sizes from ``--fit-from`` up (the issue asks for 65k to 1M).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from featureatlas.ingest.encode import encode_batch
from featureatlas.ingest.sae import SAE
from featureatlas.store.manifest import CACHE, read

REUSED = ("corpus", "windows", "harvest")  # stages that do not depend on the dictionary's width
STAGES = ("evaluate", "encode", "labels", "intervention", "map", "publish")


def dictionary(base: Path, width: int, folder: Path, seed: int) -> Path:
    """A random TopK dictionary of ``width`` features for the base atlas's model and hook."""
    cfg = json.loads((base / "dictionary" / "cfg.json").read_text())
    meta = {k: cfg[k] for k in ("model_name", "hook_name", "hook_layer")}
    SAE.initialized(int(cfg["d_in"]), width, int(cfg["k"]), seed=seed, meta=meta).save(folder)
    return folder


def reuse_cache(base: Path, atlas: Path) -> None:
    """The F-independent stages' outputs, hard-linked from the base atlas (the same key: reused)."""
    for stage in REUSED:
        source, target = base / CACHE / stage, atlas / CACHE / stage
        if source.is_dir() and not target.exists():
            shutil.copytree(source, target, copy_function=_link)


def _link(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system
        shutil.copy2(source, target)


def build(base: Path, width: int, work: Path, seed: int, extra: list[str]) -> dict:
    """One ingest at ``width`` in a child process: each stage's seconds, wall time and peak RSS."""
    atlas = work / f"atlas-{width}"
    if atlas.exists():
        shutil.rmtree(atlas)
    reuse_cache(base, atlas)
    folder = dictionary(base, width, work / f"dictionary-{width}", seed)
    limit = matmul_limit(int(json.loads((folder / "cfg.json").read_text())["d_in"]), width)
    command = [sys.executable, "-m", "featureatlas.api.cli", "ingest", "--profile", "quick", "--atlas", str(atlas),
               "--dictionary", str(folder), "--d-sae", str(width), *extra]
    log = (work / f"ingest-{width}.log").open("w")
    t0 = time.perf_counter()
    child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"the ingest at {width} features failed: see {log.name}")
    stages = read(atlas)["stages"]
    ran = {name: s["summary"]["seconds"] for name, s in stages.items() if s["status"] == "done" and name not in REUSED}
    ran["publish"] = round(wall - sum(ran.values()), 1)
    encoded = stages["encode"]["summary"].get("encode_tokens_per_s")
    return {"features": width, "seconds": ran, "wall_seconds": round(wall, 1),
            "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2),  # KiB on Linux
            "encode_tokens_per_s": encoded, "encode_fraction_of_limit": round(encoded / limit, 3) if encoded else None,
            "encode_matmul_limit_tokens_per_s": round(limit, 1),
            "reused": [name for name, s in stages.items() if s["status"] == "reused"]}


def matmul_limit(d_in: int, width: int, repeats: int = 3) -> float:
    """Tokens/s of the encoder's dense matmul alone (2·d_in·F FLOPs a token) at the encode's batch
    size, in this process on the same cores: what encode could reach if top-k, the copy out and
    reading the harvest were free."""
    batch = encode_batch(width)
    w = torch.randn(d_in, width)
    x = torch.randn(batch, d_in)
    x @ w  # warm-up (allocations, thread pool)
    t0 = time.perf_counter()
    for _ in range(repeats):
        x @ w
    return batch * repeats / (time.perf_counter() - t0)


def growth(runs: list[dict], fit_from: int) -> tuple[dict[str, float | None], list[int]]:
    """Per stage, the exponent a of seconds ∝ F^a over the runs from ``fit_from`` features up (over
    every run while fewer than two are that wide), and the sizes the fit used."""
    used = [r for r in runs if r["features"] >= fit_from]
    used = used if len(used) >= 2 else runs
    out: dict[str, float | None] = {}
    for stage in STAGES:
        points = [(r["features"], r["seconds"][stage]) for r in used if r["seconds"].get(stage, 0) > 0]
        out[stage] = round(float(np.polyfit(*np.log(np.array(points)).T, 1)[0]), 3) if len(points) >= 2 else None
    return out, [r["features"] for r in used]


def plot(runs: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    widths = [r["features"] for r in runs]
    for stage in STAGES:
        ax.plot(widths, [max(r["seconds"].get(stage, 0), 0.1) for r in runs], marker="o", label=stage)
    ax.set(xscale="log", yscale="log", xlabel="features (dictionary width)", ylabel="seconds",
           title="Ingest stage time against dictionary width (quick corpus, 2 cores)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, default=Path("atlas"), help="a built quick atlas whose cache is reused")
    p.add_argument("--sizes", type=int, nargs="+", default=[16384, 65536, 262144, 1048576])
    p.add_argument("--work", type=Path, default=Path("/tmp/featureatlas-scale"), help="where the atlases are built")
    p.add_argument("--out", type=Path, default=Path("scale.json"))
    p.add_argument("--plot", type=Path, default=Path("docs/scale/scale.png"))
    p.add_argument("--fit-from", type=int, default=65536, help="fit exponents over sizes from this one up")
    p.add_argument("--seed", type=int, default=0)
    args, extra = p.parse_known_args()  # anything else goes to every ingest (e.g. --map-layout decoder)
    if not any(a.startswith("--intervention-features") for a in extra):
        # Intervention steers a fixed sample of features (32 by default, ~4 min here) whatever the
        # width: it says nothing about growth, so it is left out unless asked for.
        extra += ["--intervention-features", "0"]
    if read(args.base) is None:
        raise SystemExit(f"{args.base} is not a built atlas: run `featureatlas ingest --profile quick` first")
    args.work.mkdir(parents=True, exist_ok=True)
    # Sizes already in --out from an earlier run are kept (a million-feature build takes hours;
    # smaller sizes can be added later), unless measured again now.
    earlier = json.loads(args.out.read_text())["runs"] if args.out.is_file() else []
    runs = [r for r in earlier if r["features"] not in args.sizes]
    for width in sorted(args.sizes):
        runs = sorted([*runs, build(args.base, width, args.work, args.seed, extra)], key=lambda r: r["features"])
        r = next(r for r in runs if r["features"] == width)
        print(f"{width:>9,} features: {r['wall_seconds']:8.1f} s, peak {r['peak_rss_gib']:.2f} GiB, encode "
              f"{r['encode_fraction_of_limit']} of the matmul limit  "
              + "  ".join(f"{s} {r['seconds'].get(s, 0):.1f}" for s in STAGES), flush=True)
        exponents, fitted = growth(runs, args.fit_from)
        result = {"sizes": [r["features"] for r in runs], "runs": runs, "growth_fitted_over": fitted,
                  "growth_exponent": exponents, "ingest_arguments": extra,
                  "dictionary": "random TopK (SAE.initialized), loaded through --dictionary"}
        args.out.write_text(json.dumps(result, indent=2))  # after every size: a long run keeps what it has
    print("growth exponents:", json.dumps(result["growth_exponent"]))
    try:
        print("wrote", args.out, plot(runs, args.plot))
    except ImportError:
        print("wrote", args.out, "(no plot: matplotlib is not installed)")


if __name__ == "__main__":
    main()
