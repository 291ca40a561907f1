"""First-version labels: what is over-represented where a feature fires, against the corpus.

For each feature we contrast (a) the tokens it fires on, (b) the few tokens just before them, and
(c) the source its activations come from, with the corpus background. With ``m(t)`` the share of
the feature's activation mass on token ``t`` and ``p(t)`` its corpus frequency, a token's weight is
``m(t) * log(m(t) / p(t))``: its contribution to a KL divergence, which prefers tokens that carry
much of the feature's strong activations and are rare elsewhere. Weighting by activation rather
than by count keeps the weak, diffuse tail from outvoting the top examples.

``label_score`` here is *token coverage*: the share of the feature's activation mass that falls on
the tokens its label names. It says how much of the feature the label accounts for, not whether a
reader would predict the feature from it (a later scorer does that).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import duckdb
import numpy as np
import pyarrow as pa

SOURCE_NAMES = {
    "wiki-en": "English Wikipedia",
    "wiki-fr": "French text",
    "wiki-es": "Spanish text",
    "shakespeare": "Shakespeare",
    "python": "Python code",
}
LABEL_SOURCE = "contrastive"
# Part of the analysis stage's key: bump it when labelling changes, so old labels are redone.
LABELS_VERSION = 4
TITLES_IN_LABEL = 3


@dataclass
class Label:
    text: str
    score: float


def contrastive_labels(
    con: duckdb.DuckDBPyConnection, vocab: list[str], d_sae: int, titles: list[list[str]] | None = None
) -> list[Label]:
    """``con`` has ``acts`` (sparse records) and ``corpus_tokens(tok, ctx, token_id, source, is_bos)``;
    ``titles[f]``: titles of the documents of feature f's top examples, strongest first."""
    at = _overrepresented(con, "select feature_id, token_id, value from acts", top=6, min_count=1, min_lift=2)
    # The three tokens before each activation (same context, BOS excluded), each counted once.
    before = _overrepresented(
        con,
        """select distinct a.feature_id, t.token_id, a.tok, a.value
           from acts a join range(1, 4) d(d) on true
           join corpus_tokens t on t.tok = a.tok - d.d and t.ctx = a.ctx and not t.is_bos""",
        top=3,
        min_count=2,
        min_lift=6,  # three positions look back, so chance alone gives a lift of about 3
    )
    source_rows = con.execute(
        """
        with corpus_share as (
            select source, count(*) / sum(count(*)) over () as share from corpus_tokens where not is_bos group by source
        ),
        fs as (
            select a.feature_id, t.source, sum(a.value) / sum(sum(a.value)) over (partition by a.feature_id) as share
            from acts a join corpus_tokens t using (tok) group by a.feature_id, t.source
        )
        select fs.feature_id, fs.source, fs.share from fs join corpus_share c using (source)
        where fs.share >= 0.6 and fs.share >= 1.5 * c.share
        """
    ).fetchall()

    source = {f: s for f, s, _ in source_rows}
    titles = titles or [[] for _ in range(d_sae)]
    return [_phrase(at.get(f, []), before.get(f, []), source.get(f), titles[f], vocab) for f in range(d_sae)]


def _overrepresented(
    con: duckdb.DuckDBPyConnection, hits: str, *, top: int, min_count: int, min_lift: float
) -> dict[int, list[tuple[int, float]]]:
    """Per feature, the ``top`` tokens of ``hits`` (rows of feature_id, token_id, value) by KL
    weight against the corpus background, as (token id, share of the feature's activation mass).
    Tokens seen fewer than ``min_count`` times or less than ``min_lift`` times their background
    rate are left out: common tokens otherwise creep in by sheer frequency."""
    rows = con.execute(
        f"""
        with bg as (
            select token_id, count(*) / sum(count(*)) over () as p from corpus_tokens where not is_bos group by token_id
        ),
        hits as ({hits}),
        nf as (select feature_id, sum(value) as mass from acts group by feature_id),
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


def _show(token: str) -> str:
    shown = token.strip() or token
    shown = shown.replace("\n", "⏎").replace("\t", "⇥")
    return f'"{shown}"' if shown.strip() else '"␣"'


def _phrase(
    at: list[tuple[int, float]], before: list[tuple[int, float]], source: str | None, titles: list[str], vocab: list[str]
) -> Label:
    """``at``/``before``: (token id, share of the feature's activation mass), best first."""
    if not at:
        return Label("dead feature (never fired on the corpus)", 0.0)
    # Name up to three tokens that matter; variants differing only by case or spacing merge.
    named: dict[str, float] = {}
    shown: list[str] = []
    for i, (t, share) in enumerate(at):
        if i > 0 and share < 0.05:
            continue
        key = _show(vocab[t]).lower()
        if key not in named:
            if len(shown) == 3:
                continue
            shown.append(_show(vocab[t]))
        named[key] = named.get(key, 0.0) + share
    coverage = sum(named.values())
    if coverage >= 0.5 and len(shown) == 1:
        text = f"the token {shown[0]}"
    elif coverage >= 0.5:
        text = "the tokens " + ", ".join(shown)
    else:
        text = "tokens such as " + ", ".join(shown)
    context = [_show(vocab[t]) for t, share in before if share >= 0.1]
    context = [c for c in dict.fromkeys(context) if c.lower() not in named]
    if context:
        text += " after " + ", ".join(context[:3])
    if source:
        text += f" in {SOURCE_NAMES.get(source, source)}"
    # The documents its strongest examples come from name the topic better than tokens can
    # ("Manganese, Magnesium, Argon" for a feature on chemical elements).
    shown_titles = list(dict.fromkeys(titles))[:TITLES_IN_LABEL]
    if len(shown_titles) > 1:
        text += " — from " + "; ".join(shown_titles)
    return Label(text, float(np.clip(coverage, 0.0, 1.0)))


def top_titles(examples: pa.Table, doc_titles: list[str], d_sae: int) -> list[list[str]]:
    """Per feature, the titles behind its top examples, strongest first (a play's scene heading is
    cut to the play)."""
    out: list[list[str]] = [[] for _ in range(d_sae)]
    ex = examples.select(["feature_id", "kind", "doc_id"]).to_pydict()
    for f, kind, d in zip(ex["feature_id"], ex["kind"], ex["doc_id"]):
        if kind == "top":
            out[f].append(doc_titles[d].split(", SCENE")[0])
    return out


def example_texts(examples: pa.Table, per_feature: int, d_sae: int) -> list[list[str]]:
    """Up to ``per_feature`` top-example snippets per feature, for the context embedding."""
    out: list[list[str]] = [[] for _ in range(d_sae)]
    ex = examples.select(["feature_id", "kind", "tokens"]).to_pydict()
    for f, kind, tokens in zip(ex["feature_id"], ex["kind"], ex["tokens"]):
        if kind == "top" and len(out[f]) < per_feature:
            out[f].append("".join(tokens).strip())
    return out
