"""Dictionary training throughput and quality: our TopK trainer vs SAELens's, in one run, on the same
cached activations of the real model (an atlas's harvest cache), same d_sae, k, batch, learning rate,
token budget and threads. Quality is measured on the atlas's held-out tokens.

    .venv/bin/python scripts/bench_train.py --atlas atlas --out train.json

Also reports our tokens/s as a fraction of the machine's limit: the encoder forward alone costs
2 * d_in * d_sae FLOPs per token, against the FLOP/s of a large matmul measured here in the same
dtype (``--device cuda --dtype bfloat16`` on a GPU).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from featureatlas.ingest.config import config_of
from featureatlas.ingest.evaluate import reconstruction_metrics
from featureatlas.ingest.harvest import cached_split
from featureatlas.ingest.runtime import configure
from featureatlas.ingest.sae import ARCHITECTURES
from featureatlas.ingest.train import train_sae
from featureatlas.store.atlas import Atlas
from featureatlas.store.manifest import CACHE


def matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a large square matmul on ``device`` in ``dtype`` (the machine's limit for our step)."""
    if device.type == "cuda":
        n, repeats = 8192, 20
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    return 2 * n**3 * repeats / (time.perf_counter() - t0)


def train_saelens(x: np.ndarray, *, d_sae: int, k: int, tokens: int, batch: int, lr: float, seed: int, device: str):
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import LoggingConfig
    from sae_lens.training.sae_trainer import SAETrainer, SAETrainerConfig

    torch.manual_seed(seed)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=x.shape[1], d_sae=d_sae, k=k, device=device))
    gen = np.random.default_rng(seed)

    def batches():
        while True:
            order = gen.permutation(len(x))
            for i in range(0, len(order) - batch + 1, batch):
                yield torch.from_numpy(x[np.sort(order[i : i + batch])].astype(np.float32))

    cfg = SAETrainerConfig(total_training_samples=tokens, train_batch_size_samples=batch, lr=lr, lr_end=lr, device=device,
                           logger=LoggingConfig(log_to_wandb=False))
    SAETrainer(cfg=cfg, sae=sae, data_provider=batches()).fit()
    return sae.eval()


@torch.no_grad()
def saelens_metrics(sae, x: np.ndarray) -> dict[str, float]:
    xs = torch.from_numpy(np.asarray(x, dtype=np.float32))
    err, l0, fired = 0.0, 0.0, torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    for i in range(0, len(xs), 4096):
        chunk = xs[i : i + 4096]
        acts = sae.encode(chunk)
        err += float((chunk - sae.decode(acts)).pow(2).sum())
        l0 += float((acts > 0).sum())
        fired |= (acts > 0).any(0)
    var = float((xs.double() - xs.double().mean(0)).pow(2).sum())
    return {"fvu": err / var, "l0": l0 / len(xs), "dead_fraction": float(1 - fired.float().mean())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--atlas", default="atlas", help="an atlas whose cache/ still holds the harvest")
    p.add_argument("--d-sae", type=int, default=8192)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--tokens", type=int, default=1_000_000)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda (SAELens trains there too)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="our forward matmuls (autocast) and the matmul the limit is measured with")
    p.add_argument("--skip-saelens", action="store_true", help="ours only (when sae-lens is not installed)")
    p.add_argument("--also", nargs="*", default=[], choices=[a for a in ARCHITECTURES if a != "topk"],
                   help="train our other architectures too, same budget (reported as ours_<name>; their L0 is "
                        "set by their sparsity coefficient, not k)")
    p.add_argument("--out")
    args = p.parse_args()
    configure(threads=args.threads, training=True)  # both trainers get the same allocator setting
    atlas = Atlas(args.atlas)
    train, held = cached_split(Path(atlas.root) / CACHE, config_of(atlas.manifest).harvest.shard_tokens)
    lr = 2e-4 / (args.d_sae / 16384) ** 0.5  # our default rule, given to both
    report: dict = {"d_in": int(train.shape[1]), "d_sae": args.d_sae, "k": args.k, "tokens": args.tokens,
                    "batch": args.batch, "lr": lr, "threads": torch.get_num_threads(), "train_rows": len(train),
                    "tokens_per_s": {}, "fvu": {}, "l0": {}, "dead_fraction": {}}

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    report.update(device=args.device, dtype=args.dtype)
    flops = matmul_flops(device, dtype)
    for architecture in ["topk", *args.also]:
        name = "ours" if architecture == "topk" else f"ours_{architecture}"
        t0 = time.perf_counter()
        ours = train_sae(train, architecture=architecture, d_sae=args.d_sae, k=args.k, tokens=args.tokens,
                         batch=args.batch, lr=lr, aux_k=256, aux_coef=1 / 32, dead_tokens=200_000, seed=args.seed,
                         device=device, compute_dtype=dtype).sae
        seconds = time.perf_counter() - t0
        m = reconstruction_metrics(ours, held)
        report["tokens_per_s"][name] = args.tokens / seconds
        report["fvu"][name], report["l0"][name], report["dead_fraction"][name] = m["fvu"], m["l0"], m["dead_fraction"]
    report["matmul_gflops"] = flops / 1e9
    report["fraction_of_matmul_limit"] = report["tokens_per_s"]["ours"] * 2 * train.shape[1] * args.d_sae / flops

    if not args.skip_saelens:
        t0 = time.perf_counter()
        theirs = train_saelens(train, d_sae=args.d_sae, k=args.k, tokens=args.tokens, batch=args.batch, lr=lr,
                               seed=args.seed, device=args.device)
        seconds = time.perf_counter() - t0
        m = saelens_metrics(theirs.to("cpu"), held)
        report["tokens_per_s"]["saelens"] = args.tokens / seconds
        for key in ("fvu", "l0", "dead_fraction"):
            report[key]["saelens"] = m[key]
        report["speedup_vs_saelens"] = report["tokens_per_s"]["ours"] / report["tokens_per_s"]["saelens"]

    print(f"d_sae={args.d_sae} k={args.k} tokens={args.tokens:,} batch={args.batch} threads={report['threads']}")
    print(f"{'trainer':<16}{'tokens/s':>10}{'held-out FVU':>14}{'L0':>7}{'dead':>8}")
    for name in report["tokens_per_s"]:
        print(f"{name:<16}{report['tokens_per_s'][name]:>10,.0f}{report['fvu'][name]:>14.4f}{report['l0'][name]:>7.1f}"
              f"{report['dead_fraction'][name]:>8.4f}")
    if "speedup_vs_saelens" in report:
        print(f"speedup vs SAELens: {report['speedup_vs_saelens']:.2f}x")
    print(f"matmul {report['matmul_gflops']:.1f} GFLOP/s; ours at {report['fraction_of_matmul_limit']:.1%} of the "
          f"encoder-forward limit")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
