"""Kinds of token: structural detectors that know the text, so a label can say *where* a feature fires.

Many features are about where a token stands rather than what it says: the letters of an
uppercase word, a speaker's name in a play, a parameter in a Python ``def``. No list of tokens or
topic words names those, so every token of the corpus is tagged once with the kinds it belongs to,
and a feature whose activation mass lies mostly in one kind is named by it
(``uppercase words and acronyms ("KING", "ING")``).

A detector reads one document's text (its tokens joined, so character offsets and token
boundaries agree) and marks characters; a token is of a kind when its first non-blank character
is marked. Python kinds come from the standard ``tokenize`` module over the source, so a string, a
comment or a parameter is what Python itself says it is. Each kind is one ``Kind`` registered in
``KINDS``: its label phrase, the ways a user asks for it (search matches those), the source it
belongs to and its detector.
"""

from __future__ import annotations

import io
import keyword
import re
import tokenize
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import duckdb
import numpy as np
import pyarrow as pa

from .windows import KeyIndex

Detector = Callable[[str], np.ndarray]  # a document's text -> [len(text)] bool, the characters of this kind


@dataclass(frozen=True)
class Kind:
    name: str  # stable key, stored in the atlas
    phrase: str  # how a label names it
    asks: tuple[str, ...]  # how a user asks for it: search embeds these
    detect: Detector
    source: str | None = None  # only documents of this source hold it (its phrase then says where)
    names: bool = True  # a label may name it (a whole source is said by "in French articles" instead)


KINDS: dict[str, Kind] = {}


def kind(name: str, phrase: str, *asks: str, source: str | None = None,
         names: bool = True) -> Callable[[Detector], Detector]:
    """Registers a detector as a kind (the one place a kind is declared)."""
    def register(detect: Detector) -> Detector:
        if len(KINDS) >= 63:  # token kinds travel as bits of one int64
            raise RuntimeError("too many kinds for a 63-bit mask")
        KINDS[name] = Kind(name, phrase, (phrase, *asks), detect, source, names)
        return detect
    return register


def vocabulary() -> dict[str, dict]:
    """What search needs of each kind, stored with the labels so a server knows the kinds its atlas was
    labelled with: {name: {phrase, asks}}."""
    return {k.name: {"phrase": k.phrase, "asks": list(k.asks)} for k in KINDS.values()}


def _spans(text: str, pattern: re.Pattern[str], group: int = 0) -> np.ndarray:
    mask = np.zeros(len(text), dtype=bool)
    for m in pattern.finditer(text):
        mask[m.start(group):m.end(group)] = True
    return mask


def _regex(name: str, phrase: str, pattern: str, *asks: str, source: str | None = None, flags: int = 0,
           group: int = 0) -> None:
    rx = re.compile(pattern, flags)
    kind(name, phrase, *asks, source=source)(lambda text: _spans(text, rx, group))


_UPPER = "A-ZÀ-ÖØ-Þ"
_LETTER = r"[^\W\d_]"
_MONTHS = ("January February March April May June July August September October November December janvier février "
           "mars avril mai juin juillet août septembre octobre novembre décembre enero febrero marzo abril mayo junio "
           "julio agosto septiembre octubre noviembre diciembre").split()

_regex("uppercase", "uppercase words and acronyms", rf"(?<!{_LETTER})[{_UPPER}]{{2,}}(?!{_LETTER})",
       "capital letters", "all caps text", "acronyms and abbreviations")
_regex("capitalised", "capitalised words", rf"(?<!{_LETTER})[{_UPPER}][a-zà-ÿ]+", "proper nouns and names",
       "words with a capital letter")
_regex("year", "years", r"(?<!\d)(1[0-9]{3}|20[0-9]{2})(?!\d)", "dates and years", "years in dates")
# Case-sensitive: English months are capitalised, French and Spanish ones not, and the verb "may" is no month.
_regex("month", "months and dates", r"\b(" + "|".join(_MONTHS) + r")\b", "calendar dates", "names of months")
_regex("number", "numbers and digits", r"\d+", "numerals", "digits")
# Ordinals by their words (any case) and by a number's suffix; "1e" only before a space, since
# 1e-5 is a float. "second" is also a unit of time: kept, as the word is the same.
_regex("ordinal", "ordinal numbers", r"\b(?i:first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth"
       r"|premi[eè]re?|deuxième|troisième|quatrième|cinquième|primer[oa]?|segund[oa]s?|tercer[oa]?|cuart[oa]s?"
       r"|quint[oa]s?)\b|\b\d+(st|nd|rd|th|er|ère|ème|º|ª)\b|\b\d+e(?=\s)", "1st, 2nd and 3rd",
       "numbers that give an order or rank")
_regex("quote", "quotation marks", r"[\"“”«»„‘]|(?<!\w)['’]|['’](?!\w)", "quotes", "quoted speech")
_regex("bracket", "brackets and parentheses", r"[()\[\]{}]", "round and square brackets", "braces")
_regex("sentence_end", "sentence ends", r"[.!?;](?=\s|$)", "full stops", "end of a sentence", "periods")
_regex("question", "question marks", r"\?", "questions")
_regex("exclamation", "exclamation marks", r"¡|!(?!=)", "exclamations in text", "shouting punctuation")  # not !=
# Inside a word only: a quote mark around a word is ``quote``.
_regex("apostrophe", "apostrophes inside words", r"(?<=\w)['’](?=\w)", "contracted words like don't",
       "possessive 's", "elided l' and d' in French")
_regex("hyphen", "hyphens in compound words", rf"(?<={_LETTER})-{_LETTER}+", "words joined with a hyphen",
       "compound words")  # letters either side: not 2020-01-15 or n-1
# A decimal comma only before one or two digits and not in a list of numbers: "1,000" is a thousands
# separator, "3,5" a French decimal, "f(1,2)" and "x[0,1]" are code. Not a version or an address (3.10.2).
_regex("decimal", "decimal numbers", r"(?<![\d.,(\[{])(\d+\.\d+|\d+,\d{1,2})(?!\d|[.,]\d)",
       "numbers with a decimal point",
       "fractional numbers like 3.14", "floating point values")
# Not " - ": in this corpus it is almost only Python's minus. "--" between letters is the plays' dash.
_regex("dash", "dashes", rf"[—–]|(?<={_LETTER})--(?={_LETTER})", "em dashes and en dashes", "a dash between clauses")
_PATH_EXT = "py|pyc|txt|csv|json|cfg|ini|toml|yaml|yml|xml|html?|md|rst|zip|gz|tar|exe|png|jpg|gif|pdf"
# A rooted path (/usr/lib, ./x, ~/x), one of three parts or more (a/b/c), or a name with a file's extension:
# not "and/or" or "km/h".
# A name with an extension is no attribute access (self.json, lxml.html): not followed by "(" or another
# dot part, and not after "self."-like code. A three-part form needs a letter (12/25/1999 is a date).
_regex("path", "file names and paths", rf"(?<![\w)\]</])(?:~|\.{{1,2}})?/[\w.-]+(?:/[\w.-]+)*"
       rf"|(?<![\w/])(?=[\w./-]*[A-Za-z])[\w.-]+(?:/[\w.-]+){{2,}}"
       rf"|(?<![\w.])(?!self\.|cls\.)[\w-]+\.(?:{_PATH_EXT})\b(?![(\w]|\.\w)", "directories and files",
       "paths like /usr/lib", "file extensions")
# The whole identifier, so a feature of the pieces after the underscore counts as well as one of "_".
_regex("snake_case", "names with underscores (snake_case)", r"(?<!\w)(?=\w*[A-Za-z])_?[A-Za-z0-9]+(?:_[A-Za-z0-9]+)+_?(?!\w)",
       "identifiers joined by underscores", "snake case variable names")
_regex("comma", "commas", r",", "comma punctuation")
_regex("colon", "colons", r":", "colon punctuation")


@kind("word_piece", "word pieces inside words", "subword tokens", "parts of words", "word fragments")
def _word_piece(text: str) -> np.ndarray:
    letters = np.array([c.isalpha() for c in text], dtype=bool)
    mask = np.zeros(len(text), dtype=bool)
    mask[1:] = letters[1:] & letters[:-1]
    return mask


@kind("line_start", "line starts", "the start of a line", "first word on a line")
def _line_start(text: str) -> np.ndarray:
    return _spans(text, re.compile(r"(?:^|\n)[ \t]*(\S)"), 1)


@kind("indentation", "line breaks and indentation", "indentation", "whitespace and newlines", "new lines")
def _indentation(text: str) -> np.ndarray:
    return _spans(text, re.compile(r"\n[ \t]*"))


_regex("speaker", "speaker names in Shakespeare", r"\*\*[^*\n]+\*\*", "names of characters who speak", "character names",
       "who is speaking", source="shakespeare")
_regex("stage_direction", "stage directions in Shakespeare", r"(?<!\w)_[^_\n]+_(?!\w)", "entrances and exits in a play",
       "enter and exit directions", source="shakespeare")


# Whole sources as kinds, for search only: "French text" finds the features whose mass lies in French.
_SOURCES = {
    "wiki-fr": ("French text", "French language text", "text in French", "French words"),
    "wiki-es": ("text in Spanish", "Spanish language text", "writing in Spanish", "Spanish words"),
    "wiki-en": ("English encyclopedia text", "English language text", "text in English", "English prose"),
    "shakespeare": ("Shakespeare's plays", "Shakespearean English", "Early Modern English verse", "lines of a play"),
    "python": ("Python code", "source code", "programming code", "code in Python"),
}
for _source, (_phrase, *_asks) in _SOURCES.items():
    kind(f"source:{_source}", _phrase, *_asks, source=_source, names=False)(lambda text: np.ones(len(text), dtype=bool))


# -- Python, through the standard tokenizer -----------------------------------------------------------

_PY = {
    "def_name": ("function names at definition in Python code", "function definitions", "names of functions"),
    "class_name": ("class names at definition in Python code", "defining a class", "names of classes"),
    "parameter": ("function parameters in Python code", "arguments of a Python function", "parameters of a function",
                  "arguments of a function definition"),
    "keyword_argument": ("keyword arguments in Python code", "named arguments in function calls", "kwargs"),
    "call_argument": ("arguments in Python function calls", "arguments passed to a call", "values passed to a function"),
    "string": ("string literals in Python code", "strings in code", "quoted strings in code"),
    "escape": ("escape sequences in Python strings", "backslash escapes", "hex escapes in byte strings"),
    "comment": ("comments in Python code", "code comments", "hash comments"),
    "docstring": ("docstrings in Python code", "documentation strings", "docstrings"),
    "decorator": ("decorators in Python code", "decorators", "at-sign decorators"),
    "import_name": ("module names in Python imports", "import statements", "imported modules"),
    "exception": ("exception names in Python code", "exceptions and errors", "errors raised in code"),
    "py_keyword": ("Python keywords", "reserved words in code", "language keywords"),
    "attribute": ("attribute names after a dot in Python code", "attribute access", "fields of an object"),
    "method_call": ("method calls in Python code", "methods called on objects", "calling a method with a dot"),
    "string_format": ("string formatting in Python code", "f-strings", "placeholders like %s and {}",
                      "string interpolation", "str.format calls"),
    "comparison": ("comparison operators in Python code", "equality tests with ==", "less than and greater than",
                   "comparing two values"),
    "while_loop": ("while loops in Python code", "while statements", "loops that repeat until a condition"),
    "with_block": ("with statements in Python code", "context managers", "with open(...) as f"),
}
_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|N\{[^}]*\}|[0-7]{1,3}|[nrtabfv'\"\\])")
_EXCEPTION = re.compile(r"\w*(Error|Exception|Warning|Exit|Interrupt)$")
# Format fields inside a string: printf-style specs and {} fields (not the doubled braces that escape one).
# A {} field is the format grammar's ({}, {0}, {name.attr[key]!r:>10}), so regex quantifiers ({2,3}) and
# JSON text ({"a": 1}) are not fields.
_FORMAT_FIELD = re.compile(r"%(\([^)]*\))?[-#0+]*(\*|\d+)?(\.(\*|\d+))?[diouxXeEfFgGcrsa]"
                           r"|(?<!\{)\{(\w+|\d*)(\.\w+|\[[^\]{}]*\])*(![rsa])?(:[^{}\n]*)?\}(?!\})")
_COMPARISON = frozenset(("==", "!=", "<", ">", "<=", ">="))
# Compound statements whose header (keyword to colon) is a kind of its own.
_HEADERS = {"while": "while_loop", "with": "with_block"}


class _PythonReader:
    """One pass of ``tokenize`` over a source text, marking the characters of every Python kind. A
    document cut short mid-statement is marked up to where it breaks."""

    def __init__(self, text: str):
        self.text = text
        self.marks = {name: np.zeros(len(text), dtype=bool) for name in _PY}
        # tokenize's rows are the lines ``readline`` returns, split at "\n" only (``str.splitlines``
        # would also split at form feeds, which the stdlib's sources hold, and shift every mark after one).
        self.line_start = np.concatenate([[0], np.cumsum([len(line) + 1 for line in text.split("\n")])])
        self.prev: list[tokenize.TokenInfo] = []  # the significant tokens so far
        self.parens: list[str] = []  # per open bracket: "def" (a signature), "call", or "other"
        self.fstrings: list[tuple[int, int]] = []  # where each open f-string starts (Python 3.12 splits them)
        self.statement_start, self.in_import, self.decorating = True, False, False
        self.header: tuple[str, tuple[int, int]] | None = None  # an open while/with header: its kind and start
        try:
            for tok in tokenize.generate_tokens(io.StringIO(text).readline):
                self.read(tok)
        except (tokenize.TokenError, IndentationError, SyntaxError):
            pass  # a document cut mid-statement: what was read is marked

    def mark(self, name: str, start: tuple[int, int], end: tuple[int, int]) -> None:
        lo, hi = (int(self.line_start[row - 1] + col) for row, col in (start, end))
        self.marks[name][lo:hi] = True
        if name in ("string", "docstring"):
            for m in _ESCAPE.finditer(self.text, lo, hi):
                self.marks["escape"][m.start():m.end()] = True
        if name == "string":
            for m in _FORMAT_FIELD.finditer(self.text, lo, hi):
                self.marks["string_format"][m.start():m.end()] = True

    def read(self, tok: tokenize.TokenInfo) -> None:
        if tok.type == tokenize.COMMENT:
            self.mark("comment", tok.start, tok.end)
        if tok.type in (tokenize.NL, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT):
            return
        if tok.type == tokenize.NEWLINE:
            self.statement_start, self.in_import, self.decorating, self.header = True, False, False, None
            return
        last = self.prev[-1] if self.prev else None
        if tok.type == tokenize.STRING:
            docstring = self.statement_start and (last is None or last.string == ":")
            self.mark("docstring" if docstring else "string", tok.start, tok.end)
        elif tok.type == getattr(tokenize, "FSTRING_START", -1):
            self.fstrings.append(tok.start)
        elif tok.type == getattr(tokenize, "FSTRING_END", -1) and self.fstrings:
            self.mark("string", self.fstrings.pop(), tok.end)
        elif tok.type == tokenize.NAME:
            self.name(tok, last)
        elif tok.type == tokenize.OP:
            self.op(tok, last)
        if self.parens and self.parens[-1] == "call" and not (tok.type == tokenize.OP and tok.string in "()"):
            self.mark("call_argument", tok.start, tok.end)
        self.statement_start = False
        self.prev.append(tok)

    def name(self, tok: tokenize.TokenInfo, last: tokenize.TokenInfo | None) -> None:
        s, before = tok.string, last.string if last is not None else None
        if keyword.iskeyword(s):
            self.mark("py_keyword", tok.start, tok.end)
            if s in _HEADERS and self.statement_start or (s == "with" and before == "async"):
                self.header = (_HEADERS[s], tok.start)
            self.in_import = self.in_import or (s in ("import", "from") and self.statement_start)
        elif before in ("def", "class"):
            self.mark("def_name" if before == "def" else "class_name", tok.start, tok.end)
        elif self.parens and self.parens[-1] == "def" and before in ("(", ",", "*", "**"):
            self.mark("parameter", tok.start, tok.end)
        elif self.in_import and before in (None, "import", "from", ",", "."):
            self.mark("import_name", tok.start, tok.end)
        elif before == ".":
            self.mark("attribute", tok.start, tok.end)
            if s == "format" and len(self.prev) >= 2 and self.prev[-2].type == tokenize.STRING:
                self.mark("string_format", tok.start, tok.end)  # "...".format(
        elif before == "@" and self.decorating:
            self.mark("decorator", tok.start, tok.end)
        if _EXCEPTION.match(s) or before in ("except", "raise"):
            self.mark("exception", tok.start, tok.end)

    def op(self, tok: tokenize.TokenInfo, last: tokenize.TokenInfo | None) -> None:
        s = tok.string
        if s == "@" and self.statement_start:  # a decorator; elsewhere "@" multiplies matrices
            self.decorating = True
            self.mark("decorator", tok.start, tok.end)
        if s == ":" and self.header is not None and not self.parens:
            self.mark(self.header[0], self.header[1], tok.end)
            self.header = None
        elif s in _COMPARISON:
            self.mark("comparison", tok.start, tok.end)
        elif s == "%" and last is not None and last.type == tokenize.STRING:
            self.mark("string_format", tok.start, tok.end)  # "..." % values
        if s in ("(", "[", "{"):
            two_back = self.prev[-2].string if len(self.prev) >= 2 else None
            called = s == "(" and last is not None and two_back != "class" and (
                (last.type == tokenize.NAME and not keyword.iskeyword(last.string)) or last.string in (")", "]"))
            self.parens.append("def" if two_back == "def" else "call" if called else "other")
            if s == "(" and two_back == "." and last is not None and last.type == tokenize.NAME:
                self.mark("method_call", last.start, last.end)  # obj.name( : the attribute is called
        elif s in (")", "]", "}") and self.parens:
            self.parens.pop()
        elif s == "=" and self.parens and self.parens[-1] == "call" and last is not None and last.type == tokenize.NAME:
            self.mark("keyword_argument", last.start, last.end)


@lru_cache(maxsize=1)
def _python_marks(text: str) -> dict[str, np.ndarray]:
    """Every Python kind's character mask of one source text (each kind's detector asks in turn)."""
    return _PythonReader(text).marks


def _python_kind(name: str) -> Detector:
    return lambda text: _python_marks(text)[name]


for _name, (_phrase, *_asks) in _PY.items():
    kind(_name, _phrase, *_asks, source="python")(_python_kind(_name))


# -- tagging the corpus ---------------------------------------------------------------------------------

def tag_document(tokens: list[str], source: str) -> np.ndarray:
    """[len(tokens)] int64: each token's kinds as bits (bit i is the i-th kind of ``KINDS``)."""
    text = "".join(tokens)
    lengths = np.array([len(t) for t in tokens], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(tokens) else np.zeros(0, np.int64)
    # A token's first non-blank character (its first character when it is all blank) decides its kinds.
    lead = np.array([len(t) - len(t.lstrip()) if t.strip() else 0 for t in tokens], dtype=np.int64)
    first = np.minimum(starts + lead, max(len(text) - 1, 0))
    bits = np.zeros(len(tokens), dtype=np.int64)
    if not text:
        return bits
    for i, k in enumerate(KINDS.values()):
        if k.source is not None and k.source != source:
            continue
        bits |= k.detect(text)[first].astype(np.int64) << i
    return bits


def token_kinds(con: duckdb.DuckDBPyConnection, *, part: str = "explain") -> pa.Table:
    """(doc_id, position, kinds) for every token of the documents of one part of the label split
    (``con`` has ``label_split``), each document's tokens joined in order so detectors see its text."""
    table = con.sql(
        """select t.doc_id, d.source, list(t.position order by t.position) as pos, list(t.token order by t.position) as toks
           from tokens t join documents d using (doc_id) join label_split s using (doc_id) where s.part = $part
           group by all order by t.doc_id""", params={"part": part}
    ).to_arrow_table()
    doc, pos, bits = [], [], []
    for d, source, positions, tokens in zip(*(table[c].to_pylist() for c in ("doc_id", "source", "pos", "toks"))):
        doc.append(np.full(len(positions), d, dtype=np.int32))
        pos.append(np.asarray(positions, dtype=np.int32))
        bits.append(tag_document(tokens, source))
    cat = lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype)  # noqa: E731
    return pa.table({"doc_id": cat(doc, np.int32), "position": cat(pos, np.int32), "kinds": cat(bits, np.int64)})


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
    tags = token_kinds(con, part="explain")
    con.register("explain_kinds", tags)
    hits = con.sql("select h.feature_id, h.value, k.kinds from explain_hits h join explain_kinds k using (doc_id, position)"
                   ).to_arrow_table()
    con.unregister("explain_kinds")
    at = KeyIndex(np.asarray(features, dtype=np.int64)).find(hits["feature_id"].to_numpy().astype(np.int64))
    keep = at >= 0
    at, value, bits = at[keep], hits["value"].to_numpy()[keep].astype(np.float64), hits["kinds"].to_numpy()[keep]
    all_bits = tags["kinds"].to_numpy()
    n = len(features)
    mass = np.bincount(at, weights=value, minlength=n)
    share, lift, recall = (np.zeros((n, len(KINDS))) for _ in range(3))
    for i in range(len(KINDS)):
        on = (bits >> i) & 1
        of_kind = int(((all_bits >> i) & 1).sum())
        if not of_kind:
            continue
        share[:, i] = np.bincount(at, weights=value * on, minlength=n) / np.maximum(mass, 1e-12)
        lift[:, i] = share[:, i] / (of_kind / len(all_bits))
        recall[:, i] = np.bincount(at, weights=on, minlength=n) / of_kind
    return KindStats(share, lift, recall)
