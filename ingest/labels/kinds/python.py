"""Kinds of Python code, through the standard ``tokenize`` module over the source, so a string, a
comment or a parameter is what Python itself says it is; statements and operators by the
language's grammar (the header of every compound statement, the simple statements that start with
a keyword of their own but ``del``, ``global`` and ``nonlocal``, every class of operator)."""

from __future__ import annotations

import io
import keyword
import re
import tokenize
from functools import lru_cache

import numpy as np

from .registry import Detector, kind

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
    # The rest of the grammar: every compound statement's header, every simple statement, every class of
    # operator, and the expressions that have a syntax of their own.
    "if_block": ("if, elif and else in Python code", "conditional statements", "branches of an if"),
    "match_block": ("match and case in Python code", "structural pattern matching", "match statements"),
    "for_loop": ("for loops in Python code", "iterating over items", "for x in items"),
    "try_block": ("try and except blocks in Python code", "catching exceptions", "error handling blocks"),
    "return_statement": ("return statements in Python code", "returning a value from a function",
                         "what a function gives back"),
    "yield_statement": ("yield in Python code", "generator functions", "yielding values one at a time"),
    "raise_statement": ("raise statements in Python code", "throwing an exception", "raising errors"),
    "assert_statement": ("assert statements in Python code", "assertions in tests", "checking a condition with assert"),
    "jump_statement": ("break, continue and pass in Python code", "leaving or skipping a loop", "empty statements"),
    "assignment": ("assignments in Python code", "the equals sign that sets a variable", "augmented assignment like x += 1"),
    "arithmetic": ("arithmetic operators in Python code", "plus, minus, times and division signs",
                   "maths operators between two values"),
    "bitwise": ("bitwise operators in Python code", "bit masks with | and &", "shifting bits left and right"),
    "boolean_op": ("boolean operators in Python code", "and, or and not in conditions", "logical operators"),
    "type_hint": ("type annotations in Python code", "annotations of parameters and return values",
                  "declared types of variables"),
    "comprehension": ("comprehensions in Python code", "generator expressions", "a for clause inside brackets"),
    "subscript": ("indexing and slicing in Python code", "subscripts with square brackets",
                  "looking up an item by key or position"),
    "lambda": ("lambda expressions in Python code", "anonymous functions", "inline functions with lambda"),
    "async_await": ("async and await in Python code", "asynchronous code", "coroutines"),
    "constant": ("None, True and False in Python code", "boolean constants", "null values"),
}
_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|N\{[^}]*\}|[0-7]{1,3}|[nrtabfv'\"\\])")
_EXCEPTION = re.compile(r"\w*(Error|Exception|Warning|Exit|Interrupt)$")
# Format fields inside a string: printf-style specs and {} fields (not the doubled braces that escape one).
# A {} field is the format grammar's ({}, {0}, {name.attr[key]!r:>10}), so regex quantifiers ({2,3}) and
# JSON text ({"a": 1}) are not fields.
_FORMAT_FIELD = re.compile(r"%(\([^)]*\))?[-#0+]*(\*|\d+)?(\.(\*|\d+))?[diouxXeEfFgGcrsa]"
                           r"|(?<!\{)\{(\w+|\d*)(\.\w+|\[[^\]{}]*\])*(![rsa])?(:[^{}\n]*)?\}(?!\})")
_COMPARISON = frozenset(("==", "!=", "<", ">", "<=", ">="))
_ARITHMETIC = frozenset(("+", "-", "*", "/", "//", "%", "**", "@"))
_BITWISE = frozenset(("|", "&", "^", "<<", ">>"))
_AUGMENTED = frozenset(("+=", "-=", "*=", "/=", "//=", "%=", "**=", "@=", "&=", "|=", "^=", ">>=", "<<=", ":="))
# Compound statements, whose header (keyword to colon) is a kind, and simple ones (keyword to the end).
_HEADERS = {"while": "while_loop", "with": "with_block", "if": "if_block", "elif": "if_block", "else": "if_block",
            "for": "for_loop", "try": "try_block", "except": "try_block", "finally": "try_block",
            "match": "match_block", "case": "match_block"}  # match and case are soft keywords: names elsewhere
_STATEMENTS = {"return": "return_statement", "yield": "yield_statement", "raise": "raise_statement",
               "assert": "assert_statement", "break": "jump_statement", "continue": "jump_statement",
               "pass": "jump_statement"}
_KEYWORD_KINDS = {"and": "boolean_op", "or": "boolean_op", "not": "boolean_op", "async": "async_await",
                  "await": "async_await", "None": "constant", "True": "constant", "False": "constant"}


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
        self.parens: list[str] = []  # per open bracket: "def" (a signature), "call", "subscript" or "other"
        self.fstrings: list[tuple[int, int]] = []  # where each open f-string starts (Python 3.12 splits them)
        self.statement_start, self.in_import, self.decorating = True, False, False
        self.header: tuple[str, tuple[int, int]] | None = None  # an open compound header: its kind and start
        self.statement: tuple[str, tuple[int, int]] | None = None  # an open simple statement: its kind and start
        self.statement_begin = 0  # where the current statement begins in ``prev``
        self.annotation: int | None = None  # inside a type annotation: the bracket depth it ends at
        self.lambdas: list[tuple[int, int]] = []  # where each open lambda starts (its colon ends its parameters)
        self.comprehensions: list[int] = []  # the bracket depth of each open for clause inside brackets
        self.for_targets = 0  # open "for"s whose "in" is still to come (that "in" is no comparison)
        self.opened: dict[int, str] = {}  # per indent column, the kind of the last header there (what an else ends)
        self.soft_header = False  # the last token was a "match" or "case" that may start a header
        try:
            for tok in tokenize.generate_tokens(io.StringIO(text).readline):
                self.read(tok)
        except (tokenize.TokenError, IndentationError, SyntaxError):
            pass  # a document cut mid-statement: what was read is marked, and what is open runs to its end
        for open_ in (self.statement, self.header):
            if open_ is not None:
                self.marks[open_[0]][self.offset(open_[1]):] = True

    def end_statement(self, tok: tokenize.TokenInfo) -> None:
        """A statement ends at a line's end or at a ";" outside brackets: what it left open is closed."""
        if self.statement is not None:
            self.mark(self.statement[0], self.statement[1], tok.start)
        self.statement_start, self.in_import, self.decorating, self.header, self.statement = True, False, False, None, None
        self.annotation, self.lambdas, self.statement_begin, self.for_targets = None, [], len(self.prev), 0

    def offset(self, position: tuple[int, int]) -> int:
        """The character offset of a (row, column) of ``tokenize``."""
        return int(self.line_start[position[0] - 1] + position[1])

    def mark(self, name: str, start: tuple[int, int], end: tuple[int, int]) -> None:
        lo, hi = self.offset(start), self.offset(end)
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
        if tok.type == tokenize.NEWLINE or tok.type == tokenize.OP and tok.string == ";" and not self.parens:
            self.end_statement(tok)
            return
        last = self.prev[-1] if self.prev else None
        if self.soft_header and tok.type == tokenize.OP and (tok.string in ("=", ".", ",", ":") or tok.string in _AUGMENTED):
            self.header = None  # "match = ...", "case.x", "match: int": a name, not a match statement
        self.soft_header = False
        self.inside(tok)
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
        # "in" after a "for" is the loop's; elsewhere "in", "is", "not in" and "is not" compare.
        if s == "for":
            self.for_targets += 1
        in_loop = s == "in" and self.for_targets > 0
        self.for_targets -= in_loop
        comparing = s == "is" or s == "in" and not in_loop or s == "not" and before == "is"
        if comparing:
            self.mark("comparison", tok.start, tok.end)
            if s == "in" and before == "not" and last is not None:
                self.mark("comparison", last.start, last.end)
                self.marks["boolean_op"][self.offset(last.start):self.offset(last.end)] = False
        elif s in _KEYWORD_KINDS:
            self.mark(_KEYWORD_KINDS[s], tok.start, tok.end)
        # async for and async with are headers when the async starts the statement, not in a comprehension
        async_header = s in ("with", "for") and before == "async" and len(self.prev) - 1 == self.statement_begin
        if s in ("match", "case") and self.statement_start:
            self.header, self.soft_header = (_HEADERS[s], tok.start), True  # until the next token says otherwise
        if keyword.iskeyword(s):
            self.mark("py_keyword", tok.start, tok.end)
            if s in _HEADERS and self.statement_start or async_header:
                column = (last if async_header else tok).start[1]
                kind = self.opened.get(column, "if_block") if s == "else" else _HEADERS[s]  # for/while/try take an else
                self.header = (kind, tok.start)
                self.opened[column] = kind
            elif s == "for" and self.parens:
                self.comprehensions.append(len(self.parens))
                self.mark("comprehension", tok.start, tok.end)
            elif s in _STATEMENTS and self.statement is None:
                self.statement = (_STATEMENTS[s], tok.start)
            elif s == "lambda":
                self.lambdas.append(tok.start)
            self.in_import = self.in_import or (s in ("import", "from") and self.statement_start)
        elif before in ("def", "class"):
            self.mark("def_name" if before == "def" else "class_name", tok.start, tok.end)
        elif self.parens and self.parens[-1] == "def" and before in ("(", ",", "*", "**"):
            self.mark("parameter", tok.start, tok.end)
        elif self.in_import and before in (None, "import", "from", ",", ".", "("):
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
        if s == ":":
            self.colon(tok)
        elif s in _COMPARISON:
            self.mark("comparison", tok.start, tok.end)
        elif s == "%" and last is not None and last.type == tokenize.STRING:
            self.mark("string_format", tok.start, tok.end)  # "..." % values
        elif s == "->":
            self.annotation = 0  # a return annotation, to the header's colon
            self.mark("type_hint", tok.start, tok.end)
        elif s == "=" and not self.parens or s in _AUGMENTED:
            self.mark("assignment", tok.start, tok.end)
        elif s in _ARITHMETIC and _operand(last) and not self.decorating:  # not unary minus, *args or a decorator
            self.mark("arithmetic", tok.start, tok.end)
        elif (s in _BITWISE and _operand(last) or s == "~") and self.annotation is None:  # not int | None
            self.mark("bitwise", tok.start, tok.end)
        if s in ("(", "[", "{"):
            two_back = self.prev[-2].string if len(self.prev) >= 2 else None
            called = s == "(" and last is not None and two_back != "class" and (
                (last.type == tokenize.NAME and not keyword.iskeyword(last.string)) or last.string in (")", "]"))
            # not a match statement's "case [x, *rest]:"
            indexed = s == "[" and _operand(last) and not (self.header is not None and last.start == self.header[1])
            self.parens.append("def" if two_back == "def" else "call" if called else "subscript" if indexed else "other")
            if indexed:
                self.mark("subscript", tok.start, tok.end)
            if s == "(" and two_back == "." and last is not None and last.type == tokenize.NAME:
                self.mark("method_call", last.start, last.end)  # obj.name( : the attribute is called
        elif s in (")", "]", "}") and self.parens:
            if self.comprehensions and self.comprehensions[-1] == len(self.parens):
                self.comprehensions.pop()
            self.parens.pop()
        elif s == "=" and self.parens and self.parens[-1] == "call" and last is not None and last.type == tokenize.NAME:
            self.mark("keyword_argument", last.start, last.end)

    def colon(self, tok: tokenize.TokenInfo) -> None:
        """A colon ends a lambda's parameters or a compound header, or starts an annotation."""
        if self.lambdas:
            self.mark("lambda", self.lambdas.pop(), tok.end)
        elif self.header is not None and not self.parens:
            self.mark(self.header[0], self.header[1], tok.end)
            self.header = None
        elif self.parens and self.parens[-1] == "def":
            self.annotation = len(self.parens)  # a parameter's, to its "," "=" or ")"
        elif not self.parens and self.annotation is None and all(
                t.string == "." or t.type == tokenize.NAME and not keyword.iskeyword(t.string)
                for t in self.prev[self.statement_begin:]):
            self.annotation = 0  # a variable's (x: int = 0, self.n: int), to its "=" or the line's end

    def inside(self, tok: tokenize.TokenInfo) -> None:
        """Marks a token inside an open annotation, for clause or subscript; run before the token opens
        or closes anything, so a closing bracket counts as inside."""
        if self.annotation is not None:
            if len(self.parens) == self.annotation and tok.type == tokenize.OP and tok.string in (",", "=", ")", ":"):
                self.annotation = None
            else:
                self.mark("type_hint", tok.start, tok.end)
        if self.comprehensions:
            self.mark("comprehension", tok.start, tok.end)
        if "subscript" in self.parens:
            self.mark("subscript", tok.start, tok.end)


def _operand(tok: tokenize.TokenInfo | None) -> bool:
    """Whether ``tok`` can end an operand, so an operator after it is binary (not a sign or ``*args``)."""
    if tok is None:
        return False
    if tok.type == tokenize.NAME:
        return not keyword.iskeyword(tok.string) or tok.string in ("None", "True", "False")
    return tok.type in (tokenize.NUMBER, tokenize.STRING, getattr(tokenize, "FSTRING_END", -1)) or tok.string in (")", "]", "}")


@lru_cache(maxsize=1)
def _python_marks(text: str) -> dict[str, np.ndarray]:
    """Every Python kind's character mask of one source text (each kind's detector asks in turn)."""
    return _PythonReader(text).marks


def _python_kind(name: str) -> Detector:
    return lambda text, source: _python_marks(text)[name]


for _name, (_phrase, *_asks) in _PY.items():
    kind(_name, _phrase, *_asks, source="python")(_python_kind(_name))


