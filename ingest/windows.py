"""The windows stage: every ``WINDOW`` tokens of every document, with its text and sentence embedding.

Embedded once per corpus and shared: the labels stage judges labels on these windows, and corpus
search (``store.corpus_search``) finds the windows that match a query in the published copy.
A window's text is its tokens joined as the model saw them, so it lines up with the activations
table by ``(doc_id, position // WINDOW)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from featureatlas.store.schema import WINDOW, WINDOWS

WINDOWS_VERSION = 1
OUTPUTS = ("windows.parquet",)


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


def run(documents: pa.Table, tokens: pa.Table, embed_fn: Callable[[list[str]], np.ndarray], folder: Path) -> dict:
    table = cut_windows(documents, tokens)
    vectors = np.asarray(embed_fn(table["text"].to_pylist()), dtype=np.float32).reshape(table.num_rows, -1)
    columns = {name: table[name] for name in table.column_names}
    columns["embedding"] = pa.FixedSizeListArray.from_arrays(vectors.ravel(), vectors.shape[1])
    pq.write_table(WINDOWS.build(columns), folder / OUTPUTS[0])
    return {"windows": table.num_rows}
