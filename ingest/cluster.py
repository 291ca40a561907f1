"""Sharded stages on a Ray cluster: the same shards as the local path, run by a pool of actors.

Each actor opens the ingest's context once (``open_ctx``: the model, the corpus, the dictionary;
the embedder on first use) and then runs whole shards, each writing its own files atomically into
the stage's folder, exactly as ``local_shards`` would. The driver writes each shard's record as it
comes back, so a killed driver resumes from the finished shards (``ingest/stages.py``), and a killed
actor is restarted by Ray and its shard run again: a shard is a pure function of its inputs, and a
half-written one was never renamed into place.

Why actors over Ray Data: a shard here is a coarse, self-describing unit (a range of contexts or
of features) whose output is a file, not a stream of rows; what the cluster must give is placement
(a model per worker, on a GPU where there is one), retries and the order-free collection of
results, which an actor pool does with nothing between the shard and its file.

Workers read the stage's inputs from, and write its outputs to, the atlas's cache folder: on more
than one machine it must be a shared filesystem (the same path on every node).
"""

from __future__ import annotations

import functools
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

from featureatlas.store.errors import BadConfig
from tqdm import tqdm

from .stages import Stage

log = logging.getLogger(__name__)
# How often one actor is restarted, and one shard re-sent, after its process died: a shard that
# kills every worker it lands on (out of memory each time) stops the ingest instead of looping.
RETRIES = 3


def connect(address: str) -> None:
    """Joins the cluster at ``address`` (``auto``: the one ``ray start`` runs on this machine, or a
    new single-machine cluster when there is none). The driver's environment goes to the workers,
    so they find the same packages and stay offline."""
    import ray

    if ray.is_initialized():  # a test's or a notebook's cluster: the caller chose it
        return
    env = {"env_vars": {k: v for k, v in os.environ.items() if k in _PASSED_ENV}}
    try:
        try:
            ray.init(address=address, runtime_env=env, log_to_driver=False)
        except ConnectionError as e:
            if address != "auto":
                raise
            # None running, or the record of one that has since stopped (Ray leaves it in /tmp/ray).
            log.info("ray: no cluster answers on this machine (%s); starting one", str(e).splitlines()[0])
            ray.init(runtime_env=env, log_to_driver=False, include_dashboard=False)
    except (ConnectionError, ValueError, OSError) as e:
        raise BadConfig("--ray", f"cannot join the Ray cluster at {address!r}: {str(e).splitlines()[0]}") from None


# What workers must see as the driver does: offline hubs, quiet Lance, reproducible MKL (ingest/runtime.py),
# the caches (models, work folders).
_PASSED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "LANCE_LOG", "MKL_CBWR", "HF_HOME", "XDG_CACHE_HOME",
               "FEATUREATLAS_CACHE")


class RayShards:
    """A ``ShardRunner`` over a pool of Ray actors, started on the first sharded stage and kept for
    the rest of the ingest (each actor loads the model once). ``workers`` actors of ``cpus`` CPUs
    and ``gpus`` GPUs each; ``workers=0``: as many as the cluster's CPUs (or GPUs) hold."""

    def __init__(self, open_ctx: Callable[[], Any], *, workers: int = 0, cpus: float = 1, gpus: float = 0,
                 threads: int = 0):
        self.open_ctx = open_ctx
        self.workers, self.cpus, self.gpus, self.threads = workers, cpus, gpus, threads
        self.actors: list[Any] = []
        self.nodes: Counter[str] = Counter()  # shards run per node id (what the two-node test reads)

    def __call__(self, stage: Stage, ctx: Any, folder: Path, todo: list[int]) -> Iterator[tuple[int, dict[str, Any]]]:
        from ray.util import ActorPool

        if not self.actors:
            self.actors = [_actor().options(num_cpus=self.cpus, num_gpus=self.gpus).remote(self.open_ctx, self.threads)
                           for _ in range(self._pool_size())]
        pool = ActorPool(self.actors)
        where = str(folder.resolve())  # the workers' working directory is not the driver's
        # The workers' own progress bars stay in their logs; this one counts finished shards.
        with tqdm(total=len(todo), desc=f"{stage.name} on {len(self.actors)} Ray actors", unit="shard") as bar:
            for i, node, record in pool.map_unordered(lambda actor, i: actor.run.remote(stage, where, i), todo):
                self.nodes[node] += 1
                bar.update()
                yield i, record

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def _pool_size(self) -> int:
        """The actors to start: ``workers``, or as many as the cluster holds. An actor the cluster
        can never place would take shards and never start, so a pool that does not fit is refused."""
        import ray

        have = ray.cluster_resources()
        kind, each = ("GPU", self.gpus) if self.gpus > 0 else ("CPU", self.cpus)
        fits = int(have.get(kind, 0) // each)
        if fits < 1:
            raise BadConfig("--device" if kind == "GPU" else "--ray", f"the Ray cluster has no {kind} for an actor")
        if self.workers > fits:
            raise BadConfig("--ray-workers", f"{self.workers} actors of {each:g} {kind} each do not fit the cluster's "
                                             f"{have.get(kind, 0):g} {kind}s")
        return self.workers or fits


@functools.cache
def _actor():
    """The actor class, made on first use so that importing this module does not need Ray. A dead
    actor is restarted (``max_restarts``) and the call it was running is sent again
    (``max_task_retries``): that is what makes a killed worker cost only its shard. An exception
    raised by a shard is not retried: it is the shard's answer, and stops the ingest."""
    import ray

    @ray.remote(max_restarts=RETRIES, max_task_retries=RETRIES)
    class ShardWorker:
        def __init__(self, open_ctx: Callable[[], Any], threads: int):
            import torch

            # Ray gives each worker OMP_NUM_THREADS = its CPUs; torch reads it only at import
            # when it is set before, so say it again.
            torch.set_num_threads(threads or max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
            self.ctx = open_ctx()

        def run(self, stage: Stage, folder: str, i: int) -> tuple[int, str, dict[str, Any]]:
            record = stage.run_shard(self.ctx, Path(folder), i)
            return i, ray.get_runtime_context().get_node_id(), record

    return ShardWorker
