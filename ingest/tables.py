"""The published tables, assembled from the stages' outputs in the shapes ``store.schema``
declares: documents and tokens from the corpus, the features table from the encode, labels and map
stages. The labels stage reads the same tables a user's SQL sees once the atlas is published."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from featureatlas.store.schema import DOCUMENTS, TOKENS

from .labels.intervention import SCORER, merge_scores
from .sae import SAE
from .tokens import TokenizedCorpus


def documents_table(corpus: TokenizedCorpus) -> pa.Table:
    docs = corpus.documents
    return DOCUMENTS.build({
        "doc_id": np.arange(len(docs), dtype=np.int32),
        "doc_key": [d.doc_id for d in docs],
        "source": [d.source for d in docs],
        "title": [d.title for d in docs],
        "text": [d.text for d in docs],
    })


def tokens_table(corpus: TokenizedCorpus, is_bos: np.ndarray, is_eval: np.ndarray, vocab: list[str]) -> pa.Table:
    ctx = corpus.token_context()
    keep = ~is_bos
    position = corpus.ctx_start[ctx] + corpus.token_position() - 1
    return TOKENS.build({
        "doc_id": corpus.ctx_doc[ctx][keep],
        "position": position[keep].astype(np.int32),
        "token_id": corpus.ids[keep],
        "token": np.array(vocab, dtype=object)[corpus.ids[keep]],
        "split": np.where(is_eval[keep], "eval", "train"),
    })


def analytics_connection(documents: pa.Table, tokens: pa.Table, encode: Path, features: range) -> duckdb.DuckDBPyConnection:
    """An in-memory connection holding ``documents``, ``tokens`` and the encode stage's
    ``activations`` of ``features`` only: a label shard reads its own features' rows, so its tables
    grow with its share of the dictionary, not with the whole of it."""
    con = duckdb.connect()
    con.register("documents", documents)
    con.register("tokens", tokens)
    wanted = (pc.field("feature_id") >= features.start) & (pc.field("feature_id") < features.stop)
    con.register("activations", pq.read_table(encode / "activations.parquet", filters=wanted))
    return con


def features_table(sae: SAE, encode: Path, labels: Path, feature_map: Path, intervened: Path, *, primary: str) -> pa.Table:
    """One row per feature in id order: decoder, statistics, logit effects, labels (with the
    intervention stage's scores among ``label_scores``; ``primary``: the scorer that gives
    ``label_score``), map position (``store.publish`` casts it to ``FEATURES`` and adds the full-text column)."""
    columns = {"decoder": pa.FixedSizeListArray.from_arrays(sae.unit_decoder().numpy().astype(np.float32).ravel(), sae.d_in)}
    for table in (pq.read_table(encode / "stats.parquet"), pq.read_table(labels / "labels.parquet"),
                  pq.read_table(feature_map / "map.parquet")):
        if "feature_id" in table.column_names and table["feature_id"].to_pylist() != list(range(sae.d_sae)):
            raise RuntimeError("stage outputs are not one row per feature in id order")
        columns.update({name: table[name] for name in table.column_names})
    scored = pq.read_table(intervened / "intervention.parquet").to_pydict()
    label_score, label_scores = columns["label_score"].to_pylist(), columns["label_scores"].to_pylist()
    merge_scores(list(range(sae.d_sae)), label_score, label_scores, dict(zip(scored["feature_id"], scored["score"])),
                 primary=primary == SCORER)
    columns["label_score"] = pa.array(label_score, pa.float32())
    columns["label_scores"] = pa.array(label_scores, columns["label_scores"].type)
    return pa.table(columns)
