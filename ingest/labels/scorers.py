"""How well a label predicts where its feature fires, on windows the label was not written from.

- ``embedding`` (default; Delphi's embedding scorer): the label's sentence embedding must rank the
  feature's firing windows above windows where it stays silent. Positives are sampled across the
  quantiles of the feature's activation, so a label that only fits the strongest examples loses;
  half the negatives are *hard*: windows that hold the feature's top token but do not fire it, so
  naming the token alone is not enough. Score: AUROC (0.5 is chance).
- ``simulation`` (OpenAI's simulate-and-score without an LLM): the tokens the label quotes become a
  token matcher, run over every token of the pool: precision, recall and the correlation of the
  matcher with the real activations.
- ``detection`` (needs an LLM; see ``llm.py``): the model says which windows fit the label; score:
  balanced accuracy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import duckdb
import numpy as np
import pyarrow as pa

from .windows import WINDOW, KeyIndex, WindowPool

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
        where s.part = '{pool.part}' order by a.feature_id
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


def embedding_scores(pool: WindowPool, trials: dict[int, Trial], label_embeddings: dict[int, np.ndarray]) -> dict[int, float]:
    """AUROC of cos(label, window) between each feature's positives and negatives."""
    out = {}
    for f, vec in label_embeddings.items():
        t = trials.get(f)
        if t is not None:
            out[f] = auroc(pool.embeddings[t.positives] @ vec, pool.embeddings[t.negatives] @ vec)
    return out


class HeldOutJudge:
    """Embedding AUROC of any label texts on fixed held-out trials: baselines in a report are judged
    on exactly the windows the real labels were."""

    def __init__(self, pool: WindowPool, trials: dict[int, Trial], embed_fn):
        self.pool, self.trials, self.embed_fn = pool, trials, embed_fn

    def __call__(self, labels: dict[int, str]) -> dict[int, float]:
        ids = [f for f in labels if f in self.trials]
        vectors = self.embed_fn([labels[f] for f in ids]) if ids else []
        return embedding_scores(self.pool, self.trials, dict(zip(ids, vectors)))


_QUOTED = re.compile(r'"([^"]+)"')


def token_key(token: str) -> str:
    """How labels quote a token: stripped, lower case, whitespace shown as symbols."""
    shown = token.strip() or token
    return shown.replace("\n", "⏎").replace("\t", "⇥").lower()


@dataclass
class Simulation:
    precision: float
    recall: float
    correlation: float


class Simulator:
    """Token matchers compiled from labels, run over every token of a pool."""

    def __init__(self, pool: WindowPool, vocab: dict[int, str]):
        self.tokens, rows, positions = pool.flat
        self._where = KeyIndex(pool.doc_id[rows] << 32 | positions)
        self.by_key: dict[str, list[int]] = {}
        for tid, text in vocab.items():
            self.by_key.setdefault(token_key(text), []).append(tid)

    def matcher(self, label: str) -> np.ndarray:
        """Token ids the label quotes; a label that quotes nothing matches the tokens it names as words."""
        quoted = _QUOTED.findall(label) or re.findall(r"\w{3,}", label)
        ids = [t for q in quoted for t in self.by_key.get(q.lower(), [])]
        return np.array(sorted(set(ids)), dtype=np.int64)

    def score(self, label: str, fired: Fired) -> Simulation:
        predicted = np.isin(self.tokens, self.matcher(label)).astype(np.float32)
        actual = np.zeros(len(self.tokens), dtype=np.float32)
        at = self._where.find(fired.token_keys)
        actual[at[at >= 0]] = fired.token_values[at >= 0]
        on = actual > 0
        hits = float((predicted * on).sum())
        precision = hits / predicted.sum() if predicted.sum() else 0.0
        recall = hits / on.sum() if on.sum() else 0.0
        corr = 0.0
        if predicted.std() > 0 and actual.std() > 0:
            corr = float(np.corrcoef(predicted, actual)[0, 1])
        return Simulation(float(precision), float(recall), corr)
