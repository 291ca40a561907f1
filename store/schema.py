"""Every table of an atlas, declared once: LanceDB's Arrow schemas, DuckDB's DDL, the columns a
re-label owns and the scalar copy of the features that SQL joins against are all derived from the
declarations below. Readers and writers both import from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa

EMBEDDING_DIM = 384
# Tokens per corpus window (``position // WINDOW`` within a document): the unit that labels are
# judged on and that corpus search matches a query against. Short enough that one window is about
# one thing, long enough for a sentence embedder to read it.
WINDOW = 16
# Below this many features an exact scan beats any ANN index (and is exact): publish builds the
# vector indexes from here on, search asks them.
ANN_MIN_ROWS = 50_000

_LOGITS = pa.list_(pa.struct([("token", pa.string()), ("value", pa.float32())]))
_KINDS = pa.list_(pa.struct([("kind", pa.string()), ("share", pa.float32()), ("recall", pa.float32())]))
_SQL_TYPES = {pa.int32(): "integer", pa.int64(): "bigint", pa.float32(): "real", pa.float64(): "double",
              pa.string(): "varchar", pa.bool_(): "boolean"}


@dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType | Callable[[int], pa.DataType]  # a callable takes d_model (the decoder's width)
    sql: bool = True  # also in DuckDB (scalars only)
    labels: bool = False  # rewritten by a re-label (``featureatlas label``)
    key: bool = False  # DuckDB primary key


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[Column, ...]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    def arrow(self, d_model: int = 0) -> pa.Schema:
        return pa.schema([(c.name, c.type(d_model) if callable(c.type) else c.type) for c in self.columns])

    @property
    def sql_names(self) -> list[str]:
        return [c.name for c in self.columns if c.sql]

    def ddl(self) -> str:
        cols = ", ".join(f"{c.name} {_SQL_TYPES[c.type]}{' primary key' if c.key else ''}" for c in self.columns if c.sql)
        return f"create table {self.name} ({cols});"

    @property
    def label_names(self) -> list[str]:
        return [c.name for c in self.columns if c.labels]

    def build(self, columns: dict, d_model: int = 0) -> pa.Table:
        """An Arrow table of this declaration from column data (every column, cast to its type)."""
        return pa.table({c: columns[c] for c in self.names}, schema=self.arrow(d_model))


def vector_matrix(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """[rows, dim] the values of a fixed-size-list (vector) column, in row order. ``flatten`` keeps a
    sliced array's offset, which ``.values`` would drop."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.flatten().to_numpy().reshape(len(column), -1)


def _vector(d_model: int) -> pa.DataType:
    return pa.list_(pa.float32(), d_model)


FEATURES = Table("features", (
    Column("feature_id", pa.int32(), key=True),
    Column("decoder", _vector, sql=False),  # unit norm
    Column("label", pa.string(), labels=True),
    # the evidence behind the label in one line: top tokens with their share of the activation
    # mass, the tokens before them, the sources it fires in
    Column("description", pa.string(), labels=True),
    # label + top tokens, the column the full-text index covers
    Column("search_text", pa.string(), sql=False),
    Column("label_source", pa.string(), labels=True),  # the explainer that wrote the kept label, or "none"
    Column("label_score", pa.float32(), labels=True),  # the first scorer's score on held-out windows; null if unscored
    Column("label_scores", pa.list_(pa.struct([("scorer", pa.string()), ("score", pa.float32())])), sql=False, labels=True),
    # top activations all on one token: token matching scores it high trivially
    Column("single_token", pa.bool_(), labels=True),
    Column("label_embedding", pa.list_(pa.float32(), EMBEDDING_DIM), sql=False, labels=True),
    # the kind of token most of its activation mass lies in, by its key ("uppercase", "parameter"), or null
    Column("kind", pa.string(), labels=True),
    # every kind worth searching it by (ingest/labels/kinds.py): share of its mass, share of the kind's tokens it fires on
    Column("kinds", _KINDS, sql=False, labels=True),
    Column("context_embedding", pa.list_(pa.float32(), EMBEDDING_DIM), sql=False),
    Column("density", pa.float64()),  # fraction of encoded tokens where it fires
    Column("n_active", pa.int64()),
    Column("n_windows", pa.int64()),  # corpus windows (``WINDOW``) it fires in: corpus search's background
    Column("mean_activation", pa.float32()),  # mean over the tokens where it fires
    Column("max_activation", pa.float32()),
    Column("top_tokens", pa.list_(pa.string()), sql=False),
    Column("logit_positive", _LOGITS, sql=False),
    Column("logit_negative", _LOGITS, sql=False),
    # counts in equal-width bins over [0, max_activation]
    Column("histogram", pa.list_(pa.int64()), sql=False),
    # the feature map (ingest/feature_map.py): UMAP of the decoder directions, in [-1, 1]
    Column("map_x", pa.float32()),
    Column("map_y", pa.float32()),
))

EXAMPLES = Table("examples", (
    Column("feature_id", pa.int32()),
    Column("kind", pa.string()),  # top | quantile
    Column("doc_id", pa.int32()),
    Column("start", pa.int32()),  # document position of tokens[0]
    Column("tokens", pa.list_(pa.string())),
    Column("activations", pa.list_(pa.float32())),
    Column("max_activation", pa.float32()),
    Column("max_position", pa.int32()),  # document position of the strongest token
))

# Every candidate label every explainer proposed, with its embedding AUROC and token correlation on
# the choose windows (their sum chooses) and on held-out windows (reported); failed LLM calls are
# rows with status "failed".
LABEL_CANDIDATES = Table("label_candidates", (
    Column("feature_id", pa.int32()),
    Column("explainer", pa.string()),
    Column("kind", pa.string()),
    Column("label", pa.string()),
    Column("status", pa.string()),
    Column("detail", pa.string()),
    Column("choice_auroc", pa.float32()),
    Column("choice_token", pa.float32()),
    Column("holdout_auroc", pa.float32()),
    Column("holdout_token", pa.float32()),
    Column("chosen", pa.bool_()),
))

DOCUMENTS = Table("documents", (
    Column("doc_id", pa.int32(), key=True),
    Column("doc_key", pa.string()),
    Column("source", pa.string()),
    Column("title", pa.string()),
    Column("text", pa.string()),
))

TOKENS = Table("tokens", (
    Column("doc_id", pa.int32()),
    Column("position", pa.int32()),
    Column("token_id", pa.int32()),
    Column("token", pa.string()),
    Column("split", pa.string()),  # train | eval
))

# The sparse code of every encoded token: every active latent, however many (no cap at k).
ACTIVATIONS = Table("activations", (
    Column("doc_id", pa.int32()),
    Column("position", pa.int32()),
    Column("feature_id", pa.int32()),
    Column("value", pa.float32()),
))

# Every window of the corpus with its sentence embedding: corpus search finds the windows that match
# a query here (by vector, in LanceDB); SQL sees their text.
WINDOWS = Table("windows", (
    Column("doc_id", pa.int32()),
    Column("window_index", pa.int32()),  # position // WINDOW
    Column("source", pa.string()),
    Column("text", pa.string()),
    Column("embedding", pa.list_(pa.float32(), EMBEDDING_DIM), sql=False),  # unit norm
))

# DuckDB holds every table's SQL columns (for features, a scalar copy to join against); LanceDB
# holds FEATURES whole (vectors, full text), EXAMPLES and WINDOWS (with their embeddings).
DUCKDB_TABLES = (DOCUMENTS, TOKENS, WINDOWS, ACTIVATIONS, FEATURES, LABEL_CANDIDATES)
