"""Writing an atlas: a whole publish, and a re-label, each one atomic change.

The manifest is the commit record (``store.manifest``). A publish builds every part in a staging
folder, moves it whole to a new folder ``data/<id>/`` and then writes the manifest that names it: a
crash leaves the previous atlas as it was. A re-label writes a new DuckDB file and a new LanceDB
table version in the current folder, neither of which readers open until the manifest that names
them replaces the old one.

Nothing a reader may still be using is deleted: the parts the previous manifest named stay until
the next change, so a server that opened them a moment ago finishes its answers from them and
then moves to the new manifest (``api.live``). ``dictionary``, ``lance`` and ``analytics.duckdb`` at
the top of the atlas are links to the current parts, for people and peers' tools.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import shutil
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import duckdb
import lancedb
import pyarrow as pa
from lancedb.index import FTS, BTree, IvfHnswSq

from . import manifest as M
from .errors import BadParameter, DamagedAtlas, UserError
from .schema import ANN_MIN_ROWS, DUCKDB_TABLES, EXAMPLES, FEATURES, LABEL_CANDIDATES, WINDOWS

log = logging.getLogger(__name__)
STAGING = ".staging"
LOCK = ".writer.lock"
KEEP_VERSIONS = timedelta(days=365_000)
# The published parts, written together into one folder; the manifest naming it goes last.
PUBLISHED = (M.DICTIONARY, M.LANCE, M.DUCKDB)


def search_text(labels: list[str], top_tokens: list[list[str]]) -> pa.Array:
    """What the full-text index covers: the label and the feature's top tokens."""
    return pa.array([f"{label} {' '.join(t.strip() for t in tokens)}" for label, tokens in zip(labels, top_tokens)], pa.string())


def write_lance(folder: Path, features: pa.Table, examples: pa.Table, windows: pa.Table, d_model: int) -> dict[str, int]:
    """Every LanceDB table with its indexes; returns each one's version (the manifest pins them)."""
    if "search_text" not in features.column_names:
        features = features.append_column(
            "search_text", search_text(features["label"].to_pylist(), features["top_tokens"].to_pylist()))
    db = lancedb.connect(str(folder))
    tables = {}
    for spec, table in ((FEATURES, features), (EXAMPLES, examples), (WINDOWS, windows)):
        schema = spec.arrow(d_model)
        tables[spec.name] = db.create_table(spec.name, table.select(schema.names).cast(schema), mode="overwrite")
    create_indexes(tables["features"], tables["examples"], tables["windows"])
    return {name: t.version for name, t in tables.items()}


def create_indexes(features, examples, windows) -> None:
    """Full-text over labels, scalar indexes for by-id lookups, and, once brute force stops being
    cheap, ANN indexes over the vectors (tuned in ``store.search``)."""
    # The sync API's first positional argument is the column when ``config`` is given.
    features.create_index("search_text", config=FTS())
    features.create_index("feature_id", config=BTree())
    examples.create_index("feature_id", config=BTree())
    rows = features.count_rows()
    if rows >= ANN_MIN_ROWS:
        for column in ("decoder", "label_embedding", "context_embedding"):
            features.create_index(column, config=IvfHnswSq(distance_type="cosine", num_partitions=max(1, rows // 4096)))
    if windows.count_rows() >= ANN_MIN_ROWS:
        windows.create_index("embedding", config=IvfHnswSq(distance_type="cosine",
                                                           num_partitions=max(1, windows.count_rows() // 4096)))


def write_duckdb(path: Path, tables: dict[str, pa.Table]) -> None:
    """``tables``: an Arrow table for each of ``DUCKDB_TABLES`` with at least its SQL columns
    (extra columns are ignored)."""
    missing = {t.name for t in DUCKDB_TABLES} - set(tables)
    if missing:
        raise ValueError(f"write_duckdb: no data for {sorted(missing)}")
    con = duckdb.connect(str(path))
    try:
        for spec in DUCKDB_TABLES:
            con.execute(spec.ddl())
            con.register("incoming", tables[spec.name].select(spec.sql_names))
            con.execute(f"insert into {spec.name} select * from incoming")
            con.unregister("incoming")
        # Ordered by feature so per-feature scans touch few row groups.
        con.execute("create table activations_sorted as select * from activations order by feature_id, value desc")
        con.execute("drop table activations")
        con.execute("alter table activations_sorted rename to activations")
        con.execute("checkpoint")
    finally:
        con.close()


@contextmanager
def writer_lock(root: Path) -> Iterator[None]:
    """One writer at a time per atlas (a publish or a re-label); readers never wait."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BadParameter("--atlas", f"another ingest or re-label is writing {root}; try again when it ends") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def publish(root: Path, build: Callable[[Path], dict[str, int]], manifest: dict[str, Any]) -> None:
    """``build(staging)`` writes every part in ``PUBLISHED`` under ``staging`` and returns the
    LanceDB table versions; then the folder becomes ``data/<id>`` and the manifest naming it is
    written last."""
    with writer_lock(root):
        _publish(root, build, manifest)


def _publish(root: Path, build: Callable[[Path], dict[str, int]], manifest: dict[str, Any]) -> None:
    staging = root / M.CACHE / STAGING
    if staging.exists():
        shutil.rmtree(staging)  # left by a crash: rebuilt whole, never trusted
    previous = _current_folder(root)
    folder = f"{M.DATA}/{time.time_ns()}"
    try:
        staging.mkdir(parents=True)
        versions = build(staging)
        missing = [p for p in PUBLISHED if not (staging / p).exists()]
        if missing:
            raise RuntimeError(f"publish: build did not write {missing}")
        (root / M.DATA).mkdir(exist_ok=True)
        staging.rename(root / folder)
        M.sync_folder(root / M.DATA)  # the parts' rename on disk before the manifest that names them
        M.write(root, M.pin(manifest, folder=folder, duckdb=M.DUCKDB, lance=versions))
    except BaseException as e:
        # Whatever stopped it (DuckDB and LanceDB report a full disk as their own errors), the
        # unfinished copy goes: left there it would keep the disk full.
        shutil.rmtree(staging, ignore_errors=True)
        if _current_folder(root) != folder:
            shutil.rmtree(root / folder, ignore_errors=True)
        if getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e):
            raise DiskFull(root) from None
        raise
    try:  # committed: what follows is tidying, which a failure must not turn into a failed publish
        _link_current(root)
        _remove_retired(root, keep={folder, previous})
    except OSError:
        log.warning("published %s, but could not update its links or remove old parts", root, exc_info=True)


class DiskFull(UserError):
    kind = "disk full"

    def __init__(self, root: Path):
        super().__init__(str(root), "the disk filled while publishing; the atlas is unchanged and the unfinished "
                                    "copy was removed: free some space and re-run (finished stages are reused)")


def _current_folder(root: Path) -> str | None:
    """The folder the manifest names now, or None where there is no readable manifest."""
    try:
        manifest = M.read(root)
    except DamagedAtlas:
        return None
    return M.folder(manifest) if manifest is not None else None


def _link_current(root: Path) -> None:
    """Point the top-level names at the current parts (each link replaced atomically). A name
    still held by a format-1 part is left alone until that part is retired."""
    manifest = M.read(root)
    base = M.folder(manifest or {})
    if manifest is None or not base:
        return
    for name, target in ((M.DICTIONARY, M.DICTIONARY), (M.LANCE, M.LANCE), (M.DUCKDB, M.duckdb_file(manifest))):
        path = root / name
        if path.exists() and not path.is_symlink():
            continue
        tmp = root / f".{name}.link"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(f"{base}/{target}")
        tmp.replace(path)


def _remove_retired(root: Path, *, keep: set[str | None]) -> None:
    """Every published folder but ``keep`` (the current one and the one before, which a reader may
    still use); format-1 parts at the top level once they are not among those."""
    if (root / M.DATA).is_dir():
        for path in (root / M.DATA).iterdir():
            if f"{M.DATA}/{path.name}" not in keep:
                shutil.rmtree(path, ignore_errors=True)
    if "" in keep:
        return
    for part in (M.DICTIONARY, M.LANCE):
        if (root / part).is_dir() and not (root / part).is_symlink():
            shutil.rmtree(root / part, ignore_errors=True)
    _remove_relabelled_copies(root, keep=set())
    _link_current(root)


def update_labels(root: Path, labels: pa.Table, candidates: pa.Table, summary: dict[str, Any],
                  config: dict[str, Any]) -> None:
    """Replace the labels of the features in ``labels`` (``feature_id`` + the label columns of
    ``FEATURES``) in a published atlas, as one change to both databases: a new DuckDB file and a new
    LanceDB version are written first, and readers move to both together when the manifest naming
    them is written. A crash before that leaves the previous labels in both. ``config``: the
    settings the labels were made with (the manifest records them)."""
    with writer_lock(root):
        manifest = M.read(root)
        if manifest is None:
            raise RuntimeError(f"{root} has no manifest")
        folder = M.folder(manifest)
        base = root / folder
        previous = M.duckdb_file(manifest)
        duckdb_name = _relabelled_duckdb(base, previous, labels, candidates)
        features_version = _relabelled_lance(base, M.lance_version(manifest, "features"), labels)
        lance = {**manifest.get("published", {}).get("lance", {}), "features": features_version}
        M.write(root, M.pin({**manifest, "labels": summary, "config": config}, folder=folder, duckdb=duckdb_name,
                            lance=lance))
        _link_current(root)
        # The file just replaced stays until the next change: a reader that read the old manifest
        # a moment ago can still open it.
        _remove_relabelled_copies(base, keep={duckdb_name, previous})


def _relabelled_duckdb(root: Path, current: str, labels: pa.Table, candidates: pa.Table) -> str:
    """A copy of the current DuckDB file with the new labels, under a new name (unpublished until
    the manifest names it)."""
    name = f"analytics.{time.time_ns()}.duckdb"
    tmp = root / f".{name}.tmp"
    shutil.copyfile(root / current, tmp)
    scalar = [c for c in FEATURES.label_names if c in FEATURES.sql_names]
    con = duckdb.connect(str(tmp))
    try:
        con.register("new_labels", labels.select(["feature_id", *scalar]))
        assignments = ", ".join(f"{c} = n.{c}" for c in scalar)
        con.execute(f"update features set {assignments} from new_labels n where features.feature_id = n.feature_id")
        con.register("new_candidates", candidates.select(LABEL_CANDIDATES.names))
        con.execute("delete from label_candidates where feature_id in (select feature_id from new_labels)")
        con.execute("insert into label_candidates select * from new_candidates")
        con.execute("checkpoint")
    finally:
        con.close()
    tmp.rename(root / name)
    return name


def _relabelled_lance(root: Path, version: int | None, labels: pa.Table) -> int:
    """A new version of the features table with the new labels; returns its number. Readers pinned
    to ``version`` keep reading that one."""
    table = lancedb.connect(str(root / M.LANCE)).open_table("features")
    if version is not None and version != table.version:
        table.restore(version)  # a re-label that died after its LanceDB commit: start from what readers see
    ids = labels["feature_id"].to_pylist()
    id_list = ", ".join(str(int(i)) for i in ids)
    current = table.search().where(f"feature_id in ({id_list})").limit(len(ids)).to_arrow()
    new = dict(zip(ids, range(len(ids))))
    take = pa.array([new[i] for i in current["feature_id"].to_pylist()])
    for name in FEATURES.label_names:
        current = current.set_column(current.schema.get_field_index(name), name,
                                     labels[name].take(take).cast(current.schema.field(name).type))
    current = current.set_column(current.schema.get_field_index("search_text"), "search_text",
                                 search_text(current["label"].to_pylist(), current["top_tokens"].to_pylist()))
    table.merge_insert("feature_id").when_matched_update_all().execute(current.select(table.schema.names))
    # Folds the rewritten rows into the full-text, scalar and vector indexes. Its default clean-up
    # would delete the files of versions over 7 days old, the pinned one among them, before the
    # manifest moves on: older versions are kept (a re-label adds about one features table's worth).
    table.optimize(cleanup_older_than=KEEP_VERSIONS)
    return table.version


def _remove_relabelled_copies(folder: Path, *, keep: set[str]) -> None:
    """DuckDB files in ``folder`` that are neither named by the manifest nor the one it named before
    (a reader may still be opening that), and any of a re-label that died before its commit. Called
    while holding the writer lock, so no other writer's file is in progress."""
    for path in folder.glob("analytics*.duckdb"):
        if path.name not in keep and not path.is_symlink():
            path.unlink(missing_ok=True)
    for path in folder.glob(".analytics.*.duckdb.tmp"):
        path.unlink(missing_ok=True)
