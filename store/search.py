"""Ranked lists of features: vector search (label, context, decoder), full-text search, and
co-activation neighbours, plus reciprocal rank fusion to combine lists.

Every function returns ``[(feature_id, score), ...]`` best first, so lists can be fused.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .atlas import Atlas

# Query-time ANN knobs (only used once an index exists: see ``publish.ANN_MIN_ROWS``).
NPROBES = 32
EF = 200
REFINE = 4
# Reciprocal rank fusion constant (Cormack et al. 2009): damps the head of each list.
RRF_K = 60

Ranked = list[tuple[int, float]]


def vector_search(atlas: Atlas, column: str, vector: Sequence[float], k: int, *, exclude: int | None = None) -> Ranked:
    """Cosine similarity between ``vector`` and ``column`` (decoder, label_embedding, context_embedding)."""
    q = (
        atlas.features.search(np.asarray(vector, dtype=np.float32), vector_column_name=column)
        .distance_type("cosine")
        .nprobes(NPROBES)
        .ef(EF)
        .refine_factor(REFINE)
        .select(["feature_id"])
        .limit(k + (exclude is not None))
    )
    rows = q.to_arrow()
    ids = rows["feature_id"].to_pylist()
    dist = rows["_distance"].to_pylist()
    return [(f, 1.0 - d) for f, d in zip(ids, dist) if f != exclude][:k]


def text_search(atlas: Atlas, query: str, k: int) -> Ranked:
    """BM25 over labels and top tokens."""
    try:
        rows = (
            atlas.features.search(query, query_type="fts", fts_columns="search_text")
            .select(["feature_id", "_score"])
            .limit(k)
            .to_arrow()
        )
    except ValueError:  # a query of only stop words or punctuation has no terms
        return []
    return list(zip(rows["feature_id"].to_pylist(), rows["_score"].to_pylist()))


def decoder_vector(atlas: Atlas, feature_id: int) -> list[float]:
    row = atlas.features.search().where(f"feature_id = {int(feature_id)}").select(["decoder"]).limit(1).to_list()
    return row[0]["decoder"]


def coactivation_neighbors(atlas: Atlas, feature_id: int, k: int) -> Ranked:
    """Features that fire on the same tokens, by Jaccard similarity of their token sets."""
    cur = atlas.duckdb_cursor()
    rows = cur.execute(
        """
        with mine as (select doc_id, position from activations where feature_id = $f),
        n_mine as (select count(*) as n from mine),
        overlap as (
            select a.feature_id, count(*) as both_ from activations a join mine using (doc_id, position)
            where a.feature_id <> $f group by a.feature_id
        )
        select o.feature_id, o.both_ / (n_mine.n + f.n_active - o.both_) as jaccard
        from overlap o join features f using (feature_id), n_mine
        order by jaccard desc, o.feature_id limit $k
        """,
        {"f": int(feature_id), "k": int(k)},
    ).fetchall()
    return [(int(f), float(j)) for f, j in rows]


def fuse(lists: dict[str, Ranked], *, weights: dict[int, float] | None = None) -> list[tuple[int, float, dict[str, int]]]:
    """Reciprocal rank fusion: ``sum 1 / (RRF_K + rank)`` over the lists a feature appears in,
    times its weight; returns (feature_id, score, {list name: rank})."""
    score: dict[int, float] = {}
    why: dict[int, dict[str, int]] = {}
    for name, ranked in lists.items():
        for rank, (f, _) in enumerate(ranked, start=1):
            score[f] = score.get(f, 0.0) + 1.0 / (RRF_K + rank)
            why.setdefault(f, {})[name] = rank
    if weights:
        score = {f: s * weights.get(f, 1.0) for f, s in score.items()}
    return sorted(((f, s, why[f]) for f, s in score.items()), key=lambda t: (-t[1], t[0]))
