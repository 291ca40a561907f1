"""The one registry of kinds of token: each kind is a ``Kind`` registered in ``KINDS`` by ``kind``
(or ``regex``) from the module that knows its text: ``text`` for prose and punctuation, ``python``
for code read through the standard tokenizer."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

# (a document's text, its source) -> [len(text)] bool, the characters of this kind
Detector = Callable[[str, str], np.ndarray]


@dataclass(frozen=True)
class Kind:
    name: str  # stable key, stored in the atlas
    phrase: str  # how a label names it
    asks: tuple[str, ...]  # how a user asks for it: search embeds these
    detect: Detector
    source: str | None = None  # only documents of this source hold it (its phrase then says where)
    names: bool = True  # a label may name it (a whole source is said by "in French articles" instead)
    not_in: tuple[str, ...] = ()  # sources that never hold it (words of prose are not words of code)

    def reads(self, source: str) -> bool:
        """Whether documents of ``source`` are tagged with this kind at all."""
        return (self.source is None or self.source == source) and source not in self.not_in


KINDS: dict[str, Kind] = {}


def kind(name: str, phrase: str, *asks: str, source: str | None = None, names: bool = True,
         not_in: tuple[str, ...] = ()) -> Callable[[Detector], Detector]:
    """Registers a detector as a kind (the one place a kind is declared)."""
    def register(detect: Detector) -> Detector:
        if name in KINDS:
            raise RuntimeError(f"kind {name!r} is registered twice")
        KINDS[name] = Kind(name, phrase, (phrase, *asks), detect, source, names, not_in)
        return detect
    return register


def spans(text: str, pattern: re.Pattern[str], group: int = 0, keep: Callable[[str], bool] | None = None) -> np.ndarray:
    """[len(text)] bool: the characters of every match of ``pattern`` (of its ``group``), or of those
    whose text ``keep`` accepts."""
    mask = np.zeros(len(text), dtype=bool)
    for m in pattern.finditer(text):
        if keep is None or keep(m.group(group)):
            mask[m.start(group):m.end(group)] = True
    return mask


def regex(name: str, phrase: str, pattern: str, *asks: str, source: str | None = None, flags: int = 0,
          group: int = 0, not_in: tuple[str, ...] = ()) -> None:
    """Registers a kind whose characters are a regular expression's matches."""
    rx = re.compile(pattern, flags)
    kind(name, phrase, *asks, source=source, not_in=not_in)(lambda text, source: spans(text, rx, group))


def vocabulary() -> dict[str, dict]:
    """What search needs of each kind, stored with the labels so a server knows the kinds its atlas was
    labelled with: {name: {phrase, asks}}."""
    return {k.name: {"phrase": k.phrase, "asks": list(k.asks)} for k in KINDS.values()}
