"""Kinds of prose and punctuation, by regular expressions and word lists over a document's text:
capitals, numbers, punctuation by class, the plays' markup, the word classes of English, French and
Spanish (closed classes by their words, open ones by WordNet), and whole sources for search."""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache

import numpy as np

from ..wordnet import wordnet_folder
from .registry import Detector, kind, regex, spans

_UPPER = "A-ZÀ-ÖØ-Þ"
_LETTER = r"[^\W\d_]"
MONTHS = ("January February March April May June July August September October November December janvier février "
           "mars avril mai juin juillet août septembre octobre novembre décembre enero febrero marzo abril mayo junio "
           "julio agosto septiembre octubre noviembre diciembre").split()

regex("uppercase", "uppercase words and acronyms", rf"(?<!{_LETTER})[{_UPPER}]{{2,}}(?!{_LETTER})",
      "capital letters", "all caps text", "acronyms and abbreviations")
regex("capitalised", "capitalised words", rf"(?<!{_LETTER})[{_UPPER}][a-zà-ÿ]+", "proper nouns and names",
      "words with a capital letter")
regex("year", "years", r"(?<!\d)(1[0-9]{3}|20[0-9]{2})(?!\d)", "dates and years", "years in dates")
# Case-sensitive: English months are capitalised, French and Spanish ones not, and the verb "may" is no month.
regex("month", "months and dates", r"\b(" + "|".join(MONTHS) + r")\b", "calendar dates", "names of months")
regex("number", "numbers and digits", r"\d+", "numerals", "digits")
# Ordinals by their words (any case) and by a number's suffix; "1e" only before a space, since
# 1e-5 is a float. "second" is also a unit of time: kept, as the word is the same.
regex("ordinal", "ordinal numbers", r"\b(?i:first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth"
      r"|premi[eè]re?|deuxième|troisième|quatrième|cinquième|primer[oa]?|segund[oa]s?|tercer[oa]?|cuart[oa]s?"
      r"|quint[oa]s?)\b|\b\d+(st|nd|rd|th|er|ère|ème|º|ª)\b|\b\d+e(?=\s)", "1st, 2nd and 3rd",
      "numbers that give an order or rank")
regex("quote", "quotation marks", r"[\"“”«»„‘]|(?<!\w)['’]|['’](?!\w)", "quotes", "quoted speech")
regex("bracket", "brackets and parentheses", r"[()\[\]{}]", "round and square brackets", "braces")
regex("sentence_end", "sentence ends", r"[.!?;](?=\s|$)", "full stops", "end of a sentence", "periods")
regex("question", "question marks", r"\?", "questions")
regex("exclamation", "exclamation marks", r"¡|!(?!=)", "exclamations in text", "shouting punctuation")  # not !=
# Inside a word only: a quote mark around a word is ``quote``.
regex("apostrophe", "apostrophes inside words", r"(?<=\w)['’](?=\w)", "contracted words like don't",
      "possessive 's", "elided l' and d' in French")
regex("hyphen", "hyphens in compound words", rf"(?<={_LETTER})-{_LETTER}+", "words joined with a hyphen",
      "compound words")  # letters either side: not 2020-01-15 or n-1
# A decimal comma only before one or two digits and not in a list of numbers: "1,000" is a thousands
# separator, "3,5" a French decimal, "f(1,2)" and "x[0,1]" are code. Not a version or an address (3.10.2).
regex("decimal", "decimal numbers", r"(?<![\d.,(\[{])(\d+\.\d+|\d+,\d{1,2})(?!\d|[.,]\d)",
      "numbers with a decimal point",
      "fractional numbers like 3.14", "floating point values")
# Not " - ": in this corpus it is almost only Python's minus. "--" between letters is the plays' dash.
regex("dash", "dashes", rf"[—–]|(?<={_LETTER})--(?={_LETTER})", "em dashes and en dashes", "a dash between clauses")
_PATH_EXT = "py|pyc|txt|csv|json|cfg|ini|toml|yaml|yml|xml|html?|md|rst|zip|gz|tar|exe|png|jpg|gif|pdf"
# A rooted path (/usr/lib, ./x, ~/x), one of three parts or more (a/b/c), or a name with a file's extension:
# not "and/or" or "km/h".
# A name with an extension is no attribute access (self.json, lxml.html): not followed by "(" or another
# dot part, and not after "self."-like code. A three-part form needs a letter (12/25/1999 is a date).
regex("path", "file names and paths", rf"(?<![\w)\]</])(?:~|\.{{1,2}})?/[\w.-]+(?:/[\w.-]+)*"
      rf"|(?<![\w/])(?=[\w./-]*[A-Za-z])[\w.-]+(?:/[\w.-]+){{2,}}"
      rf"|(?<![\w.])(?!self\.|cls\.)[\w-]+\.(?:{_PATH_EXT})\b(?![(\w]|\.\w)", "directories and files",
      "paths like /usr/lib", "file extensions")
# The whole identifier, so a feature of the pieces after the underscore counts as well as one of "_".
regex("snake_case", "names with underscores (snake_case)", r"(?<!\w)(?=\w*[A-Za-z])_?[A-Za-z0-9]+(?:_[A-Za-z0-9]+)+_?(?!\w)",
      "identifiers joined by underscores", "snake case variable names")
regex("comma", "commas", r",", "comma punctuation")
regex("colon", "colons", r":", "colon punctuation")


@kind("word_piece", "word pieces inside words", "subword tokens", "parts of words", "word fragments")
def _word_piece(text: str, source: str) -> np.ndarray:
    letters = np.array([c.isalpha() for c in text], dtype=bool)
    mask = np.zeros(len(text), dtype=bool)
    mask[1:] = letters[1:] & letters[:-1]
    return mask


@kind("line_start", "line starts", "the start of a line", "first word on a line")
def _line_start(text: str, source: str) -> np.ndarray:
    return spans(text, re.compile(r"(?:^|\n)[ \t]*(\S)"), 1)


@kind("indentation", "line breaks and indentation", "indentation", "whitespace and newlines", "new lines")
def _indentation(text: str, source: str) -> np.ndarray:
    return spans(text, re.compile(r"\n[ \t]*"))


regex("speaker", "speaker names in Shakespeare", r"\*\*[^*\n]+\*\*", "names of characters who speak", "character names",
      "who is speaking", source="shakespeare")
regex("stage_direction", "stage directions in Shakespeare", r"(?<!\w)_[^_\n]+_(?!\w)", "entrances and exits in a play",
      "enter and exit directions", source="shakespeare")


regex("blank_line", "blank lines", r"\n(?:[ \t]*\n)+", "empty lines", "a line with nothing on it",
      "gaps between paragraphs")


# -- word classes -------------------------------------------------------------------------------------------

# A source's language; a source not named here (a user's own files) is read as English.
LANGUAGES = {"wiki-en": "en", "shakespeare": "en", "wiki-fr": "fr", "wiki-es": "es"}
# Closed classes by their words, per language, lower case: one list for all three would make Spanish "a"
# an article, French "car" a conjunction and English "son" a verb. ``wording`` names a label's quoted
# tokens by them too (``"in", "on" (prepositions)``).
WORD_CLASSES = {
    "prepositions": {"en": "on upon under underneath through in into at by with from of to for over above below about "
                           "against between among within without across along toward towards after before during",
                     "fr": "de du des en dans par pour sur sous avec sans entre vers à chez",
                     "es": "de del en a al con por para sin sobre desde hasta entre hacia"},
    "articles": {"en": "the a an", "fr": "le la les l un une", "es": "el la los las lo un uno una unos unas"},
    "pronouns": {"en": "i me my mine you your yours he him his she her hers it its we us our they them their thee "
                       "thou thy thine ye",
                 "fr": "je tu il elle on nous vous ils elles se lui leur me te",
                 "es": "yo tú él ella nosotros nosotras ellos ellas se me te le les nos"},
    "conjunctions": {"en": "and or but nor yet so because if than that", "fr": "et ou mais donc car que ni",
                     "es": "y e o u pero sino que ni"},
    "auxiliary verbs": {"en": "is are was were be been being am have has had do does did will would shall should can "
                              "could may might must",
                        "fr": "est sont était étaient être avoir a ont", "es": "es son fue fueron ha han era eran está"},
    "number words": {"en": "one two three four five six seven eight nine ten twelve twenty hundred thousand million",
                     "fr": "deux trois quatre cinq six sept huit neuf dix vingt cent mille",
                     "es": "dos tres cuatro cinco seis siete ocho nueve diez veinte cien mil"},
}
_CLASS_ASKS = {
    "prepositions": ("words of place and relation", "function words such as with and from"),
    "articles": ("determiners", "definite and indefinite article words"),
    "pronouns": ("words that stand for a person", "he, she, they and it"),
    "conjunctions": ("connecting words", "words that join clauses"),
    "auxiliary verbs": ("helping verbs", "forms of to be and to have"),
    "number words": ("numbers spelled out in letters", "counting words"),
}
_CLASS_OF = {lang: {w: name for name, by in WORD_CLASSES.items() for w in by[lang].split()} for lang in ("en", "fr", "es")}
# Sources that are code: in code "in", "if" and "or" are keywords (``python.py`` names those).
CODE = ("python",)


def language(source: str | None) -> str:
    return LANGUAGES.get(source or "", "en")


def word_class(word: str, source: str | None) -> str | None:
    """The closed class of a lower-case word in its source's language (in any language when the
    source is unknown, English first)."""
    if source is not None:
        return _CLASS_OF[language(source)].get(word)
    return next((of[word] for of in _CLASS_OF.values() if word in of), None)


def _word_list(words: str) -> re.Pattern[str]:
    """Matches the words in lower case or Capitalised, not in capitals ("US", "IT" and "OR" are no pronouns)."""
    forms = sorted({f for w in words.split() for f in (w, w[0].upper() + w[1:])}, key=len, reverse=True)
    # After an apostrophe too (c'est, qu'il, l'un); the elided l' itself is a word of the list.
    return re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, forms)) + r")(?!\w)")


def _closed_class(by_language: dict[str, str]) -> Detector:
    lists = {lang: _word_list(words) for lang, words in by_language.items()}
    return lambda text, source: spans(text, lists[language(source)])


for _class, _by_language in WORD_CLASSES.items():
    kind(_class.replace(" ", "_"), _class, *_CLASS_ASKS[_class], not_in=CODE)(_closed_class(_by_language))


class _Lexicon:
    """English open classes from WordNet 3.0 (``wordnet.wordnet_folder``): its lemmas of each part of
    speech with how often WordNet's corpus tagged them so, and the irregular forms of verbs and
    adjectives. Empty without WordNet, and the word-form kinds then mark nothing: guessing by
    endings alone made "number" a comparative and "morning" a verb."""

    def __init__(self) -> None:
        folder = wordnet_folder()
        read = lambda name: (folder / name).read_text(encoding="utf-8").splitlines() if folder else []  # noqa: E731
        # An index line: lemma, pos, synset count, pointer count p, p pointers, sense count, tagged sense count, ...
        self.tagged = {pos: {f[0]: int(f[5 + int(f[3])]) for f in map(str.split, read(f"index.{pos}")) if f[0][:1].isalpha()}
                       for pos in ("noun", "verb", "adj", "adv")}
        self.verb_forms = dict(line.split()[:2] for line in read("verb.exc"))  # went -> go, taken -> take
        self.adjective_forms = dict(line.split()[:2] for line in read("adj.exc"))  # better -> good

    def lemma(self, word: str, *pos: str) -> bool:
        return any(word in self.tagged[p] for p in pos)

    def mostly(self, word: str, pos: str) -> bool:
        """Whether ``word`` is a lemma of ``pos`` tagged as such at least as often as any other part of speech."""
        return word in self.tagged[pos] and all(self.tagged[pos][word] >= of.get(word, -1) for of in self.tagged.values())

    def stems(self, word: str, ending: str, pos: str) -> list[str]:
        """The lemmas of ``pos`` that ``word`` is with a regular ``ending`` taken off: walked, loved,
        stopped, tried, being, bigger. A word that is a lemma of ``pos`` itself (feed, seed) is not an
        inflection of another, unless that other is tagged more often (bigger beside big)."""
        if not word.endswith(ending) or len(word) < len(ending) + 2:
            return []
        base = word[: -len(ending)]
        stems = {base, base + "e", base[:-1] if base[-1] == base[-2] else base, base[:-1] + "y" if base[-1] == "i" else base}
        own = self.tagged[pos].get(word, -1)
        return [stem for stem in stems if stem != word and self.tagged[pos].get(stem, -1) > own]


@lru_cache(maxsize=1)
def _lexicon() -> _Lexicon:
    return _Lexicon()


_WORD = re.compile(r"(?<![\w'’-])[a-z]{3,}(?![\w'’-])")


def _word_form(name: str, phrase: str, *asks: str) -> Callable[[Callable[[str], bool]], Callable[[str], bool]]:
    """Registers a kind of the lower-case words of English text its decorated test passes."""
    def register(test: Callable[[str], bool]) -> Callable[[str], bool]:
        def detect(text: str, source: str) -> np.ndarray:
            if language(source) != "en":  # WordNet's lemmas are English: French "aller" is no comparative
                return np.zeros(len(text), dtype=bool)
            return spans(text, _WORD, keep=test)
        kind(name, phrase, *asks, not_in=CODE)(detect)
        return test
    return register


# The irregular pasts common enough to keep though WordNet also has them as nouns (a saw, the left).
_COMMON_PAST = frozenset("was were had did said went came saw took made gave knew thought told found became left felt "
                         "kept held stood heard brought began wrote led lost ran sent spent won".split())


@_word_form("past_tense", "verbs in the past tense", "past forms of verbs such as went and walked",
            "the simple past and past participles")
def past_tense(word: str) -> bool:
    lex = _lexicon()
    if word in lex.verb_forms:  # went, taken; not the present am, are, has, does; not a rose or the ground
        return word in _COMMON_PAST or not (word.endswith(("ing", "s")) or word == "am" or lex.lemma(word, "noun"))
    return bool(lex.stems(word, "ed", "verb")) and not lex.mostly(word, "noun")  # used, died; not seed, weed


@_word_form("ing_form", "-ing forms of verbs", "present participles and gerunds", "verbs such as being and running")
def ing_form(word: str) -> bool:
    lex = _lexicon()
    return word.endswith("ing") and word in lex.verb_forms or bool(lex.stems(word, "ing", "verb"))


@_word_form("adverb", "adverbs", "words such as quickly, often and very", "words that modify a verb")
def adverb(word: str) -> bool:
    # WordNet's adverbs hold "right", "long" and "so": a word is one when that is its most tagged part of
    # speech and it is in no closed class
    return _CLASS_OF["en"].get(word) is None and _lexicon().mostly(word, "adv")


_DEGREES = frozenset("more most less least better best worse worst further furthest farther farthest".split())


@_word_form("comparison_word", "comparatives and superlatives", "words such as bigger, best and more",
            "degrees of an adjective")
def degree(word: str) -> bool:
    lex = _lexicon()
    if not lex.tagged["adj"]:  # without WordNet, nothing: not even the fixed words
        return False
    if word in _DEGREES:
        return True
    # Not a noun or an adverb itself (number, forest, after); an adjective only when its stem is tagged
    # more often (bigger beside big, not modest beside mod).
    if lex.lemma(word, "noun", "adv"):
        return False
    irregular = word in lex.adjective_forms and word not in lex.tagged["adj"]  # happier -> happy
    return irregular or bool(lex.stems(word, "er", "adj") or lex.stems(word, "est", "adj"))


# Dotted abbreviations (U.S.A., e.g.) before a single initial, so they match whole; not "I.", a sentence's end.
regex("abbreviation", "abbreviations", r"(?<![\w.])(?:[a-zA-Z]\.){2,}|(?<![\w.])(?:Mr|Mrs|Ms|Dr|Prof|St|Jr|Sr|Mt|Gen|Col"
      r"|Capt|Lt|Rev|Mme|Mlle|Sra|Sta|etc|vol|vols|pp|cf|vs|approx|fig|ca|[A-HJ-Z])\.", "shortened words with a full stop",
      "initials and titles such as Dr.", not_in=CODE)


# Whole sources as kinds, for search only: "French text" finds the features whose mass lies in French.
_SOURCES = {
    "wiki-fr": ("French text", "French language text", "text in French", "French words"),
    "wiki-es": ("text in Spanish", "Spanish language text", "writing in Spanish", "Spanish words"),
    "wiki-en": ("English encyclopedia text", "English language text", "text in English", "English prose"),
    "shakespeare": ("Shakespeare's plays", "Shakespearean English", "Early Modern English verse", "lines of a play"),
    "python": ("Python code", "source code", "programming code", "code in Python"),
}
for _source, (_phrase, *_asks) in _SOURCES.items():
    kind(f"source:{_source}", _phrase, *_asks, source=_source, names=False)(lambda text, source: np.ones(len(text), dtype=bool))

