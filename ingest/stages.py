"""Stages as units: each has a name, a version, the config groups it reads, its upstream stages,
the files it leaves, and a ``run``. Its cache key is derived: the key settings of its groups (see
``config.setting``), its upstream stages' keys, its version and whatever else it declares as input
(a corpus fingerprint, a resolved dtype). Nothing lists fields by hand.

Each stage's output lives in ``cache/<stage>/`` with a ``done.json`` that records its key. A stage
whose key matches is skipped; a changed key clears its folder first; a folder holding this key's
partial output (a killed run) is kept, so a stage that writes in shards (the harvest, a shard of
tokens at a time; the training checkpoint) resumes where it was.

Who runs a sharded stage's shards is the runner's choice (``ShardRunner``): one after the other in
this process (``local_shards``, the default) or on a Ray cluster's workers (``ingest/cluster.py``).
Either way a shard's record is written here, in the driver, as each one finishes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generic, Iterable, Iterator, TypeVar

from featureatlas.store.manifest import write_json_atomic

log = logging.getLogger(__name__)
DONE = "done.json"
Context = TypeVar("Context")


def stage_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def key_settings(group: Any) -> dict[str, Any]:
    """The settings of a config group that can change a stage's output (``setting(key=True)``, and
    ``key="if set"`` ones away from their default)."""
    return {f.name: getattr(group, f.name) for f in dataclasses.fields(group)
            if f.metadata.get("key", True) is True
            or (f.metadata.get("key") == "if set" and getattr(group, f.name) != f.metadata["default"])}


@dataclass(frozen=True)
class Stage(Generic[Context]):
    name: str
    version: int  # bump when the stage's output changes for the same inputs
    groups: tuple[str, ...]  # config groups read (their key settings are in the key)
    upstream: tuple[str, ...]  # stages whose outputs it reads (their keys are in the key)
    outputs: tuple[str, ...]  # files it leaves in its folder
    run: Callable[[Context, Path], dict[str, Any]]  # writes ``outputs`` into the folder, returns a summary
    inputs: Callable[[Context], Any] = lambda _: None  # inputs that are not settings (a fingerprint, a dtype)
    # A sharded stage splits its work into independent pieces (of tokens or of features): ``shards``
    # says how many, ``run_shard`` does one (writing its output atomically) and returns a small
    # record, and ``run`` then merges them. The runner records each finished shard, so a killed
    # stage redoes only the missing ones; a cluster can hand the same shards to its workers.
    shards: Callable[[Context], int] | None = None
    run_shard: Callable[[Context, Path, int], dict[str, Any]] | None = None


# Runs the listed shards of a stage (in any order) and yields (shard, record) as each finishes.
ShardRunner = Callable[[Stage, Any, Path, list[int]], Iterable[tuple[int, dict[str, Any]]]]


def local_shards(stage: Stage, ctx: Any, folder: Path, todo: list[int]) -> Iterator[tuple[int, dict[str, Any]]]:
    for i in todo:
        yield i, stage.run_shard(ctx, folder, i)


class Stages:
    """Runs stages in order against one cache folder, skipping the finished ones; ``record`` is
    what the manifest reports (key, reused or done, summary)."""

    def __init__(self, cache: Path, config: Any, runner: ShardRunner = local_shards):
        self.cache = cache
        self.config = config
        self.runner = runner
        self.keys: dict[str, str] = {}
        self.record: dict[str, dict[str, Any]] = {}

    def folder(self, name: str) -> Path:
        return self.cache / name

    def key(self, stage: Stage, ctx: Any) -> str:
        settings = {g: key_settings(getattr(self.config, g)) for g in stage.groups}
        return stage_key(stage.name, stage.version, settings, [self.keys[u] for u in stage.upstream], stage.inputs(ctx))

    def ensure(self, stage: Stage, ctx: Any) -> dict[str, Any]:
        """The summary of ``stage``: from its finished run with these inputs, or from running it now."""
        key = self.key(stage, ctx)
        self.keys[stage.name] = key
        folder = self.folder(stage.name)
        done = folder / DONE
        if done.is_file():
            data = json.loads(done.read_text())
            if data.get("key") == key and all((folder / o).exists() for o in stage.outputs):
                self.record[stage.name] = {"key": key, "status": "reused", "summary": data["summary"]}
                log.info("%-9s reused (inputs unchanged): %s", stage.name, _short(data["summary"]))
                return data["summary"]
        partial = folder / ".key"
        if folder.exists() and (not partial.is_file() or partial.read_text() != key):
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        partial.write_text(key)
        t0 = time.perf_counter()
        if stage.shards is not None and stage.run_shard is not None:
            self._run_shards(stage, ctx, folder)
        summary = stage.run(ctx, folder)
        missing = [o for o in stage.outputs if not (folder / o).exists()]
        if missing:
            raise RuntimeError(f"stage {stage.name} did not write {missing}")
        summary["seconds"] = round(time.perf_counter() - t0, 1)
        write_json_atomic(done, {"key": key, "summary": summary})
        self.record[stage.name] = {"key": key, "status": "done", "summary": summary}
        log.info("%-9s done: %s", stage.name, _short(summary))
        return summary

    def _run_shards(self, stage: Stage, ctx: Any, folder: Path) -> None:
        n = stage.shards(ctx)
        todo = [i for i in range(n) if not _shard_record(folder, i).is_file()]
        if len(todo) < n:
            log.info("%-9s resuming: %d of %d shards already done", stage.name, n - len(todo), n)
        if todo:
            for i, record in self.runner(stage, ctx, folder, todo):
                write_json_atomic(_shard_record(folder, i), record)


@contextmanager
def written_atomically(path: Path) -> Iterator[Path]:
    """A fresh temporary name beside ``path`` to write a shard's file to; renamed to ``path`` when
    the block ends whole, removed when it does not. The name is unique, so a stale worker (on a
    node thought lost) writing the same shard cannot write into this one's file; it keeps the
    suffix, which numpy's savers insist on."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def shard_records(folder: Path) -> list[dict[str, Any]]:
    """What each finished shard of the stage in ``folder`` returned, in shard order."""
    return [json.loads(p.read_text()) for p in sorted(folder.glob("shard-*.json"))]


def _shard_record(folder: Path, i: int) -> Path:
    return folder / f"shard-{i:05d}.json"


def _short(summary: dict[str, Any]) -> str:
    scalars = {k: v for k, v in summary.items() if not isinstance(v, (dict, list))}
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in scalars.items())
