"""Ranked lists of features: vector search (label, context, decoder), full-text search, search
through the corpus, and co-activation neighbours, plus reciprocal rank fusion to combine lists.

Every function returns ``Hit``s best first, so lists can be fused. Hits carry the label and density
read in the same query: a second lookup per request costs more than the search at 1M features.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from .atlas import Atlas
from .schema import ANN_MIN_ROWS

# Query-time ANN knobs (only used once an index exists: see ``ANN_MIN_ROWS``). Measured on
# 100k clustered decoders: SQ quantisation alone caps recall@10 near 0.97; re-ranking twice the
# candidates on full vectors gives 1.0 at ~10 ms, where nprobes 32 / ef 200 / refine 4 took ~14 ms.
NPROBES = 8
EF = 100
REFINE = 2
# Reciprocal rank fusion constant (Cormack et al. 2009): damps the head of each list.
RRF_K = 60

# The signals a search can use, by name (``label`` and ``context`` are vector searches over the
# embeddings of the same names, ``text`` is full text, ``inference`` runs the query through the
# model, ``corpus`` finds the corpus windows that match the query and the features that fire there
# far more often than in the corpus at large, ``kind`` finds the features of the kind of token or
# the language the query asks for: ``ingest/labels/kinds/``).
SEARCH_MODES = ("label", "context", "text", "inference", "corpus", "kind")
FUSED = "all"  # the mode of a search over every signal (the default)
# A kind answers a query whose embedding is this close to one of the ways of asking for it
# ("uppercase text" ~ "all caps text"). On the tuning half of scripts/search_eval.py the topic and
# absent queries came to at most 0.48 of any kind, the queries a kind covers to at least 0.72, and
# those between were queries no kind covers ("accented letters" 0.58, "hexadecimal numbers" 0.50).
KIND_MATCH = 0.6
KIND_MIN_SHARE = 0.5  # a feature answers for a kind first when at least this share of its mass lies in it ...
# ... and after those when it gives the kind a fair share (every kind the labeller keeps: ``KEEP_SHARE``,
# a quarter). Some kinds hold no feature of their own: on the quick atlas no feature puts half its mass
# on keyword arguments, months or decorators, but one each puts a quarter to a third there.
_COLUMNS = ["feature_id", "label", "density"]


class Hit(NamedTuple):
    feature_id: int
    score: float
    label: str
    density: float


Ranked = list[Hit]


def vector_search(atlas: Atlas, column: str, vector: Sequence[float], k: int, *, exclude: int | None = None,
                  within: range | None = None) -> Ranked:
    """Cosine similarity between ``vector`` and ``column`` (decoder, label_embedding,
    context_embedding; each stored unit-norm or zero), among the features ``within`` (one
    dictionary's ids) if given.

    Indexed atlases ask LanceDB's ANN index. Below ``ANN_MIN_ROWS`` there is no index and LanceDB
    would scan the whole table per query (~30 ms at 4k features, ~80 ms at 16k), so the column is
    held in memory instead (at most 50k rows) and ranked exactly with one matrix-vector product."""
    vector = np.asarray(vector, dtype=np.float32)
    if atlas.d_sae < ANN_MIN_ROWS:
        sims = atlas.vectors(column) @ vector
        if within is not None:
            sims[: within.start] = sims[within.stop :] = -np.inf
            k = min(k, len(within) - (exclude in within))
        top = top_k(sims, k, exclude)
        info = atlas.summaries(top.tolist())
        return [Hit(int(f), float(sims[f]), info[int(f)]["label"], info[int(f)]["density"]) for f in top]
    q = (
        atlas.features.search(vector, vector_column_name=column)
        .distance_type("cosine")
        .nprobes(NPROBES)
        .ef(EF)
        .refine_factor(REFINE)
        .select([*_COLUMNS, "_distance"])
        .limit(k + (exclude is not None))
    )
    if within is not None:  # before the index's candidates are cut to k, so a narrow dictionary still gets k
        q = q.where(f"feature_id >= {within.start} and feature_id < {within.stop}", prefilter=True)
    hits = [Hit(f, 1.0 - d, lab, den) for f, d, lab, den in _rows(q.to_arrow(), "_distance")]
    return [h for h in hits if h.feature_id != exclude][:k]


def top_k(scores: np.ndarray, k: int, exclude: int | None = None) -> np.ndarray:
    """Indices of the ``k`` highest ``scores`` (never ``exclude``), best first, ties by index."""
    if exclude is not None:
        scores = scores.copy()
        scores[exclude] = -np.inf
    k = min(k, len(scores) - (exclude is not None))
    if k <= 0:
        return np.zeros(0, np.int64)
    top = np.argpartition(-scores, k - 1)[:k]
    return top[np.lexsort((top, -scores[top]))]


def _rows(table, score: str):
    return zip(*(table[c].to_pylist() for c in ("feature_id", score, "label", "density")))


def text_search(atlas: Atlas, query: str, k: int) -> Ranked:
    """BM25 over labels and top tokens (a query of only stop words or punctuation finds nothing)."""
    rows = (
        atlas.features.search(query, query_type="fts", fts_columns="search_text")
        .select([*_COLUMNS, "_score"])
        .limit(k)
        .to_arrow()
    )
    return [Hit(*row) for row in _rows(rows, "_score")]


class KindIndex(NamedTuple):
    """Every kind of the atlas's labels with the ways to ask for it, and its features best first."""

    asks: list[str]  # every way of asking for every kind
    kind_of_ask: list[str]
    ranked: dict[str, list[tuple[int, float]]]  # kind -> (feature, share x sqrt(recall)), best first


def kind_index(atlas: Atlas) -> KindIndex | None:
    """Read once per atlas from the features' ``kinds`` column and the labels' kind vocabulary
    (None for an atlas labelled before kinds existed). A kind's features are ranked by the share of
    their mass in it times the square root of the share of its tokens they fire on (a feature of
    all French text before a feature of one French word), those with most of their mass in it first."""
    vocabulary = (atlas.manifest.get("labels") or {}).get("kinds")
    if not vocabulary or "kinds" not in atlas.features.schema.names:
        return None
    table = atlas.features.search().select(["feature_id", "kinds"]).limit(atlas.d_sae).to_arrow().to_pydict()
    tiered: dict[str, list[tuple[bool, int, float]]] = {name: [] for name in vocabulary}
    for f, kinds in zip(table["feature_id"], table["kinds"]):
        for k in kinds or []:
            if k["kind"] in tiered:
                score = float(k["share"]) * float(k["recall"]) ** 0.5
                tiered[k["kind"]].append((k["share"] < KIND_MIN_SHARE, int(f), score))
    ranked = {name: _behind_the_first_tier(sorted(rows, key=lambda t: (t[0], -t[2], t[1])))
              for name, rows in tiered.items()}
    asks = [(ask, name) for name, entry in vocabulary.items() for ask in entry["asks"]]
    return KindIndex([a for a, _ in asks], [n for _, n in asks], ranked)


def _behind_the_first_tier(rows: list[tuple[bool, int, float]]) -> list[tuple[int, float]]:
    """(feature, score) in the order of ``rows`` (second-tier flag, feature, score), the second tier's
    scores scaled to stay under the first's: search fuses and calibrates by score, and a feature with
    a third of its mass in a kind must not outrank one with most of it because it fires on more of
    the kind's tokens."""
    first = [score for second, _, score in rows if not second]
    rest = [score for second, _, score in rows if second]
    scale = min(1.0, 0.99 * min(first) / max(rest)) if first and rest and max(rest) > 0 else 1.0
    return [(f, score * scale if second else score) for second, f, score in rows]


def kind_search(atlas: Atlas, index: KindIndex, similarities: Sequence[float], k: int) -> tuple[Ranked, float]:
    """The features of the kind the query asks for (``similarities``: the query's cosine with each of
    ``index.asks``), with that cosine; nothing when no kind is asked for."""
    if not len(similarities):
        return [], 0.0
    best = int(np.argmax(similarities))
    if similarities[best] < KIND_MATCH:
        return [], float(similarities[best])
    rows = index.ranked[index.kind_of_ask[best]][:k]
    info = atlas.summaries([f for f, _ in rows])
    return [Hit(f, score, info[f]["label"], info[f]["density"]) for f, score in rows], float(similarities[best])


def decoder_neighbors(atlas: Atlas, feature_id: int, k: int, within: range | None = None) -> Ranked:
    """The ``k`` features (of those ``within``, if given) whose decoder directions are most
    cosine-similar to ``feature_id``'s."""
    if atlas.d_sae < ANN_MIN_ROWS:
        vector = atlas.vectors("decoder")[feature_id]
    else:
        row = atlas.feature_row(feature_id, ["decoder"])
        if row is None:  # callers check the id first: the atlas itself is damaged
            raise RuntimeError(f"feature {feature_id} is missing from the features table")
        vector = row["decoder"]
    return vector_search(atlas, "decoder", vector, k, exclude=feature_id, within=within)


def coactivation_neighbors(atlas: Atlas, feature_id: int, k: int, within: range | None = None) -> Ranked:
    """Features (of those ``within``, if given) that fire on the same tokens, by Jaccard similarity
    of their token sets."""
    within = within or range(atlas.d_sae)
    rows = atlas.query(
        """
        with mine as (select doc_id, position from activations where feature_id = $f),
        n_mine as (select count(*) as n from mine),
        overlap as (
            select a.feature_id, count(*) as both_ from activations a join mine using (doc_id, position)
            where a.feature_id <> $f and a.feature_id >= $lo and a.feature_id < $hi group by a.feature_id
        )
        select o.feature_id, o.both_ / (n_mine.n + f.n_active - o.both_) as jaccard, f.label, f.density
        from overlap o join features f using (feature_id), n_mine
        order by jaccard desc, o.feature_id limit $k
        """,
        {"f": int(feature_id), "k": int(k), "lo": within.start, "hi": within.stop},
    ).rows
    return [Hit(int(f), float(j), lab, den) for f, j, lab, den in rows]


def fuse(lists: dict[str, Ranked], *, weights: dict[int, float] | None = None) -> list[tuple[int, float, dict[str, int]]]:
    """Reciprocal rank fusion: ``sum 1 / (RRF_K + rank)`` over the lists a feature appears in,
    times its weight; returns (feature_id, score, {list name: rank})."""
    score: dict[int, float] = {}
    why: dict[int, dict[str, int]] = {}
    for name, ranked in lists.items():
        for rank, (f, *_) in enumerate(ranked, start=1):
            score[f] = score.get(f, 0.0) + 1.0 / (RRF_K + rank)
            why.setdefault(f, {})[name] = rank
    if weights:
        score = {f: s * weights.get(f, 1.0) for f, s in score.items()}
    return sorted(((f, s, why[f]) for f, s in score.items()), key=lambda t: (-t[1], t[0]))
