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
from .windows import label_connection, window_pool

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
    cap = cfg.label_pool_windows
    explain_pool = window_pool(con, part="explain", embed_fn=embed_fn, max_windows=cap, seed=seed)
    choose_pool = window_pool(con, part="choose", embed_fn=embed_fn, max_windows=cap, seed=seed)
    held_pool = window_pool(con, part="holdout", embed_fn=embed_fn, max_windows=cap, seed=seed)
    fired_explain = scorers.fired_in_pool(con, explain_pool, features)
    fired_choose = scorers.fired_in_pool(con, choose_pool, features)
    fired_held = scorers.fired_in_pool(con, held_pool, features)
    evidence = contrastive.gather_evidence(con, features, explain_pool, fired_explain, vocab)
    top_token = {f: ev.at[0][0] for f, ev in evidence.items() if ev.at}
    bank = themes.WordBank.build(explain_pool, embed_fn)
    explain_trials = scorers.make_trials(explain_pool, fired_explain, top_token, seed=seed, per_side=themes.PER_SIDE)
    for f, words in themes.themes(bank, explain_pool, explain_trials).items():
        evidence[f].themes = words

    proposed: dict[int, list[Candidate]] = {f: contrastive.candidates(evidence[f], vocab) for f in features}
    if cfg.label_explainer == "llm":
        asked = [f for f in features if proposed[f]]
        written = llm.explain(_need(chat), asked, explain_pool, fired_explain, logits or {},
                              workers=cfg.llm_workers, seed=seed)
        for f, extra in written.items():
            proposed[f] = extra + proposed[f]  # an LLM label wins ties with the contrastive fallback

    choose_trials = scorers.make_trials(choose_pool, fired_choose, top_token, seed=seed, per_side=None)
    held_trials = scorers.make_trials(held_pool, fired_held, top_token, seed=seed)
    flat = [(f, c) for f in features for c in proposed[f] if c.status == "ok"]
    vectors = embed_fn([c.text for _, c in flat]) if flat else np.zeros((0, EMBEDDING_DIM), np.float32)

    choice_auroc: list[float] = []
    held_auroc: list[float] = []
    for i, (f, c) in enumerate(tqdm(flat, desc="score candidates", unit="label")):
        choice_auroc.append(scorers.embedding_scores(choose_pool, choose_trials, {f: vectors[i]}).get(f, math.nan))
        held_auroc.append(scorers.embedding_scores(held_pool, held_trials, {f: vectors[i]}).get(f, math.nan))
    chosen = _choose(flat, choice_auroc)

    simulator = scorers.Simulator(held_pool, vocab) if "simulation" in cfg.label_scorers else None
    single = _single_token(con)
    detection = {}
    if "detection" in cfg.label_scorers:
        kept = {f: flat[i][1].text for f, i in chosen.items()}
        detection = llm.detect(_need(chat), held_pool, held_trials, kept, workers=cfg.llm_workers, seed=seed)

    out = Labels([], [], [], [], [], [], np.zeros((len(features), EMBEDDING_DIM), np.float32),
                 pa.table({}))
    for row, f in enumerate(features):
        out.features.append(f)
        i = chosen.get(f)
        if i is None:  # no candidate at all: an LLM is only asked about features that have contrastive ones
            out.text.append("unlabelled: never fired on the explain documents")
            out.source.append("none")
            out.score.append(None)
            out.scores.append([])
            out.single_token.append(False)
            continue
        cand = flat[i][1]
        per = {"embedding": held_auroc[i]}
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
        out.embeddings[row] = vectors[i]

    cand_rows = {k: [] for k in ("feature_id", "explainer", "kind", "label", "status", "detail", "choice_auroc",
                                 "holdout_auroc", "chosen")}
    j = 0
    for f in features:
        for c in proposed[f]:
            ok = c.status == "ok"
            cand_rows["feature_id"].append(f)
            cand_rows["explainer"].append(c.explainer)
            cand_rows["kind"].append(c.kind)
            cand_rows["label"].append(c.text)
            cand_rows["status"].append(c.status)
            cand_rows["detail"].append(c.detail)
            cand_rows["choice_auroc"].append(_none(choice_auroc[j]) if ok else None)
            cand_rows["holdout_auroc"].append(_none(held_auroc[j]) if ok else None)
            cand_rows["chosen"].append(ok and chosen.get(f) == j)
            j += ok
    out.candidates = pa.table(cand_rows, schema=LABEL_CANDIDATES.arrow())
    out.top_token = {f: vocab[t] for f, t in top_token.items()}
    out.judge = scorers.HeldOutJudge(held_pool, held_trials, embed_fn)
    scored = [s for s in out.score if s is not None]
    out.summary = {
        "explainer": cfg.label_explainer, "scorers": list(cfg.label_scorers), "labelled": len(features),
        "scored": len(scored), "label_score_mean": float(np.mean(scored)) if scored else None,
        "windows": {"explain": len(explain_pool), "choose": len(choose_pool), "holdout": len(held_pool)},
        "failed": int(sum(1 for c in cand_rows["status"] if c != "ok")),
    }
    return out


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
