"""Labels: the held-out split, the scorers on a planted concept, the LLM explainer against a fake
OpenAI-compatible server on loopback, failures, and re-labelling an atlas in place."""

from __future__ import annotations

import json
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from featureatlas.api.cli import main
from featureatlas.ingest.config import LabelConfig
from featureatlas.ingest.embed import embed
from featureatlas.ingest.labels import kinds, scorers, topics, wording
from featureatlas.ingest.labels.label import TOKEN_WEIGHT, label_features
from featureatlas.ingest.labels.llm import Chat, ChatError, OpenAIBackend, make_chat
from featureatlas.ingest.labels.windows import label_connection, split_parts, window_pool
from featureatlas.ingest.labels.wording import Evidence
from featureatlas.ingest.labels.wordnet import wordnet_folder
from featureatlas.store.atlas import Atlas

from .conftest import SQL

TOPICS = {
    "bridge": "the suspension bridge hangs from steel cables between two towers over the bay while traffic crosses the deck",
    "cooking": "stir the onions in butter then add garlic and simmer the tomato sauce for twenty minutes before serving",
    "music": "the orchestra played the symphony as violins and cellos carried the melody through the concert hall",
    "football": "the striker scored a goal in the final minute and the crowd in the stadium cheered for the team",
    "weather": "heavy rain and strong winds are expected tonight with snow falling on the mountains by morning",
}
BRIDGE_FEATURE, TOKEN_FEATURE = 0, 1


@pytest.fixture(scope="module")
def planted() -> duckdb.DuckDBPyConnection:
    """An atlas-shaped database: 250 documents over five topics; feature 0 fires on every token of
    the bridge documents, feature 1 on the token " the" wherever it appears."""
    vocab: dict[str, int] = {}
    docs, toks, acts = [], [], []
    for d in range(250):
        topic = list(TOPICS)[d % len(TOPICS)]
        words = f"doc{d} " + (TOPICS[topic] + " ") * 2  # the marker shows which document a window is from
        docs.append((d, f"doc-{d}", "synthetic", f"{topic} {d}", words))
        for pos, w in enumerate(" " + x for x in words.split()):
            tid = vocab.setdefault(w, len(vocab))
            toks.append((d, pos, tid, w))
            if topic == "bridge":
                acts.append((d, pos, BRIDGE_FEATURE, 1.0 + (pos % 5)))
            if w == " the":
                acts.append((d, pos, TOKEN_FEATURE, 2.0))
    con = duckdb.connect()
    for name, cols, rows in (
        ("documents", ("doc_id", "doc_key", "source", "title", "text"), docs),
        ("tokens", ("doc_id", "position", "token_id", "token"), toks),
        ("activations", ("doc_id", "position", "feature_id", "value"), acts),
    ):
        table = pa.table({c: [r[i] for r in rows] for i, c in enumerate(cols)})
        con.register(f"{name}_in", table)
        con.execute(f"create table {name} as select * from {name}_in")
    label_connection(con)
    return con


@pytest.fixture(scope="module")
def held(planted):
    pool = window_pool(planted, part="holdout", embed_fn=embed)
    fired = scorers.fired_in_pool(planted, pool, [BRIDGE_FEATURE, TOKEN_FEATURE])
    top = {BRIDGE_FEATURE: planted.execute("select token_id from tokens where token = ' bridge'").fetchone()[0]}
    return pool, fired, scorers.make_trials(pool, fired, top)


def test_split_is_stable_three_fifths_one_fifth_one_fifth():
    keys = [f"doc-{i}" for i in range(5000)]
    parts = split_parts(keys)
    assert 0.57 < (parts == "explain").mean() < 0.63
    assert 0.17 < (parts == "choose").mean() < 0.23 and 0.17 < (parts == "holdout").mean() < 0.23
    assert (split_parts(keys[::-1])[::-1] == parts).all()


def test_embedding_scorer_rewards_the_planted_concept(held):
    pool, fired, trials = held
    t = trials[BRIDGE_FEATURE]
    assert len(t.positives) >= scorers.MIN_POSITIVES and len(t.negatives) == len(t.positives)
    assert not set(t.negatives) & set(fired[BRIDGE_FEATURE].rows)  # negatives never fire
    right, wrong = embed(["a suspension bridge with steel cables and towers", "a recipe for vegetable soup"])
    scores = scorers.embedding_scores(pool, trials, {BRIDGE_FEATURE: right})
    assert scores[BRIDGE_FEATURE] > 0.95
    unrelated = [scorers.embedding_scores(pool, trials, {BRIDGE_FEATURE: v})[BRIDGE_FEATURE]
                 for v in embed(["a parliament election", "quantum mechanics", "medieval poetry", "stock markets"])]
    assert 0.3 < float(np.mean(unrelated)) < 0.7
    assert scorers.embedding_scores(pool, trials, {BRIDGE_FEATURE: wrong})[BRIDGE_FEATURE] < 0.8


def test_token_scorer_matches_quoted_tokens_and_what_comes_before(planted, held):
    pool, fired, trials = held
    vocab = dict(planted.execute("select distinct token_id, token from tokens").fetchall())
    judge = scorers.TokenScorer(pool, vocab)
    trial, hits = trials[TOKEN_FEATURE], fired[TOKEN_FEATURE]
    exact = judge.score('"the" (articles) in synthetic text', trial, hits)
    assert exact.precision == 1.0 and exact.recall == 1.0 and exact.correlation == pytest.approx(1.0)
    narrower = judge.score('"the" after "in"', trial, hits)  # only "... in the ..."
    assert narrower.precision == 1.0 and 0 < narrower.recall < 1
    for label in ('"rain"', "text about the weather"):  # a wrong token; no quoted token at all
        wrong = judge.score(label, trial, hits)
        assert wrong.precision == 0.0 and wrong.recall == 0.0 and wrong.correlation <= 0


def test_labels_quote_what_fires_and_say_where_in_few_words():
    ev = Evidence(at=[(" upon", 0.3), (" on", 0.25), (" under", 0.1), (" Upon", 0.05)], before=[(" it", 0.2)],
                  sources=[("shakespeare", 0.8, 0.2), ("wiki-en", 0.15, 0.4)], topics=["warfare", "battle", "sword"])
    written = [text for text, _ in wording.candidates(ev)]
    assert '"upon", "on", "under" (prepositions) in Shakespeare\'s plays' in written
    assert '"upon" after "it" in Shakespeare\'s plays' in written
    assert 'warfare in Shakespeare\'s plays ("upon")' in written and "warfare" in written
    assert {"warfare", "battle", "sword"} <= set(written) and not any(" and " in text for text in written)  # one topic a label
    for text in written:
        assert wording.words(text) <= wording.MAX_WORDS and wording.listed_words(text) < 4
        assert len(re.findall(r'"[^"]*"', text)) <= wording.QUOTED_MAX
    assert wording.describe(ev) == ('fires on "upon" 30%, "on" 25%, "under" 10%, "Upon" 5%; after "it" 20%; '
                                    "mass from Shakespeare 80%, English wiki 15%; topics warfare, battle, sword")
    two = Evidence([(" un", 0.4), (" dos", 0.2)], [], [("wiki-es", 0.5, 0.2), ("wiki-fr", 0.45, 0.3)])
    assert wording.context(two)[1] == "in Spanish and French articles"
    assert wording.candidates(Evidence([], [], [])) == []
    assert wording.describe(Evidence([], [], [])) == "never fired on the explain documents"
    # fired, but on no token that stands out: its kind or its topic still names it
    spread = Evidence([], [], [("wiki-fr", 0.9, 0.2)], topics=["France"], kind="word pieces inside words")
    assert [t for t, _ in wording.candidates(spread)] == ["word pieces inside words in French articles"]
    assert [t for t, _ in wording.candidates(Evidence([], [], [("wiki-fr", 0.9, 0.2)], topics=["France"]))] == ["France"]
    assert wording.describe(spread).startswith("fires on no token more than on others; mass from French wiki 90%")


def test_a_feature_of_one_kind_of_token_is_named_by_its_kind():
    ev = Evidence([("KING", 0.5), ("QUEEN", 0.3)], [], [("shakespeare", 0.95, 0.2)], topics=["royalty"],
                  kind="speaker names in Shakespeare", kind_share=0.9, kind_says_where=True)
    written = [text for text, _ in wording.candidates(ev)]
    assert written == ['speaker names in Shakespeare ("KING")', 'speaker names in Shakespeare ("KING", "QUEEN")']
    # a kind of any source gets the source it lives in, whatever words its phrase has
    past = Evidence([("went", 0.5)], [], [("shakespeare", 0.95, 0.2)], kind="verbs in the past tense", kind_share=0.6)
    assert [t for t, _ in wording.candidates(past)] == ['verbs in the past tense in Shakespeare\'s plays ("went")']
    assert "90% on speaker names in Shakespeare" in wording.describe(ev)
    # Where the source would take a kind past the word limit, the kind alone names it (never no label).
    wide = Evidence([("KING", 0.5)], [], [("wiki-fr", 0.5, 0.2), ("wiki-es", 0.45, 0.2)], kind="uppercase words and acronyms")
    assert [t for t, _ in wording.candidates(wide)] == ['uppercase words and acronyms ("KING")']


def test_word_lists_are_counted_and_quoted_tokens_are_not_words():
    assert wording.words('"of", "in" (prepositions) in French articles') == 4
    assert wording.listed_words('"of" about Nay, sans and tis') == 3
    assert wording.listed_words('"cor" about coroutines, charge, complications, Proto and coroutine') == 5
    assert wording.listed_words('"a", "b", "c", "d" in Python code') == 0
    assert wording.listed_words("warfare and battle") == 2


@pytest.mark.parametrize("token,source,kind", [
    (" 1", None, "digits"), (",", None, "punctuation"), ("\n    ", "python", "line breaks and indentation"),
    (" def", "python", "Python keywords"), (" in", "wiki-en", "prepositions"), (" les", "wiki-fr", "articles"),
    ("ing", None, "word pieces"), (" Paris", None, "capitalised words"), (" blood", None, None),
    (" US", "wiki-en", None), (" con", "wiki-es", "prepositions"), (" of", "wiki-fr", "prepositions"),
])
def test_token_kinds(token, source, kind):
    assert wording.token_kind(token, source) == kind


def test_parse_pattern_reads_targets_and_what_comes_before():
    assert wording.parse_pattern('"self", "cls" after "(", "def" in Python code') == (["self", "cls"], ["(", "def"])
    assert wording.parse_pattern('"on" in Shakespeare\'s plays about love after all') == (["on"], [])
    assert wording.parse_pattern("text about the weather") == ([], [])
    # A double-quote token and a run of spaces are quoted so that the scorer finds them again.
    label = wording.show_token(' "') + ", " + wording.show_token("   ") + " after " + wording.show_token(" =")
    targets, before = wording.parse_pattern(label)
    assert targets == [wording.token_key(' "'), wording.token_key("   ")] == ["＂", "␣"] and before == ["="]


def test_auroc_counts_ties_as_half():
    assert scorers.auroc(np.array([1.0, 2.0]), np.array([0.0])) == 1.0
    assert scorers.auroc(np.array([1.0]), np.array([1.0])) == 0.5
    assert np.isnan(scorers.auroc(np.array([]), np.array([1.0])))


def test_explainers_never_see_choose_or_held_out_documents(planted):
    other = {d for (d,) in planted.execute("select doc_id from label_split where part != 'explain'").fetchall()}
    assert other
    out = label_features(planted, [BRIDGE_FEATURE, TOKEN_FEATURE], LabelConfig(), embed, seed=0)
    seen = {d for (d,) in planted.execute("select distinct doc_id from explain_hits").fetchall()}
    assert seen and not seen & other
    bridge = out.features.index(BRIDGE_FEATURE)
    assert out.score[bridge] is not None and out.score[bridge] > 0.8
    assert out.source[bridge] == "contrastive"
    assert out.single_token[out.features.index(TOKEN_FEATURE)]


def test_a_texts_embedding_does_not_depend_on_the_texts_beside_it():
    # Ties between windows and label choices must come out the same in a local and a Ray build (issue 32).
    texts = ["the Golden Gate Bridge", "a much longer sentence about the weather in San Francisco today",
             "bridge", "the Golden Gate Bridge at night", "cooking"]
    together = embed(texts)
    for i, text in enumerate(texts):
        assert np.array_equal(embed([text])[0], together[i])
    assert np.array_equal(embed(texts[::-1])[::-1], together)
    assert np.allclose(np.linalg.norm(together, axis=1), 1, atol=1e-6)


def test_rank_auroc_counts_ties_as_nothing_in_any_order():
    scores = np.array([[0.5, 0.2, 0.5, 0.1], [0.3, 0.3, 0.3, 0.3]], np.float32)
    assert topics.rank_auroc(scores, 2).tolist() == [0.5, 0.0]  # 0.5 beats 0.1 only; 0.2 beats 0.1


def test_rank_auroc_equals_the_pairwise_definition():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(6, 30))
    want = [scorers.auroc(row[:12], row[12:]) for row in scores]
    assert topics.rank_auroc(scores, 12) == pytest.approx(want)


def test_topics_name_the_concept_from_the_bank_preferring_short_names(planted, tmp_path, monkeypatch):
    monkeypatch.setenv("FEATUREATLAS_CACHE", str(tmp_path))
    pool = window_pool(planted, part="explain", embed_fn=embed)
    fired = scorers.fired_in_pool(planted, pool, [BRIDGE_FEATURE])
    trial = scorers.make_trials(pool, fired, {}, per_side=None)[BRIDGE_FEATURE]
    assert sorted(trial.positives) == sorted(fired[BRIDGE_FEATURE].rows)  # every firing window
    bank = topics.ConceptBank.load(embed, ["Golden Gate Bridge", "suspension bridge over a bay", "Cooking", "Weather"],
                                   embedder="minilm", nouns=300)
    assert (tmp_path / "concepts").is_dir() and len(list((tmp_path / "concepts").glob("*.npy"))) == 2  # cached
    names = topics.topics(bank, pool, {BRIDGE_FEATURE: trial}, {})[BRIDGE_FEATURE]
    assert 1 <= len(names) <= topics.TOPICS and len(set(names)) == len(names)
    assert "bridge" in names[0].lower()
    silent = scorers.Trial(trial.positives, np.array([], dtype=np.int64))
    assert topics.topics(bank, pool, {BRIDGE_FEATURE: silent}, {}) == {BRIDGE_FEATURE: []}
    again = topics.ConceptBank.load(embed, ["Cooking"], embedder="minilm", nouns=300)  # WordNet's part from the cache
    assert len(again.names) < len(bank.names) and again.vectors.shape[1] == bank.vectors.shape[1]
    # Two names that rank the windows alike: the shorter wins, then the more common.
    vec = pool.embeddings[trial.positives].mean(0)
    twins = topics.ConceptBank(["the war of the roses", "war", "warfare"], np.stack([vec, vec, vec]),
                               np.array([4, 1, 1]), np.array([0, 5, 9]))
    assert topics.topics(twins, pool, {BRIDGE_FEATURE: trial}, {})[BRIDGE_FEATURE][0] == "warfare"


PYTHON = '''import os.path
from collections import OrderedDict

@functools.cache
def load(name, *rest, key=None):
    """Load it."""
    # read the file
    data = read(name, mode="rb")
    if data.startswith(b"\\x03"):
        raise ValueError("bad")
    return MAX_SIZE
'''


def _tags(text: str, source: str = "wiki-en") -> tuple[list[str], np.ndarray]:
    tokens = re.findall(r"\s*\w+|\s*[^\w\s]+|\s+", text)
    return tokens, kinds.tag_document(tokens, source)


def _tagged(text: str, source: str) -> dict[str, set[str]]:
    tokens, tags = _tags(text, source)
    return {name: {t.strip() for t, on in zip(tokens, tags[:, i]) if on} for i, name in enumerate(kinds.KINDS)}


def test_python_kinds_come_from_the_tokenizer():
    got = _tagged(PYTHON, "python")
    assert got["def_name"] == {"load"} and got["parameter"] == {"name", "rest", "key"}
    assert got["keyword_argument"] == {"mode"} and {"name", "mode"} <= got["call_argument"]
    assert got["import_name"] >= {"os", "collections", "OrderedDict"} and got["decorator"] >= {"@", "functools"}
    assert "read" in got["comment"] and got["docstring"] >= {"Load"} and "bad" in got["string"]
    assert got["exception"] == {"ValueError"} and got["uppercase"] >= {"MAX_SIZE"} and "x03" in got["escape"]
    assert got["py_keyword"] >= {"def", "return", "import", "if", "raise"}
    assert not got["speaker"] and not got["parameter"] & got["def_name"]
    broken = _tagged("def f(a, b):\n    return (a +", "python")  # cut mid-expression: what was read is tagged
    assert broken["parameter"] == {"a", "b"}
    # A form feed (the stdlib has them) is no line break to tokenize: the marks after it stay in place.
    fed = _tagged("x = 1\n\x0c\ndef f(a, b):\n    return g(a, key=b)\n", "python")
    assert fed["def_name"] == {"f"} and fed["parameter"] == {"a", "b"} and fed["keyword_argument"] == {"key"}
    calls = _tagged("x = self.read(a.size, b.path)\n", "python")
    assert calls["method_call"] == {"read"} and calls["attribute"] == {"read", "size", "path"}
    other = _tagged("y = a @ b\nclass A(Base):\n    pass\nimport os.path\n", "python")
    assert not other["decorator"] and not other["call_argument"]  # matrix product; class bases
    assert other["import_name"] == {"os", "path"} and other["class_name"] == {"A"}



def test_python_kinds_know_formatting_comparisons_and_block_headers():
    code = ('s = "%d of %s" % (n, m) + f"{x!r} {{y}}" + "{} {0}".format(a, b) + "50% of" + r"\\d{2,3}"\n'
            'while a < b and b != 3:\n    a += 1\nwith open(p) as fh:\n    pass\n'
            'async def g():\n    async with x as y:\n        pass\nz = a == b - c\n')
    got = _tagged(code, "python")
    assert {"%", "d", "s", "{", "x", "!", "r", "format"} <= got["string_format"]
    assert not {"y", "50", "of", "2", "3"} & got["string_format"]  # escaped braces; a percent sign; a regex
    assert got["comparison"] == {"<", "!=", "=="} and "+=" not in got["comparison"]
    assert got["while_loop"] == {"while", "a", "<", "b", "and", "!=", "3", ":"}
    assert got["with_block"] == {"with", "open", "(", "p", ")", "as", "fh", ":", "x", "y"}

def test_python_kinds_follow_the_grammar():
    code = ("def f(a: int, b: list[str] = None, *args, **kw) -> dict:\n"
            "    x: int = a + b * 2 - (c // 3)\n    y = -x\n    z = [i for i in range(3) if i]\n"
            "    d['k'] += a[1:3] | b << 2\n    if a and not b:\n        return None\n    elif x:\n        yield x\n"
            "    else:\n        raise ValueError('bad')\n    for i in y:\n        break\n    try:\n        pass\n"
            "    except KeyError as e:\n        assert e\n    g = lambda q, r: q % r\n    m = a @ b\n")
    got = _tagged(code, "python")
    assert got["type_hint"] == {"int", "list", "[", "str", "]", "->", "dict"}  # not the defaults, not *args
    assert got["arithmetic"] == {"+", "*", "-", "//", "%", "@"}  # not the sign of -x, *args or **kw
    assert got["assignment"] == {"=", "+="} and got["bitwise"] == {"|", "<<"}
    assert got["comprehension"] == {"for", "i", "in", "range", "(", "3", ")", "if", "]"}
    assert {"['", "k", "1", ":", "3", "]"} <= got["subscript"] and "range" not in got["subscript"]
    assert got["if_block"] == {"if", "a", "and", "not", "b", ":", "elif", "x", "else"}
    assert got["for_loop"] == {"for", "i", "in", "y", ":"} and got["try_block"] >= {"try", "except", "KeyError", "as"}
    assert got["return_statement"] == {"return", "None"} and got["yield_statement"] == {"yield", "x"}
    assert got["raise_statement"] >= {"raise", "ValueError"} and got["assert_statement"] == {"assert", "e"}
    assert got["jump_statement"] == {"break", "pass"} and got["lambda"] == {"lambda", "q", ",", "r", ":"}
    assert got["boolean_op"] == {"and", "not"} and got["constant"] == {"None"} and not got["decorator"]
    # a dict's colon and a lambda's are no annotation; a variable's is, and its union is no bitwise or
    other = _tagged("d = {'a': 1}\nf(key=lambda v: v)\nself.n: float | None = 0.5\n", "python")
    assert other["type_hint"] == {"float", "|", "None"} and not other["arithmetic"] and not other["bitwise"]
    # an else takes the kind of the header at its column; in, is, not in and is not compare
    loops = _tagged("for i in x:\n    if i is not None and i not in y:\n        pass\n    else:\n"
                    "        z = [j async for j in i]\nelse:\n    w = 1\n", "python")
    assert loops["for_loop"] == {"for", "i", "in", "x", ":", "else"} and "else" in loops["if_block"]
    assert loops["comparison"] == {"is", "not", "in"} and loops["boolean_op"] == {"and"}
    assert loops["comprehension"] == {"for", "j", "in", "i", "]"} and "j" not in loops["for_loop"]  # async for in brackets
    # a ";" ends a statement; "match" as a name opens no header; a parenthesised import is an import
    semi = _tagged("if x: pass; y = f(a)\nimport pdb; pdb.set_trace()\nmatch: int = 0\nfrom os import (path, sep)\n", "python")
    assert semi["jump_statement"] == {"pass"} and semi["import_name"] == {"pdb", "os", "path", "sep"}
    assert semi["type_hint"] == {"int"} and not semi["match_block"]
    cut = _tagged("def f():\n    return foo(a,", "python")  # cut mid-statement: the open statement runs to the end
    assert cut["return_statement"] == {"return", "foo", "(", "a", ","}


def test_word_classes_and_english_word_forms():
    got = _tagged("He walked and was running quickly to the biggest house; they tried, better than the number of "
                  "forests after the modest wall, e.g. Mr. Smith. The US and IT firms OR the car.", "wiki-en")
    assert got["pronouns"] == {"He", "they"} and got["articles"] == {"the", "The"} and got["prepositions"] >= {"to", "of"}
    assert not {"US", "IT", "OR", "car"} & (got["pronouns"] | got["conjunctions"])  # capitals; French "car"
    assert {"e", "g", "Mr"} <= got["abbreviation"] and "Smith" not in got["abbreviation"]
    assert got["conjunctions"] >= {"and", "than"}
    # per language: Spanish "a" is a preposition, French "l'" an article, and prose words are not code's
    assert _tagged("Va a la casa con su hijo.", "wiki-es")["prepositions"] == {"a", "con"}
    assert _tagged("l'homme est à Paris", "wiki-fr")["articles"] == {"l"}
    assert not _tagged("if a and b in c:\n    pass\n", "python")["prepositions"]
    assert [t for t, on in zip(*_column(["a", ".\n", "\n", "b", "\n", "c"], "blank_line")) if on] == ["\n"]
    if wordnet_folder() is None:  # the word forms come from WordNet's lemmas; without it they mark nothing
        assert not got["past_tense"] and not got["adverb"]
        return
    assert got["past_tense"] == {"walked", "was", "tried"} and got["ing_form"] == {"running"}
    assert got["adverb"] == {"quickly"} and got["comparison_word"] == {"biggest", "better"}  # not number, modest, after
    assert not _tagged("They are on the ground, a rose.", "wiki-en")["past_tense"]
    forms = _tagged("he used it, doing so; bigger and older than the modest seed", "wiki-en")
    assert forms["past_tense"] == {"used"} and forms["ing_form"] == {"doing"}  # short stems; not seed
    assert forms["comparison_word"] == {"bigger", "older"}  # lemmas tagged less than their stems
    assert not _tagged("aller plus loin avec", "wiki-fr")["comparison_word"]  # English forms in English only


def _column(tokens: list[str], name: str) -> tuple[list[str], np.ndarray]:
    return tokens, kinds.tag_document(tokens, "wiki-en")[:, list(kinds.KINDS).index(name)]


def test_text_kinds_know_plays_numbers_and_case():
    play = "_Enter KING HENRY_\n\n**KING HENRY**  \nWhat say you, 1415? Speak!\n"
    got = _tagged(play, "shakespeare")
    assert got["stage_direction"] >= {"_Enter", "KING", "HENRY_"} and "What" not in got["stage_direction"]
    assert {"KING", "HENRY"} <= got["speaker"] and "What" in got["line_start"]
    assert got["year"] == {"1415"} and got["question"] == {"?"} and {"KING", "HENRY"} <= got["uppercase"]
    assert _tagged("You may go in May or en mayo.", "wiki-en")["month"] == {"May", "mayo"}
    marks = _tagged("Don't stop! The well-known 2nd and third men, l'homme 'here'.", "wiki-en")
    assert marks["exclamation"] == {"!"} and marks["hyphen"] == {"-", "known"} and marks["ordinal"] == {"2nd", "third"}
    code = _tagged("if a != b and 1e-5 < x[n-1]: on 2020-01-15", "wiki-en")  # none of these
    assert not code["exclamation"] and not code["ordinal"] and not code["hyphen"]
    assert _tagged("First, the 3e étage", "wiki-fr")["ordinal"] == {"First", "3e"}
    text = _tagged("It cost 3.14, 1,000 or 3,5 — so read ./setup.py, /usr/lib and a/b/c (and/or, km/h), "
                   "word--word, x - y, n_items, _cache_size and __init__.", "wiki-en")
    assert text["decimal"] >= {"3", "14", "5"} and "000" not in text["decimal"]
    assert text["dash"] == {"—", "--"} and "-" not in text["dash"]
    assert {"setup", "py", "usr", "lib", "a", "b", "c"} <= text["path"] and not {"and", "or", "km", "h"} & text["path"]
    assert text["snake_case"] == {"n_items", "_cache_size"}  # not a dunder name
    code = _tagged("f(1,2) x[0,1] v3.10.2 at 192.168.0.1 on 12/25/1999 self.json r.json() 1_000", "wiki-en")
    assert not code["decimal"] and not code["path"] and not code["snake_case"]  # tuples, versions, dates, attributes
    tokens, tags = _tags("l'homme 'here'")  # an apostrophe inside a word; quotes around one
    of = lambda name: [t for t, on in zip(tokens, tags[:, list(kinds.KINDS).index(name)]) if on]  # noqa: E731
    assert of("apostrophe") == ["'"] and of("quote") == [" '", "'"] and marks["apostrophe"] == {"'"}
    assert not _tagged(play, "wiki-en")["speaker"]  # the plays' markup means nothing elsewhere
    pieces = kinds.tag_document(["Walk", "ing", " home"], "wiki-en")
    piece = list(kinds.KINDS).index("word_piece")
    assert pieces[:, piece].tolist() == [False, True, False]


def test_kind_stats_find_the_kind_that_holds_a_features_mass(planted):
    from featureatlas.ingest.labels import contrastive

    contrastive.explain_tables(planted)
    stats = kinds.kind_stats(planted, [BRIDGE_FEATURE, TOKEN_FEATURE])
    assert stats.share.shape == (2, len(kinds.KINDS)) and (stats.share <= 1 + 1e-9).all()
    # the token feature fires on " the": an article, and nothing else
    assert stats.dominant(1) == "articles"
    assert all(k["share"] >= kinds.KEEP_SHARE for k in stats.kept(0))


class FakeOpenAI(BaseHTTPRequestHandler):
    """Answers chat completions with a fixed label, or fails, as the class attributes say."""

    answer = '"bridge", "cables", "towers" in text about a suspension bridge over the bay'
    status = 200
    requests: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        if self.status != 200:
            self.send_response(self.status)
            self.end_headers()
            return
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": self.answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture()
def fake_llm():
    FakeOpenAI.requests = []
    FakeOpenAI.status = 200
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_llm_explainer_through_an_openai_compatible_endpoint(planted, fake_llm, tmp_path, monkeypatch):
    monkeypatch.setenv("FA_TEST_KEY", "sekret")
    cfg = LabelConfig(label_explainer="llm", llm_url=fake_llm, llm_model="fake", llm_api_key_env="FA_TEST_KEY",
                      label_scorers=["embedding", "detection"], llm_workers=2)
    chat = Chat(OpenAIBackend(cfg.llm_url, cfg.llm_model, cfg.llm_api_key_env, 5.0), max_calls=50, cache=tmp_path / "c.jsonl")
    out = label_features(planted, [BRIDGE_FEATURE], cfg, embed, seed=0, chat=chat, logits={BRIDGE_FEATURE: [" bridge"]})
    req = FakeOpenAI.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sekret" and req["body"]["model"] == "fake"
    prompt = req["body"]["messages"][1]["content"]
    assert "<<" in prompt and "bridge" in prompt
    assert "Counted over all its activations: fires on" in prompt  # the offline explainer's evidence too
    shown = {int(d) for d in re.findall(r"\bdoc(\d+)\b", prompt)}
    explain = {d for (d,) in planted.execute("select doc_id from label_split where part = 'explain'").fetchall()}
    assert shown and shown <= explain
    candidates = out.candidates.to_pylist()
    written = [c for c in candidates if c["explainer"] == "llm"]
    assert [c["label"] for c in written] == [FakeOpenAI.answer] and written[0]["holdout_auroc"] > 0.9
    assert written[0]["holdout_token"] > 0  # it quotes " bridge", which fires
    assert {c["explainer"] for c in candidates} == {"llm", "contrastive"} and sum(c["chosen"] for c in candidates) == 1
    # The kept label is the best candidate by embedding AUROC plus weighted token correlation on the choose windows.
    best = max(c["choice_auroc"] + TOKEN_WEIGHT * c["choice_token"] for c in candidates if c["status"] == "ok")
    kept = next(c for c in candidates if c["chosen"])
    assert kept["choice_auroc"] + TOKEN_WEIGHT * kept["choice_token"] == pytest.approx(best) and out.text == [kept["label"]]
    scores = {s["scorer"]: s["score"] for s in out.scores[0]}
    assert scores["embedding"] > 0.9 and "detection" in scores and "token" in scores
    # A second run answers from the cache: no new calls.
    n = len(FakeOpenAI.requests)
    Chat(OpenAIBackend(cfg.llm_url, cfg.llm_model, "", 5.0), max_calls=0, cache=tmp_path / "c.jsonl")(req["body"]["messages"])
    assert len(FakeOpenAI.requests) == n
    # Another model is asked again: its answer is not the first model's.
    Chat(OpenAIBackend(cfg.llm_url, "another", "", 5.0), max_calls=1, cache=tmp_path / "c.jsonl")(req["body"]["messages"])
    assert len(FakeOpenAI.requests) == n + 1 and FakeOpenAI.requests[-1]["body"]["model"] == "another"


def test_failed_llm_calls_are_marked_failed_not_scored(planted, fake_llm):
    FakeOpenAI.status = 500
    cfg = LabelConfig(label_explainer="llm", llm_url=fake_llm, llm_model="fake")
    chat = Chat(OpenAIBackend(cfg.llm_url, "fake", "", 5.0), max_calls=10, retries=1)
    out = label_features(planted, [BRIDGE_FEATURE], cfg, embed, seed=0, chat=chat)
    assert len(FakeOpenAI.requests) == 2  # one call, one retry
    failed = [c for c in out.candidates.to_pylist() if c["status"] == "failed"]
    assert len(failed) == 1 and "500" in failed[0]["detail"] and failed[0]["holdout_auroc"] is None
    assert out.source == ["contrastive"]  # the fallback label, scored on its own merits


@pytest.mark.parametrize("answer,label", [
    ('"a suspension bridge"', "a suspension bridge"),
    ('- "def" opening a Python function', '"def" opening a Python function'),
    ('Explanation: "un", "dos" in Spanish prose\nmore', '"un", "dos" in Spanish prose'),
])
def test_parse_label_keeps_quoted_tokens(answer, label):
    from featureatlas.ingest.labels.llm import parse_label

    assert parse_label(answer) == label


def test_budget_and_timeouts_raise_chat_errors():
    dead = Chat(OpenAIBackend("http://127.0.0.1:9", "m", "", 0.5), max_calls=1, retries=0)
    with pytest.raises(ChatError):
        dead([{"role": "user", "content": "hi"}])
    with pytest.raises(ChatError, match="budget"):
        dead([{"role": "user", "content": "again"}])


def test_label_command_relabels_in_place(tiny_atlas, tmp_path, capsys):
    root = tmp_path / "atlas"
    shutil.copytree(tiny_atlas, root, symlinks=True)
    before = Atlas(root).features.version
    assert main(["label", "--atlas", str(root), "--features", "0-9", "--scorer", "token", "embedding", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["labelled"] == 10 and summary["scorers"] == ["token", "embedding"]
    atlas = Atlas(root)
    assert atlas.features.version > before
    assert atlas.manifest["labels"]["features"] == "0-9"
    rows = {r["feature_id"]: r for r in atlas.features.to_arrow().to_pylist()}
    assert len(rows) == atlas.d_sae
    con = SQL(atlas)
    for f in range(10):
        scores = {s["scorer"]: s["score"] for s in rows[f]["label_scores"]}
        if rows[f]["label_source"] == "contrastive" and scores.get("token") is not None:
            assert rows[f]["label_score"] == pytest.approx(scores["token"], abs=1e-6)
        assert con.execute("select label from features where feature_id = ?", [f]).fetchone()[0] == rows[f]["label"]
    assert con.execute("select count(*) from label_candidates where feature_id < 10 and chosen").fetchone()[0] <= 10
    # Search still answers over the new labels.
    assert atlas.features.search(rows[0]["label"].split()[0], query_type="fts").limit(5).to_list() is not None


def test_label_command_scores_by_intervention(tiny_atlas, tmp_path, capsys):
    """``--scorer intervention``: the relabelled features are steered, and that score is their label_score."""
    root = tmp_path / "atlas"
    shutil.copytree(tiny_atlas, root, symlinks=True)
    assert main(["label", "--atlas", str(root), "--features", "0-5", "--scorer", "intervention", "embedding", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert 0 <= summary["intervention_score_mean"] <= 1
    rows = {r["feature_id"]: r for r in Atlas(root).features.to_arrow().to_pylist()}
    scored = 0
    for f in range(6):
        scores = {s["scorer"]: s["score"] for s in rows[f]["label_scores"]}
        if "intervention" in scores:
            scored += 1
            assert rows[f]["label_score"] == pytest.approx(scores["intervention"], abs=1e-6) and "embedding" in scores
        else:  # unlabelled or never fired: nothing to steer with
            assert rows[f]["label_source"] == "none" or rows[f]["max_activation"] == 0
    assert scored and summary["label_score_mean"] is not None


@pytest.mark.parametrize("args,flag", [
    (["--features", "5-x"], "--features"),
    (["--features", "100000"], "--features"),
    (["--explainer", "llm"], "--llm-url"),
    (["--scorer", "detection"], "--llm-url"),
])
def test_label_command_bad_input_exits_2(tiny_atlas, tmp_path, capsys, args, flag):
    root = tmp_path / "atlas"
    shutil.copytree(tiny_atlas, root, symlinks=True)
    assert main(["label", "--atlas", str(root), *args]) == 2
    assert flag in capsys.readouterr().err


def test_local_model_folder_backend(tiny_model_dir, tmp_path):
    folder = tmp_path / "instruct"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    cfg = LabelConfig(label_explainer="llm", llm_model=str(folder), llm_max_calls=1)
    chat = make_chat(cfg, "cpu", None)
    answer = chat([{"role": "user", "content": "the bridge"}], max_tokens=4)
    assert isinstance(answer, str)
    assert chat([{"role": "user", "content": "the bridge"}], max_tokens=4) == answer  # cached, within budget


@pytest.mark.parametrize("step", ["_relabelled_lance", "write"])
def test_a_relabel_that_dies_between_the_databases_leaves_the_previous_labels_in_both(tiny_atlas, tmp_path, monkeypatch,
                                                                                     step):
    """Dies after the new DuckDB file is written (before LanceDB), or after both are written (before
    the manifest): readers see the previous labels in LanceDB and DuckDB alike, and the next
    re-label works and cleans up."""
    from featureatlas.store import manifest as manifest_module
    from featureatlas.store import publish

    root = tmp_path / "atlas"
    shutil.copytree(tiny_atlas, root, symlinks=True)
    before = {r["feature_id"]: r["label"] for r in Atlas(root).features.to_arrow().to_pylist()}

    def crash(*_a, **_kw):
        raise RuntimeError("killed")

    monkeypatch.setattr(publish if step == "_relabelled_lance" else manifest_module, step, crash)
    with pytest.raises(RuntimeError, match="killed"):
        main(["label", "--atlas", str(root), "--scorer", "token"])
    monkeypatch.undo()
    atlas = Atlas(root)
    lance = {r["feature_id"]: r["label"] for r in atlas.features.to_arrow().to_pylist()}
    duck = dict(SQL(atlas).execute("select feature_id, label from features").fetchall())
    assert lance == before and duck == before
    # The next re-label (another scorer, so other label scores) goes through and leaves one DuckDB file.
    assert main(["label", "--atlas", str(root), "--scorer", "token"]) == 0
    atlas = Atlas(root)
    assert atlas.manifest["labels"]["scorers"] == ["token"]
    # The crashed run's file is gone; the one just replaced stays until the next change (a reader
    # that read the old manifest may still open it).
    assert {p.name for p in atlas.base.glob("*.duckdb")} == {atlas.manifest["published"]["duckdb"], "analytics.duckdb"}
    assert not list(atlas.base.glob(".*.tmp"))
    assert (root / "analytics.duckdb").resolve() == atlas.duckdb_path.resolve()  # the link follows the re-label


def test_context_embeddings_average_the_stored_windows_each_example_spans(monkeypatch):
    """A feature's context embedding is the unit mean of its first top examples, each the mean of
    the stored window embeddings it covers; quantile examples and later top examples do not count,
    and the answer is the same gathered one row at a time (the chunking a million features needs)."""
    from featureatlas.ingest.labels import stage
    from featureatlas.store.schema import WINDOW

    e = np.eye(4, dtype=np.float32)  # windows (doc 0, 0), (doc 0, 1), (doc 1, 0)
    windows = pa.table({"doc_id": [0, 0, 1], "window_index": [0, 1, 0],
                        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(e[:3].ravel()), 4)})
    rows = [  # feature, kind, doc, start, length
        (0, "top", 0, WINDOW - 1, 2),  # spans windows 0 and 1
        (0, "top", 1, 0, 3),
        (0, "top", 0, 0, 1),  # past context_embedding_examples=2
        (1, "quantile", 0, 0, 1),
        (2, "top", 0, WINDOW, 1),
    ]
    examples = pa.table({"feature_id": [r[0] for r in rows], "kind": [r[1] for r in rows], "doc_id": [r[2] for r in rows],
                         "start": [r[3] for r in rows], "tokens": [["t"] * r[4] for r in rows]})
    cfg = LabelConfig(context_embedding_examples=2)
    out = stage.context_embeddings(examples, windows, cfg, 4)
    expected = np.zeros((4, 4), np.float32)
    expected[0] = (e[0] / 2 + e[1] / 2 + e[2]) / np.linalg.norm([0.5, 0.5, 1])
    expected[2] = e[1]
    assert out == pytest.approx(expected, abs=1e-6)
    monkeypatch.setattr(stage, "CONTEXT_CHUNK", 1)
    assert stage.context_embeddings(examples, windows, cfg, 4) == pytest.approx(expected, abs=1e-6)
    with pytest.raises(RuntimeError, match="lacks 1 windows"):
        stage.context_embeddings(examples, windows.slice(0, 2), cfg, 4)


def test_a_label_shard_reads_only_its_own_features_activations_and_labels_them_the_same(tiny_atlas, tiny_model_dir,
                                                                                        corpus_dir, tmp_path):
    """Why a label shard's connection may hold only its features' rows: every explain table is per
    feature, so the labels are those written from the whole activations table."""
    import pyarrow.parquet as pq
    from featureatlas.ingest import tables
    from featureatlas.ingest.labels import stage as label_stage
    from featureatlas.ingest.pipeline import Ingest

    from .conftest import tiny_config

    ctx = Ingest.open(tiny_config(tiny_atlas, tiny_model_dir, corpus_dir))
    d_sae, cfg = ctx.sae.d_sae, ctx.cfg.labels
    own = label_stage.shard_features(d_sae, cfg, 1)
    assert label_stage.shards(d_sae, cfg) >= 2 and own.start > 0
    written, rows = {}, {}
    for name, features in (("all", range(d_sae)), ("own", own)):
        con = tables.analytics_connection(ctx.documents, ctx.tokens, ctx.folder("encode"), features)
        rows[name] = con.execute("select min(feature_id), max(feature_id), count(*) from activations").fetchone()
        (tmp_path / name).mkdir()
        label_stage.run_shard(con, d_sae, cfg, ctx.folder("encode"), ctx.folder("windows"), tmp_path / name, 1,
                              seed=ctx.cfg.run.seed, device="cpu")
        written[name] = [pq.read_table(tmp_path / name / f"{kind}-00001.parquet") for kind in ("labels", "candidates")]
    assert rows["own"][0] >= own.start and rows["own"][1] < own.stop and 0 < rows["own"][2] < rows["all"][2]
    labels, candidates = written["own"]
    assert labels.column("feature_id").to_pylist() == list(own)
    assert sum(score is not None for score in labels.column("label_score").to_pylist()) > 0  # judged, not all silent
    assert labels.equals(written["all"][0]) and candidates.equals(written["all"][1])


def test_a_topic_names_a_feature_only_when_it_earns_its_words():
    from featureatlas.ingest.labels.contrastive import Candidate
    from featureatlas.ingest.labels.label import TOPIC_MARGIN, _choose

    flat = [(1, Candidate('"se"', "contrastive", "token")), (1, Candidate('latin ("se")', "contrastive", "topic")),
            (2, Candidate('"war"', "contrastive", "token")), (2, Candidate('war ("war")', "contrastive", "topic")),
            (3, Candidate("folklore", "contrastive", "topic")), (3, Candidate("myth", "contrastive", "topic"))]
    score = np.array([0.70, 0.70 + TOPIC_MARGIN / 2, 0.70, 0.70 + 2 * TOPIC_MARGIN, 0.60, 0.65])
    assert _choose(flat, score) == {1: 0, 2: 3, 3: 5}  # a near tie keeps the tokens; topics among themselves as scored
