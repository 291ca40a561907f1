"""Writing an atlas: both databases are built in a staging folder, then swapped in.

The manifest is the commit record: it is removed before the swap and written (atomically) after, so
a crash at any point leaves either the previous atlas, or a folder that ``Atlas`` refuses to open —
never a half atlas that opens.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import duckdb
import lancedb
import pyarrow as pa
from lancedb.index import FTS, BTree, IvfHnswSq

from .atlas import CACHE, DUCKDB, LANCE, MANIFEST, PUBLISHED, write_json_atomic
from .schema import DUCKDB_DDL, EXAMPLES_SCHEMA, features_schema

STAGING = ".staging"
# Below this many features an exact scan beats any ANN index (and is exact).
ANN_MIN_ROWS = 50_000


def search_text(labels: list[str], top_tokens: list[list[str]]) -> pa.Array:
    """What the full-text index covers: the label and the feature's top tokens."""
    return pa.array([f"{label} {' '.join(t.strip() for t in tokens)}" for label, tokens in zip(labels, top_tokens)], pa.string())


def write_lance(folder: Path, features: pa.Table, examples: pa.Table, d_model: int) -> None:
    if "search_text" not in features.column_names:
        features = features.append_column(
            "search_text", search_text(features["label"].to_pylist(), features["top_tokens"].to_pylist()))
    db = lancedb.connect(str(folder))
    tables = {}
    for name, table, schema in (("features", features, features_schema(d_model)), ("examples", examples, EXAMPLES_SCHEMA)):
        tables[name] = db.create_table(name, table.select(schema.names).cast(schema), mode="overwrite")
    create_indexes(tables["features"], tables["examples"])


def create_indexes(features, examples) -> None:
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


def write_duckdb(path: Path, tables: dict[str, pa.Table]) -> None:
    """``tables``: Arrow tables for documents, tokens, activations and features, with at least the
    columns of ``DUCKDB_DDL`` (extra columns are ignored)."""
    con = duckdb.connect(str(path))
    try:
        con.execute(DUCKDB_DDL)
        for name, table in tables.items():
            columns = [c[0] for c in con.execute(f"describe {name}").fetchall()]
            con.register("incoming", table.select(columns))
            con.execute(f"insert into {name} select * from incoming")
            con.unregister("incoming")
        # Ordered by feature so per-feature scans touch few row groups.
        con.execute("create table activations_sorted as select * from activations order by feature_id, value desc")
        con.execute("drop table activations")
        con.execute("alter table activations_sorted rename to activations")
        con.execute("checkpoint")
    finally:
        con.close()


# The columns a re-labelling replaces, in LanceDB and in DuckDB's copy of the feature table.
LABEL_COLUMNS = ("label", "label_source", "label_score", "label_scores", "single_token", "label_embedding")


def update_labels(root: Path, labels: pa.Table, candidates: pa.Table, summary: dict[str, Any]) -> None:
    """Replace the labels of the features in ``labels`` (``feature_id`` + ``LABEL_COLUMNS``) in a
    published atlas, each database in one atomic step: LanceDB commits a new table version (older
    versions stay readable) and DuckDB is rewritten as a copy that replaces the file by rename, so
    a server reading the atlas sees old or new labels, never a mix within one database."""
    ids = labels["feature_id"].to_pylist()
    id_list = ", ".join(str(int(i)) for i in ids)
    table = lancedb.connect(str(root / LANCE)).open_table("features")
    current = table.search().where(f"feature_id in ({id_list})").limit(len(ids)).to_arrow()
    new = dict(zip(labels["feature_id"].to_pylist(), range(len(ids))))
    take = pa.array([new[i] for i in current["feature_id"].to_pylist()])
    for name in LABEL_COLUMNS:
        current = current.set_column(current.schema.get_field_index(name), name,
                                     labels[name].take(take).cast(current.schema.field(name).type))
    current = current.set_column(current.schema.get_field_index("search_text"), "search_text",
                                 search_text(current["label"].to_pylist(), current["top_tokens"].to_pylist()))
    table.merge_insert("feature_id").when_matched_update_all().execute(current.select(table.schema.names))
    table.optimize()  # folds the rewritten rows into the full-text, scalar and vector indexes

    path = root / DUCKDB
    tmp = path.with_name(f".{path.name}.relabel")
    shutil.copyfile(path, tmp)
    con = duckdb.connect(str(tmp))
    try:
        con.register("new_labels", labels.select(["feature_id", "label", "label_source", "label_score", "single_token"]))
        con.execute(
            """update features set label = n.label, label_source = n.label_source, label_score = n.label_score,
                      single_token = n.single_token from new_labels n where features.feature_id = n.feature_id"""
        )
        con.register("new_candidates", candidates)
        con.execute("delete from label_candidates where feature_id in (select feature_id from new_labels)")
        con.execute("insert into label_candidates select * from new_candidates")
        con.execute("checkpoint")
    finally:
        con.close()
    os.replace(tmp, path)

    manifest = json.loads((root / MANIFEST).read_text())
    manifest["labels"] = summary
    write_json_atomic(root / MANIFEST, manifest)


def publish(root: Path, build: Callable[[Path], None], manifest: dict[str, Any]) -> None:
    """``build(staging)`` writes every part in ``PUBLISHED`` under ``staging``; then they replace
    the atlas's parts and the manifest is written last."""
    root.mkdir(parents=True, exist_ok=True)
    staging = root / CACHE / STAGING
    if staging.exists():
        shutil.rmtree(staging)  # left by a crash: rebuilt whole, never trusted
    staging.mkdir(parents=True)
    build(staging)
    missing = [p for p in PUBLISHED if not (staging / p).exists()]
    if missing:
        raise RuntimeError(f"publish: build did not write {missing}")
    old = staging / "old"
    old.mkdir()
    (root / MANIFEST).unlink(missing_ok=True)
    for part in PUBLISHED:
        if (root / part).exists():
            (root / part).rename(old / part)
        (staging / part).rename(root / part)
    write_json_atomic(root / MANIFEST, manifest)
    shutil.rmtree(staging)

