"""Harvest throughput: the forward pass stopped after the hook layer vs. a full forward of the same
model on the same batches, in the same run (interleaved, so machine noise hits both alike).

    .venv/bin/python scripts/bench_harvest.py --out harvest.json

Expect a speedup near n_layers / (layer + 1) (~1.9 for layer 15 of 30), a little more since the
stopped pass also skips the final norm and the unembedding.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from featureatlas.ingest.config import ModelConfig
from featureatlas.ingest.corpus import read_source
from featureatlas.ingest.model import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--layer", type=int)
    p.add_argument("--batches", type=int, default=6)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context-len", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, device=args.device, cache_dir=ModelConfig.model_cache)
    layer = args.layer if args.layer is not None else model.n_layers // 2
    # Real text: full-length contexts from English Wikipedia summaries.
    ids: list[int] = []
    for doc in read_source("wiki-en"):
        ids += model.tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        if len(ids) > args.batches * args.batch * args.context_len:
            break
    body = torch.tensor(ids[: args.batches * args.batch * (args.context_len - 1)]).view(args.batches, args.batch, -1)
    batches = torch.cat([torch.full((args.batches, args.batch, 1), model.bos_id), body], dim=2)

    def sync() -> None:
        if model.device.type == "cuda":
            torch.cuda.synchronize()

    def full(x: torch.Tensor) -> None:
        with torch.no_grad():
            model.model(input_ids=x.to(model.device), use_cache=False)

    def stopped(x: torch.Tensor) -> None:
        model.residual(x, layer)

    timings = {"harvest": 0.0, "full": 0.0}
    stopped(batches[0])  # warm-up both paths
    full(batches[0])
    for b in batches:
        for name, fn in (("harvest", stopped), ("full", full)):
            sync()
            t0 = time.perf_counter()
            fn(b)
            sync()
            timings[name] += time.perf_counter() - t0
    tokens = batches.numel()
    result = {
        "model": args.model,
        "device": str(model.device),
        "dtype": str(model.dtype),
        "threads": torch.get_num_threads(),
        "layer": layer,
        "n_layers": model.n_layers,
        "tokens": tokens,
        "harvest_tokens_per_s": tokens / timings["harvest"],
        "full_forward_tokens_per_s": tokens / timings["full"],
        "speedup": timings["full"] / timings["harvest"],
        "expected_speedup": model.n_layers / (layer + 1),
    }
    print(f"{'path':<14}{'tokens/s':>12}")
    print(f"{'harvest':<14}{result['harvest_tokens_per_s']:>12.0f}")
    print(f"{'full forward':<14}{result['full_forward_tokens_per_s']:>12.0f}")
    print(f"speedup {result['speedup']:.2f}x (n_layers / (layer + 1) = {result['expected_speedup']:.2f})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
