"""The queries users run, shared by the HTTP routes, the CLI and the Python API: search, contrast,
probe, steering, neighbours, features.

Each returns plain JSON-ready dicts. Input errors raise ``store.errors.UserError``s (HTTP 4xx). The
checks are here, not only in the HTTP schema, because Python callers pass any object: a float id
or a numpy integer must be refused or made an ``int`` before it reaches a query or the answer.
"""

from __future__ import annotations

import copy
import logging
import numbers
import os
import re
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from typing import Any

import numpy as np
from featureatlas.ingest.config import config_of
from featureatlas.ingest.embed import embed
from featureatlas.ingest.probe import ModelBusy, Probe
from featureatlas.ingest.steer import Continuation, Edit
from featureatlas.store import calibrate as C
from featureatlas.store import search as S
from featureatlas.store.atlas import Atlas, QueryInterrupted
from featureatlas.store.corpus_search import WindowIndex, coverage, enriched, match_windows
from featureatlas.store.dictionaries import dictionary_of, family, feature_ids, read_dictionaries
from featureatlas.store.errors import BadParameter, NotFound
from featureatlas.store.map_view import NoMap, map_data, map_json, map_levels
from featureatlas.store.schema import ANN_MIN_ROWS
from featureatlas.store.search import SEARCH_MODES

log = logging.getLogger(__name__)

# Features firing on more than this share of tokens are down-weighted in fused search: they match
# everything and crowd out specific features (a common complaint about feature search).
DENSE_DENSITY = 0.05
DENSE_WEIGHT = 0.5
MAX_K = 100
MAX_PAGE = 1000  # features in one page of the feature list
MAX_OFFSET = 2**31 - 1  # DuckDB's OFFSET is a BIGINT; past any atlas's size anyway
# The keys of a neighbour and of a contrast hit (the Python API names the columns of an empty answer by them).
NEIGHBOR_KEYS = ("feature_id", "similarity", "label", "density")
CONTRAST_KEYS = ("feature_id", "label", "score", "density")
# What an atlas is, from its manifest (``info``): the rest (config, versions, parts) is for the CLI's ``info --json``.
INFO_KEYS = ("model", "hook", "dictionary", "metrics", "families", "corpus", "tokens", "labels", "firing", "created_at")
# Each signal contributes this many candidates per requested hit (at least ``MIN_CANDIDATES``
# hits' worth) before fusion: a short answer is the head of the same ranking as a long one.
CANDIDATES_PER_HIT = 3
MIN_CANDIDATES = 10
# Tokens shown around the strongest one in a search hit's snippet.
SNIPPET_BEFORE = 12
SNIPPET_AFTER = 4


# Prompts per side of a contrast query: each one is a forward pass of the model.
MAX_PROMPTS = 16
MAX_STEERED = 16  # features steered at once
MAX_PROMPT_CHARS = 4000  # refused before tokenizing (the token limit is checked after)
MAX_QUERY_CHARS = 1000  # a search query
# A search's inference signal waits at most this long for a model busy steering, then is left out.
INFERENCE_WAIT_S = 0.5
# The inference signal runs the query through the model (~150 ms here), which says something only
# when the query is text the model reads (a sentence, a line of code): a query of at most this many
# words, letters and digits only, is a topic and skips it (``reads_as_text``), unless asked for alone.
TOPIC_WORDS = 6
_NOT_TOPIC = re.compile(r"[^\w\s'’-]")  # punctuation, brackets, operators: text or code
ANSWERS = 512  # searches remembered per atlas (the service is made anew for each publish)


# "features about X", "a feature that fires on X": the concept is X (the rest would pull every
# search towards text about features).
_ASKING = re.compile(r"^\s*(show me |find |search for )?(an? |the |all )?(features?|latents?)"
                     r"(\s+(that|which)\s+(fires?|responds?|activates?|detects?))?"
                     r"\s+(about|on|for|related to|detecting|involving)\s+", re.I)


def concept_of(query: str) -> str:
    """The concept a query asks about, without "features about" and the like."""
    return _ASKING.sub("", query).strip() or query.strip()


def reads_as_text(concept: str) -> bool:
    """Whether a query is text to run through the model rather than a topic ("football", "French
    language text" are topics; "To be, or not to be" and "def add(a, b):" are text)."""
    return len(concept.split()) > TOPIC_WORDS or bool(_NOT_TOPIC.search(concept))


def not_found(query: str, cover: dict[str, Any]) -> str:
    """What the UI and the CLI say when no hit is confident."""
    docs = cover["documents"]
    where = "does not mention it" if docs == 0 else f"mentions it in {docs:,} of {cover['documents_total']:,} documents"
    return f"No feature in this atlas is clearly about {query!r}; the corpus {where}. The nearest features follow, all weak."


def snippet(tokens: list[str], activations: list[float]) -> str:
    """An example on one line around its strongest token, which is in [[brackets]]."""
    i = int(np.argmax(activations))
    before = "".join(tokens[max(0, i - SNIPPET_BEFORE) : i])
    after = "".join(tokens[i + 1 : i + 1 + SNIPPET_AFTER])
    return f"{before}[[{tokens[i]}]]{after}".replace("\n", "⏎")


def _check_text(where: str, text: str, limit: int = MAX_PROMPT_CHARS) -> str:
    """Refused before tokenizing: a megabyte of text would cost the model's tokenizer seconds."""
    if not isinstance(text, str):
        raise BadParameter(where, f"must be a string, got {type(text).__name__}")
    if len(text) > limit:
        raise BadParameter(where, f"is {len(text):,} characters; the limit is {limit:,}")
    return text


def _integer(where: str, value: Any) -> int:
    """``value`` as a Python ``int``; numpy integers pass, bools and floats (3.7 is not feature 3) do not."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise BadParameter(where, f"must be an integer, got {value!r}")
    return int(value)


def _number(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise BadParameter(where, f"must be a number, got {value!r}")
    return float(value)


def _check_k(k: int) -> int:
    k = _integer("k", k)
    if not 1 <= k <= MAX_K:
        raise BadParameter("k", f"must be between 1 and {MAX_K}")
    return k


def _prompts(where: str, prompts: list[str]) -> list[str]:
    """A list of prompts, each checked (a lone string would be read as a list of characters)."""
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise BadParameter(where, "give a list of prompts, e.g. [\"...\"]")
    if len(prompts) > MAX_PROMPTS:
        raise BadParameter(where, f"at most {MAX_PROMPTS} prompts on each side")
    return [_check_text(f"{where}[{i}]", text) for i, text in enumerate(prompts)]


class AtlasService:
    def __init__(self, atlas: Atlas, *, probe_device: str | None = None):
        if not atlas.has_table("windows"):
            raise BadParameter("--atlas", f"{atlas.root} was published by an older Feature Atlas, without the corpus "
                                          "windows search needs; re-run `featureatlas ingest` on it (finished stages are reused)")
        self.atlas = atlas
        self.probe = Probe(atlas, device=probe_device)
        self.embedder = config_of(atlas.manifest).labels.embedder
        self._map_parts: dict[str, Any] = {}
        self._map_lock = threading.RLock()
        self._kinds: tuple[S.KindIndex | None, np.ndarray | None] | None = None  # (None, None): an atlas without kinds
        self._kinds_lock = threading.Lock()
        self._answers: OrderedDict[tuple[str, int, str | None, str | None], dict[str, Any]] = OrderedDict()
        self._answers_lock = threading.Lock()
        self._windows: WindowIndex | None = None  # corpus search's data in memory, once warmed up
        self._held_snippets: dict[int, str] | None = None  # every feature's snippet, warmed up on small atlases
        # The inference signal's own thread: the model runs while the other signals are computed.
        self._inference = ThreadPoolExecutor(1, thread_name_prefix="search-inference")
        # The corpus windows a query matches (coverage, the corpus signal) are read while the vector
        # signals run: on an indexed atlas both are LanceDB reads (~10 and ~17 ms at 100k features)
        # whose native side runs beside Python's. A thread per core, as many as the searches a server
        # runs side by side (threads start on demand).
        self._matching = ThreadPoolExecutor(os.cpu_count() or 2, thread_name_prefix="search-windows")

    def warm_up(self) -> None:
        """Load the embedder and open the tables now; the model behind search by inference stays
        lazy (seconds to load, and many deployments never use it)."""
        embed(["warm up"], name=self.embedder)
        self.atlas.open_all()
        self.atlas.sql_workers  # noqa: B018 (started now: a worker process takes ~0.3 s to start)
        S.decoder_neighbors(self.atlas, 0, 1)  # small atlases load their decoders for exact search here
        self._kind_index()  # the kinds' ways of asking, embedded once: the first search would wait for it
        self._windows = WindowIndex.load(self.atlas)
        if self.atlas.d_sae < ANN_MIN_ROWS:  # exact search's matrices (an indexed atlas has its index warm)
            for column in ("label_embedding", "context_embedding"):
                self.atlas.vectors(column)
            self.atlas.hold_pages()
            # Each search shows its hits' snippets: ~5 ms a search from LanceDB, 0.3 s once here at 4k features.
            self._held_snippets = self._snippets(list(range(self.atlas.d_sae)))
        # The map document takes seconds at 100k features: built in the background, so the server
        # starts answering now and the first visitor of the map does not wait for all of it.
        threading.Thread(target=self._warm_map, name="warm-map", daemon=True).start()

    def _warm_map(self) -> None:
        try:
            self.map_head()
        except NoMap:
            pass  # an atlas without a map: /api/map says so when asked

    def info(self) -> dict[str, Any]:
        """What was mapped and how well: model, hook, dictionary, metrics, corpus, tokens, labels,
        and firing (features that never fired or fired rarely over the corpus)."""
        return copy.deepcopy({k: self.atlas.manifest.get(k) for k in INFO_KEYS})  # the caller's to change

    def dictionaries(self) -> dict[str, Any]:
        """Every dictionary of the atlas (``store.schema.DICTIONARIES``), the default first."""
        rows = copy.deepcopy(self._dictionaries)  # the caller's to change
        return {"dictionaries": rows, "default": rows[0]["dictionary"]}

    @cached_property
    def _dictionaries(self) -> list[dict[str, Any]]:
        return read_dictionaries(self.atlas)

    def _within(self, dictionary: str | None) -> range | None:
        """The feature ids of ``dictionary`` (None: every feature), or ``NotFound`` for an unknown id."""
        if not dictionary:  # None, or a form's empty choice: every dictionary
            return None
        row = next((d for d in self._dictionaries if d["dictionary"] == dictionary), None)
        if row is None:
            known = ", ".join(d["dictionary"] for d in self._dictionaries)
            raise NotFound("dictionary", f"no dictionary {dictionary!r} in this atlas; it has {known}")
        return feature_ids(row)

    @cached_property
    def _has_families(self) -> bool:
        """Several dictionaries (a nested one's prefixes, a stack's widths) and the table linking their features."""
        return len(self._dictionaries) > 1 and "families" in self.atlas.duckdb_tables

    # -- features -------------------------------------------------------------------------------

    def features(self, sort: str = "density", descending: bool = True, limit: int = 50, offset: int = 0) -> dict[str, Any]:
        """A page of the feature list (scalar columns), sorted by one of ``store.atlas.SORTABLE``."""
        limit, offset = _integer("limit", limit), _integer("offset", offset)
        if not 1 <= limit <= MAX_PAGE:
            raise BadParameter("limit", f"must be between 1 and {MAX_PAGE}")
        if not 0 <= offset <= MAX_OFFSET:
            raise BadParameter("offset", f"must be between 0 and {MAX_OFFSET}")
        rows = self.atlas.list_features(sort=sort, descending=bool(descending), limit=limit, offset=offset)
        return {"features": rows, "limit": limit, "offset": offset, "total": self.atlas.d_sae}

    def check_feature(self, feature_id: int) -> int:
        """The id as an ``int``, or ``NotFound`` for one outside the dictionary."""
        feature_id = _integer("feature_id", feature_id)
        if not 0 <= feature_id < self.atlas.d_sae:
            raise NotFound("feature_id", f"no feature {feature_id}: this atlas has features 0..{self.atlas.d_sae - 1}")
        return feature_id

    def feature_id(self, dictionary: str, index: int) -> int:
        """The atlas's id of feature ``index`` of ``dictionary``."""
        ids = self._within(dictionary)
        index = _integer("index", index)
        if not 0 <= index < len(ids):
            raise NotFound("index", f"no feature {index} in {dictionary}: it has features 0..{len(ids) - 1}")
        return ids[index]

    def feature(self, feature_id: int) -> dict[str, Any]:
        """Label, scores, statistics, histogram (with its bin edges), and top and quantile examples."""
        feature_id = self.check_feature(feature_id)
        row = self.atlas.feature(feature_id)
        if row is None:  # its id is in range: the atlas itself is damaged
            raise RuntimeError(f"feature {feature_id} is missing from the features table")
        examples = self.atlas.feature_examples(feature_id)
        row["top_examples"] = [e for e in examples if e["kind"] == "top"]
        row["quantile_examples"] = [e for e in examples if e["kind"] != "top"]
        bins = len(row["histogram"])
        row["histogram_edges"] = [row["max_activation"] * i / bins for i in range(bins + 1)] if bins else []
        # The narrowest dictionary holding it, and its parent and children across the widths (null
        # with one dictionary).
        row["dictionary"] = dictionary_of(self._dictionaries, feature_id)
        row["family"] = family(self.atlas, self._dictionaries, feature_id) if self._has_families else None
        return row

    def _snippets(self, ids: list[int]) -> dict[int, str]:
        """The top example of each feature, strongest token in [[brackets]]."""
        if self._held_snippets is not None:
            return {f: self._held_snippets[f] for f in ids if f in self._held_snippets}
        return {f: snippet(r["tokens"], r["activations"]) for f, r in self.atlas.top_examples(ids).items()}

    def _map(self, part: str) -> Any:
        """A part of the map (``store.map_view``: its ``data``, ``json`` document or binary
        ``levels``), made on first request and kept: it is the same for every visitor until the
        atlas is re-labelled, and a restart picks that up."""
        if part in self._map_parts:  # made already: no wait behind another part's build
            return self._map_parts[part]
        make = {"data": lambda: map_data(self.atlas), "json": lambda: map_json(self._map("data")),
                "levels": lambda: map_levels(self._map("data"))}[part]
        with self._map_lock:  # one build, however many requests arrive while it runs
            if part not in self._map_parts:
                self._map_parts[part] = make()
            return self._map_parts[part]

    def feature_map(self) -> bytes:
        """The whole map as one JSON document (``map_json``)."""
        return self._map("json")

    def map_head(self) -> dict[str, Any]:
        """The map's head for the browser: clusters, regions and the size of each level
        (``map_levels``), and ``version``: the atlas's publish time, which each level's answer
        carries too, so that a browser never joins levels of two atlases across a re-publish."""
        return {**self._map("levels")[0], "version": self.map_version}

    @property
    def map_version(self) -> str:
        return str(self.atlas.manifest.get("created_at"))

    def map_level(self, level: int) -> bytes:
        """One level of detail of the map's points, as binary columns (``map_levels``)."""
        level = _integer("level", level)
        levels = self._map("levels")[1]
        if not 0 <= level < len(levels):
            raise NotFound("level", f"the map has levels 0..{len(levels) - 1}")
        return levels[level]

    # -- search ---------------------------------------------------------------------------------

    def search(self, q: str, k: int = 10, mode: str | None = None, dictionary: str | None = None) -> dict[str, Any]:
        """Features about ``q`` from every signal (or one, ``mode``), ordered by their calibrated
        evidence (``store.calibrate``); ``confident`` says whether one of the first hits clearly
        is about the query, ``coverage`` how much of the corpus is. Every dictionary's features, or
        one ``dictionary``'s. Answers are remembered (``ANSWERS``), except those that had to leave a
        signal out."""
        q = _check_text("q", q, MAX_QUERY_CHARS).strip()
        if not q:
            raise BadParameter("q", "the query is empty")
        k = _check_k(k)
        if mode is not None and mode not in (*SEARCH_MODES, S.FUSED):
            raise BadParameter("mode", f"must be one of {', '.join(SEARCH_MODES)} or {S.FUSED} (every signal, the default)")
        mode = None if mode == S.FUSED else mode
        within = self._within(dictionary)
        key = (q, k, mode, dictionary)
        with self._answers_lock:
            if key in self._answers:
                self._answers.move_to_end(key)
                return copy.deepcopy(self._answers[key])  # the caller's to change
        answer, complete = self._search(q, k, mode, within)
        if complete:
            with self._answers_lock:
                self._answers[key] = copy.deepcopy(answer)
                while len(self._answers) > ANSWERS:
                    self._answers.popitem(last=False)
        return answer

    def _search(self, q: str, k: int, mode: str | None, within: range | None = None) -> tuple[dict[str, Any], bool]:
        """The answer, and whether every signal asked for is in it. ``within``: the only feature ids
        that may answer (the vector signals search among them; the others draw as many more
        candidates as the atlas is larger than ``within``, then are cut to it)."""
        modes = [mode] if mode else list(SEARCH_MODES)
        concept = concept_of(q)
        complete = True
        inference = None
        n = max(k, MIN_CANDIDATES) * CANDIDATES_PER_HIT
        wide = n if within is None else min(self.atlas.d_sae, n * -(-self.atlas.d_sae // len(within)))
        if "inference" in modes and (mode == "inference" or reads_as_text(concept)):
            inference = self._inference.submit(self._inference_ranking, q, wide)
        vec = embed([concept], name=self.embedder)[0]
        matching = self._matching.submit(match_windows, self.atlas, vec, held=self._windows)
        lists: dict[str, S.Ranked] = {}
        evidence: dict[str, dict[int, float]] = {}
        for m in ("label", "context"):
            if m in modes:
                lists[m] = S.vector_search(self.atlas, f"{m}_embedding", vec, n, within=within)
                null = C.vector_null(self.atlas.vectors(f"{m}_embedding", sample=C.NULL_SAMPLE) @ vec)
                digits = C.vector_evidence(np.array([h.score for h in lists[m]]), null, self.atlas.d_sae)
                evidence[m] = {h.feature_id: float(e) for h, e in zip(lists[m], digits)}
        matched = matching.result()
        if "corpus" in modes:
            try:
                found = enriched(self.atlas, matched, wide, held=self._windows)
            except QueryInterrupted:  # a scan of every activation: on a big atlas, search goes on without it
                log.warning("search: the corpus signal ran past its time limit for %r and was left out", q)
                found, complete = [], False
            lists["corpus"] = self._hits([(f, log_p) for f, _, _, log_p, _ in found])
            evidence["corpus"] = {f: C.corpus_evidence(log_p, self.atlas.d_sae) for f, _, _, log_p, _ in found}
        if "text" in modes:
            lists["text"] = S.text_search(self.atlas, concept, wide)
        if "kind" in modes and self._kind_index() is not None:
            index, asks = self._kind_index()
            lists["kind"], asked = S.kind_search(self.atlas, index, asks @ vec, wide)
            best = lists["kind"][0].score if lists["kind"] else 0.0
            evidence["kind"] = {h.feature_id: C.kind_evidence(h.score, best, asked, S.KIND_MATCH) for h in lists["kind"]}
        if inference is not None:
            try:
                lists["inference"] = inference.result()
            except ModelBusy:  # steering holds the model: search goes on without this signal
                log.info("search: the model was busy; the inference signal was left out for %r", q)
                complete = False
            except BadParameter as e:  # over the model's token limit (CJK text can be): the other signals answer
                log.info("search: the inference signal was left out for %r: %s", q, e)
        cover = coverage(self.atlas, matched)
        if within is not None:
            lists = {m: [h for h in ranked if h.feature_id in within] for m, ranked in lists.items()}
        hits = self._fused(lists, evidence, k, vec, cover["best_similarity"])
        confident = any(h["strong"] for h in hits[: C.CONFIDENT_WITHIN])
        return {"query": q, "concept": concept, "mode": mode or S.FUSED, "confident": confident, "coverage": cover,
                "message": None if confident else not_found(q, cover), "hits": hits}, complete

    def _fused(self, lists: dict[str, S.Ranked], evidence: dict[str, dict[int, float]], k: int, vec: np.ndarray,
               corpus_similarity: float | None) -> list[dict[str, Any]]:
        """Hits best first by weighted evidence (reciprocal rank fusion breaks ties, and alone orders
        the signals that have no null); dense features are down-weighted."""
        info = {h.feature_id: {"label": h.label, "density": h.density} for ranked in lists.values() for h in ranked}
        weights = {f: DENSE_WEIGHT for f, s in info.items() if s["density"] > DENSE_DENSITY}
        rrf = {f: (score, why) for f, score, why in S.fuse(lists, weights=weights)}
        total = {f: sum(C.WEIGHTS[m] * e[f] for m, e in evidence.items() if f in e) * weights.get(f, 1.0) for f in rrf}
        order = sorted(rrf, key=lambda f: (-total[f], -rrf[f][0], f))[:k]
        snippets = self._snippets(order)
        summary = self.atlas.summaries(order)
        # The label signal has the query's similarity to its hits' labels already; the rest are read.
        similarity = {h.feature_id: h.score for h in lists.get("label", ())}
        missing = [f for f in order if f not in similarity]
        if missing:
            similarity |= dict(zip(missing, (self.atlas.vectors_of(missing, "label_embedding") @ vec).tolist()))
        label_similarity = [similarity[f] for f in order]
        hits = []
        for f, sim in zip(order, label_similarity):
            match = C.match(float(sim), corpus_similarity)
            hits.append({
                "feature_id": f, "label": info[f]["label"], "description": summary[f]["description"],
                "evidence": round(total[f], 2), "score": round(C.probability(total[f]), 6),
                "signals": {m: round(e[f], 2) for m, e in evidence.items() if f in e},
                "match": round(match, 3), "strong": match >= C.CONFIDENT_MATCH, "rank_score": round(rrf[f][0], 6),
                "density": info[f]["density"], "matched_by": rrf[f][1], "snippet": snippets.get(f),
                "down_weighted": f in weights})
        return hits

    def _kind_index(self) -> tuple[S.KindIndex, np.ndarray] | None:
        """The atlas's kinds with the embeddings of the ways to ask for them, built on first use."""
        with self._kinds_lock:
            if self._kinds is None:
                index = S.kind_index(self.atlas)
                self._kinds = (index, embed(index.asks, name=self.embedder)) if index else (None, None)
            return None if self._kinds[0] is None else self._kinds

    def _hits(self, scored: list[tuple[int, float]]) -> S.Ranked:
        info = self.atlas.summaries([f for f, _ in scored])
        return [S.Hit(f, s, info[f]["label"], info[f]["density"]) for f, s in scored]

    def _inference_ranking(self, text: str, n: int) -> S.Ranked:
        """Anthropic's single-prompt method: features ranked by their activation on the text
        relative to their own maximum over the corpus."""
        maxima = self.probe.run(text, timeout=INFERENCE_WAIT_S).feature_maxima(self.atlas.d_sae)
        ranked = self._relative(np.flatnonzero(maxima > 0), maxima)[:n]
        return [S.Hit(f, rel, info["label"], info["density"]) for f, rel, info in ranked]

    def _relative(self, ids: np.ndarray, values: np.ndarray) -> list[tuple[int, float, dict[str, Any]]]:
        """(feature, value / its corpus max, summary) for ``ids``, best first; ``values`` is [d_sae]."""
        info = self.atlas.summaries([int(i) for i in ids])
        rel = [(int(f), float(values[f]) / max(info[int(f)]["max_activation"] or 0.0, 1e-6), info[int(f)]) for f in ids]
        return sorted(rel, key=lambda t: (-t[1], t[0]))

    def contrast(self, positive: list[str], negative: list[str], k: int = 10) -> dict[str, Any]:
        """Features active on every positive prompt and on none of the negative ones, ranked by
        their weakest relative activation over the positives."""
        positive, negative = _prompts("positive", positive), _prompts("negative", negative)
        if not positive:
            raise BadParameter("positive", "give at least one positive prompt")
        k = _check_k(k)
        d = self.atlas.d_sae
        pos = np.stack([self.probe.run(t).feature_maxima(d) for t in positive])
        neg = np.stack([self.probe.run(t).feature_maxima(d) for t in negative]) if negative else np.zeros((1, d))
        ok = np.flatnonzero((pos > 0).all(0) & (neg <= 0).all(0))
        ranked = self._relative(ok, pos.min(0))[:k]
        hits = [dict(zip(CONTRAST_KEYS, (f, info["label"], rel, info["density"]))) for f, rel, info in ranked]
        return {"positive": positive, "negative": negative, "hits": hits}

    def activations(self, text: str, k: int = 5) -> dict[str, Any]:
        """Each token of ``text`` with its ``k`` strongest features (runs the model)."""
        _check_text("text", text)
        k = _check_k(k)
        result = self.probe.run(text)
        k = min(k, result.values.shape[1])
        ids = sorted({int(f) for row, vals in zip(result.indices, result.values) for f, v in zip(row[:k], vals[:k]) if v > 0})
        info = self.atlas.summaries(ids)
        tokens = []
        for tok, row, vals in zip(result.tokens, result.indices, result.values):
            # relative: against the feature's own corpus maximum, comparable across features (raw
            # values are not: the first tokens of a text fire with outsized values)
            feats = [{"feature_id": int(f), "value": float(v), "label": info[int(f)]["label"],
                      "relative": float(v) / max(info[int(f)]["max_activation"] or 0.0, 1e-6)}
                     for f, v in zip(row[:k], vals[:k]) if v > 0]
            tokens.append({"token": tok, "features": feats})
        return {"tokens": tokens}

    def steer(self, prompt: str, edits: list[Edit], *, max_new_tokens: int = 32, temperature: float = 0.0,
              seed: int = 0, chat: bool = False, generated_only: bool = False) -> dict[str, Any]:
        """The prompt continued twice, untouched and with the edited features clamped or pushed
        (``ingest.steer``); each token carries the steered features' activations as the model read it."""
        _check_text("prompt", prompt)
        edits = [Edit(_integer(f"features[{i}].id", e.feature), _number(f"features[{i}].value", e.value), e.mode)
                 for i, e in enumerate(edits)]
        max_new_tokens, seed = _integer("max_new_tokens", max_new_tokens), _integer("seed", seed)
        temperature = _number("temperature", temperature)
        if not edits:
            raise BadParameter("features", "give at least one feature to steer")
        if len(edits) > MAX_STEERED:
            raise BadParameter("features", f"at most {MAX_STEERED} features at once, got {len(edits)}")
        result = self.probe.steer([prompt], edits, max_new_tokens=max_new_tokens, temperature=temperature,
                                  seed=seed, chat=chat, generated_only=generated_only)
        info = self.atlas.summaries([e.feature for e in edits])
        steered = [{"id": e.feature, "value": e.value, "mode": e.mode, "label": info[e.feature]["label"],
                    "max_activation": info[e.feature]["max_activation"], "density": info[e.feature]["density"]}
                   for e in edits]
        settings = {"max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed, "chat": chat,
                    "generated_only": generated_only}
        return {"prompt": prompt, "settings": settings, "features": steered,
                "default": _run_json(result.default[0]), "steered": _run_json(result.steered[0])}

    def neighbors(self, feature_id: int, k: int = 10, by: str = "decoder", dictionary: str | None = None) -> dict[str, Any]:
        """The ``k`` nearest features by decoder cosine or by co-activation (Jaccard), in every
        dictionary (all read one hook point) or in one ``dictionary``."""
        feature_id = self.check_feature(feature_id)
        k = _check_k(k)
        within = self._within(dictionary)
        if by == "decoder":
            ranked = S.decoder_neighbors(self.atlas, feature_id, k, within)
        elif by == "coactivation":
            ranked = S.coactivation_neighbors(self.atlas, feature_id, k, within)
        else:
            raise BadParameter("by", "must be decoder or coactivation")
        return {"feature_id": feature_id, "by": by, "dictionary": dictionary, "neighbors": [
            dict(zip(NEIGHBOR_KEYS, (h.feature_id, round(h.score, 6), h.label, h.density))) for h in ranked]}


def _run_json(run: Continuation) -> dict[str, Any]:
    return {"text": run.text, "tokens": run.tokens, "logprobs": run.logprobs, "activations": run.activations}
