"""The search evaluation's concept table and judging rules (scripts/search_eval.py), without an atlas."""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "search_eval.py"


@pytest.fixture(scope="module")
def se():
    spec = importlib.util.spec_from_file_location("search_eval", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["search_eval"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_table_is_large_balanced_and_unique(se):
    present = [c for c in se.CONCEPTS if c.present]
    absent = [c for c in se.CONCEPTS if not c.present]
    assert len(present) >= 40 and len(absent) >= 10
    assert len({c.query for c in se.CONCEPTS}) == len(se.CONCEPTS)
    assert {c.half for c in se.CONCEPTS} == set(se.HALVES)
    # every later held-out set has at least 30 concepts of its own two categories, kinds of token and
    # topics; the first two halves cover every category, in near-equal numbers
    for half, topics in ((se.HELDOUT2, "topic2"), (se.HELDOUT3, "topic3"), (se.HELDOUT4, "topic4"),
                         (se.HELDOUT5, "topic5")):
        held = [c for c in se.CONCEPTS if c.half == half]
        assert len(held) >= 30 and {c.category for c in held} == {"kind", topics}
    for category, n in Counter(c.category for c in se.CONCEPTS if c.half in (se.TUNING, se.HELDOUT)).items():
        tuning = sum(c.category == category and c.half == se.TUNING for c in se.CONCEPTS)
        assert abs(2 * tuning - n) <= 1, category


def test_every_detector_compiles(se):
    for c in se.CONCEPTS:
        c.regex()


@pytest.mark.parametrize(("query", "text", "hit"), [
    ("Python function definitions", "\n    def encode(self", True),
    ("Python function definitions", " the default value", False),
    ("French language text", " est un médecin,", True),
    ("French language text", " is a doctor,", False),
    ("Spanish text", " el 4 de agosto de", True),
    ("speaker names in a play", "\n\n**BRUTUS**", True),
    ("speaker names in a play", "f(*args, **kwargs)", False),
    ("stage directions", "_Flourish. Enter K", True),
    ("comments in code", "\n# Copyright (C", True),
    ("comments in code", "### SCENE III.", False),
    ("years and dates", " born in 1736 at", True),
    ("hexadecimal numbers", "0x03 -> END OF TEXT", True),
])
def test_detectors(se, query, text, hit):
    concept = next(c for c in se.CONCEPTS if c.query == query)
    assert (concept.regex().search(text) is not None) == hit


def test_window_is_fixed_around_the_strongest_token(se):
    tokens = [f"t{i} " for i in range(20)]
    acts = [0.0] * 20
    acts[10] = 5.0
    assert se.window(tokens, acts) == "".join(tokens[10 - se.WINDOW_BEFORE : 11 + se.WINDOW_AFTER])
    acts = [0.0] * 20
    acts[1] = 1.0  # near the start: the window is cut, not shifted
    assert se.window(tokens, acts) == "".join(tokens[: 2 + se.WINDOW_AFTER])


def test_found_rule(se):
    assert se.qualifies(0.5, 0.1)
    assert not se.qualifies(0.45, 0.0)  # under half of the examples
    assert not se.qualifies(0.6, 0.3)  # not more than twice the base rate
    assert not se.qualifies(1.0, 0.5)


def test_rates_ignore_missing_confidence(se):
    assert se.rate([None, None], True) is None
    assert se.rate([True, False, None, True], True) == pytest.approx(2 / 3, abs=1e-3)
    assert se.rate([True, False], False) == 0.5


class StubService:
    """Answers like ``AtlasService.search``; ``fields`` are the extra top-level keys it returns."""

    def __init__(self, fields: dict, fail: str | None = None):
        self.fields, self.fail = fields, fail

    def search(self, q: str, k: int = 10, mode: str | None = None) -> dict:
        if self.fail is not None and mode == self.fail:
            raise RuntimeError("no windows table")
        hits = [{"feature_id": f, "label": f"feature {f}"} for f in (2, 0, 1)][:k]
        return {"query": q, "mode": mode or "all", "hits": hits, **self.fields}


def test_run_query_judges_hits_and_reads_optional_fields(se):
    import numpy as np

    present = next(c for c in se.CONCEPTS if c.present)
    absent = next(c for c in se.CONCEPTS if not c.present)
    fractions = np.array([0.9, 0.1, 0.2])
    old = se.run_query(StubService({}), present, "label", 3, fractions, 0.05)
    assert old["found"] is True and old["confident"] is None and "coverage" not in old
    assert [h["fraction"] for h in old["hits"]] == [0.2, 0.9, 0.1]
    assert se.run_query(StubService({}), present, "label", 2, fractions, 0.5)["found"] is False  # 0.9 < 2 x 0.5
    new = se.run_query(StubService({"confident": False, "coverage": 0.0}), absent, se.FUSED, 3, None, None)
    assert new["found"] is None and new["confident"] is False and new["coverage"] == 0.0
    broken = se.run_query(StubService({}, fail="corpus"), present, "corpus", 3, fractions, 0.05)
    assert broken["found"] is False and "RuntimeError" in broken["error"]

    rows = [{"query": c.query, "half": se.TUNING, "present": c.present, "ceiling": 1,
             "modes": {"label": m}} for c, m in ((present, old), (absent, new))]
    summary = se.summarize(rows, ["label"], [se.TUNING, se.HELDOUT])["label"]
    assert summary[se.TUNING]["found"] == 1 and summary[se.TUNING]["confident_false_on_absent"] == 1.0
    assert summary[se.TUNING]["confident_true_on_present"] is None
    assert summary[se.HELDOUT]["n_present"] == 0


def test_no_way_of_asking_for_a_kind_copies_a_held_out_query(se):
    """The kind signal matches a query against the ways of asking for each kind: none of them may be a
    held-out query word for word (the kind's own phrase, what its labels say, is exempt)."""
    from featureatlas.ingest.labels.kinds import KINDS

    held = {c.query.lower() for c in se.CONCEPTS if c.half != se.TUNING}
    assert not {ask.lower() for k in KINDS.values() for ask in k.asks[1:]} & held

