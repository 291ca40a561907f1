"""The manifest: what an atlas is (model, hook, dictionary, metrics, corpus, config, versions) and
which files of it are current. It is the commit record of every change: written last, atomically,
and naming the DuckDB file and the LanceDB table versions readers open, so a change that dies
half-way leaves readers on the previous, whole state.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import os
import tempfile
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
DICTIONARY = "dictionary"
LANCE = "lance"
DUCKDB = "analytics.duckdb"
CACHE = "cache"
# Whose versions a manifest records.
PACKAGES = ("featureatlas", "torch", "transformers", "sentence-transformers", "duckdb", "lancedb", "litestar")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write to a temporary name in the same folder, then rename: readers see old or new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the manifest from other readers
    os.replace(tmp, path)


def read(root: Path) -> dict[str, Any] | None:
    """The manifest of the atlas at ``root``, or None where there is none (no atlas, or a publish
    that died before its commit)."""
    path = root / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def write(root: Path, manifest: dict[str, Any]) -> None:
    write_json_atomic(root / MANIFEST, manifest)


def duckdb_file(manifest: dict[str, Any]) -> str:
    """The DuckDB file readers open (a re-label writes a new one; atlases before pins had one name)."""
    return manifest.get("published", {}).get("duckdb", DUCKDB)


def lance_version(manifest: dict[str, Any], table: str) -> int | None:
    """The LanceDB version of ``table`` readers open; None (the latest) for atlases before pins."""
    return manifest.get("published", {}).get("lance", {}).get(table)


def pin(manifest: dict[str, Any], *, duckdb: str, lance: dict[str, int]) -> dict[str, Any]:
    return {**manifest, "published": {"duckdb": duckdb, "lance": lance}}


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions
