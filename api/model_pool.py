"""Model work off the request threads, bounded: a generation or a probe runs in this pool's own
thread, never in the thread pool that serves the read-only routes (only a search's inference signal
runs one short forward pass there, and waits at most half a second for the model), and at most
``workers + waiting`` requests are in it at once. One more is refused at once (``PoolFull``: a 503 with
``Retry-After``) rather than queued without bound: a steering request takes seconds on a CPU, and a
queue that grows is a server that answers nobody in time.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

T = TypeVar("T")
# One worker: the model runs one forward pass at a time anyway (``Probe.busy``), and on a small
# machine a second one would only take cores from the read-only routes.
WORKERS = 1
WAITING = 8


class PoolFull(Exception):
    """Every slot of the model pool is taken."""


class ModelPool:
    def __init__(self, workers: int = WORKERS, waiting: int = WAITING):
        self.capacity = workers + waiting
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="model")
        self._slots = threading.BoundedSemaphore(self.capacity)

    async def run(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        """``fn(*args, **kwargs)`` in the pool; ``PoolFull`` when no slot is free. A slot is freed
        when the work ends, not when its client leaves: abandoned work still holds the model."""
        if not self._slots.acquire(blocking=False):
            raise PoolFull(f"the model is busy with {self.capacity} requests")
        try:
            future = self._executor.submit(fn, *args, **kwargs)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        return await asyncio.wrap_future(future)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
