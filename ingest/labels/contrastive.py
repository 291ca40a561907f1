"""The default explainer: what is over-represented where a feature fires, against the corpus.

Offline and fast: a few SQL aggregates over the explainer's side of the split. For each feature we
contrast (a) the tokens it fires on, (b) the tokens just before them and (c) the sources its
activation mass comes from, with the corpus background. With ``m(t)`` the share of the feature's
activation mass on ``t`` and ``p(t)`` its background rate, a token's weight is ``m(t) * log(m(t) /
p(t))``, its contribution to a KL divergence: it prefers tokens that carry much of the feature's
strong activations and are rare elsewhere, and weighting by activation rather than count keeps the
weak, diffuse tail from outvoting the top examples. The topic of its windows comes from
``topics.py``, its kinds of token from ``kinds/``; ``wording.py`` writes the candidate labels and
the description from all of it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import duckdb

from .wording import Evidence

EXPLAINER = "contrastive"


@dataclass
class Candidate:
    text: str
    explainer: str
    kind: str  # what names the feature: token | pattern | topic | kind (of token) | llm
    status: str = "ok"  # ok | failed (an explainer call that did not return a label)
    detail: str = ""


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


def gather_evidence(con: duckdb.DuckDBPyConnection, features: list[int],
                    vocab: dict[int, str]) -> tuple[dict[int, Evidence], dict[int, int]]:
    """Each feature's evidence (topics and kind are left for the caller to fill in) and the id of its
    strongest token. ``con`` has ``explain_tables``."""
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
    sources: dict[int, list[tuple[str, float, float]]] = defaultdict(list)
    for f, source, mass, base in con.execute(
        """
        with corpus_share as (select source, count(*) / sum(count(*)) over () as share from explain_tokens group by source),
        fs as (select feature_id, source, sum(value) / sum(sum(value)) over (partition by feature_id) as share
               from explain_hits group by feature_id, source)
        select fs.feature_id, fs.source, fs.share, c.share from fs join corpus_share c using (source)
        order by fs.feature_id, fs.share desc, fs.source
        """
    ).fetchall():
        sources[f].append((source, float(mass), float(base)))
    evidence = {f: Evidence([(vocab[t], s) for t, s in at.get(f, [])], [(vocab[t], s) for t, s in before.get(f, [])],
                            sources.get(f, [])) for f in features}
    return evidence, {f: tokens[0][0] for f, tokens in at.items() if tokens}


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
            select *, row_number() over (partition by feature_id order by w desc, token_id) as r from scored
        ) where r <= {top} order by feature_id, r
        """
    ).fetchall()
    out: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for f, t, share in rows:
        out[f].append((t, share))
    return out
