"""Labelling, from evidence to a scored label per feature: used by the ingest and by `featureatlas label`.

Explainers read only the explain documents (see ``windows``) and each propose candidate labels.
Every candidate is embedded; the one with the best embedding AUROC on the choose documents' windows
(every window the feature fires in there, against as many silent ones: a prototype on the quick
atlas chose worse on 40 a side, 0.648 held-out AUROC against 0.656 on 400) is kept, and the kept
label is then scored on held-out windows by every configured scorer.
``label_score`` is the first scorer's score.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable

import duckdb
import numpy as np
import pyarrow as pa
from featureatlas.store.schema import EMBEDDING_DIM, LABEL_CANDIDATES
from tqdm import tqdm

from ..config import LabelConfig
from . import contrastive, llm, scorers, themes
from .contrastive import Candidate
from .windows import WindowPool, label_connection, window_pool

log = logging.getLogger(__name__)
# Part of the ingest's analysis-stage key: bump it when labelling changes, so old labels are redone.
LABELS_VERSION = 6
# A feature whose top activations (explainer side) all sit on one token id: it scores high on
# token matching trivially, so reports keep it apart.
SINGLE_TOKEN_TOP = 10


@dataclass
class Labels:
    """Per labelled feature (``features`` order): the kept label and its scores."""

    features: list[int]
    text: list[str]
    source: list[str]
    score: list[float | None]
    scores: list[list[dict]]  # [{"scorer", "score"}], every score of the kept label
    single_token: list[bool]
    embeddings: np.ndarray
    candidates: pa.Table  # every candidate of every explainer, with its scores (DuckDB ``label_candidates``)
    summary: dict = field(default_factory=dict)
    top_token: dict[int, str] = field(default_factory=dict)  # the strongest token per feature (explain documents)
    judge: scorers.HeldOutJudge | None = None  # scores other label texts on the same held-out trials

    def columns(self) -> dict[str, pa.Array | list]:
        """The feature-table columns labelling owns (``store.schema.FEATURES.label_names``), in ``features`` order."""
        return {
            "label": self.text,
            "label_source": self.source,
            "label_score": pa.array(self.score, pa.float32()),
            "label_scores": self.scores,
            "single_token": self.single_token,
            "label_embedding": pa.FixedSizeListArray.from_arrays(self.embeddings.ravel(), self.embeddings.shape[1]),
        }


def label_features(
    con: duckdb.DuckDBPyConnection,
    features: list[int],
    cfg: LabelConfig,
    embed_fn: Callable[[list[str]], np.ndarray],
    *,
    seed: int,
    chat: llm.Chat | None = None,
    logits: dict[int, list[str]] | None = None,
) -> Labels:
    """``con`` holds the atlas tables ``documents``, ``tokens`` and ``activations``. ``chat`` is
    needed by the llm explainer and the detection scorer; ``logits``: each feature's promoted
    tokens, shown to the LLM."""
    label_connection(con)
    contrastive.explain_tables(con)
    vocab = dict(con.execute("select distinct token_id, token from tokens").fetchall())
    log.info("labels: cutting windows, embedding those that judge labels")
    pools = {part: window_pool(con, part=part, embed_fn=embed_fn, max_windows=cfg.label_pool_windows, seed=seed)
             for part in ("explain", "choose", "holdout")}
    fired = {part: scorers.fired_in_pool(con, pool, features) for part, pool in pools.items()}
    proposed, top_token = _propose(con, features, pools["explain"], fired["explain"], vocab, cfg, embed_fn, seed=seed,
                                   chat=chat, logits=logits or {})
    choose_trials = scorers.make_trials(pools["choose"], fired["choose"], top_token, seed=seed, per_side=None)
    held_trials = scorers.make_trials(pools["holdout"], fired["holdout"], top_token, seed=seed)
    flat = [(f, c) for f in features for c in proposed[f] if c.status == "ok"]
    vectors = embed_fn([c.text for _, c in flat]) if flat else np.zeros((0, EMBEDDING_DIM), np.float32)
    choice_auroc: list[float] = []
    held_auroc: list[float] = []
    for i, (f, c) in enumerate(tqdm(flat, desc="score candidates", unit="label")):
        choice_auroc.append(scorers.embedding_scores(pools["choose"], choose_trials, {f: vectors[i]}).get(f, math.nan))
        held_auroc.append(scorers.embedding_scores(pools["holdout"], held_trials, {f: vectors[i]}).get(f, math.nan))
    chosen = _choose(flat, choice_auroc)
    detection = {}
    if "detection" in cfg.label_scorers:
        kept = {f: flat[i][1].text for f, i in chosen.items()}
        detection = llm.detect(_need(chat), pools["holdout"], held_trials, kept, workers=cfg.llm_workers, seed=seed)
    simulator = scorers.Simulator(pools["holdout"], vocab) if "simulation" in cfg.label_scorers else None
    out = _kept(features, [(flat[i][1], vectors[i], held_auroc[i]) if i is not None else None
                           for i in (chosen.get(f) for f in features)],
                cfg, simulator, fired["holdout"], detection, _single_token(con))
    out.candidates = _candidate_table(features, proposed, chosen, choice_auroc, held_auroc)
    out.top_token = {f: vocab[t] for f, t in top_token.items()}
    out.judge = scorers.HeldOutJudge(pools["holdout"], held_trials, embed_fn)
    scored = [s for s in out.score if s is not None]
    out.summary = {
        "explainer": cfg.label_explainer, "scorers": list(cfg.label_scorers), "labelled": len(features),
        "scored": len(scored), "label_score_mean": float(np.mean(scored)) if scored else None,
        "windows": {part: len(pool) for part, pool in pools.items()},
        "failed": int(sum(1 for c in out.candidates["status"].to_pylist() if c != "ok")),
    }
    return out


def _propose(con: duckdb.DuckDBPyConnection, features: list[int], pool: WindowPool, fired: dict, vocab: dict[int, str],
             cfg: LabelConfig, embed_fn: Callable[[list[str]], np.ndarray], *, seed: int, chat: llm.Chat | None,
             logits: dict[int, list[str]]) -> tuple[dict[int, list[Candidate]], dict[int, int]]:
    """Every explainer's candidates per feature, from the explain part only; and each feature's
    strongest token there (the hard negatives of its trials)."""
    evidence = contrastive.gather_evidence(con, features, pool, fired, vocab)
    top_token = {f: ev.at[0][0] for f, ev in evidence.items() if ev.at}
    bank = themes.WordBank.build(pool, embed_fn)
    explain_trials = scorers.make_trials(pool, fired, top_token, seed=seed, per_side=themes.PER_SIDE)
    for f, words in themes.themes(bank, pool, explain_trials).items():
        evidence[f].themes = words
    proposed: dict[int, list[Candidate]] = {f: contrastive.candidates(evidence[f], vocab) for f in features}
    if cfg.label_explainer == "llm":
        asked = [f for f in features if proposed[f]]
        written = llm.explain(_need(chat), asked, pool, fired, logits, workers=cfg.llm_workers, seed=seed)
        for f, extra in written.items():
            proposed[f] = extra + proposed[f]  # an LLM label wins ties with the contrastive fallback
    return proposed, top_token


def _kept(features: list[int], kept: list[tuple[Candidate, np.ndarray, float] | None], cfg: LabelConfig,
          simulator: scorers.Simulator | None, fired_held: dict, detection: dict[int, float],
          single: dict[int, bool]) -> Labels:
    """The kept label of each feature (candidate, its embedding, its held-out AUROC; None where no
    candidate exists) with every held-out score."""
    out = Labels([], [], [], [], [], [], np.zeros((len(features), EMBEDDING_DIM), np.float32), pa.table({}))
    for row, (f, choice) in enumerate(zip(features, kept)):
        out.features.append(f)
        if choice is None:  # no candidate at all: an LLM is only asked about features that have contrastive ones
            out.text.append("unlabelled: never fired on the explain documents")
            out.source.append("none")
            out.score.append(None)
            out.scores.append([])
            out.single_token.append(False)
            continue
        cand, vector, held_auroc = choice
        per = {"embedding": held_auroc}
        if simulator is not None and f in fired_held:
            sim = simulator.score(cand.text, fired_held[f])
            per.update({"simulation": sim.correlation, "simulation_precision": sim.precision, "simulation_recall": sim.recall})
        if f in detection:
            per["detection"] = detection[f]
        primary = per.get(cfg.label_scorers[0], math.nan)
        out.text.append(cand.text)
        out.source.append(cand.explainer)
        out.score.append(None if math.isnan(primary) else float(primary))
        out.scores.append([{"scorer": k, "score": None if math.isnan(v) else float(v)} for k, v in per.items()])
        out.single_token.append(bool(single.get(f, False)))
        out.embeddings[row] = vector
    return out


def _candidate_table(features: list[int], proposed: dict[int, list[Candidate]], chosen: dict[int, int],
                     choice_auroc: list[float], held_auroc: list[float]) -> pa.Table:
    """Every candidate of every feature with its scores (``ok`` candidates are indexed in order)."""
    rows: dict[str, list] = {name: [] for name in LABEL_CANDIDATES.names}
    j = 0
    for f in features:
        for c in proposed[f]:
            ok = c.status == "ok"
            for name, value in (("feature_id", f), ("explainer", c.explainer), ("kind", c.kind), ("label", c.text),
                                ("status", c.status), ("detail", c.detail),
                                ("choice_auroc", _none(choice_auroc[j]) if ok else None),
                                ("holdout_auroc", _none(held_auroc[j]) if ok else None),
                                ("chosen", ok and chosen.get(f) == j)):
                rows[name].append(value)
            j += ok
    return pa.table(rows, schema=LABEL_CANDIDATES.arrow())


def _choose(flat: list[tuple[int, Candidate]], auroc: list[float]) -> dict[int, int]:
    """Per feature, the index into ``flat`` of the candidate with the best choose-document AUROC;
    the first candidate (an LLM's, when there is one) where no candidate could be judged. Shrinking
    each feature's ranking towards how each kind of phrase does on average was tried on the quick
    atlas: no better on held-out windows."""
    chosen: dict[int, int] = {}
    for i, ((f, _), a) in enumerate(zip(flat, auroc)):
        best = chosen.get(f)
        if best is None or (not math.isnan(a) and (math.isnan(auroc[best]) or a > auroc[best])):
            chosen[f] = i
    return chosen


def _need(chat: llm.Chat | None) -> llm.Chat:
    if chat is None:
        raise ValueError("the llm explainer and the detection scorer need a chat (see llm.make_chat)")
    return chat


def _none(x: float) -> float | None:
    return None if math.isnan(x) else x


def _single_token(con: duckdb.DuckDBPyConnection) -> dict[int, bool]:
    return dict(con.execute(
        f"""
        select feature_id, count(distinct token_id) = 1 from (
            select feature_id, token_id, row_number() over (partition by feature_id order by value desc) as r from explain_hits
        ) where r <= {SINGLE_TOKEN_TOP} group by feature_id
        """
    ).fetchall())
