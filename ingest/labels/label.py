"""Labelling, from evidence to a scored label per feature: used by the ingest and by `featureatlas label`.

Explainers read only the explain documents (see ``windows``) and each propose candidate labels.
Every candidate is judged on the choose documents' windows (every window the feature fires in
there, against as many silent ones: a prototype on the quick atlas chose worse on 40 a side, 0.648
held-out AUROC against 0.656 on 400) by two scorers that fail in different ways: the embedding
AUROC (does the label read like the windows it fires in? a list of topic words games it) and the
token correlation (does it name the tokens that fire? a bare token games it). The candidate with
the best weighted sum is kept and scored again on held-out windows; ``label_score`` is the first configured
scorer's score there.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import duckdb
import numpy as np
import pyarrow as pa
from featureatlas.store.schema import EMBEDDING_DIM, FEATURES, LABEL_CANDIDATES
from tqdm import tqdm

from ..config import LabelConfig
from . import contrastive, kinds, llm, scorers, topics, wording
from .contrastive import Candidate
from .windows import WindowPool, label_connection, window_pool
from .wording import Evidence

log = logging.getLogger(__name__)
# Part of the ingest's labels-stage key: bump it when labelling changes, so old labels are redone.
LABELS_VERSION = 22
# A feature whose top activations (explainer side) all sit on one token id: it scores high on
# token matching trivially, so reports keep it apart.
SINGLE_TOKEN_TOP = 10
# How much the token correlation counts in choosing a label. Replaying the choice over every candidate
# of the quick atlas (4,096 features; held-out embedding AUROC / token correlation of the kept
# labels): 0 gave 0.660 / 0.289, 0.5 gave 0.657 / 0.317, 1 gave 0.655 / 0.319. Half keeps nearly all
# of the token gain for a third of the AUROC cost.
TOKEN_WEIGHT = 0.5
# A topic must earn its words: it names a feature only when its label beats every label without a
# topic by this much of the choice score. Replayed from ``label_candidates`` of the quick atlas
# (4,096 features; held-out AUROC of the kept labels / share named by a topic): 0 gave 0.6245 / 44%,
# 0.02 0.6235 / 40%, 0.03 0.6226 / 36%, 0.05 0.6201 / 28%. Of 30 labels 0.03 took a topic from,
# read: about 20 topics were noise on a token feature (`latin ("se")`, `snow ("ord", "ice")`, `Xiongnu
# ("si")`), 7 fit (`regular expressions`, `error messages`).
TOPIC_MARGIN = 0.03


@dataclass
class Labels:
    """Per labelled feature (``features`` order): the kept label, its description and its scores."""

    features: list[int]
    text: list[str]
    description: list[str]
    source: list[str]
    score: list[float | None]
    scores: list[list[dict]]  # [{"scorer", "score"}], every score of the kept label
    single_token: list[bool]
    embeddings: np.ndarray
    kind: list[str | None]  # the kind of token that holds most of its mass (``kinds.KindStats.dominant``)
    kinds: list[list[dict]]  # the kinds holding a fair share of its mass: {kind, share, recall}
    candidates: pa.Table  # every candidate of every explainer, with its scores (DuckDB ``label_candidates``)
    summary: dict = field(default_factory=dict)
    top_token: dict[int, str] = field(default_factory=dict)  # the strongest token per feature (explain documents)
    judge: scorers.HeldOutJudge | None = None  # scores other label texts on the same held-out trials

    def columns(self) -> dict[str, pa.Array | list]:
        """The feature-table columns labelling owns (``store.schema.FEATURES.label_names``), in ``features`` order."""
        return {
            "label": self.text,
            "description": self.description,
            "label_source": self.source,
            "label_score": pa.array(self.score, pa.float32()),
            "label_scores": self.scores,
            "single_token": self.single_token,
            "label_embedding": pa.FixedSizeListArray.from_arrays(self.embeddings.ravel(), self.embeddings.shape[1]),
            "kind": pa.array(self.kind, pa.string()),
            "kinds": pa.array(self.kinds, FEATURES.arrow().field("kinds").type),
        }


@dataclass
class Judged:
    """Every candidate's scores on one part of the split (``nan`` where its feature has no trial)."""

    auroc: np.ndarray
    token: list[scorers.TokenScore | None]

    @property
    def combined(self) -> np.ndarray:
        """What candidates are chosen by: embedding AUROC plus ``TOKEN_WEIGHT`` times token
        correlation, so a label must both read like the windows it fires in and name the tokens that fire."""
        return self.auroc + TOKEN_WEIGHT * np.array([t.correlation if t else np.nan for t in self.token])


def label_features(
    con: duckdb.DuckDBPyConnection,
    features: list[int],
    cfg: LabelConfig,
    embed_fn: Callable[[list[str]], np.ndarray],
    *,
    seed: int,
    chat: llm.Chat | None = None,
    logits: dict[int, list[str]] | None = None,
    windows: pa.Table | None = None,
) -> Labels:
    """``con`` holds the atlas tables ``documents``, ``tokens`` and ``activations``; ``windows``:
    the stored window embeddings (embedded here when None). ``chat`` is needed by the llm explainer
    and the detection scorer; ``logits``: each feature's promoted tokens, shown to the LLM."""
    label_connection(con)
    contrastive.explain_tables(con)
    vocab = dict(con.execute("select distinct token_id, token from tokens").fetchall())
    log.info("labels: cutting windows")
    pools = {part: window_pool(con, part=part, embed_fn=embed_fn, stored=windows, max_windows=cfg.label_pool_windows,
                               seed=seed) for part in ("explain", "choose", "holdout")}
    fired = {part: scorers.fired_in_pool(con, pool, features) for part, pool in pools.items()}
    evidence, top_token, stats, bank = _evidence(con, features, pools["explain"], fired["explain"], vocab, embed_fn,
                                                 cfg, seed=seed)
    proposed = _propose(features, evidence, pools["explain"], fired["explain"], cfg, seed=seed, chat=chat,
                        logits=logits or {})
    trials = {"choose": scorers.make_trials(pools["choose"], fired["choose"], top_token, seed=seed, per_side=None),
              "holdout": scorers.make_trials(pools["holdout"], fired["holdout"], top_token, seed=seed)}
    flat = [(f, c) for f in features for c in proposed[f] if c.status == "ok"]
    vectors = _embed_candidates(flat, trials, embed_fn, bank)
    judged = {part: _judge(flat, vectors, pools[part], trials[part], fired[part], vocab, part)
              for part in ("choose", "holdout")}
    chosen = _choose(flat, judged["choose"].combined)
    detection = {}
    if "detection" in cfg.label_scorers:
        kept = {f: flat[i][1].text for f, i in chosen.items()}
        detection = llm.detect(_need(chat), pools["holdout"], trials["holdout"], kept, workers=cfg.llm_workers, seed=seed)
    out = _kept(features, chosen, flat, vectors, judged["holdout"], cfg, detection, _single_token(con))
    out.kind = [stats.dominant(row) for row in range(len(features))]
    out.kinds = [stats.kept(row) for row in range(len(features))]
    out.description = [wording.describe(evidence[f]) for f in features]
    out.candidates = _candidate_table(features, proposed, chosen, judged)
    out.top_token = {f: vocab[t] for f, t in top_token.items()}
    out.judge = scorers.HeldOutJudge(pools["holdout"], trials["holdout"], fired["holdout"], vocab, embed_fn)
    out.summary = summarize(cfg, out.score, out.scores, {part: len(pool) for part, pool in pools.items()},
                            out.candidates["status"].to_pylist())
    return out


def summarize(cfg: LabelConfig, score: list[float | None], scores: list[list[dict]], windows: dict[str, int],
              status: list[str]) -> dict[str, Any]:
    """The labels stage's summary from its columns (of one call, or of the shards it ran in)."""
    scored = [s for s in score if s is not None]
    return {
        "explainer": cfg.label_explainer, "scorers": list(cfg.label_scorers), "labelled": len(score),
        "scored": len(scored), "label_score_mean": float(np.mean(scored)) if scored else None,
        "token_score_mean": _mean([_score_of(per, "token") for per in scores]),
        "windows": windows, "failed": int(sum(1 for c in status if c != "ok")),
        "kinds": kinds.vocabulary(),
    }


def _evidence(con: duckdb.DuckDBPyConnection, features: list[int], pool: WindowPool, fired: dict, vocab: dict[int, str],
              embed_fn: Callable[[list[str]], np.ndarray], cfg: LabelConfig, *,
              seed: int) -> tuple[dict[int, Evidence], dict[int, int], kinds.KindStats, topics.ConceptBank]:
    """Each feature's evidence from the explain part only, with its kind of token and its topics;
    its strongest token id there (the hard negatives of its trials); its share of every kind; and
    the bank its topics were named from."""
    evidence, top_token = contrastive.gather_evidence(con, features, vocab)
    stats = kinds.kind_stats(con, features)
    for row, f in enumerate(features):
        name = stats.dominant(row)
        if name is not None:
            evidence[f].kind = kinds.KINDS[name].phrase
            evidence[f].kind_share = float(stats.share[row, list(kinds.KINDS).index(name)])
            evidence[f].kind_says_where = kinds.KINDS[name].source is not None
    bank = topics.ConceptBank.load(embed_fn, topics.corpus_titles(con), embedder=cfg.embedder, nouns=cfg.label_topic_nouns)
    explain_trials = scorers.make_trials(pool, fired, top_token, seed=seed, per_side=topics.PER_SIDE)
    where = {f: wording.context(ev)[1] for f, ev in evidence.items()}
    phrases = sorted({w for w in where.values() if w})
    vectors = dict(zip(phrases, embed_fn([p.removeprefix("in ") for p in phrases]))) if phrases else {}
    places = {f: vectors[w] if w else None for f, w in where.items()}
    for f, names in topics.topics(bank, pool, explain_trials, places).items():
        evidence[f].topics = names
    return evidence, top_token, stats, bank


def _propose(features: list[int], evidence: dict[int, Evidence], pool: WindowPool, fired: dict, cfg: LabelConfig, *,
             seed: int, chat: llm.Chat | None, logits: dict[int, list[str]]) -> dict[int, list[Candidate]]:
    """Every explainer's candidates per feature, written from the explain part only."""
    proposed = {f: [Candidate(text, contrastive.EXPLAINER, kind) for text, kind in wording.candidates(evidence[f])]
                for f in features}
    if cfg.label_explainer == "llm":
        asked = [f for f in features if proposed[f]]
        notes = {f: wording.describe(evidence[f]) for f in asked}
        written = llm.explain(_need(chat), asked, pool, fired, logits, notes, workers=cfg.llm_workers, seed=seed)
        for f, extra in written.items():
            proposed[f] = extra + proposed[f]  # an LLM label wins ties with the contrastive fallback
    return proposed


def _starts(flat: list[tuple[int, Candidate]]) -> list[int]:
    """Where each feature's run of candidates begins in ``flat`` (its first, kept if none is judged)."""
    return [i for i in range(len(flat)) if i == 0 or flat[i - 1][0] != flat[i][0]]


def _embed_candidates(flat: list[tuple[int, Candidate]], trials: dict[str, dict[int, scorers.Trial]],
                      embed_fn: Callable[[list[str]], np.ndarray], bank: topics.ConceptBank) -> np.ndarray:
    """[len(flat), dim] the embedding of every candidate that is judged (its feature has a trial in
    choose or holdout) or kept unjudged (a feature's first candidate); zeros for the rest, which
    nothing reads. With a wide dictionary over a short corpus most features fire too rarely to be
    judged, and embedding their every candidate was most of the stage. A candidate that is a bare
    topic name takes the bank's vector (the same embedder's, of the same text: the same bits)."""
    judged = set(trials["choose"]) | set(trials["holdout"])
    wanted = sorted({i for i, (f, _) in enumerate(flat) if f in judged} | set(_starts(flat)))
    vectors = np.zeros((len(flat), EMBEDDING_DIM), np.float32)
    known = bank.rows_of([flat[i][1].text for i in wanted])
    new = [i for i, row in zip(wanted, known) if row < 0]
    vectors[[i for i, row in zip(wanted, known) if row >= 0]] = bank.vectors[known[known >= 0]]
    if new:
        vectors[new] = embed_fn([flat[i][1].text for i in new])
    return vectors


def _judge(flat: list[tuple[int, Candidate]], vectors: np.ndarray, pool: WindowPool, trials: dict[int, scorers.Trial],
           fired: dict, vocab: dict[int, str], part: str) -> Judged:
    """Every candidate's scores; a feature's candidates are consecutive in ``flat`` and judged together."""
    tokens = scorers.TokenScorer(pool, vocab)
    auroc = np.full(len(flat), np.nan)
    token: list[scorers.TokenScore | None] = [None] * len(flat)
    starts = _starts(flat) + [len(flat)]
    for a, b in tqdm(list(zip(starts, starts[1:])), desc=f"score candidates ({part})", unit="feature"):
        f = flat[a][0]
        trial = trials.get(f)
        if trial is not None:
            auroc[a:b] = scorers.embedding_auroc(pool, trial, vectors[a:b])
            token[a:b] = tokens.scores([c.text for _, c in flat[a:b]], trial, fired[f])
    return Judged(auroc, token)


def _kept(features: list[int], chosen: dict[int, int], flat: list[tuple[int, Candidate]], vectors: np.ndarray,
          held: Judged, cfg: LabelConfig, detection: dict[int, float], single: dict[int, bool]) -> Labels:
    """The kept label of each feature with every held-out score (a placeholder where no candidate exists)."""
    out = Labels([], [], [], [], [], [], [], np.zeros((len(features), EMBEDDING_DIM), np.float32), [], [], pa.table({}))
    for row, f in enumerate(features):
        out.features.append(f)
        i = chosen.get(f)
        if i is None:  # no candidate at all: an LLM is only asked about features that have contrastive ones
            out.text.append("unlabelled: no token, kind or topic stands out in the explain documents")
            out.source.append("none")
            out.score.append(None)
            out.scores.append([])
            out.single_token.append(False)
            continue
        cand = flat[i][1]
        per = {"embedding": float(held.auroc[i])}
        if held.token[i] is not None:
            t = held.token[i]
            per.update({"token": t.correlation, "token_precision": t.precision, "token_recall": t.recall})
        if f in detection:
            per["detection"] = detection[f]
        primary = per.get(cfg.label_scorers[0], math.nan)
        out.text.append(cand.text)
        out.source.append(cand.explainer)
        out.score.append(None if math.isnan(primary) else float(primary))
        out.scores.append([{"scorer": k, "score": _none(v)} for k, v in per.items()])
        out.single_token.append(bool(single.get(f, False)))
        out.embeddings[row] = vectors[i]
    return out


def _candidate_table(features: list[int], proposed: dict[int, list[Candidate]], chosen: dict[int, int],
                     judged: dict[str, Judged]) -> pa.Table:
    """Every candidate of every feature with its scores (``ok`` candidates are indexed in order)."""
    rows: dict[str, list] = {name: [] for name in LABEL_CANDIDATES.names}
    j = 0
    for f in features:
        for c in proposed[f]:
            ok = c.status == "ok"
            scores = {}
            for where, part in (("choice", "choose"), ("holdout", "holdout")):
                scores[f"{where}_auroc"] = _none(float(judged[part].auroc[j])) if ok else None
                scores[f"{where}_token"] = _token(judged[part].token[j]) if ok else None
            values = {"feature_id": f, "explainer": c.explainer, "kind": c.kind, "label": c.text, "status": c.status,
                      "detail": c.detail, **scores, "chosen": ok and chosen.get(f) == j}
            for name in LABEL_CANDIDATES.names:
                rows[name].append(values[name])
            j += ok
    return pa.table(rows, schema=LABEL_CANDIDATES.arrow())


def _choose(flat: list[tuple[int, Candidate]], score: np.ndarray) -> dict[int, int]:
    """Per feature, the index into ``flat`` of the candidate with the best choose-document score, a
    topic's score counted ``TOPIC_MARGIN`` lower; the first candidate (an LLM's, when there is one)
    where no candidate could be judged. Shrinking each feature's ranking towards how each kind of
    phrase does on average was tried on the quick atlas: no better on held-out windows."""
    handicap = np.array([TOPIC_MARGIN if c.kind == "topic" else 0.0 for _, c in flat])
    score = score - handicap
    chosen: dict[int, int] = {}
    for i, ((f, _), a) in enumerate(zip(flat, score)):
        best = chosen.get(f)
        if best is None or (not math.isnan(a) and (math.isnan(score[best]) or a > score[best])):
            chosen[f] = i
    return chosen


def _need(chat: llm.Chat | None) -> llm.Chat:
    if chat is None:
        raise ValueError("the llm explainer and the detection scorer need a chat (see llm.make_chat)")
    return chat


def _none(x: float) -> float | None:
    return None if math.isnan(x) else x


def _token(t: scorers.TokenScore | None) -> float | None:
    return None if t is None else t.correlation


def _score_of(per: list[dict], scorer: str) -> float | None:
    return next((s["score"] for s in per if s["scorer"] == scorer), None)


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _single_token(con: duckdb.DuckDBPyConnection) -> dict[int, bool]:
    return dict(con.execute(
        f"""
        select feature_id, count(distinct token_id) = 1 from (
            select feature_id, token_id, row_number() over (partition by feature_id order by value desc, doc_id, position) as r
            from explain_hits
        ) where r <= {SINGLE_TOKEN_TOP} group by feature_id
        """
    ).fetchall())
