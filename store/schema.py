"""Every table's schema, in one place: LanceDB's ``features`` and ``examples`` (Arrow schemas) and
DuckDB's analytics tables. Readers and writers both import from here."""

from __future__ import annotations

import pyarrow as pa

EMBEDDING_DIM = 384

_logit = pa.list_(pa.struct([("token", pa.string()), ("value", pa.float32())]))


def features_schema(d_model: int) -> pa.Schema:
    return pa.schema(
        [
            ("feature_id", pa.int32()),
            ("decoder", pa.list_(pa.float32(), d_model)),  # unit norm
            ("label", pa.string()),
            # label + top tokens, the column the full-text index covers
            ("search_text", pa.string()),
            ("label_source", pa.string()),  # the explainer that wrote the kept label, or "none"
            ("label_score", pa.float32()),  # the first scorer's score on held-out windows; null if unscored
            ("label_scores", pa.list_(pa.struct([("scorer", pa.string()), ("score", pa.float32())]))),
            # top activations all on one token: token matching scores it high trivially
            ("single_token", pa.bool_()),
            ("label_embedding", pa.list_(pa.float32(), EMBEDDING_DIM)),
            ("context_embedding", pa.list_(pa.float32(), EMBEDDING_DIM)),
            ("density", pa.float64()),  # fraction of encoded tokens where it fires
            ("n_active", pa.int64()),
            ("mean_activation", pa.float32()),  # mean over the tokens where it fires
            ("max_activation", pa.float32()),
            ("top_tokens", pa.list_(pa.string())),
            ("logit_positive", _logit),
            ("logit_negative", _logit),
            # counts in equal-width bins over [0, max_activation]
            ("histogram", pa.list_(pa.int64())),
            # the feature map (ingest/feature_map.py): UMAP of the decoder directions, in [-1, 1]
            ("map_x", pa.float32()),
            ("map_y", pa.float32()),
        ]
    )


EXAMPLES_SCHEMA = pa.schema(
    [
        ("feature_id", pa.int32()),
        ("kind", pa.string()),  # top | quantile
        ("doc_id", pa.int32()),
        ("start", pa.int32()),  # document position of tokens[0]
        ("tokens", pa.list_(pa.string())),
        ("activations", pa.list_(pa.float32())),
        ("max_activation", pa.float32()),
        ("max_position", pa.int32()),  # document position of the strongest token
    ]
)

# Every candidate label every explainer proposed, with its AUROC on the explainer's side (used to
# choose) and on held-out windows (reported); failed LLM calls are rows with status "failed".
LABEL_CANDIDATES_SCHEMA = pa.schema(
    [
        ("feature_id", pa.int32()),
        ("explainer", pa.string()),
        ("kind", pa.string()),
        ("label", pa.string()),
        ("status", pa.string()),
        ("detail", pa.string()),
        ("choice_auroc", pa.float32()),
        ("holdout_auroc", pa.float32()),
        ("chosen", pa.bool_()),
    ]
)

# DuckDB analytics. ``activations`` holds the sparse code of every encoded token (its k largest
# latents that are > 0); ``features`` is a scalar copy of the LanceDB table for joins.
DUCKDB_DDL = """
create table documents (doc_id integer primary key, doc_key varchar, source varchar, title varchar, text varchar);
create table tokens (doc_id integer, position integer, token_id integer, token varchar, split varchar);
create table activations (doc_id integer, position integer, feature_id integer, value real);
create table features (feature_id integer primary key, label varchar, label_source varchar, label_score real,
                       single_token boolean, density double, n_active bigint, mean_activation real, max_activation real,
                       map_x real, map_y real);
create table label_candidates (feature_id integer, explainer varchar, kind varchar, label varchar, status varchar,
                               detail varchar, choice_auroc real, holdout_auroc real, chosen boolean);
"""
