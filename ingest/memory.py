"""Keep freed memory inside the process instead of handing it back to the OS.

glibc serves every allocation above a threshold (at most 32 MB) with its own ``mmap`` and unmaps it
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

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


@functools.cache
def keep_freed_memory() -> bool:
    """Once per process; False where the C library is not glibc (nothing to do there)."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30) and mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1))
