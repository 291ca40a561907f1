"""Resumable stages: each one's output lives in ``cache/<stage>/`` with a ``done.json`` that records
the key of its inputs. A stage whose key matches is skipped; a changed key clears its folder first."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from featureatlas.store.atlas import write_json_atomic

log = logging.getLogger(__name__)
DONE = "done.json"


def stage_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Stages:
    def __init__(self, cache: Path):
        self.cache = cache
        self.record: dict[str, dict[str, Any]] = {}

    def folder(self, name: str) -> Path:
        return self.cache / name

    def finished(self, name: str, key: str) -> dict[str, Any] | None:
        """The summary of a finished run of ``name`` with inputs ``key``, or None."""
        done = self.folder(name) / DONE
        if done.is_file():
            data = json.loads(done.read_text())
            if data.get("key") == key:
                self.record[name] = {"key": key, "status": "reused", "summary": data["summary"]}
                log.info("%-9s reused (inputs unchanged): %s", name, _short(data["summary"]))
                return data["summary"]
        return None

    @contextmanager
    def run(self, name: str, key: str) -> Iterator[dict[str, Any]]:
        """Yields a dict the stage fills with its summary; marks the stage done on success.

        A folder holding another key's output is cleared; one holding this key's partial output
        (a killed run) is kept, so stages that can resume (the harvest) pick up where they were.
        """
        folder = self.folder(name)
        partial = folder / ".key"
        if folder.exists() and (not partial.is_file() or partial.read_text() != key):
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        partial.write_text(key)
        summary: dict[str, Any] = {}
        t0 = time.perf_counter()
        yield summary
        summary["seconds"] = round(time.perf_counter() - t0, 1)
        write_json_atomic(folder / DONE, {"key": key, "summary": summary})
        self.record[name] = {"key": key, "status": "done", "summary": summary}
        log.info("%-9s done: %s", name, _short(summary))


def _short(summary: dict[str, Any]) -> str:
    scalars = {k: v for k, v in summary.items() if not isinstance(v, (dict, list))}
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in scalars.items())
