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
    doc: str  # what it holds: the schema reference (docs/) and anyone reading SQL results are told this
    sql: bool = True  # also in DuckDB (scalars only)
    labels: bool = False  # rewritten by a re-label (``featureatlas label``)
    key: bool = False  # DuckDB primary key


@dataclass(frozen=True)
class Table:
    name: str
    doc: str
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


FEATURES = Table("features", "one row per feature: its decoder direction, label, statistics and map position", (
    Column("feature_id", pa.int32(), "the feature's index in the dictionary", key=True),
    Column("decoder", _vector, "the decoder direction, unit norm, in the model's residual space", sql=False),
    Column("label", pa.string(), "the chosen label", labels=True),
    Column("description", pa.string(), "the evidence behind the label in one line: top tokens with their share of "
                                       "the activation mass, the tokens before them, the sources it fires in", labels=True),
    Column("search_text", pa.string(), "label and top tokens: what the full-text index covers", sql=False),
    Column("label_source", pa.string(), "the explainer that wrote the kept label, or none", labels=True),
    Column("label_score", pa.float32(), "the first scorer's score on held-out windows; null if unscored", labels=True),
    Column("label_scores", pa.list_(pa.struct([("scorer", pa.string()), ("score", pa.float32())])),
           "every scorer's score on held-out windows", sql=False, labels=True),
    Column("single_token", pa.bool_(), "its top activations are all on one token (token matching scores it high "
                                       "trivially)", labels=True),
    Column("label_embedding", pa.list_(pa.float32(), EMBEDDING_DIM), "the label's sentence embedding (label search)",
           sql=False, labels=True),
    Column("kind", pa.string(), "the kind of token most of its activation mass lies in, by key (uppercase, parameter), "
                                "or null", labels=True),
    Column("kinds", _KINDS, "every kind worth searching it by: share of its mass, share of the kind's tokens it fires on",
           sql=False, labels=True),
    Column("context_embedding", pa.list_(pa.float32(), EMBEDDING_DIM), "mean embedding of the windows it fires "
                                                                       "strongest in (context search)", sql=False),
    Column("density", pa.float64(), "fraction of encoded tokens where it fires"),
    Column("n_active", pa.int64(), "encoded tokens where it fires"),
    Column("n_windows", pa.int64(), "corpus windows it fires in: corpus search's background"),
    Column("mean_activation", pa.float32(), "mean over the tokens where it fires"),
    Column("max_activation", pa.float32(), "its largest activation on the corpus"),
    Column("top_tokens", pa.list_(pa.string()), "the tokens holding most of its activation mass", sql=False),
    Column("logit_positive", _LOGITS, "tokens whose logits its decoder direction raises most", sql=False),
    Column("logit_negative", _LOGITS, "tokens whose logits its decoder direction lowers most", sql=False),
    Column("histogram", pa.list_(pa.int64()), "counts of its activations in equal-width bins over [0, max_activation]",
           sql=False),
    Column("map_x", pa.float32(), "position on the feature map, in [-1, 1]"),
    Column("map_y", pa.float32(), "position on the feature map, in [-1, 1]"),
))

EXAMPLES = Table("examples", "each feature's top activating examples and examples across its activation quantiles", (
    Column("feature_id", pa.int32(), "the feature"),
    Column("kind", pa.string(), "top or quantile"),
    Column("doc_id", pa.int32(), "the document"),
    Column("start", pa.int32(), "document position of tokens[0]"),
    Column("tokens", pa.list_(pa.string()), "the example's tokens"),
    Column("activations", pa.list_(pa.float32()), "the feature's activation on each token"),
    Column("max_activation", pa.float32(), "the largest of them"),
    Column("max_position", pa.int32(), "document position of the strongest token"),
))

LABEL_CANDIDATES = Table(
    "label_candidates", "every candidate label every explainer proposed, with its embedding AUROC and token correlation "
                        "on the choose windows (their sum chooses) and on held-out windows (reported); failed LLM calls "
                        "are rows with status failed", (
        Column("feature_id", pa.int32(), "the feature"),
        Column("explainer", pa.string(), "contrastive or llm"),
        Column("kind", pa.string(), "what names the feature: token, pattern, topic, kind (of token) or llm"),
        Column("label", pa.string(), "the candidate's text"),
        Column("status", pa.string(), "ok, or failed for an LLM call that gave no label"),
        Column("detail", pa.string(), "why an LLM call failed"),
        Column("choice_auroc", pa.float32(), "embedding AUROC on the choose windows"),
        Column("choice_token", pa.float32(), "token correlation on the choose windows"),
        Column("holdout_auroc", pa.float32(), "embedding AUROC on held-out windows"),
        Column("holdout_token", pa.float32(), "token correlation on held-out windows"),
        Column("chosen", pa.bool_(), "the candidate that became the feature's label"),
    ))

DOCUMENTS = Table("documents", "the corpus, one row per document", (
    Column("doc_id", pa.int32(), "the document's number in the atlas", key=True),
    Column("doc_key", pa.string(), "its id in its source"),
    Column("source", pa.string(), "the corpus source (wiki-en, shakespeare, python, a file)"),
    Column("title", pa.string(), "its title, where the source has one"),
    Column("text", pa.string(), "its text"),
))

TOKENS = Table("tokens", "every harvested token", (
    Column("doc_id", pa.int32(), "the document"),
    Column("position", pa.int32(), "the token's position in it"),
    Column("token_id", pa.int32(), "the model's token id"),
    Column("token", pa.string(), "the token's text"),
    Column("split", pa.string(), "train or eval (held out from training)"),
))

ACTIVATIONS = Table("activations", "the sparse code of every encoded token: every active latent, however many (no cap "
                                   "at k)", (
    Column("doc_id", pa.int32(), "the document"),
    Column("position", pa.int32(), "the token's position in it"),
    Column("feature_id", pa.int32(), "an active feature"),
    Column("value", pa.float32(), "its activation"),
))

WINDOWS = Table("windows", "every window of the corpus with its sentence embedding: corpus search finds the windows that "
                           "match a query here (by vector, in LanceDB); SQL sees their text", (
    Column("doc_id", pa.int32(), "the document"),
    Column("window_index", pa.int32(), "position // WINDOW"),
    Column("source", pa.string(), "the corpus source"),
    Column("text", pa.string(), "the window's text"),
    Column("embedding", pa.list_(pa.float32(), EMBEDDING_DIM), "its sentence embedding, unit norm", sql=False),
))

DICTIONARIES = Table("dictionaries", "every dictionary of the atlas, one row each: where it reads the model, its size "
                                     "and how well it reconstructs held-out tokens (one row; one per width trained "
                                     "with --widths; or one per prefix of a matryoshka dictionary). Its features are "
                                     "the features table's with feature_id from first_feature to first_feature + d_sae "
                                     "- 1", (
    Column("dictionary", pa.string(), "its id: L<layer>-<width>, e.g. L15-4k", key=True),
    Column("is_default", pa.bool_(), "the widest, whose metrics the atlas's summary shows"),
    Column("first_feature", pa.int32(), "the feature_id of its first feature (0 for a prefix of a matryoshka "
                                        "dictionary, which shares its features with the wider ones)"),
    Column("hook", pa.string(), "the model activation it reads, e.g. blocks.15.hook_resid_post"),
    Column("layer", pa.int32(), "the block whose output it reads"),
    Column("architecture", pa.string(), "topk, batchtopk, jumprelu, relu or matryoshka (ingest/sae.py's registry)"),
    Column("source", pa.string(), "trained, or loaded (and from which format: loaded (saelens))"),
    Column("d_in", pa.int32(), "the width of the activations it reads"),
    Column("d_sae", pa.int32(), "its number of features"),
    Column("k", pa.int32(), "active latents per token for TopK-style dictionaries, else null"),
    Column("l0", pa.float64(), "mean active latents per held-out token"),
    Column("variance_explained", pa.float64(), "1 - FVU on held-out tokens"),
    Column("variance_explained_without_outliers", pa.float64(), "the same without the few tokens of huge norm"),
    Column("loss_recovered", pa.float64(), "share of the next-token loss gap (zero-ablation to clean) it closes"),
    Column("dead_fraction", pa.float64(), "share of its features that never fire on held-out tokens"),
    Column("training", pa.string(), "its training settings as JSON (a prefix's are its whole dictionary's; null for a "
                                     "loaded dictionary)"),
))

FAMILIES = Table("families", "feature families across the widths at the hook point: every feature of a wider "
                             "dictionary (that a matryoshka prefix adds), linked to its parent in the next narrower "
                             "one (empty with one dictionary)", (
    Column("dictionary", pa.string(), "the narrowest dictionary that holds the feature"),
    Column("feature_id", pa.int32(), "the child: a feature that dictionary adds"),
    Column("parent_dictionary", pa.string(), "the narrowest dictionary that holds the parent"),
    Column("parent_id", pa.int32(), "the parent: of the features of the dictionary before the child's, the one "
                                    "whose decoder direction is closest"),
    Column("decoder_cosine", pa.float32(), "cosine of the two decoder directions"),
    Column("coactivation", pa.float32(), "share of the child's tokens on which the parent fires too"),
))

# DuckDB holds every table's SQL columns (for features, a scalar copy to join against); LanceDB
# holds FEATURES whole (vectors, full text), EXAMPLES and WINDOWS (with their embeddings).
DUCKDB_TABLES = (DOCUMENTS, TOKENS, WINDOWS, ACTIVATIONS, FEATURES, LABEL_CANDIDATES, DICTIONARIES, FAMILIES)
