"""Harvest: residual-stream activations at the hook layer for every corpus token, to disk.

Shards cover contiguous context ranges and hold float16 rows in corpus token order (BOS rows
included, so a row index is a token index). A shard is written under a temporary name and renamed,
so after a crash every shard present is whole; the stage runner (``ingest/stages.py``) records each
finished shard, and a re-run does only the missing ones.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .model import SubjectModel
from .stages import written_atomically
from .tokens import TokenizedCorpus


def shard_plan(corpus: TokenizedCorpus, shard_tokens: int) -> list[tuple[int, int]]:
    """Context ranges [a, b) of about ``shard_tokens`` tokens each."""
    plan: list[tuple[int, int]] = []
    a = 0
    for c in range(corpus.n_contexts):
        if corpus.ctx_offset[c + 1] - corpus.ctx_offset[a] >= shard_tokens:
            plan.append((a, c + 1))
            a = c + 1
    if a < corpus.n_contexts:
        plan.append((a, corpus.n_contexts))
    return plan


def shard_path(folder: Path, i: int) -> Path:
    return folder / f"acts-{i:05d}.npy"


def harvest_shard(model: SubjectModel, corpus: TokenizedCorpus, layer: int, folder: Path, i: int, *, batch: int,
                  shard_tokens: int) -> dict:
    """Shard ``i`` of the plan: its contexts through the model up to ``layer``, written atomically.
    Returns its token count and seconds (the harvest stage's summary adds them up)."""
    plan = shard_plan(corpus, shard_tokens)
    a, b = plan[i]
    base = int(corpus.ctx_offset[a])
    out = np.empty((int(corpus.ctx_offset[b]) - base, model.d_model), dtype=np.float16)
    bar = tqdm(total=len(out), desc=f"harvest layer {layer} ({i + 1}/{len(plan)})", unit="tok", unit_scale=True)
    t0 = time.perf_counter()
    # Length-sorted batches waste almost nothing on padding; padding sits on the right, where a
    # causal model's real tokens cannot see it, so no attention mask is needed.
    order = sorted(range(a, b), key=lambda c: int(corpus.ctx_offset[c + 1] - corpus.ctx_offset[c]))
    for j in range(0, len(order), batch):
        ctxs = order[j : j + batch]
        seqs = [corpus.context_ids(c) for c in ctxs]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), model.bos_id, dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.from_numpy(s.astype(np.int64))
        acts = model.residual(ids, layer).to(torch.float16).cpu().numpy()
        for r, (c, s) in enumerate(zip(ctxs, seqs)):
            o = int(corpus.ctx_offset[c]) - base
            out[o : o + len(s)] = acts[r, : len(s)]
        bar.update(sum(len(s) for s in seqs))
    bar.close()
    with written_atomically(shard_path(folder, i)) as tmp:
        np.save(tmp, out)
    return {"tokens": len(out), "seconds": time.perf_counter() - t0}


def harvest_summary(corpus: TokenizedCorpus, shards: list[dict]) -> dict:
    seconds = sum(s["seconds"] for s in shards)
    return {"shards": len(shards), "tokens": corpus.n_tokens,
            "tokens_per_s": sum(s["tokens"] for s in shards) / seconds if seconds > 0 else None}


class ShardedActivations:
    """The harvest's shards as one [n_tokens, d] float16 array, read on demand.

    Each shard is a memory map: nothing is loaded until rows are asked for, and the OS page cache
    keeps the hot ones, so training on more tokens than fit in memory works, and an ingest holds one
    copy of the activations (the page cache's) instead of two. Indexing takes what numpy indexing
    takes along the first axis (an int array, a boolean mask, a slice) and returns an ndarray.
    """

    def __init__(self, shards: list[np.ndarray]):
        self.shards = shards
        self.starts = np.cumsum([0] + [len(s) for s in shards])
        self.shape = (int(self.starts[-1]), shards[0].shape[1])
        self.dtype = shards[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice):
            key = np.arange(*key.indices(len(self)))
        key = np.asarray(key)
        rows = np.flatnonzero(key) if key.dtype == bool else key.astype(np.int64, copy=False)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"rows outside 0..{len(self) - 1}")
        out = np.empty((len(rows), self.shape[1]), dtype=self.dtype)
        shard = np.searchsorted(self.starts, rows, side="right") - 1
        for i in np.unique(shard):
            mine = shard == i
            out[mine] = self.shards[i][rows[mine] - self.starts[i]]
        return out


def load_activations(folder: Path, corpus: TokenizedCorpus, shard_tokens: int) -> ShardedActivations:
    """All harvested rows [n_tokens, d] (float16), in corpus token order, memory-mapped."""
    plan = shard_plan(corpus, shard_tokens)
    return ShardedActivations([np.load(shard_path(folder, i), mmap_mode="r") for i in range(len(plan))])


def cached_split(cache: Path, shard_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, held-out rows) of an atlas's harvest cache, BOS excluded: what benchmarks and
    sweeps train on without running the model again."""
    corpus = TokenizedCorpus.load(cache / "corpus")
    acts = load_activations(cache / "harvest", corpus, shard_tokens)
    keep = corpus.token_position() > 0
    held = corpus.ctx_eval[corpus.token_context()]
    return np.ascontiguousarray(acts[keep & ~held]), np.ascontiguousarray(acts[keep & held])
