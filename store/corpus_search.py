"""Search through the corpus: the windows that match a query, and the features that fire on them.

This is Anthropic's prompt-set search with the positive prompts found automatically, and it needs
no label: the query's sentence embedding finds the corpus windows most like it (``MATCHED``), and
each feature is tested for firing in more of them than its rate over all windows predicts. The test
is hypergeometric (drawing the matched windows from all windows, how likely is it to see this many
where the feature fires?), so a feature that fires everywhere needs many more matched windows than a
rare one, and the p-value means the same for every query. The same matched windows say how much of
the corpus is about the query at all (``Coverage``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import gammaln, logsumexp

from .atlas import Atlas
from .schema import ANN_MIN_ROWS, WINDOW, vector_matrix
from .search import EF, NPROBES, REFINE, top_k

MATCHED = 48  # windows taken as the query's positive set
# A window this cosine-similar to the query is about it (MiniLM): coverage counts those. On the quick
# atlas the best window of concepts it holds scored 0.515-0.69, of ones it lacks 0.38-0.48 ("Golden
# Gate Bridge" 0.463: a Shakespeare line about a bridge); scripts/search_eval.py checks it.
COVERS = 0.5
COVERAGE_SCAN = 1000  # windows read to count coverage (a broader concept's count is "1,000 or more")
SNIPPETS = 3
MIN_LIFT = 2.0  # a feature must fire in at least this many times its share of matched windows


# A server holds corpus search's data in memory (``WindowIndex``) when the windows are too few for a
# vector index and the (window, feature) pairs at most this many (~12 bytes each: 70 MB at the quick
# atlas's 5.7M); bigger atlases ask LanceDB's index and DuckDB per query.
HELD_PAIRS = 50_000_000


@dataclass
class WindowIndex:
    """Every corpus window's embedding, and the features that fire in it, in memory: the two reads
    of a corpus search were ~30 ms (LanceDB's scan of 16k windows) and ~90 ms (DuckDB's scan of 7.9M
    activations, which are stored by feature, not by window) on the quick atlas, against ~1 ms each
    here. Loading takes a few seconds, so a server loads it when it warms up and a one-off CLI query
    does without."""

    vectors: np.ndarray  # [windows, dim], table order: a row is a LanceDB row offset
    doc_id: np.ndarray  # [windows]
    window: np.ndarray  # [windows]
    starts: np.ndarray  # [windows + 1]: window i's features are features[starts[i]:starts[i + 1]]
    features: np.ndarray  # every distinct (window, feature) pair's feature, by window
    n_windows: np.ndarray  # [d_sae] windows each feature fires in
    text: list[str]  # [windows]: what a search shows of the windows it matched ...
    source: list[str]
    title: dict[int, str]  # ... and the titles of their documents

    @classmethod
    def load(cls, atlas: Atlas) -> "WindowIndex | None":
        """None where the atlas is too big to hold (``HELD_PAIRS``, ``ANN_MIN_ROWS``) or has no windows."""
        if not 0 < atlas.n_windows < ANN_MIN_ROWS:
            return None
        table = (atlas.windows.search().select(["doc_id", "window_index", "embedding", "text", "source"])
                 .limit(atlas.n_windows).to_arrow())
        doc_id = table["doc_id"].to_numpy().astype(np.int64)
        window = table["window_index"].to_numpy().astype(np.int64)
        keys = doc_id << 32 | window
        if len(keys) > 1 and (np.diff(keys) <= 0).any():
            return None  # written out of order by some other tool: the per-query path handles that
        if atlas.query("select count(*) from activations").rows[0][0] > HELD_PAIRS:
            return None
        con = atlas.batch_connection()
        try:
            pairs = con.sql(f"select distinct (doc_id::bigint << 32) | (position // {WINDOW}), feature_id "
                            "from activations").to_arrow_table()
            n_windows = con.sql("select n_windows from features order by feature_id").to_arrow_table()
        finally:
            con.close()
        key, feature = pairs.column(0).to_numpy(), pairs.column(1).to_numpy().astype(np.int32)
        row = np.searchsorted(keys, key)
        known = keys[np.minimum(row, len(keys) - 1)] == key  # every activation lies in a window; if not, left out
        row, feature = row[known], feature[known]
        order = np.argsort(row, kind="stable")
        starts = np.searchsorted(row[order], np.arange(len(keys) + 1))
        return cls(vector_matrix(table["embedding"]), doc_id, window, starts, feature[order],
                   n_windows.column(0).to_numpy().astype(np.int64), table["text"].to_pylist(),
                   table["source"].to_pylist(), dict(atlas.query("select doc_id, title from documents").rows))


@dataclass
class Matched:
    """The windows most similar to a query, best first; the text of the first ``SNIPPETS``."""

    doc_id: np.ndarray
    window: np.ndarray
    similarity: np.ndarray
    text: list[str]
    source: list[str]
    title: dict[int, str]
    row: np.ndarray | None = None  # their rows in a ``WindowIndex``, when one answered


def match_windows(atlas: Atlas, vector: np.ndarray, n: int = COVERAGE_SCAN, held: WindowIndex | None = None) -> Matched:
    """The ``n`` windows most similar to ``vector``: ranked exactly by ``held``, or by LanceDB."""
    vector = np.asarray(vector, dtype=np.float32)
    if held is not None:
        sims = held.vectors @ vector
        row = top_k(sims, n)
        doc_id, window, similarity = held.doc_id[row], held.window[row], sims[row].astype(np.float64)
        first = row[:SNIPPETS].tolist()
        titles = {int(d): held.title[int(d)] for d in doc_id[:SNIPPETS] if int(d) in held.title}
        return Matched(doc_id, window, similarity, [held.text[r] for r in first], [held.source[r] for r in first],
                       titles, row)
    rows = (atlas.windows.search(vector, vector_column_name="embedding")
            .distance_type("cosine").nprobes(NPROBES).ef(EF).refine_factor(REFINE)
            .select(["doc_id", "window_index", "source", "text", "_distance"]).limit(n).to_arrow())
    doc_id, window = rows["doc_id"].to_numpy().astype(np.int64), rows["window_index"].to_numpy().astype(np.int64)
    similarity, shown = 1.0 - rows["_distance"].to_numpy(), rows.slice(0, SNIPPETS)
    ids = ", ".join(str(d) for d in sorted(set(doc_id[:SNIPPETS].tolist()))) or "-1"
    titles = dict(atlas.query(f"select doc_id, title from documents where doc_id in ({ids})").rows)
    return Matched(doc_id, window, similarity, shown["text"].to_pylist(), shown["source"].to_pylist(), titles)


def enriched(atlas: Atlas, matched: Matched, k: int, held: WindowIndex | None = None) -> list[tuple[int, int, int, float, float]]:
    """The ``k`` features most significantly over-represented in the top ``MATCHED`` windows:
    (feature_id, matched windows it fires in, windows it fires in overall, -log10 p, lift), by p."""
    n = min(MATCHED, len(matched.doc_id))
    if n == 0:
        return []
    if held is not None and matched.row is not None:
        rows = matched.row[:n]
        fired = np.concatenate([held.features[held.starts[r]:held.starts[r + 1]] for r in rows])
        f, hit = np.unique(fired, return_counts=True)  # pairs are distinct: a count is of windows
        overall = held.n_windows[f]
    else:
        rows = atlas.query(
            f"""
            with matched as (select unnest($docs) as doc_id, unnest($windows) as w),
            hits as (
                select a.feature_id, count(distinct (a.doc_id::bigint << 32) + a.position // {WINDOW}) as k
                from activations a semi join matched m on a.doc_id = m.doc_id and a.position // {WINDOW} = m.w
                group by a.feature_id
            )
            select h.feature_id, h.k, f.n_windows from hits h join features f using (feature_id)
            """,
            {"docs": matched.doc_id[:n].tolist(), "windows": matched.window[:n].tolist()},
        ).rows
        if not rows:
            return []
        f, hit, overall = (np.array(c) for c in zip(*rows))
    if not len(f):
        return []
    total = atlas.n_windows
    overall = np.maximum(overall, hit)
    lift = (hit / n) / (overall / total)
    keep = lift >= MIN_LIFT  # before the tail sums: most features that fire in a matched window are common ones
    f, hit, overall, lift = f[keep], hit[keep], overall[keep], lift[keep]
    log_p = -hypergeometric_log_tail(hit, total, overall, n) / np.log(10)
    order = np.lexsort((f, -log_p))[:k]
    return [(int(f[i]), int(hit[i]), int(overall[i]), float(log_p[i]), float(lift[i])) for i in order]


def hypergeometric_log_tail(k: np.ndarray, total: int, marked: np.ndarray, n: int) -> np.ndarray:
    """ln P(X >= k) for X ~ Hypergeometric(``total`` windows, ``marked`` of them where a feature
    fires, ``n`` drawn), for many features at once (scipy's ``logsf`` loops in Python: 2 s for 3,000
    features, against milliseconds here: ``n`` is small, so every term of the tail is summed)."""
    x = np.arange(n + 1)[None, :]  # every possible count
    k, marked = k[:, None].astype(np.float64), marked[:, None].astype(np.float64)
    log_pmf = (_log_choose(marked, x) + _log_choose(total - marked, n - x) - _log_choose(total, n))
    feasible = (x >= k) & (x <= marked) & (n - x <= total - marked)
    return logsumexp(np.where(feasible, log_pmf, -np.inf), axis=1)


def _log_choose(a, b):
    with np.errstate(invalid="ignore"):
        return gammaln(a + 1) - gammaln(b + 1) - gammaln(np.maximum(a - b, 0) + 1)


def coverage(atlas: Atlas, matched: Matched) -> dict[str, Any]:
    """How much of the corpus is about the query: windows and documents whose embedding is at least
    ``COVERS`` similar to it, and a few of them."""
    on = matched.similarity >= COVERS
    snippets = [{"doc_id": int(d), "title": matched.title.get(int(d), ""), "source": s, "text": t,
                 "similarity": round(float(x), 3)}
                for d, s, t, x in zip(matched.doc_id, matched.source, matched.text, matched.similarity)]
    return {
        "windows": int(on.sum()), "windows_total": atlas.n_windows, "capped": bool(on.all() and len(on) == COVERAGE_SCAN),
        "documents": len(set(matched.doc_id[on].tolist())), "documents_total": atlas.n_documents,
        "tokens": int(on.sum()) * WINDOW, "best_similarity": round(float(matched.similarity[0]), 3) if len(on) else None,
        "snippets": snippets,
    }
