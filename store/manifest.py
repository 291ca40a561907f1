"""The manifest: what an atlas is (model, hook, dictionary, metrics, corpus, config, versions) and
which files of it are current. It is the commit record of every change: written last, atomically,
and naming the folder of published parts, the DuckDB file and the LanceDB table versions readers
open, so a change that dies half-way leaves readers on the previous, whole state.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import DamagedAtlas

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
DICTIONARY = "dictionary"
# The dictionary's files (SAELens layout; ``ingest.sae`` writes and reads them).
DICTIONARY_CFG = "cfg.json"
DICTIONARY_WEIGHTS = "sae_weights.safetensors"
# The key in the dictionary's cfg.json metadata listing the widths of a stack of dictionaries
# trained apart (``ingest/sae.py``'s ``SAE.stack``), whose tensors lie side by side in one file.
STACKED_WIDTHS = "stacked_widths"
STACKED_K = "stacked_k"  # and each one's k (loaded dictionaries of one release may differ)
LANCE = "lance"
DUCKDB = "analytics.duckdb"
CACHE = "cache"
# Each publish writes its parts to a new folder under this one (``data/<id>/``); the manifest names
# the current one. Atlases of format 1 kept their parts at the top level.
DATA = "data"
# The layout this code writes; it reads every format up to this one.
FORMAT = 2
# Whose versions a manifest records.
PACKAGES = ("featureatlas", "torch", "transformers", "sentence-transformers", "duckdb", "lancedb", "litestar")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write to a temporary name in the same folder, then rename: readers see old or new, never half.
    The file is synced before the rename and the folder after it, so once this returns a power cut
    cannot undo the rename (on POSIX a rename lives in the folder's entry, not in the file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())  # a full disk fails here, before the old file is replaced
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the manifest from other readers
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    sync_folder(path.parent)


def sync_folder(folder: Path) -> None:
    """fsync a folder's entries, so a rename in it survives a power cut. Windows cannot open a
    folder for that (its renames are journalled), and some network and FUSE file systems refuse it:
    the rename has happened either way, so a refusal is logged, not raised."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        log.warning("could not sync folder %s (%s): a power cut now could undo its last rename", folder, e)


def read(root: Path) -> dict[str, Any] | None:
    """The manifest of the atlas at ``root``, or None where there is none (no atlas, or a publish
    that died before its commit). One that does not parse, or is of a newer format, is
    ``DamagedAtlas`` with what to do."""
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise DamagedAtlas(path, f"is not valid JSON ({e}); re-run `featureatlas ingest` on {root} to publish it "
                                 "again (finished stages are reused)") from None
    if not isinstance(manifest, dict) or "dictionary" not in manifest:
        raise DamagedAtlas(path, f"is not a Feature Atlas manifest; re-run `featureatlas ingest` on {root}")
    if int(manifest.get("format", 1)) > FORMAT:
        raise DamagedAtlas(path, f"is of format {manifest['format']}, written by a newer Feature Atlas; this one "
                                 f"reads formats up to {FORMAT}: upgrade featureatlas to open it")
    return manifest


def write(root: Path, manifest: dict[str, Any]) -> None:
    write_json_atomic(root / MANIFEST, manifest)


def folder(manifest: dict[str, Any]) -> str:
    """The published parts' folder relative to the atlas root ("" for format 1: the root itself)."""
    return manifest.get("published", {}).get("folder", "")


def duckdb_file(manifest: dict[str, Any]) -> str:
    """The DuckDB file readers open (a re-label writes a new one; atlases before pins had one name)."""
    return manifest.get("published", {}).get("duckdb", DUCKDB)


def lance_version(manifest: dict[str, Any], table: str) -> int | None:
    """The LanceDB version of ``table`` readers open; None (the latest) for atlases before pins."""
    return manifest.get("published", {}).get("lance", {}).get(table)


def pin(manifest: dict[str, Any], *, folder: str, duckdb: str, lance: dict[str, int]) -> dict[str, Any]:
    return {**manifest, "format": FORMAT, "published": {"folder": folder, "duckdb": duckdb, "lance": lance}}


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
