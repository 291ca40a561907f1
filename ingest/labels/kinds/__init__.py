"""Kinds of token: structural detectors that know the text, so a label can say *where* a feature fires.

Many features are about where a token stands rather than what it says: the letters of an
uppercase word, a speaker's name in a play, a parameter in a Python ``def``. No list of tokens or
topic words names those, so every token of the corpus is tagged once with the kinds it belongs to,
and a feature whose activation mass lies mostly in one kind is named by it
(``uppercase words and acronyms ("KING", "ING")``).

A detector reads one document's text (its tokens joined, so character offsets and token
boundaries agree) and marks characters; a token is of a kind when its first non-blank character
is marked. Each kind is one ``Kind`` registered in ``KINDS`` (``registry``): its label phrase, the
ways a user asks for it (search matches those), the sources it belongs to and its detector. The
detectors live by what they read: ``text`` (prose and punctuation) and ``python`` (code).
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import numpy as np
import pyarrow as pa
from scipy import sparse

from ..windows import KeyIndex

# Their kinds register on import.
from . import python as _python  # noqa: F401
from . import text as _text  # noqa: F401
from .registry import KINDS, Kind, vocabulary

__all__ = ["KINDS", "Kind", "KindStats", "TokenKinds", "kind_stats", "tag_document", "token_kinds", "vocabulary"]


# -- tagging the corpus ---------------------------------------------------------------------------------

def tag_document(tokens: list[str], source: str) -> np.ndarray:
    """[len(tokens), len(KINDS)] bool: each token's kinds (column i is the i-th kind of ``KINDS``)."""
    text = "".join(tokens)
    lengths = np.array([len(t) for t in tokens], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(tokens) else np.zeros(0, np.int64)
    # A token's first non-blank character (its first character when it is all blank) decides its kinds.
    lead = np.array([len(t) - len(t.lstrip()) if t.strip() else 0 for t in tokens], dtype=np.int64)
    first = np.minimum(starts + lead, max(len(text) - 1, 0))
    tags = np.zeros((len(tokens), len(KINDS)), dtype=bool)
    if not text:
        return tags
    for i, k in enumerate(KINDS.values()):
        if k.reads(source):
            tags[:, i] = k.detect(text, source)[first]
    return tags


@dataclass
class TokenKinds:
    """Every token of some documents with its kinds: ``tokens`` (doc_id, position), ``kinds`` the
    matching rows of ``tag_document``."""

    tokens: pa.Table
    kinds: np.ndarray


def token_kinds(con: duckdb.DuckDBPyConnection, *, part: str = "explain") -> TokenKinds:
    """The kinds of every token of the documents of one part of the label split (``con`` has
    ``label_split``), each document's tokens joined in order so detectors see its text."""
    table = con.sql(
        """select t.doc_id, d.source, list(t.position order by t.position) as pos, list(t.token order by t.position) as toks
           from tokens t join documents d using (doc_id) join label_split s using (doc_id) where s.part = $part
           group by all order by t.doc_id""", params={"part": part}
    ).to_arrow_table()
    doc, pos, tags = [], [], []
    for d, source, positions, tokens in zip(*(table[c].to_pylist() for c in ("doc_id", "source", "pos", "toks"))):
        doc.append(np.full(len(positions), d, dtype=np.int32))
        pos.append(np.asarray(positions, dtype=np.int32))
        tags.append(tag_document(tokens, source))
    cat = lambda parts, empty: np.concatenate(parts) if parts else empty  # noqa: E731
    return TokenKinds(pa.table({"doc_id": cat(doc, np.zeros(0, np.int32)), "position": cat(pos, np.zeros(0, np.int32))}),
                      cat(tags, np.zeros((0, len(KINDS)), bool)))


# -- which kinds a feature fires on ----------------------------------------------------------------------

MOSTLY = 0.5  # a kind holding most of a feature's activation mass ...
MIN_LIFT = 2.0  # ... at this many times the kind's share of all tokens names the feature
KEEP_SHARE = 0.25  # kinds kept per feature for search: at least this share of its mass ...
KEEP_LIFT = 1.5  # ... and this lift


@dataclass
class KindStats:
    """Per feature (rows, ``features`` order) and kind (columns, ``KINDS`` order), over the explain
    documents: the share of its activation mass on tokens of the kind, that share over the kind's
    share of all tokens, and the share of the kind's tokens it fires on."""

    share: np.ndarray
    lift: np.ndarray
    recall: np.ndarray

    def dominant(self, row: int) -> str | None:
        """The most specific kind (highest lift) that holds most of the feature's mass, if one does."""
        ok = (self.share[row] >= MOSTLY) & (self.lift[row] >= MIN_LIFT) & _NAMEABLE
        return list(KINDS)[int(np.argmax(np.where(ok, self.lift[row], -1)))] if ok.any() else None

    def kept(self, row: int) -> list[dict]:
        """The kinds that hold a fair share of the feature's mass: {kind, share, recall}, largest share
        first (SQL and the feature page show them; search ranks those of at least half its mass)."""
        ok = np.flatnonzero((self.share[row] >= KEEP_SHARE) & (self.lift[row] >= KEEP_LIFT))
        names = list(KINDS)
        return [{"kind": names[i], "share": float(self.share[row, i]), "recall": float(self.recall[row, i])}
                for i in ok[np.argsort(-self.share[row, ok], kind="stable")]]


_NAMEABLE = np.array([k.names for k in KINDS.values()])


def kind_stats(con: duckdb.DuckDBPyConnection, features: list[int]) -> KindStats:
    """``KindStats`` of ``features`` from the explain documents. ``con`` has ``label_split`` and the
    explain tables (``contrastive.explain_tables``)."""
    tagged = token_kinds(con, part="explain")
    con.register("explain_kinds", tagged.tokens.append_column("row", pa.array(np.arange(tagged.tokens.num_rows))))
    hits = con.sql("select h.feature_id, h.value, k.row from explain_hits h join explain_kinds k using (doc_id, position)"
                   ).to_arrow_table()
    con.unregister("explain_kinds")
    at = KeyIndex(np.asarray(features, dtype=np.int64)).find(hits["feature_id"].to_numpy().astype(np.int64))
    keep = at >= 0
    at, value, rows = at[keep], hits["value"].to_numpy()[keep].astype(np.float64), hits["row"].to_numpy()[keep]
    n, n_tokens = len(features), len(tagged.kinds)
    # Features by tokens, once with the activation and once with a count, times tokens by kinds: every
    # kind's mass and count per feature in two sparse products (a loop over the kinds took 7 s at 79 kinds).
    fired = lambda weights: sparse.csr_matrix((weights, (at, rows)), shape=(n, n_tokens))  # noqa: E731
    tags = sparse.csr_matrix(tagged.kinds, dtype=np.float64)
    on_kind, hits_on_kind = ((fired(w) @ tags).toarray() for w in (value, np.ones_like(value)))
    mass = np.bincount(at, weights=value, minlength=n)
    of_kind = tagged.kinds.sum(axis=0)
    share = on_kind / np.maximum(mass, 1e-12)[:, None]
    lift = share / np.maximum(of_kind / max(n_tokens, 1), 1e-12)
    recall = hits_on_kind / np.maximum(of_kind, 1)
    return KindStats(share, lift, recall)
