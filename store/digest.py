"""What an atlas holds, as one hash per published table: two builds of the same config are the same
atlas when their digests are equal (the Ray path against the local one, a resumed run against a
clean one). Rows are hashed in a canonical order, so the order a build wrote them in does not count;
the manifest (times, stage seconds) is left out on purpose.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import duckdb
import lancedb
import pyarrow as pa

from . import manifest as M
from .schema import DUCKDB_TABLES, EXAMPLES, FEATURES, WINDOWS


def atlas_digest(root: Path) -> dict[str, str]:
    """``{table: sha256}`` over every DuckDB table (activations, features with their statistics
    and labels, ...) and every LanceDB table (decoder and label vectors, examples, window embeddings)."""
    manifest = M.read(Path(root)) or {}
    base = Path(root) / M.folder(manifest)  # the parts the manifest names (a mirror has no top-level links)
    con = duckdb.connect(str(base / M.duckdb_file(manifest)), read_only=True)
    try:
        out = {spec.name: _hash(con.sql(f"select * from {spec.name} order by all").to_arrow_table())
               for spec in DUCKDB_TABLES}
    finally:
        con.close()
    db = lancedb.connect(str(base / M.LANCE))
    for spec in (FEATURES, EXAMPLES, WINDOWS):
        table = db.open_table(spec.name)
        version = M.lance_version(manifest, spec.name)
        if version is not None:  # the version the manifest pins (a re-label writes a newer one)
            table.checkout(version)
        rows = table.to_arrow()  # noqa: F841 (read by the query below)
        out[f"lance.{spec.name}"] = _hash(duckdb.sql("select * from rows order by all").to_arrow_table())
    return out


def _hash(table: pa.Table) -> str:
    """SHA-256 of the table's Arrow IPC stream, in one chunk (so batch boundaries do not count)."""
    sink = pa.BufferOutputStream()
    combined = table.combine_chunks()
    with pa.ipc.new_stream(sink, combined.schema) as writer:
        writer.write_table(combined)
    return hashlib.sha256(sink.getvalue()).hexdigest()
