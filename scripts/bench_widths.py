"""A family of dictionary widths from one pass over the cached activations, against the widest alone.

Three ways to get 1,024 / 4,096 / 16,384 features at one hook point, trained in one process on the
same cached activations of the real model (an atlas's harvest cache), same k, batch, token budget
and threads, each width at its default learning rate:

- ``widest``: the 16,384-feature TopK dictionary alone: the baseline;
- ``together``: three TopK dictionaries stepped on each batch as it is read (``train_saes``);
- ``matryoshka``: one 16,384-feature Matryoshka BatchTopK dictionary whose prefixes are the others.

Reports seconds and tokens/s of each, the ratio to the widest alone (issue 30 asks for at most 1.6
for the three widths), and the held-out FVU and L0 of every width (a Matryoshka prefix is encoded as
a dictionary of its own).

    .venv/bin/python scripts/bench_widths.py --atlas atlas --out widths.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from featureatlas.ingest.config import TrainConfig, config_of
from featureatlas.ingest.evaluate import reconstruction_metrics
from featureatlas.ingest.harvest import cached_split
from featureatlas.ingest.runtime import configure
from featureatlas.ingest.sae import PREFIXES_KEY
from featureatlas.ingest.train import DictionarySpec, train_saes
from featureatlas.store.atlas import Atlas
from featureatlas.store.manifest import CACHE


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--atlas", default="atlas", help="a built atlas whose harvest cache is read")
    p.add_argument("--widths", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--tokens", type=int, default=200_000)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path("widths.json"))
    args = p.parse_args()
    configure(threads=args.threads, training=True)
    atlas = Atlas(args.atlas)
    train, held = cached_split(Path(atlas.root) / CACHE, config_of(atlas.manifest).harvest.shard_tokens)
    widths = sorted(args.widths)
    common = dict(tokens=args.tokens, batch=args.batch, seed=args.seed, device=torch.device(args.device))

    def spec(width: int, architecture: str = "topk", **meta) -> DictionarySpec:
        return DictionarySpec(width, min(args.k, width), TrainConfig(d_sae=width).lr_value, architecture, meta=meta)

    runs = {"widest": [spec(widths[-1])], "together": [spec(w) for w in widths],
            "matryoshka": [spec(widths[-1], "matryoshka", **{PREFIXES_KEY: widths})]}
    report: dict = {"widths": widths, "k": args.k, "tokens": args.tokens, "batch": args.batch,
                    "threads": torch.get_num_threads(), "train_rows": len(train), "runs": {}}
    train_saes(train, [spec(widths[0])], **{**common, "tokens": 4 * args.batch})  # warm-up: not timed
    for name, specs in runs.items():
        t0 = time.perf_counter()
        results = train_saes(train, specs, **common)
        seconds = time.perf_counter() - t0
        saes = [r.sae for r in results]
        if name == "matryoshka":
            saes = [saes[0].prefix(w) for w in widths]
        quality = {sae.d_sae: reconstruction_metrics(sae, held) for sae in saes}
        report["runs"][name] = {"seconds": seconds, "tokens_per_s": args.tokens / seconds,
                                "fvu": {w: m["fvu"] for w, m in quality.items()},
                                "l0": {w: m["l0"] for w, m in quality.items()}}
    base = report["runs"]["widest"]["seconds"]
    for run in report["runs"].values():
        run["over_widest_alone"] = run["seconds"] / base
    report["together_within_1_6x"] = report["runs"]["together"]["over_widest_alone"] <= 1.6
    print(f"widths {widths} k={args.k} tokens={args.tokens:,} batch={args.batch} threads={report['threads']}")
    print(f"{'run':<12}{'seconds':>9}{'x widest':>10}  held-out FVU (L0) per width")
    for name, run in report["runs"].items():
        cells = "  ".join(f"{w}: {f:.4f} ({run['l0'][w]:.1f})" for w, f in run["fvu"].items())
        print(f"{name:<12}{run['seconds']:>9.1f}{run['over_widest_alone']:>10.2f}  {cells}")
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
