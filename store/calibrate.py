"""Search scores on scales that mean the same for every query.

Raw scores do not compare across queries or signals: a cosine of 0.4 is a strong label match for
one query and noise for another, and a hypergeometric p-value is on another scale altogether.

*Evidence* orders the hits: each calibrated signal's score becomes ``-log10 P(chance scores this
high)``, in decimal digits:

- vector signals (label, context): the query's cosine with every feature (a sample of
  ``NULL_SAMPLE`` on big atlases) is its own null; from a hit's z-score against it, the chance that
  the best of ``d_sae`` chance features reaches it, ``1 - Φ(z)^d``;
- corpus: the hypergeometric p-value of the feature's firing in the matched windows, times
  ``d_sae``. Windows of one document are not independent draws, so these p-values overstate the
  evidence (tens of digits even for concepts the corpus lacks): ``WEIGHTS`` discounts them.

A hit's evidence is the weighted sum over signals (independent signals that agree add up); text
and inference have no null, so they only break ties (reciprocal rank fusion). ``WEIGHTS`` were
chosen on the tuning half of ``scripts/search_eval.py``: label 1, context 0.5, corpus 0.1 with the
word-list labels (20 of 30 found there); with labels that name kinds and topics (issue 28) the
corpus weight went to 0.3, the middle of the 0.2 to 0.5 that found 23/30 (0.1: 22/30, 0.05: 21/30).
``KIND_DIGITS`` from 4 to 30 found the same there (22/30 at corpus 0.1; none: 20/30) with the kinds
of stop 37; with the grammar's kinds (stop 39, 79 kinds: a kind's features now compete with word
features that the corpus signal credits, "line" against blank lines) 12 found 23/30, 16 24/30, and
24, 36 and 60 25/30: 24, the least that reaches the plateau (held-out sets, for the record: 24 lost
none and found one more on the first and second and two on the fourth; 36 and 60 lost one on the
third and fifth).

*Match* says whether to trust a hit: the cosine between the query and the hit's label plus the best
cosine between the query and any corpus window. Both are on MiniLM's fixed scale, and both must be
high: a label can read like the query by accident, and a feature cannot be clearly about something
its corpus never shows. A hit is strong from ``CONFIDENT_MATCH``; a search is confident when one of
its first three hits is strong. The threshold is the middle of the range that, on the tuning half,
kept every concept the corpus lacks unconfident and at least 80% of present ones confident: 0.90 to
0.96 with word-list labels; 0.95 to 1.04 with labels that name real concepts (they read closer to
any query: "quantum" for "quantum computing"), hence 1.0.
"""

from __future__ import annotations

import numpy as np
from scipy.special import log_ndtr

WEIGHTS = {"label": 1.0, "context": 0.5, "corpus": 0.3, "kind": 1.0}
# A kind has no null distribution: its features carry evidence in proportion to their kind score
# (relative to the kind's best) and to how clearly the query asks for the kind, up to this many digits.
KIND_DIGITS = 24.0
CONFIDENT_MATCH = 1.0
CONFIDENT_WITHIN = 3  # a search is confident when one of this many first hits is strong
NULL_SAMPLE = 20_000  # features a vector signal's null is drawn from on big atlases


def vector_null(similarities: np.ndarray) -> tuple[float, float]:
    """(mean, standard deviation) of a query's cosine over all (or a sample of) features."""
    return float(similarities.mean()), float(similarities.std()) or 1.0


def vector_evidence(similarities: np.ndarray, null: tuple[float, float], n_features: int) -> np.ndarray:
    """Evidence of each of ``similarities`` (one call for a whole list: scipy's distribution
    objects cost ~0.1 ms a call, a tenth of a search's budget for 30 hits)."""
    z = (np.asarray(similarities, dtype=np.float64) - null[0]) / null[1]
    p = -np.expm1(n_features * log_ndtr(z))  # 1 - Φ(z)^n, without cancelling to 0
    digits = np.maximum(0.0, -np.log10(np.maximum(p, 1e-300)))
    # An all-zero embedding (an unlabelled feature) has no cosine; + 0.0 turns -0.0 into 0.
    return np.where(np.isfinite(z), digits, 0.0) + 0.0


def kind_evidence(score: float, best: float, similarity: float, match_from: float) -> float:
    """Evidence of a kind's feature: ``score`` against the kind's ``best``, times how far the query's
    cosine with the kind (``similarity``) rises above ``match_from``, where a kind starts to answer."""
    asked = min(1.0, max(0.0, (similarity - match_from) / (1.0 - match_from)))
    return float(KIND_DIGITS * asked * score / max(best, 1e-9))


def corpus_evidence(log10_p: float, n_features: int) -> float:
    return float(max(0.0, log10_p - np.log10(n_features)))


def probability(evidence: float) -> float:
    """``1 - 10^-evidence``: the evidence as a probability that the hit is not chance."""
    return float(1.0 - 10.0 ** -evidence)


def match(label_similarity: float, corpus_similarity: float | None) -> float:
    return float(label_similarity + (corpus_similarity or 0.0))
