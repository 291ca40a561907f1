"""The windows stage: every ``WINDOW`` tokens of every document, with its text and sentence embedding.

Embedded once per corpus and shared: the labels stage judges labels on these windows, and corpus
search (``store.corpus_search``) finds the windows that match a query in the published copy.
A window's text is its tokens joined as the model saw them, so it lines up with the activations
table by ``(doc_id, position // WINDOW)``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from featureatlas.store.schema import WINDOW, WINDOWS

from .stages import written_atomically

WINDOWS_VERSION = 2
OUTPUTS = ("windows.parquet",)
SHARD_WINDOWS = 4096  # windows embedded per shard: about half a minute of MiniLM on two cores


def cut_windows(documents: pa.Table, tokens: pa.Table) -> pa.Table:
    """(doc_id, window, source, text) of every window, in document order; no embedding yet."""
    con = duckdb.connect()
    try:
        con.register("documents", documents)
        con.register("tokens", tokens)
        return con.sql(
            f"""
            select t.doc_id, (t.position // {WINDOW})::int as window_index, any_value(d.source) as source,
                   trim(string_agg(t.token, '' order by t.position)) as text
            from tokens t join documents d using (doc_id) group by all order by all
            """
        ).to_arrow_table()
    finally:
        con.close()


def shards(table: pa.Table) -> int:
    """Shards of ``SHARD_WINDOWS`` windows of ``cut_windows``'s table."""
    return max(1, -(-table.num_rows // SHARD_WINDOWS))


def embed_shard(table: pa.Table, embed_fn: Callable[[list[str]], np.ndarray], folder: Path, i: int) -> dict:
    """The embeddings of shard ``i`` of ``table`` (``cut_windows``'s), written atomically."""
    t0 = time.perf_counter()
    texts = table["text"].slice(i * SHARD_WINDOWS, SHARD_WINDOWS).to_pylist()
    vectors = np.asarray(embed_fn(texts), dtype=np.float32).reshape(len(texts), -1)
    with written_atomically(_embedding_path(folder, i)) as tmp:
        np.save(tmp, vectors)
    return {"windows": len(texts), "seconds": time.perf_counter() - t0}


def run(table: pa.Table, folder: Path) -> dict:
    """The windows table: ``cut_windows``'s rows with the embeddings its shards wrote."""
    vectors = np.concatenate([np.load(_embedding_path(folder, i)) for i in range(shards(table))])
    columns = {name: table[name] for name in table.column_names}
    columns["embedding"] = pa.FixedSizeListArray.from_arrays(vectors.ravel(), vectors.shape[1])
    pq.write_table(WINDOWS.build(columns), folder / OUTPUTS[0])
    return {"windows": table.num_rows}


def _embedding_path(folder: Path, i: int) -> Path:
    return folder / f"embedding-{i:05d}.npy"
