"""Process-wide settings, in one place: the CLI and the server call ``configure`` once at start;
nothing in the package changes them on import or as a side effect of a library call.

- Offline: the Hugging Face libraries never reach a hub (every model is a local file anyway).
- ``LANCE_LOG``: Lance logs a warning for every table created in a fresh folder (every one we write).
- ``MKL_CBWR``: the same floats from the same matmul in every process (below).
- Torch's CPU threads, when asked for.
- ``keep_freed_memory`` for training (below).

Keep freed memory inside the process instead of handing it back to the OS: glibc serves every
allocation above a threshold (at most 32 MB) with its own ``mmap`` and unmaps it
on free. A training step allocates and frees the same few tens-of-MB tensors (pre-activations,
gradients) every step, so each step page-faults all of them in again: on this 2-core machine that
cost a fifth of the step (``scripts/bench_train.py``: 9,900 -> 11,600 tokens/s at d_sae 8,192).
Raising the thresholds makes freed blocks reusable; the price is that the process keeps its peak
memory until it exits, which an ingest run does anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
# MKL (torch's CPU BLAS) may pick kernels by the memory alignment of each call's buffers, so the
# same matmul can round differently in two processes; STRICT asks for results that do not depend on
# it. The local and the Ray ingest run the same shards in different processes and should agree to
# the bit: scripts/bench_ray.py compares every table. (Their other source of difference was the
# embedder's batches, not MKL: see ingest/embed.py, PAD_STEP.)
REPRODUCIBLE_MKL = "AUTO,STRICT"


@functools.cache
def keep_freed_memory() -> bool:
    """Once per process; False where the C library is not glibc (nothing to do there)."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30) and mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1))


def configure(*, threads: int = 0, training: bool = False) -> None:
    """``threads`` > 0 sets torch's CPU threads; ``training`` keeps freed memory (see above)."""
    for name, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("LANCE_LOG", "error"),
                        ("MKL_CBWR", REPRODUCIBLE_MKL)):
        os.environ.setdefault(name, value)
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    if training:
        keep_freed_memory()
