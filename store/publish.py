"""Writing an atlas: both databases are built in a staging folder, then swapped in.

The manifest is the commit record: it is removed before the swap and written (atomically) after, so
a crash at any point leaves either the previous atlas, or a folder that ``Atlas`` refuses to open —
never a half atlas that opens.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

import duckdb
import lancedb
import pyarrow as pa
from lancedb.index import FTS, BTree, IvfHnswSq

from .atlas import CACHE, MANIFEST, PUBLISHED, write_json_atomic
from .schema import DUCKDB_DDL, EXAMPLES_SCHEMA, features_schema

STAGING = ".staging"
# Below this many features an exact scan beats any ANN index (and is exact).
ANN_MIN_ROWS = 50_000



def write_lance(folder: Path, features: pa.Table, examples: pa.Table, d_model: int) -> None:
    if "search_text" not in features.column_names:
        text = [f"{label} {' '.join(t.strip() for t in tokens)}" for label, tokens in
                zip(features["label"].to_pylist(), features["top_tokens"].to_pylist())]
        features = features.append_column("search_text", pa.array(text, pa.string()))
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

