"""What an atlas holds, as one fingerprint per published table: two builds of the same config are
the same atlas when their digests are equal (the Ray path against the local one, a resumed run
against a clean one). A table's fingerprint is its row count and the sum of a hash of every row, so
the order a build wrote its rows in does not count (ties are written in any order) and nothing is
sorted; the manifest (times, stage seconds) is left out on purpose.
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from .atlas import Atlas
from .schema import DUCKDB_TABLES

FINGERPRINT = "select count(*), coalesce(sum(hash(t)::hugeint), 0) from {table} t"


def atlas_digest(root: Path) -> dict[str, str]:
    """``{table: fingerprint}`` over every DuckDB table (activations, features with their statistics
    and labels, ...) and every LanceDB table (decoder and label vectors, examples, window
    embeddings), as the manifest pins them."""
    atlas = Atlas(root)
    try:
        out = {spec.name: _format(atlas.query(FINGERPRINT.format(table=spec.name)).rows[0]) for spec in DUCKDB_TABLES
               if spec.name in atlas.duckdb_tables}
        con = duckdb.connect()  # the LanceDB tables, as Arrow, in a database of their own
        for name, table in (("features", atlas.features), ("examples", atlas.examples), ("windows", atlas.windows)):
            con.register("rows", table.to_arrow())
            out[f"lance.{name}"] = _format(con.execute(FINGERPRINT.format(table="rows")).fetchall()[0])
            con.unregister("rows")
        con.close()
    finally:
        atlas.close()
    return out


def _format(row: tuple) -> str:
    return f"{row[0]} rows, {row[1]:x}"
