"""Writing labels and descriptions a person reads at a glance, from a feature's evidence.

A label says what fires and where, in at most ``MAX_WORDS`` words besides at most ``QUOTED_MAX``
quoted tokens, naming one kind or one topic:

- a feature whose activation mass lies mostly in one kind of token (``kinds/``) is named by that
  kind, with the tokens that carry it: ``speaker names in Shakespeare ("KING", "QUEEN")``;
- otherwise candidates quote what fires, with what kind of words they are when they share one
  ("prepositions") and the source it lives in (``"on", "upon", "under" (prepositions) in
  Shakespeare's plays``), or name the topic of its windows from the concept bank (``topics.py``):
  ``royalty in English articles ("king")``. The judge chooses among them.

A list of corpus words is never a label, and document titles are left out (they name where a
feature was seen, not what it fires on). The description beside the label holds the numbers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .kinds.text import CODE, MONTHS, word_class

SOURCE_NAMES = {
    "wiki-en": "English articles",
    "wiki-fr": "French articles",
    "wiki-es": "Spanish articles",
    "shakespeare": "Shakespeare's plays",
    "python": "Python code",
}
SHORT_SOURCE = {"wiki-en": "English wiki", "wiki-fr": "French wiki", "wiki-es": "Spanish wiki",
                "shakespeare": "Shakespeare", "python": "Python"}
QUOTED_MAX = 3
QUOTE_MIN_SHARE = 0.05  # a token below this share of the activation mass is not worth quoting
BEFORE_MIN_SHARE = 0.1
MOSTLY = 0.6  # a source holding this share of the mass (and over-represented) is the context
PAIR = 0.8  # ... or two sources holding this much together, each a quarter at least
MAX_WORDS = 8  # words a label may have besides its quoted tokens
TOPIC_CANDIDATES = 3  # a feature's best topics, each tried as the topic of its label

_MONTHS = {m.lower() for m in MONTHS}  # "may" is a month in a label's tokens
_PYTHON_KEYWORDS = set("def class import from return self if elif else for while try except finally with as "
                       "lambda yield none true false raise pass in not and or is async await global".split())


def show_token(token: str) -> str:
    """A token as labels quote it: stripped, whitespace shown as a symbol, a double quote as ＂ (so
    the quotes around it still delimit it)."""
    shown = token.strip() or token
    shown = shown.replace("\n", "⏎").replace("\t", "⇥").replace('"', "＂")
    return f'"{shown}"' if shown.strip() else '"␣"'


def token_key(token: str) -> str:
    """How a quoted token is matched against the vocabulary: as ``show_token`` shows it, lower case."""
    return show_token(token)[1:-1].lower()


def token_kind(token: str, source: str | None) -> str | None:
    """What kind of token this is, or None when it is just itself."""
    bare = token.strip()
    if not bare:
        return "line breaks and indentation" if "\n" in token or len(token) > 1 else "spaces"
    if bare.isdigit():
        return "digits"
    if not any(ch.isalnum() for ch in bare):
        return "punctuation"
    low = bare.lower()
    if source == "python" and low in _PYTHON_KEYWORDS:
        return "Python keywords"
    if low in _MONTHS:
        return "months"
    # The source's language first, then any: a feature of "de" and "of" quotes prepositions of two languages.
    # Lower case or capitalised only, as in the corpus's kinds: "US" and "IT" are no pronouns.
    cased = bare in (low, low[:1].upper() + low[1:])
    if cased and source not in CODE and (closed := word_class(low, source) or word_class(low, None)) is not None:
        return closed
    if not token.startswith(" ") and bare.isalpha() and bare.islower():
        return "word pieces"
    if bare[0].isupper() and bare[1:].islower() and len(bare) > 1:
        return "capitalised words"
    return None


@dataclass
class Evidence:
    """What a feature fires on in the explain documents: the material of its label and description."""

    at: list[tuple[str, float]]  # (token text, share of activation mass), best first
    before: list[tuple[str, float]]  # tokens one to three places before, with their share
    sources: list[tuple[str, float, float]]  # (source, share of the mass, share of the tokens), largest first
    topics: list[str] = field(default_factory=list)  # concept names for its windows, best first (``topics.py``)
    kind: str | None = None  # the kind of token that holds most of its mass (``kinds.Kind.phrase``)
    kind_share: float = 0.0  # ... and that share
    kind_says_where: bool = False  # the kind belongs to one source and its phrase names it ("... in Python code")


def quoted(ev: Evidence, n: int = QUOTED_MAX) -> list[str]:
    """Up to ``n`` tokens worth quoting, strongest first, one of each case and spacing variant."""
    out: list[str] = []
    for i, (token, share) in enumerate(ev.at):
        if (i == 0 or share >= QUOTE_MIN_SHARE) and show_token(token).lower() not in {show_token(o).lower() for o in out}:
            out.append(token)
        if len(out) == n:
            break
    return out


def kind_of(tokens: list[str], source: str | None) -> str | None:
    """The kind every one of ``tokens`` is, if they share one."""
    kinds = {token_kind(t, source) for t in tokens}
    return kinds.pop() if len(kinds) == 1 else None


def context(ev: Evidence) -> tuple[str | None, str | None]:
    """(the main source's code, "in <the sources it lives in>") or (None, None) when it lives everywhere."""
    lean = [(s, m) for s, m, base in ev.sources if m >= 1.2 * base]
    if lean and lean[0][1] >= MOSTLY:
        return lean[0][0], f"in {SOURCE_NAMES.get(lean[0][0], lean[0][0])}"
    if len(lean) >= 2 and lean[0][1] + lean[1][1] >= PAIR and lean[1][1] >= 0.25:
        a, b = (SOURCE_NAMES.get(s, s) for s, _ in lean[:2])
        if a.endswith(" articles") and b.endswith(" articles"):  # "French and Spanish articles"
            return lean[0][0], f"in {a.removesuffix(' articles')} and {b}"
        return lean[0][0], f"in {a} and {b}"
    return (lean[0][0] if lean else None), None


def candidates(ev: Evidence) -> list[tuple[str, str]]:
    """(label, what names it) candidates; none for a feature that never fired on the explain
    documents. A feature of one kind of token gets only labels that name the kind; the others get
    labels that quote what fires or name a topic, and the scorers choose."""
    source, where = context(ev)
    if ev.kind:  # a kind names the feature, with the source when that still fits the word limit
        kind = ev.kind if ev.kind_says_where or not where else f"{ev.kind} {where}"
        kind = kind if words(kind) <= MAX_WORDS else ev.kind
        return [(kind, "kind")] if not ev.at else [(f"{kind} ({shown})", "kind") for shown in _heads(ev)]
    if not ev.at:  # it fired, but on no token that stands out: a topic can still name it
        return [(t, "topic") for t in ev.topics[:1] if words(t) <= MAX_WORDS]
    shown = [show_token(t) for t in quoted(ev)]
    counts = sorted({1, len(shown)})
    targets = {token_key(t) for t in quoted(ev)}
    before = list(dict.fromkeys(show_token(t) for t, share in sorted(ev.before, key=lambda b: -b[1])
                                if share >= BEFORE_MIN_SHARE and token_key(t) not in targets))
    out = []
    for n in counts:
        shared = kind_of(quoted(ev, n), source) if n > 1 else None
        head = ", ".join(shown[:n]) + (f" ({shared})" if shared else "")
        out.append((head + (f" {where}" if where else ""), "token"))
        if before and n < QUOTED_MAX:  # the tokens before count among the quoted ones
            after = " after " + ", ".join(before[:min(2, QUOTED_MAX - n)])
            out.append((head + after + (f" {where}" if where else ""), "pattern"))
    for name in ev.topics[:TOPIC_CANDIDATES]:  # one topic a label: two read as a word list ("lemon and polymerization")
        out.append((name, "topic"))
        for n in counts:
            out.append((f"{name} ({', '.join(shown[:n])})", "topic"))
            if where:
                out.append((f"{name} {where} ({', '.join(shown[:n])})", "topic"))
    return [c for c in dict.fromkeys(out) if words(c[0]) <= MAX_WORDS]


def _heads(ev: Evidence) -> list[str]:
    """The quoted tokens a label may show: the strongest one, and up to ``QUOTED_MAX``."""
    shown = [show_token(t) for t in quoted(ev)]
    return list(dict.fromkeys([shown[0], ", ".join(shown)]))


def words(label: str) -> int:
    """Words of a label besides its quoted tokens."""
    return len(_QUOTE.sub(" ", label).replace("(", " ").replace(")", " ").replace(",", " ").split())


def listed_words(label: str) -> int:
    """The longest list of unquoted items in a label (items parted by commas or "and"): 4 or more
    is a word list, not a name."""
    bare = _QUOTE.sub("", label)
    longest = 0
    for part in re.split(r"[()]", bare):
        items = [i for i in re.split(r",|\band\b", part) if i.strip()]
        longest = max(longest, len(items) if len(items) > 1 else 0)
    return longest


def describe(ev: Evidence) -> str:
    """The evidence in one line: the top tokens with their share of the activation mass, the tokens
    before them, and the sources the mass comes from."""
    if not ev.at and not ev.sources:
        return "never fired on the explain documents"
    parts = ["fires on " + ", ".join(f"{show_token(t)} {share:.0%}" for t, share in ev.at[:5]) if ev.at
             else "fires on no token more than on others"]
    if ev.before:
        parts.append("after " + ", ".join(f"{show_token(t)} {share:.0%}" for t, share in ev.before[:3]))
    if ev.sources:
        parts.append("mass from " + ", ".join(f"{SHORT_SOURCE.get(s, s)} {m:.0%}" for s, m, _ in ev.sources[:3] if m >= 0.05))
    if ev.kind:
        parts.append(f"{ev.kind_share:.0%} on {ev.kind}")
    if ev.topics:
        parts.append("topics " + ", ".join(ev.topics))
    return "; ".join(parts)


_QUOTE = re.compile(r'"([^"]+)"')


def parse_pattern(label: str) -> tuple[list[str], list[str]]:
    """(the quoted tokens a label says fire, the quoted tokens it says come just before them): the
    quotes before the word "after", and those right after it."""
    head, sep, tail = label.partition(" after ")
    targets = _QUOTE.findall(head)
    before = _QUOTE.findall(re.match(r'^(\s*"[^"]+"\s*,?)*', tail).group(0)) if sep else []
    return targets, before
