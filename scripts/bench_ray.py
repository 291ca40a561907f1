"""The ingest on Ray against the local ingest, same machine, same run: wall time, per-stage time,
per-shard cost, and whether the two atlases are the same.

    .venv/bin/python scripts/bench_ray.py --workdir /tmp/bench-ray --out bench_ray.json

Each build is a fresh ``featureatlas ingest`` child process with its own atlas folder (the model
cache is shared: dequantizing the GGUF is not the ingest's work). The local build runs first, then
``--ray auto`` (a single-machine cluster started for it, or the one ``ray start`` runs here).
``overhead`` is Ray's wall time over the local one; ``identical`` is true when every published
table hashes the same (``store/digest.py``: activations, features with their statistics and labels,
examples, windows, ...). ``shards`` gives each sharded stage's shard count and mean seconds a
shard, as measured inside the worker that ran it: the numbers a cluster run is sized from.
Extra arguments after ``--`` go to both ingests (``-- --d-sae 1024``).
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

from featureatlas.ingest.stages import shard_records
from featureatlas.store.digest import atlas_digest
from featureatlas.store.manifest import CACHE, read

SHARDED = ("windows", "harvest", "encode", "labels")


def build(atlas: Path, profile: str, extra: list[str], model_cache: Path) -> dict:
    """One ingest in a child process: its wall time, stage seconds and shard costs."""
    shutil.rmtree(atlas, ignore_errors=True)
    cmd = [sys.executable, "-m", "featureatlas.api.cli", "ingest", "--profile", profile, "--atlas", str(atlas),
           "--model-cache", str(model_cache), *extra]
    log = atlas.with_suffix(".log")
    t0 = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"bench_ray: {' '.join(cmd)} failed ({done.returncode}); see {log}")
    manifest = read(atlas) or {}
    stages = {name: rec["summary"].get("seconds") for name, rec in manifest.get("stages", {}).items()}
    return {"wall_s": round(wall, 1), "stages_s": stages, "shards": shard_costs(atlas / CACHE)}


def shard_costs(cache: Path) -> dict:
    out = {}
    for stage in SHARDED:
        records = shard_records(cache / stage)
        seconds = [r["seconds"] for r in records if "seconds" in r]
        out[stage] = {"shards": len(records), "mean_shard_s": round(sum(seconds) / len(seconds), 2) if seconds else None,
                      **_work(stage, records)}
    return out


def _work(stage: str, records: list[dict]) -> dict:
    """What a shard of ``stage`` covers, summed: tokens, windows or features."""
    unit = {"windows": "windows", "harvest": "tokens", "encode": "tokens", "labels": "features"}[stage]
    return {unit: sum(r.get(unit, 0) for r in records)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("bench-ray"))
    p.add_argument("--profile", default="quick")
    p.add_argument("--ray", default="auto", help="what --ray gets (auto: this machine)")
    p.add_argument("--model-cache", type=Path, default=Path("~/.cache/featureatlas/models").expanduser())
    p.add_argument("--out", type=Path, default=Path("bench_ray.json"))
    p.add_argument("extra", nargs="*", help="more ingest flags for both builds, after --")
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    env_note = {"cpus": os.cpu_count()}
    local = build(args.workdir / "local", args.profile, args.extra, args.model_cache)
    on_ray = build(args.workdir / "ray", args.profile, [*args.extra, "--ray", args.ray], args.model_cache)
    a, b = atlas_digest(args.workdir / "local"), atlas_digest(args.workdir / "ray")
    result = {
        "profile": args.profile, "extra": args.extra, "machine": env_note,
        "overhead": round(on_ray["wall_s"] / local["wall_s"], 3),
        "identical": a == b,
        "tables_equal": {name: a[name] == b.get(name) for name in a},
        "local": local, "ray": on_ray,
    }
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("overhead", "identical")}))


if __name__ == "__main__":
    main()
