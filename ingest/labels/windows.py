"""The text labels are judged on: a document split explainers never cross, and pools of short windows.

Documents fall in three parts by a hash of their key (stable across runs and atlases): explainers
write labels from ``explain`` documents only (3 in 5); the candidate labels of a feature compete on
``choose`` windows (1 in 5); the kept label is scored on ``holdout`` windows (1 in 5). So a
candidate is never chosen on the text it was written from (a label built from a feature's top
windows would win there by construction), and the reported score comes from documents that neither
writing nor choosing saw.

A window is ``WINDOW`` consecutive tokens of one document (``position // WINDOW``). Every window of
the corpus is embedded once by the windows stage (``ingest/windows.py``) and shared by all features:
embedding per feature would not scale past a few thousand features. (Overlapping windows that show
each token with its preceding context were tried on the quick atlas: no better AUROC, twice the
embedding.)
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import duckdb
import numpy as np
import pyarrow as pa
from featureatlas.store.schema import WINDOW, vector_matrix

PARTS = ("explain", "explain", "explain", "choose", "holdout")


def split_parts(doc_keys: Sequence[str]) -> np.ndarray:
    """The part (explain | choose | holdout) of each document."""
    return np.array([PARTS[zlib.crc32(b"label-split/" + k.encode()) % len(PARTS)] for k in doc_keys], dtype=object)


def label_connection(con: duckdb.DuckDBPyConnection) -> duckdb.DuckDBPyConnection:
    """Registers ``label_split(doc_id, part)`` on a connection that holds the atlas tables
    ``documents``, ``tokens`` and ``activations`` (published or about to be)."""
    doc_id, keys = zip(*con.execute("select doc_id, doc_key from documents order by doc_id").fetchall()) or ((), ())
    con.register("label_split", pa.table({"doc_id": pa.array(doc_id, pa.int32()),
                                          "part": pa.array(split_parts(keys), pa.string())}))
    return con


@dataclass
class WindowPool:
    """Every window of one part of the split, with its text, tokens and embedding."""

    part: str
    doc_id: np.ndarray  # [n] int
    window: np.ndarray  # [n] int, position // WINDOW
    texts: list[str]
    token_ids: list[np.ndarray]
    token_texts: list[list[str]]
    positions: list[np.ndarray]  # document position of each token
    embeddings: np.ndarray | None  # [n, dim], unit norm; None for a pool that is only read

    def __len__(self) -> int:
        return len(self.texts)

    @cached_property
    def flat(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every token of the pool in one array: (token ids, pool row, document position)."""
        if len(self) == 0:
            empty = np.zeros(0, np.int64)
            return empty, empty, empty
        rows = np.repeat(np.arange(len(self)), [len(t) for t in self.token_ids])
        return np.concatenate(self.token_ids), rows, np.concatenate(self.positions)

    @cached_property
    def _index(self) -> "KeyIndex":
        return KeyIndex(self.doc_id << 32 | self.window)

    def rows(self, doc_id: np.ndarray, window: np.ndarray) -> np.ndarray:
        """Pool row of each (doc_id, window) pair; -1 where the pool has none."""
        return self._index.find(np.asarray(doc_id, dtype=np.int64) << 32 | np.asarray(window, dtype=np.int64))


class KeyIndex:
    """Where each wanted int64 key sits in an unsorted array of distinct keys (binary search); -1 if absent."""

    def __init__(self, keys: np.ndarray):
        self._order = np.argsort(keys)
        self._sorted = keys[self._order]

    def find(self, want: np.ndarray) -> np.ndarray:
        if len(self._sorted) == 0:
            return np.full(len(want), -1, dtype=np.int64)
        at = np.clip(np.searchsorted(self._sorted, want), 0, len(self._sorted) - 1)
        return np.where(self._sorted[at] == want, self._order[at], -1)


def window_pool(
    con: duckdb.DuckDBPyConnection, *, part: str, embed_fn=None, stored: pa.Table | None = None,
    max_windows: int | None = None, seed: int = 0
) -> WindowPool:
    """The windows of one part of the split (a random ``max_windows`` of them when capped), with
    their embeddings from ``stored`` (the windows stage's table: doc_id, window, embedding) when
    given, else embedded with ``embed_fn(texts) -> [n, dim]`` when that is given."""
    table = con.sql(
        f"""
        select t.doc_id, t.position // {WINDOW} as w, string_agg(t.token, '' order by t.position) as text,
               list(t.token_id order by t.position) as ids, list(t.position order by t.position) as pos,
               list(t.token order by t.position) as toks
        from tokens t join label_split s using (doc_id)
        where s.part = '{PARTS[PARTS.index(part)]}' group by all order by all
        """
    ).to_arrow_table()
    if max_windows is not None and table.num_rows > max_windows:
        keep = np.sort(np.random.default_rng(seed).choice(table.num_rows, max_windows, replace=False))
        table = table.take(keep)
    texts = [t.strip() for t in table["text"].to_pylist()]
    doc_id = table["doc_id"].to_numpy().astype(np.int64)
    window = table["w"].to_numpy().astype(np.int64)
    if stored is not None:
        embeddings = stored_embeddings(stored, doc_id, window)
    else:
        embeddings = None if embed_fn is None else np.asarray(embed_fn(texts), dtype=np.float32)
    return WindowPool(
        part=part,
        doc_id=doc_id,
        window=window,
        texts=texts,
        token_ids=[np.asarray(x, dtype=np.int64) for x in table["ids"].to_pylist()],
        token_texts=table["toks"].to_pylist(),
        positions=[np.asarray(x, dtype=np.int64) for x in table["pos"].to_pylist()],
        embeddings=embeddings,
    )


def stored_embeddings(stored: pa.Table, doc_id: np.ndarray, window: np.ndarray) -> np.ndarray:
    """[n, dim] the stored embedding of each (doc_id, window)."""
    keys = stored["doc_id"].to_numpy().astype(np.int64) << 32 | stored["window_index"].to_numpy().astype(np.int64)
    rows = KeyIndex(keys).find(doc_id << 32 | window)
    if (rows < 0).any():
        raise RuntimeError(f"the windows table lacks {int((rows < 0).sum())} windows of the corpus: rebuild the atlas")
    return vector_matrix(stored["embedding"])[rows].astype(np.float32)
