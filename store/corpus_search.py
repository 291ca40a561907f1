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
from .schema import WINDOW
from .search import EF, NPROBES, REFINE

MATCHED = 48  # windows taken as the query's positive set
# A window this cosine-similar to the query is about it (MiniLM): coverage counts those. On the quick
# atlas the best window of concepts it holds scored 0.515-0.69, of ones it lacks 0.38-0.48 ("Golden
# Gate Bridge" 0.463: a Shakespeare line about a bridge); scripts/search_eval.py checks it.
COVERS = 0.5
COVERAGE_SCAN = 1000  # windows read to count coverage (a broader concept's count is "1,000 or more")
SNIPPETS = 3
MIN_LIFT = 2.0  # a feature must fire in at least this many times its share of matched windows


@dataclass
class Matched:
    """The windows most similar to a query, best first."""

    doc_id: np.ndarray
    window: np.ndarray
    similarity: np.ndarray
    text: list[str]
    source: list[str]
    title: dict[int, str]


def match_windows(atlas: Atlas, vector: np.ndarray, n: int = COVERAGE_SCAN) -> Matched:
    rows = (atlas.windows.search(np.asarray(vector, dtype=np.float32), vector_column_name="embedding")
            .distance_type("cosine").nprobes(NPROBES).ef(EF).refine_factor(REFINE)
            .select(["doc_id", "window_index", "source", "text", "_distance"]).limit(n).to_arrow())
    doc_id = rows["doc_id"].to_numpy().astype(np.int64)
    ids = ", ".join(str(d) for d in sorted(set(doc_id[:SNIPPETS].tolist()))) or "-1"
    titles = dict(atlas.query(f"select doc_id, title from documents where doc_id in ({ids})").rows)
    return Matched(doc_id, rows["window_index"].to_numpy().astype(np.int64), 1.0 - rows["_distance"].to_numpy(),
                   rows["text"].to_pylist(), rows["source"].to_pylist(), titles)


def enriched(atlas: Atlas, matched: Matched, k: int) -> list[tuple[int, int, int, float, float]]:
    """The ``k`` features most significantly over-represented in the top ``MATCHED`` windows:
    (feature_id, matched windows it fires in, windows it fires in overall, -log10 p, lift), by p."""
    n = min(MATCHED, len(matched.doc_id))
    if n == 0:
        return []
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
    total = atlas.n_windows
    f, hit, overall = (np.array(c) for c in zip(*rows))
    overall = np.maximum(overall, hit)
    log_p = -hypergeometric_log_tail(hit, total, overall, n) / np.log(10)
    lift = (hit / n) / (overall / total)
    keep = lift >= MIN_LIFT
    order = np.lexsort((f, -log_p))
    return [(int(f[i]), int(hit[i]), int(overall[i]), float(log_p[i]), float(lift[i])) for i in order if keep[i]][:k]


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
                for d, s, t, x in list(zip(matched.doc_id, matched.source, matched.text, matched.similarity))[:SNIPPETS]]
    return {
        "windows": int(on.sum()), "windows_total": atlas.n_windows, "capped": bool(on.all() and len(on) == COVERAGE_SCAN),
        "documents": len(set(matched.doc_id[on].tolist())), "documents_total": atlas.n_documents,
        "tokens": int(on.sum()) * WINDOW, "best_similarity": round(float(matched.similarity[0]), 3) if len(on) else None,
        "snippets": snippets,
    }
