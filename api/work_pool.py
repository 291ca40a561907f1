"""Heavy work off the request threads, bounded.

Two kinds of request cost far more than a feature page: model work (a generation or a probe: a
forward pass per token, seconds on a CPU) and search (an embedding, several index probes and a scan
of the activations: tens of milliseconds of CPU). Each kind runs in its own pool's threads, never in
the thread pool that serves the cheap read-only routes nor behind the other kind. At most
``workers + waiting`` requests are in a pool at once; one more is refused at once (``PoolFull``: a
503 with ``Retry-After``) rather than queued without bound: a queue that grows is a server that
answers nobody in time.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

T = TypeVar("T")


class PoolFull(Exception):
    """Every slot of a pool is taken."""

    def __init__(self, what: str, capacity: int):
        super().__init__(f"{what} is busy with {capacity} requests")
        self.what = what


class WorkPool:
    def __init__(self, what: str, *, workers: int = 1, waiting: int = 8):
        """``what``: the name a refusal uses ("the model"). One worker by default: the model runs one
        forward pass at a time anyway (``Probe.busy``)."""
        self.what = what
        self.capacity = workers + waiting
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix=what.split()[-1])
        self._slots = threading.BoundedSemaphore(self.capacity)

    async def run(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        """``fn(*args, **kwargs)`` in the pool; ``PoolFull`` when no slot is free. A slot is freed
        when the work ends, not when its client leaves: abandoned work still holds its worker."""
        if not self._slots.acquire(blocking=False):
            raise PoolFull(self.what, self.capacity)
        try:
            future = self._executor.submit(fn, *args, **kwargs)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        return await asyncio.wrap_future(future)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
