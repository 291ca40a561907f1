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
            ("label_source", pa.string()),
            ("label_score", pa.float32()),
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

# DuckDB analytics. ``activations`` holds the sparse code of every encoded token (its k largest
# latents that are > 0); ``features`` is a scalar copy of the LanceDB table for joins.
DUCKDB_DDL = """
create table documents (doc_id integer primary key, doc_key varchar, source varchar, title varchar, text varchar);
create table tokens (doc_id integer, position integer, token_id integer, token varchar, split varchar);
create table activations (doc_id integer, position integer, feature_id integer, value real);
create table features (feature_id integer primary key, label varchar, label_source varchar, label_score real,
                       density double, n_active bigint, mean_activation real, max_activation real);
"""
