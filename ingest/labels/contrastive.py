"""The default explainer: what is over-represented where a feature fires, against the corpus.

Offline and fast: a few SQL aggregates over the explainer's side of the split. For each feature we
contrast (a) the tokens it fires on, (b) the tokens just before them, (c) the words of the windows
it fires in, and (d) the source its activation mass comes from, with the corpus background. With
``m(t)`` the share of the feature's activation mass on ``t`` and ``p(t)`` its background rate, a
term's weight is ``m(t) * log(m(t) / p(t))``, its contribution to a KL divergence: it prefers terms
that carry much of the feature's strong activations and are rare elsewhere, and weighting by
activation rather than count keeps the weak, diffuse tail from outvoting the top examples.

From these it writes a few candidate phrases that say what kind of thing fires (a token in its
context, a topic, a language or a code construct); the caller keeps whichever candidate scores best
on other documents.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

import duckdb
import numpy as np

from .scorers import Fired
from .windows import WindowPool

EXPLAINER = "contrastive"
SOURCE_NAMES = {
    "wiki-en": "English text",
    "wiki-fr": "French text",
    "wiki-es": "Spanish text",
    "shakespeare": "Shakespeare's plays",
    "python": "Python code",
}
TITLES_IN_LABEL = 3
CONTEXT_WORDS = 4
TOP_WINDOWS = 50  # the strongest windows whose words describe the context
_WORD = re.compile(r" [^\W\d_]{3,}")  # a word-start token (sub-word pieces say little about a topic)
COMMON_WORD_RATE = 0.05  # words in more windows than this (the, that, and) name no topic
THEME_SIZES = (3, 5)  # a short and a long theme phrase compete


@dataclass
class Candidate:
    text: str
    explainer: str
    kind: str  # what the phrase names: token | topic | combined | llm
    status: str = "ok"  # ok | failed (an explainer call that did not return a label)
    detail: str = ""


@dataclass
class Evidence:
    """What the contrastive explainer knows about one feature, from the explain documents only."""

    at: list[tuple[int, float]]  # (token id, share of activation mass), best first
    before: list[tuple[int, float]]
    source: str | None  # the source it is most over-represented in
    mostly: bool  # ... and where most of its activation mass is
    titles: list[str]
    words: list[str]  # counted: frequent in its strongest windows, rare in the pool
    themes: list[str] = field(default_factory=list)  # chosen by meaning (``themes.py``), set by the caller


def explain_tables(con: duckdb.DuckDBPyConnection) -> None:
    """Temporary tables of the explain documents, the only text explainers read."""
    con.execute(
        """
        create or replace temp table explain_tokens as
        select t.doc_id, t.position, t.token_id, d.source
        from tokens t join label_split s using (doc_id) join documents d using (doc_id) where s.part = 'explain';
        create or replace temp table explain_hits as
        select a.feature_id, a.doc_id, a.position, t.token_id, t.source, a.value
        from activations a join explain_tokens t using (doc_id, position);
        """
    )


def gather_evidence(
    con: duckdb.DuckDBPyConnection, features: list[int], pool: WindowPool, fired: dict[int, Fired], vocab: dict[int, str]
) -> dict[int, Evidence]:
    """``con`` has ``explain_tables``; ``pool``/``fired``: windows of the explain documents."""
    at = _overrepresented(con, "select feature_id, token_id, value from explain_hits", top=6, min_count=1, min_lift=2)
    # The three tokens before each activation, each counted once.
    before = _overrepresented(
        con,
        """select distinct h.feature_id, t.token_id, h.doc_id, h.position, h.value
           from explain_hits h join range(1, 4) d(d) on true
           join explain_tokens t on t.doc_id = h.doc_id and t.position = h.position - d.d""",
        top=3,
        min_count=2,
        min_lift=6,  # three positions look back, so chance alone gives a lift of about 3
    )
    # Per feature, the source with the highest lift (its share of the feature's activation mass over
    # its share of the tokens), and whether the feature lives mostly there.
    source = {
        f: (src, bool(mostly))
        for f, src, mostly in con.execute(
            """
            with corpus_share as (select source, count(*) / sum(count(*)) over () as share from explain_tokens group by source),
            fs as (select feature_id, source, sum(value) / sum(sum(value)) over (partition by feature_id) as share
                   from explain_hits group by feature_id, source)
            select fs.feature_id, arg_max(fs.source, fs.share / c.share),
                   max(fs.share >= 0.6 and fs.share >= 1.5 * c.share)
            from fs join corpus_share c using (source) where fs.share >= 1.2 * c.share group by fs.feature_id
            """
        ).fetchall()
    }
    titles: dict[int, list[str]] = defaultdict(list)
    for f, title in con.execute(
        """
        with per_doc as (select feature_id, doc_id, max(value) as v from explain_hits group by all),
        ranked as (select *, row_number() over (partition by feature_id order by v desc, doc_id) as r from per_doc)
        select r.feature_id, d.title from ranked r join documents d using (doc_id) where r.r <= 10 order by r.feature_id, r.r
        """
    ).fetchall():
        title = title.split(", SCENE")[0]  # a play's scene heading names the play
        if title not in titles[f]:
            titles[f].append(title)
    words = _context_words(pool, fired, vocab)
    return {
        f: Evidence(at.get(f, []), before.get(f, []), *source.get(f, (None, False)), titles.get(f, [])[:TITLES_IN_LABEL],
                    words.get(f, []))
        for f in features
    }


def _overrepresented(
    con: duckdb.DuckDBPyConnection, hits: str, *, top: int, min_count: int, min_lift: float
) -> dict[int, list[tuple[int, float]]]:
    """Per feature, the ``top`` tokens of ``hits`` (rows with feature_id, token_id, value) by KL
    weight against the explain documents' background. Tokens seen fewer than ``min_count`` times or
    less than ``min_lift`` times their background rate are left out: common tokens otherwise creep
    in by sheer frequency."""
    rows = con.execute(
        f"""
        with bg as (select token_id, count(*) / sum(count(*)) over () as p from explain_tokens group by token_id),
        hits as ({hits}),
        nf as (select feature_id, sum(value) as mass from explain_hits group by feature_id),
        ft as (select feature_id, token_id, sum(value) as s, count(*) as c from hits group by feature_id, token_id),
        scored as (
            select ft.feature_id, ft.token_id, ft.s / nf.mass as share, (ft.s / nf.mass) * ln((ft.s / nf.mass) / bg.p) as w
            from ft join nf using (feature_id) join bg using (token_id)
            where ft.c >= {min_count} and ft.s / nf.mass >= {min_lift} * bg.p
        )
        select feature_id, token_id, share from (
            select *, row_number() over (partition by feature_id order by w desc) as r from scored
        ) where r <= {top} order by feature_id, r
        """
    ).fetchall()
    out: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for f, t, share in rows:
        out[f].append((t, share))
    return out


def _context_words(pool: WindowPool, fired: dict[int, Fired], vocab: dict[int, str]) -> dict[int, list[str]]:
    """Whole words over-represented in a feature's strongest windows, against how many windows of
    the pool hold them: the topic around the activations rather than the token itself."""
    if len(pool) == 0:
        return {}
    word_ids = np.array(sorted(t for t, s in vocab.items() if _WORD.fullmatch(s)), dtype=np.int64)
    holds = [np.intersect1d(ids, word_ids) for ids in pool.token_ids]  # distinct words per window
    all_words, counts = np.unique(np.concatenate(holds), return_counts=True)
    window_rate = dict(zip(all_words.tolist(), (counts / len(pool)).tolist()))
    out: dict[int, list[str]] = {}
    for f, hit in fired.items():
        top = np.argsort(-hit.values)[:TOP_WINDOWS]
        weights = hit.values[top] / hit.values[top].sum()
        mass: dict[int, float] = defaultdict(float)
        seen: dict[int, int] = defaultdict(int)
        for row, w in zip(hit.rows[top], weights):
            for t in holds[row].tolist():
                mass[t] += float(w)
                seen[t] += 1
        scored = []
        for t, m in mass.items():
            p = window_rate[t]
            if seen[t] >= 3 and m >= 3 * p and p <= COMMON_WORD_RATE:
                scored.append((m * np.log(m / p), vocab[t].strip()))
        scored.sort(reverse=True)
        words: dict[str, str] = {}  # case variants merge, the strongest spelling shown
        for _, w in scored:
            words.setdefault(w.lower(), w)
        out[f] = list(words.values())[:CONTEXT_WORDS]
    return out


def show_token(token: str) -> str:
    shown = token.strip() or token
    shown = shown.replace("\n", "⏎").replace("\t", "⇥")
    return f'"{shown}"' if shown.strip() else '"␣"'


def candidates(ev: Evidence, vocab: dict[int, str]) -> list[Candidate]:
    """Phrases naming the token in its context, the topic (the words around it, counted or chosen by
    meaning), the documents it fires in, the source it leans to, and all together: each says what
    kind of thing fires, none is a bare token list. A feature that never fired on the explain
    documents gets no candidate."""
    if not ev.at:
        return []
    named: dict[str, float] = {}  # variants differing only by case or spacing merge
    shown: list[str] = []
    for i, (t, share) in enumerate(ev.at):
        if i > 0 and share < 0.05:
            continue
        key = show_token(vocab[t]).lower()
        if key not in named:
            if len(shown) == 3:
                continue
            shown.append(show_token(vocab[t]))
        named[key] = named.get(key, 0.0) + share
    coverage = sum(named.values())
    if coverage >= 0.5:
        token = ("the token " if len(shown) == 1 else "the tokens ") + ", ".join(shown)
    else:
        token = "tokens such as " + ", ".join(shown)
    before = [show_token(vocab[t]) for t, share in ev.before if share >= 0.1]
    before = [b for b in dict.fromkeys(before) if b.lower() not in named]
    if before:
        token += " after " + ", ".join(before[:3])
    lean = SOURCE_NAMES.get(ev.source, ev.source) if ev.source else None
    where = lean if ev.mostly else None
    if where:
        token += f" in {where}"
    kind_of_text = lean or "text"
    combined = token + ("; context: " + ", ".join(ev.words) if ev.words else "")
    if len(ev.titles) > 1:
        combined += " — from " + "; ".join(ev.titles)
    phrases = [(combined, "combined"), (token, "token")]
    if ev.words:
        phrases.append((f"{kind_of_text} about " + ", ".join(ev.words), "topic"))
    for n in sorted({min(n, len(ev.themes)) for n in THEME_SIZES} - {0}):
        words = ev.themes[:n]
        phrases.append(("about " + (", ".join(words[:-1]) + " and " if n > 1 else "") + words[-1], "theme"))
    if ev.titles:
        phrases.append((f"{kind_of_text} like " + "; ".join(ev.titles), "titles"))
    if lean:
        phrases.append((lean, "source"))
    return [Candidate(text, EXPLAINER, kind) for text, kind in phrases]
