"""The notebook HTML (``api.notebook``): data is text, never markup; shading follows activation; output
is bounded; and it renders what the real service returns."""

from __future__ import annotations

import re
from html.parser import HTMLParser

from featureatlas.api import notebook as nb

HOSTILE = '<script>alert(1)</script> "onmouseover=alert(2) &amp; <b>bold</b>'
# Tags the module may write: anything else (script, img, a, style, iframe) would be a leak or an external resource.
TAGS = {"div", "span", "b", "mark", "ol", "ul", "li", "details", "summary",
        "table", "caption", "thead", "tbody", "tr", "th", "td"}
ALPHA = re.compile(r"rgba\(255, 120, 0, ([\d.]+)\)")


class _Checker(HTMLParser):
    """Every start tag closed by its own end tag, and the tags, attributes and token spans seen."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.tags: set[str] = set()
        self.attrs: list[tuple[str, str | None]] = []
        self.spans: list[dict[str, str]] = []  # title, style and text of each span

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack.append(tag)
        self.tags.add(tag)
        self.attrs += attrs
        if tag == "span":
            self.spans.append({**{k: v or "" for k, v in attrs}, "text": ""})

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        raise AssertionError(f"self-closing <{tag}/>")

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        if self.stack and self.stack[-1] == "span":
            self.spans[-1]["text"] += data


def check(out: str) -> _Checker:
    """Parses ``out`` and asserts it is balanced, inert (no script, handler, link or external resource)."""
    p = _Checker()
    p.feed(out)
    p.close()
    assert not p.stack, f"unclosed {p.stack}"
    assert p.tags <= TAGS, p.tags - TAGS
    for name, value in p.attrs:
        assert name in {"style", "title", "colspan"}, name
        assert "url(" not in (value or "") and "expression(" not in (value or "")
    assert "<script" not in out.lower() and "<b>bold" not in out
    return p


def assert_escaped(out: str) -> None:
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in out
    assert "&quot;onmouseover=alert(2)" in out
    assert "&amp;amp;" in out
    assert "&lt;b&gt;bold&lt;/b&gt;" in out


def alpha(span: dict[str, str]) -> float:
    m = ALPHA.search(span.get("style", ""))
    return float(m.group(1)) if m else 0.0


def example(tokens: list[str], activations: list[float], kind: str = "top") -> dict:
    peak = max(range(len(activations)), key=activations.__getitem__)
    return {"feature_id": 7, "kind": kind, "doc_id": 3, "start": 40, "tokens": tokens, "activations": activations,
            "max_activation": max(activations), "max_position": 40 + peak}


def feature(**changes) -> dict:
    """A feature as ``AtlasService.feature`` returns it (the features row, its examples, histogram edges)."""
    hist = [900, 120, 30, 8, 2, 0, 0, 1]
    f = {
        "feature_id": 7, "label": "suspension bridges", "description": "top tokens: ' bridge' 41%, ' Gate' 12%",
        "search_text": "suspension bridges bridge Gate", "label_source": "token", "label_score": 0.81,
        "label_scores": [{"scorer": "embedding", "score": 0.81}, {"scorer": "correlation", "score": 0.44}],
        "single_token": False, "density": 0.0123, "n_active": 1061, "n_windows": 212, "mean_activation": 1.9,
        "max_activation": 8.0, "top_tokens": [" bridge", " Gate"],
        "logit_positive": [{"token": " span", "value": 0.41}], "logit_negative": [{"token": "\n", "value": -0.3}],
        "histogram": hist, "map_x": 0.1, "map_y": -0.4,
        "top_examples": [example([" The", " Golden", " Gate", " bridge"], [0.0, 0.5, 4.0, 8.0])],
        "quantile_examples": [example([" a", " bridge"], [0.0, 1.0], "quantile")],
        "histogram_edges": [8.0 * i / len(hist) for i in range(len(hist) + 1)],
    }
    return f | changes


def test_feature_escapes_every_string_from_the_data():
    f = feature(label=HOSTILE, description=HOSTILE, label_source=HOSTILE,
                label_scores=[{"scorer": HOSTILE, "score": 0.5}],
                top_examples=[example([" x", HOSTILE, "y"], [0.0, 8.0, 2.0])],
                logit_positive=[{"token": HOSTILE, "value": 0.4}])
    out = nb.feature_html(f)
    check(out)
    assert_escaped(out)
    assert out.count("&lt;script&gt;") == 6  # label, description, source, scorer, example token, logit


def test_shading_scales_with_activation_over_the_feature_maximum():
    f = feature(top_examples=[example([" zero", " half", " full", " over"], [0.0, 4.0, 8.0, 12.0])])
    spans = {s["text"]: s for s in check(nb.feature_html(f)).spans if s.get("title")}
    assert " zero" not in spans  # silent tokens are plain text
    assert alpha(spans[" full"]) > alpha(spans[" half"]) > 0
    assert alpha(spans[" over"]) == alpha(spans[" full"]) <= 0.75  # capped: readable on dark themes
    assert spans[" half"]["title"] == "4.000"


def test_whitespace_is_shown_as_the_ui_shows_it():
    f = feature(top_examples=[example(["def", " f", "():\n", "\treturn", " 1"], [0.0, 0.0, 8.0, 4.0, 0.0])])
    out = nb.feature_html(f)
    spans = {s["text"]: s for s in check(out).spans if s.get("title")}
    assert "():⏎" in spans and "⇥return" in spans  # newline and tab made visible, as showToken
    assert "def f" in out  # leading spaces kept, in a pre-wrap run
    assert "white-space: pre-wrap" in out


def test_feature_output_is_bounded():
    long = [f" w{i}" for i in range(128)]
    values = [0.0] * 128
    values[100] = 8.0
    tops = [example(long, values) for _ in range(30)]
    quantiles = [example([" q", f" band{i}"], [0.0, 8.0 - i / 2], "quantile") for i in range(12)]
    out = nb.feature_html(feature(top_examples=tops, quantile_examples=quantiles))
    check(out)
    assert out.count(" w100") == nb.MAX_EXAMPLES and "… 10 more examples" in out
    assert " w99" in out and " w60" not in out  # a window around the strongest token, cut with "…"
    shown = [i for i in range(12) if f" band{i}<" in out]
    assert shown[0] == 0 and shown[-1] == 11 and len(shown) == nb.MAX_QUANTILE_EXAMPLES  # spread over the bands


def test_feature_histogram_and_empty_feature():
    out = nb.feature_html(feature())
    check(out)
    assert "8 bins from 0 to 8" in out and "0–1: 900 tokens" in out and "7–8: 1 tokens" in out
    dead = nb.feature_html(feature(label=None, histogram=[], histogram_edges=[], top_examples=[], quantile_examples=[],
                                   max_activation=0.0, label_score=None, label_scores=[]))
    check(dead)
    assert "(no label)" in dead and "never fired" in dead


def hit(**changes) -> dict:
    """A hit as ``AtlasService._fused`` builds it."""
    h = {"feature_id": 7, "label": "suspension bridges", "description": "top tokens: ' bridge' 41%",
         "evidence": 12.34, "score": 0.99, "signals": {"label": 9.1, "corpus": 3.2}, "match": 0.71, "strong": True,
         "rank_score": 0.032, "density": 0.0123, "matched_by": {"label": 1, "corpus": 2},
         "snippet": "The Golden Gate[[ bridge]] is a", "down_weighted": False}
    return h | changes


def search(**changes) -> dict:
    cover = {"windows": 14, "windows_total": 300, "capped": False, "documents": 9, "documents_total": 61, "tokens": 896,
             "best_similarity": 0.62,
             "snippets": [{"doc_id": 3, "title": "bridges 3", "source": "docs.jsonl", "text": "The Golden Gate Bridge",
                           "similarity": 0.62}]}
    r = {"query": "bridge", "concept": "bridge", "mode": "all", "confident": True, "coverage": cover, "message": None,
         "hits": [hit(), hit(feature_id=9, strong=False, down_weighted=True, snippet=None)]}
    return r | changes


def test_search_verdict_hits_and_marked_snippet():
    out = nb.search_html(search())
    p = check(out)
    assert "Found features about “bridge”: 14 of 300 corpus windows (9 of 61 documents)" in out
    assert "<mark" in out and "[[" not in out and "]]" not in out
    assert "evidence 12.3" in out and "(dense: down-weighted)" in out and "label #1" in out
    assert any(s.get("title") == "not clearly more than chance" for s in p.spans)


def test_search_escapes_labels_snippets_and_message():
    hostile_cover = search()["coverage"] | {"snippets": [{"doc_id": 1, "title": HOSTILE, "source": "x", "text": HOSTILE,
                                                          "similarity": 0.4}]}
    r = search(query=HOSTILE, confident=False, message=HOSTILE, coverage=hostile_cover,
               hits=[hit(label=HOSTILE, description=HOSTILE, matched_by={HOSTILE: 1},
                         snippet=f"a {HOSTILE}[[<script>x</script>]]\n&amp;")])
    out = nb.search_html(r)
    check(out)
    assert_escaped(out)
    assert "<mark" in out and "&lt;script&gt;x&lt;/script&gt;</mark>" in out and "⏎&amp;amp;" in out
    assert 'title="rank 1 by &lt;script&gt;' in out  # in attributes too


def activations() -> dict:
    """As ``AtlasService.activations`` returns it: each token with its features, strongest first."""
    def feat(f, value, max_act, label):
        return {"feature_id": f, "value": value, "label": label, "relative": value / max_act}
    return {"tokens": [
        {"token": "<s>", "features": []},
        {"token": "The", "features": [feat(3, 1.0, 4.0, "articles")]},
        {"token": " bridge", "features": [feat(7, 8.0, 8.0, HOSTILE), feat(3, 0.5, 4.0, "articles")]},
        {"token": "\n", "features": [feat(7, 4.0, 8.0, HOSTILE)]},
    ]}


def test_activations_shading_and_tooltips():
    out = nb.activations_html(activations())
    p = check(out)
    assert_escaped(out)
    spans = {s["text"]: s for s in p.spans if s.get("title")}
    assert alpha(spans[" bridge"]) > alpha(spans["⏎"]) > alpha(spans["The"]) > 0
    assert spans[" bridge"]["title"].splitlines() == ["“ bridge”", f"#7 {HOSTILE}: 8.000 (100% of max)",
                                                       "#3 articles: 0.500 (12% of max)"]
    assert "&lt;s&gt;" in out and "Strongest features in this text" in out


def test_activations_are_bounded():
    many = {"tokens": [{"token": " a", "features": [{"feature_id": 1, "value": 1.0, "label": "a", "relative": 0.5}]}] * 1000}
    out = nb.activations_html(many)
    check(out)
    assert out.count("“ a”") == nb.MAX_TOKENS and "… 600 more tokens" in out


def test_table_truncates_and_escapes():
    rows = [(i, f"label {i}", i / 7, None) for i in range(12)]
    rows[0] = (0, HOSTILE, float("nan"), True)
    out = nb.table_html(["feature_id", HOSTILE, "score", "note"], rows, caption=HOSTILE, max_rows=5)
    check(out)
    assert_escaped(out)
    assert out.count("<tr>") == 1 + 5 + 1 and "… 7 more rows" in out
    assert "0.142857" in out and "text-align: right" in out and ">True<" in out
    empty = nb.table_html(["a"], [])
    check(empty)
    assert "no rows" in empty and "more rows" not in empty
    assert nb.MAX_CELL_CHARS < len(nb.table_html(["t"], [["x" * 5000]])) < 5000


def steer(**changes) -> dict:
    """As ``AtlasService.steer`` returns it: activations are [token][steered feature]."""
    run = {"text": " the bridge", "tokens": [" the", " bridge"], "logprobs": [-1.2, -0.4], "activations": [[0.0], [4.0]]}
    steered = {"text": " bridge bridge", "tokens": [" bridge", " bridge"], "logprobs": [-0.3, -0.1],
               "activations": [[8.0], [8.0]]}
    r = {"prompt": "I walked over", "features": [{"id": 7, "value": 2.0, "mode": "clamp", "label": "suspension bridges",
                                                  "max_activation": 8.0, "density": 0.0123}],
         "settings": {"max_new_tokens": 2, "temperature": 0.0, "seed": 0, "chat": False, "generated_only": False},
         "default": run, "steered": steered}
    return r | changes


def test_steer_side_by_side():
    out = nb.steer_html(steer())
    p = check(out)
    assert out.index("Default") < out.index("Steered") < out.index("Steered features")
    assert out.count("I walked over") == 2 and "logprob -0.40" in out
    shaded = [s for s in p.spans if "activation 8" in s.get("title", "")]
    plain = [s for s in p.spans if "activation 0 " in s.get("title", "")]
    assert shaded and plain and all(alpha(s) > 0 for s in shaded) and all(alpha(s) == 0 for s in plain)


def test_steer_escapes_and_handles_an_empty_continuation():
    r = steer(prompt=HOSTILE, features=[steer()["features"][0] | {"label": HOSTILE}])
    r["steered"] = {"text": "", "tokens": [], "logprobs": [], "activations": []}
    out = nb.steer_html(r)
    check(out)
    assert_escaped(out)
    assert "ended the text at once" in out


def test_renders_what_the_real_service_returns(client, live):
    f = client.get(f"/api/features/{live}").json()
    out = nb.feature_html(f)
    p = check(out)
    assert f"#{live}" in out and "Top examples" in out
    assert any(alpha(s) > 0 for s in p.spans)  # a feature that fired has shaded tokens
    r = client.get("/api/search", params={"q": "bridge"}).json()
    out = nb.search_html(r)
    check(out)
    assert "Features for “bridge”" in out and out.count("<li") >= len(r["hits"]) > 0
