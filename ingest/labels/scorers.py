"""How well a label predicts where its feature fires, on windows the label was not written from.

- ``embedding`` (default; Delphi's embedding scorer): the label's sentence embedding must rank the
  feature's firing windows above windows where it stays silent. Positives are sampled across the
  quantiles of the feature's activation, so a label that only fits the strongest examples loses;
  half the negatives are *hard*: windows that hold the feature's top token but do not fire it, so
  naming the token alone is not enough. Score: AUROC (0.5 is chance).
- ``token`` (OpenAI's simulate-and-score without an LLM): the label's quoted tokens, with the quoted
  tokens it says come just before them ("... after "the""), become a token matcher, run over every
  token of the feature's trial windows (the same positives and hard negatives): the correlation of
  the matcher with the real activations (0 is chance; a label that quotes nothing scores 0), with
  its precision and recall. This is what tells which *tokens* fire, which an embedding cannot.
- ``detection`` (needs an LLM; see ``llm.py``): the model says which windows fit the label; score:
  balanced accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import duckdb
import numpy as np
import pyarrow as pa
from featureatlas.store.schema import WINDOW
from scipy.stats import rankdata

from .windows import KeyIndex, WindowPool
from .wording import parse_pattern, token_key

PER_SIDE = 20  # positives per feature (negatives match their number)
QUANTILE_BANDS = 4
MIN_POSITIVES = 4  # fewer firing windows than this: no score rather than a noisy one


@dataclass
class Trial:
    """One feature's windows to tell apart (pool rows)."""

    positives: np.ndarray
    negatives: np.ndarray


@dataclass
class Fired:
    """Where a feature fires inside a pool: windows with their max activation, and single tokens."""

    rows: np.ndarray  # pool rows of the windows it fires in
    values: np.ndarray  # its strongest activation in each
    token_keys: np.ndarray  # doc_id << 32 | position of every firing token
    token_values: np.ndarray


def fired_in_pool(con: duckdb.DuckDBPyConnection, pool: WindowPool, features: list[int]) -> dict[int, Fired]:
    """Every activation of ``features`` inside the pool's documents, grouped by feature."""
    con.register("wanted_features", pa.table({"feature_id": pa.array(features, pa.int32())}))
    t = con.sql(
        f"""
        select a.feature_id, a.doc_id, a.position, a.value
        from activations a join label_split s using (doc_id) join wanted_features using (feature_id)
        where s.part = '{pool.part}' order by a.feature_id, a.doc_id, a.position
        """
    ).to_arrow_table()
    con.unregister("wanted_features")
    f = t["feature_id"].to_numpy()
    doc = t["doc_id"].to_numpy().astype(np.int64)
    pos = t["position"].to_numpy().astype(np.int64)
    val = t["value"].to_numpy().astype(np.float32)
    rows = pool.rows(doc, pos // WINDOW)
    keep = rows >= 0  # a capped pool holds only some windows
    f, doc, pos, val, rows = f[keep], doc[keep], pos[keep], val[keep], rows[keep]
    out: dict[int, Fired] = {}
    ids, starts = np.unique(f, return_index=True)
    for i, fid in enumerate(ids):
        sl = slice(starts[i], starts[i + 1] if i + 1 < len(starts) else len(f))
        r, v = rows[sl], val[sl]
        order = np.lexsort((-v, r))
        first = np.ones(len(order), dtype=bool)
        first[1:] = r[order][1:] != r[order][:-1]  # the strongest activation of each window
        out[int(fid)] = Fired(r[order][first], v[order][first], doc[sl] << 32 | pos[sl], v)
    return out


class TokenIndex:
    """Which pool rows hold a given token id."""

    def __init__(self, pool: WindowPool):
        tokens, rows, _ = pool.flat
        order = np.argsort(tokens, kind="stable")
        self._tokens, self._rows = tokens[order], rows[order]

    def rows(self, token_id: int) -> np.ndarray:
        lo, hi = np.searchsorted(self._tokens, [token_id, token_id + 1])
        return np.unique(self._rows[lo:hi])


def make_trials(
    pool: WindowPool, fired: dict[int, Fired], top_token: dict[int, int], *, seed: int = 0,
    per_side: int | None = PER_SIDE,
) -> dict[int, Trial]:
    """Positives and negatives per feature, drawn with a per-feature seed so a feature's trial does
    not depend on which other features are scored. ``per_side=None``: every window it fires in.
    Features firing in fewer than ``MIN_POSITIVES`` windows get no trial."""
    index = TokenIndex(pool)
    out: dict[int, Trial] = {}
    for f, hit in fired.items():
        if len(hit.rows) < MIN_POSITIVES:
            continue
        rng = np.random.default_rng([seed, f])
        bands = np.array_split(np.argsort(hit.values), QUANTILE_BANDS)
        per_band = len(hit.rows) if per_side is None else -(-per_side // QUANTILE_BANDS)
        pos = np.concatenate([rng.choice(b, min(per_band, len(b)), replace=False) for b in bands if len(b)])
        positives = hit.rows[pos]
        silent = np.ones(len(pool), dtype=bool)
        silent[hit.rows] = False
        hard = np.array([], dtype=np.int64)
        if f in top_token:
            candidates = index.rows(top_token[f])
            candidates = candidates[silent[candidates]]
            hard = rng.choice(candidates, min(len(positives) // 2, len(candidates)), replace=False)
        silent[hard] = False
        free = np.flatnonzero(silent)
        rand = rng.choice(free, min(len(positives) - len(hard), len(free)), replace=False)
        out[f] = Trial(positives, np.concatenate([hard, rand]).astype(np.int64))
    return out


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(a random positive outscores a random negative), ties counting half."""
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    d = pos[:, None] - neg[None, :]
    return float((d > 0).mean() + 0.5 * (d == 0).mean())


def auroc_rows(scores: np.ndarray, n_pos: int) -> np.ndarray:
    """``auroc`` of each row of ``scores`` [m, n_pos + n_neg] whose first ``n_pos`` columns are the
    positives (Mann-Whitney from average ranks, so ties still count half): every candidate label of
    a feature in one vectorised ranking instead of a pairwise matrix each."""
    n_neg = scores.shape[1] - n_pos
    if n_pos == 0 or n_neg == 0:
        return np.full(len(scores), np.nan)
    ranks = rankdata(scores, axis=1)
    return (ranks[:, :n_pos].sum(1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b.T`` of unit float32 vectors, as float32 that do not depend on who computed them. A
    float32 matmul's sums run in an order set by the BLAS kernel and its thread count: the same label
    scored a window a few ulps apart in the local build (2 threads) and in a Ray actor (1), which
    turned ties between identical windows into orders and moved AUROCs (issue 32). In float64 each
    product is exact and a 384-term sum is off by ~1e-16, so rounded to float32 the result is the
    same bits but where the exact value lies within ~1e-16 of a rounding boundary (about one in 10^8
    values). Twice the cost of a float32 matmul, a small part of a label's."""
    return (np.asarray(a, np.float64) @ np.asarray(b, np.float64).T).astype(np.float32)


def embedding_auroc(pool: WindowPool, trial: Trial, vectors: np.ndarray) -> np.ndarray:
    """AUROC of cos(label, window) between the trial's positives and negatives, per row of ``vectors``."""
    windows = pool.embeddings[np.concatenate([trial.positives, trial.negatives])]
    return auroc_rows(cosines(np.atleast_2d(vectors), windows), len(trial.positives))


def embedding_scores(pool: WindowPool, trials: dict[int, Trial], label_embeddings: dict[int, np.ndarray]) -> dict[int, float]:
    """AUROC of cos(label, window) between each feature's positives and negatives."""
    return {f: float(embedding_auroc(pool, trials[f], vec)[0]) for f, vec in label_embeddings.items() if f in trials}


class HeldOutJudge:
    """Embedding AUROC and token correlation of any label texts on fixed held-out trials: baselines
    in a report are judged on exactly the windows the real labels were."""

    def __init__(self, pool: WindowPool, trials: dict[int, Trial], fired: dict[int, Fired], vocab: dict[int, str],
                 embed_fn):
        self.pool, self.trials, self.fired, self.embed_fn = pool, trials, fired, embed_fn
        self.tokens = TokenScorer(pool, vocab)

    def __call__(self, labels: dict[int, str]) -> dict[int, tuple[float, float]]:
        """(embedding AUROC, token correlation) per feature that has a held-out trial."""
        ids = [f for f in labels if f in self.trials]
        vectors = self.embed_fn([labels[f] for f in ids]) if ids else []
        auroc = embedding_scores(self.pool, self.trials, dict(zip(ids, vectors)))
        return {f: (auroc[f], self.tokens.score(labels[f], self.trials[f], self.fired[f]).correlation) for f in ids}


class TokenScore(NamedTuple):
    correlation: float
    """Pearson correlation of the matcher (0/1) with the activation, over the trial windows' tokens."""
    precision: float
    recall: float


LOOK_BACK = 3  # "after X": X is one of the three tokens before


class TokenScorer:
    """Token matchers compiled from labels (``wording.parse_pattern``), run over the tokens of each
    feature's trial windows in one pool. A feature's candidates are scored together (``scores``):
    its trial's tokens and activations are gathered once, and the statistics of every matcher come
    from one matrix of predictions."""

    def __init__(self, pool: WindowPool, vocab: dict[int, str]):
        self.tokens, rows, positions = pool.flat
        self.keys = pool.doc_id[rows] << 32 | positions
        lengths = np.array([len(t) for t in pool.token_ids], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(lengths)])
        # The token d places back in the same window (-1 at a window's start), for "after" patterns.
        self.back = []
        for d in range(1, LOOK_BACK + 1):
            prev = np.full(len(self.tokens), -1, dtype=np.int64)
            prev[d:] = np.where(rows[d:] == rows[:-d], self.tokens[:-d], -1)
            self.back.append(prev)
        self.by_key = {key: np.array(sorted(ids), dtype=np.int64) for key, ids in _group(vocab).items()}

    def _ids(self, quoted: list[str]) -> np.ndarray:
        found = [self.by_key[q.lower()] for q in quoted if q.lower() in self.by_key]
        return np.concatenate(found) if found else np.zeros(0, np.int64)

    def _trial_tokens(self, trial: Trial, fired: Fired) -> tuple[np.ndarray, np.ndarray]:
        """(flat indices of the trial windows' tokens, the feature's activation on each)."""
        rows = np.concatenate([trial.positives, trial.negatives])
        lengths = self.starts[rows + 1] - self.starts[rows]
        idx = np.repeat(self.starts[rows] - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
        at = KeyIndex(fired.token_keys).find(self.keys[idx])
        return idx, np.where(at >= 0, fired.token_values[at], 0).astype(np.float32)

    def _matches(self, pattern: tuple[tuple[str, ...], tuple[str, ...]], idx: np.ndarray) -> np.ndarray:
        """A label's matcher (0/1) on the pool's flat tokens ``idx``."""
        targets, before = pattern
        hit = np.isin(self.tokens[idx], self._ids(list(targets)))
        if before:
            want = self._ids(list(before))
            hit &= np.logical_or.reduce([np.isin(prev[idx], want) for prev in self.back])
        return hit.astype(np.float32)

    def scores(self, labels: list[str], trial: Trial, fired: Fired) -> list[TokenScore]:
        """Each label's ``TokenScore`` on one feature's trial. A feature's candidates mostly quote the
        same tokens (a topic with them, the tokens alone): each distinct pattern is matched once."""
        idx, actual = self._trial_tokens(trial, fired)
        patterns = [_pattern(label) for label in labels]
        matched_once = {p: self._matches(p, idx) for p in dict.fromkeys(patterns)}
        predicted = np.stack([matched_once[p] for p in patterns]).astype(np.float64)
        on = (actual > 0).astype(np.float64)
        hits, matched = predicted @ on, predicted.sum(1)
        precision = np.divide(hits, matched, out=np.zeros_like(hits), where=matched > 0)
        recall = hits / on.sum() if on.sum() else np.zeros_like(hits)
        centred = actual - actual.mean(dtype=np.float64)
        spread = predicted - predicted.mean(1, keepdims=True)
        norms = np.sqrt((spread ** 2).sum(1) * (centred ** 2).sum())
        corr = np.divide(spread @ centred, norms, out=np.zeros_like(hits), where=norms > 0)
        return [TokenScore(float(c), float(p), float(r)) for c, p, r in zip(corr, precision, recall)]

    def score(self, label: str, trial: Trial, fired: Fired) -> TokenScore:
        return self.scores([label], trial, fired)[0]


def _pattern(label: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A label's (quoted targets, tokens before them), hashable."""
    targets, before = parse_pattern(label)
    return tuple(targets), tuple(before)


def _group(vocab: dict[int, str]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for tid, text in vocab.items():
        out.setdefault(token_key(text), []).append(tid)
    return out


