"""HTML for Feature Atlas results in a notebook: what Jupyter shows through ``_repr_html_``.

Pure functions from the plain dicts ``api.service.AtlasService`` returns (the HTTP API's JSON) to an
HTML string, drawn like the browser UI (``api/web/app.js``): tokens shaded by activation over the
feature's corpus maximum, the value in a title tooltip, newlines and tabs made visible.

Corpus text, labels and messages are untrusted text, never markup: every string from the data goes
through ``html.escape(quote=True)``, and every attribute value through ``_el``, which escapes it, as
``h()`` in ``api/web/dom.js`` guarantees in the browser. There is no script, no event handler and no
external resource. Styles are inline: notebook frontends may drop ``<style>`` elements from untrusted
outputs but keep style attributes. Colours are translucent or opacity-based, so one palette reads on
light and dark themes alike. Output is bounded (examples, tokens, rows, characters) so a notebook
that shows many results stays light.
"""

from __future__ import annotations

import html
import math
import numbers
from collections.abc import Sequence
from typing import Any

MAX_EXAMPLES = 20  # top examples of a feature shown
MAX_QUANTILE_EXAMPLES = 6  # spread over the quantile bands, strongest to weakest
EXAMPLE_TOKENS = 32  # tokens of an example shown (contexts are 128 by default) ...
EXAMPLE_BEFORE = 24  # ... most of them before the strongest token: the context that made it fire
MAX_LOGITS = 10  # promoted and suppressed tokens each
MAX_TOKENS = 400  # tokens of a probed text or of a continuation
MAX_ROWS = 50  # rows of a table, hits of a search
MAX_STRONGEST = 10  # features listed under a probed text
MAX_CELL_CHARS = 200  # characters of a table cell
MAX_SNIPPET_CHARS = 400  # characters of a corpus window quoted under a search
MAX_PROMPT_CHARS = 400  # of a prompt before its continuations: its end, which the model continued

# One accent for both themes (the UI's --hot, between its light and dark values), translucent so
# the page shows through. The UI goes to alpha 0.9 with a colour per theme; one colour for both is
# capped at 0.75 so light text on a dark theme stays readable on the strongest token.
HOT = "255, 120, 0"
ALPHA_MIN, ALPHA_SPAN = 0.10, 0.65

_LINE = "rgba(128, 128, 128, 0.35)"
_PANEL = "rgba(128, 128, 128, 0.12)"
_BOX = "font-family: system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif; line-height: 1.45; max-width: 72rem"
_MONO = "font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 0.85em"
# As the UI's .example: pre-wrap keeps a token's leading spaces, so nothing but text goes between its spans.
_RUN = f"{_MONO}; white-space: pre-wrap; overflow-wrap: anywhere; padding: 0.3em 0.5em; border-bottom: 1px solid {_LINE}"
_TITLE = "font-weight: 600; font-size: 1.15em; margin: 0.2em 0 0.4em; overflow-wrap: anywhere"
_HEAD = "font-weight: 600; margin: 1em 0 0.3em"
_MUTED = "opacity: 0.7"
_META = "font-size: 0.85em; opacity: 0.75"
_MARK = "background: rgba(255, 200, 0, 0.45); color: inherit; font-weight: 600; border-radius: 2px"
_BADGE = (f"display: inline-block; font-size: 0.8em; padding: 0 0.4em; border: 1px solid {_LINE}; border-radius: 999px; "
          "margin-right: 0.25em")
_CELL = (f"padding: 0.2em 0.6em; border-bottom: 1px solid {_LINE}; vertical-align: top; white-space: pre-wrap; "
         "overflow-wrap: anywhere")


def _e(value: object) -> str:
    """Data as text: ``<``, ``>``, ``&`` and both quotes escaped, so it is safe in text and in attributes."""
    return html.escape(str(value), quote=True)


def _el(tag: str, body: str = "", **attrs: object) -> str:
    """One element. Attribute values are escaped here, so no caller can forget; ``body`` is HTML
    already (text in it went through ``_e``). ``aria_label`` is written ``aria-label``."""
    attr = "".join(f' {k.replace("_", "-")}="{_e(v)}"' for k, v in attrs.items() if v is not None)
    return f"<{tag}{attr}>{body}</{tag}>"


def _show(token: str) -> str:
    """A token as the model saw it, as ``showToken`` in api/web/dom.js: newlines and tabs made visible,
    spaces kept (the runs are ``white-space: pre-wrap``)."""
    return token.replace("\n", "⏎").replace("\t", "⇥")


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _num(x: float | None, digits: int = 3) -> str:
    """As the UI's ``fmt.num``: significant digits, a dash for missing."""
    return "–" if x is None else f"{x:.{digits}g}"


def _pct(x: float | None) -> str:
    """As the UI's ``fmt.pct``: more decimals for the rare features, whose density is the interesting part."""
    return "–" if x is None else f"{100 * x:.{4 if x < 0.001 else 2 if x < 0.1 else 1}f}%"


def _int(x: int | None) -> str:
    return "–" if x is None else f"{int(x):,}"


def _more(n: int, what: str) -> str:
    """Says what a bounded list left out: a truncated result says it was truncated."""
    return _el("div", _e(f"… {n:,} more {what}"), style=_META) if n > 0 else ""


def _box(*parts: str) -> str:
    return _el("div", "".join(parts), style=_BOX)


def _token(token: str, relative: float, title: str | None = None) -> str:
    """A token shaded by ``relative`` (its activation over the feature's corpus maximum, capped at 1), as
    ``shadedTokens`` in app.js; silent tokens without a tooltip are plain text, which keeps examples light."""
    if relative <= 0 and title is None:
        return _e(_show(token))
    alpha = ALPHA_MIN + ALPHA_SPAN * min(1.0, relative)
    return _el("span", _e(_show(token)), title=title,
               style=f"background: rgba({HOT}, {alpha:.3f}); border-radius: 2px" if relative > 0 else None)


# -- feature -----------------------------------------------------------------------------------------


def _example(example: dict[str, Any], max_activation: float) -> str:
    """``EXAMPLE_TOKENS`` of one example around its strongest token, each shaded against the feature's maximum."""
    tokens, values = example["tokens"], example["activations"]
    peak = max(range(len(values)), key=lambda i: values[i] or 0.0, default=0)
    start = max(0, min(peak - EXAMPLE_BEFORE, len(tokens) - EXAMPLE_TOKENS))
    end = min(len(tokens), start + EXAMPLE_TOKENS)
    cut = _el("span", "…", style=_MUTED)
    body = "".join(_token(t, (v or 0.0) / (max_activation or 1.0), f"{v:.3f}" if v and v > 0 else None)
                   for t, v in zip(tokens[start:end], values[start:end]))
    return _el("div", (cut if start > 0 else "") + body + (cut if end < len(tokens) else ""), style=_RUN)


def _spread(items: list[Any], k: int) -> list[Any]:
    """``k`` of ``items`` evenly spaced, first and last included: quantile examples come strongest first,
    and a few of them should span the bands, not sample the top one."""
    if len(items) <= k:
        return items
    step = (len(items) - 1) / max(1, k - 1)
    return [items[round(i * step)] for i in range(k)]


def _examples(examples: list[dict[str, Any]], shown: list[dict[str, Any]], max_activation: float, empty: str) -> str:
    if not examples:
        return _el("div", _e(empty), style=_MUTED)
    return "".join(_example(e, max_activation) for e in shown) + _more(len(examples) - len(shown), "examples")


def _histogram(counts: Sequence[int], edges: Sequence[float]) -> str:
    """Bars on a log scale, as app.js's ``histogram``: counts fall by orders of magnitude across the
    bins, and the rare strong activations are the interesting ones. Divs, not SVG: any frontend draws them."""
    if not counts:
        return _el("div", "none", style=_MUTED)
    top = math.log1p(max([1, *counts]))
    bars = "".join(_el("div", title=f"{_num(edges[i])}–{_num(edges[i + 1])}: {c:,} tokens",
                       style=f"flex: 1; height: {max(2.0, 98 * math.log1p(c) / top) if c else 0:.1f}%; "
                             f"background: rgba({HOT}, 0.8)")
                   for i, c in enumerate(counts))
    frame = f"display: flex; align-items: flex-end; gap: 1px; height: 4em; max-width: 32em; border-bottom: 1px solid {_LINE}"
    return (_el("div", bars, style=frame)
            + _el("div", _e(f"{len(counts)} bins from 0 to {_num(edges[-1])}; counts on a log scale"), style=_META))


def _stats(pairs: list[tuple[str, str]]) -> str:
    cell = f"padding: 0.3em 0.7em; border-radius: 6px; background: {_PANEL}"
    items = "".join(_el("div", _el("div", _e(k), style=_META) + _el("div", _e(v), style="font-weight: 600"), style=cell)
                    for k, v in pairs)
    return _el("div", items, style="display: flex; flex-wrap: wrap; gap: 0.5em")


def _logits(name: str, logits: list[dict[str, Any]] | None) -> str:
    """The tokens a feature promotes or suppresses, on one line: a notebook has no room for the UI's columns."""
    if not logits:
        return ""
    tok = f"{_MONO}; white-space: pre; border: 1px solid {_LINE}; border-radius: 3px; padding: 0 0.2em"
    items = " ".join(_el("span", _e(_show(x["token"])), style=tok) + _e(f" {x['value']:.3f}") for x in logits[:MAX_LOGITS])
    return _el("div", _el("span", _e(f"{name}: "), style=_META) + items, style="margin: 0.3em 0")


def feature_html(feature: dict[str, Any]) -> str:
    """A feature as its page in the UI shows it (``AtlasService.feature``): label and its evidence,
    statistics, histogram, and examples shaded against the feature's maximum activation."""
    f = feature
    scores = ", ".join(f"{s['scorer']} {_num(s['score'])}" for s in f.get("label_scores") or [])
    meta = f"label by {f.get('label_source') or '?'}"
    meta += f" · label score {_num(f['label_score'])}" if f.get("label_score") is not None else ""
    meta += f" ({scores})" if scores else ""
    meta += " · single-token feature" if f.get("single_token") else ""
    label = _e(f["label"]) if f.get("label") else _el("span", "(no label)", style=_MUTED)
    top, quantile, peak = f.get("top_examples") or [], f.get("quantile_examples") or [], f.get("max_activation") or 0.0
    return _box(
        _el("div", _e(f"#{f['feature_id']} ") + label, style=_TITLE),
        _el("div", _e(f["description"]), style=_MUTED) if f.get("description") else "",
        _el("div", _e(meta), style=_META + "; margin-bottom: 0.5em"),
        _stats([("density", _pct(f.get("density"))),
                ("fires on", f"{_int(f.get('n_active'))} tokens, {_int(f.get('n_windows'))} windows"),
                ("max activation", _num(f.get("max_activation"))), ("mean activation", _num(f.get("mean_activation")))]),
        _el("div", "Activation histogram", style=_HEAD),
        _histogram(f.get("histogram") or [], f.get("histogram_edges") or []),
        _el("div", "Top examples", style=_HEAD),
        _examples(top, top[:MAX_EXAMPLES], peak, "none (the feature never fired on the corpus)"),
        _el("div", "Examples across activation quantiles", style=_HEAD),
        _examples(quantile, _spread(quantile, MAX_QUANTILE_EXAMPLES), peak,
                  "none (it fired in too few contexts for more than its top examples)" if top else "none"),
        _logits("promotes", f.get("logit_positive")),
        _logits("suppresses", f.get("logit_negative")),
    )


# -- search ------------------------------------------------------------------------------------------


def _snippet(text: str | None) -> str:
    """A hit's snippet with its strongest token, which the service marks ``[[like this]]``, highlighted
    instead of bracketed (app.js's ``snippet``, which finds the marks the same way)."""
    if not text:
        return ""
    i = text.find("[[")
    j = text.find("]]", i + 2) if i >= 0 else -1
    if j < 0:
        body = _e(_show(text))
    else:
        body = _e(_show(text[:i])) + _el("mark", _e(_show(text[i + 2 : j])), style=_MARK) + _e(_show(text[j + 2 :]))
    return _el("div", body, style=f"{_MONO}; white-space: pre-wrap; overflow-wrap: anywhere; margin-top: 0.2em")


def _hit(x: dict[str, Any]) -> str:
    weak = "" if x.get("strong", True) else _el("span", "weak", title="not clearly more than chance", style=_BADGE)
    badges = "".join(_el("span", _e(f"{sig} #{rank}"), title=f"rank {rank} by {sig}", style=_BADGE)
                     for sig, rank in (x.get("matched_by") or {}).items())
    meta = (f"evidence {x['evidence']:.1f} · density {_pct(x.get('density'))}"
            f"{' (dense: down-weighted)' if x.get('down_weighted') else ''} · matched by ")
    return _el("li", "".join([
        _el("b", _e(f"#{x['feature_id']}")), _e(f" {x.get('label') or ''} "), weak,
        _el("div", _e(x["description"]), style=_MUTED) if x.get("description") else "",
        _el("div", _e(meta) + badges, style=_META),
        _snippet(x.get("snippet")),
    ]), style=f"padding: 0.5em 0; border-bottom: 1px solid {_LINE}" + ("" if x.get("strong", True) else "; opacity: 0.85"))


def _closest(snippets: list[dict[str, Any]]) -> str:
    """The corpus windows nearest the query, folded: they say why a search found little."""
    if not snippets:
        return ""
    items = "".join(_el("li", _el("span", _e(f"{s['title']} ({s['source']}, similarity {s['similarity']:.2f}): "), style=_MUTED)
                            + _e(_clip(s["text"], MAX_SNIPPET_CHARS)), style="white-space: pre-wrap; overflow-wrap: anywhere")
                    for s in snippets)
    return _el("details", _el("summary", "where the corpus comes closest") + _el("ul", items), style="margin: 0.5em 0")


def search_html(result: dict[str, Any]) -> str:
    """A search (``AtlasService.search``): the verdict first, since weak hits must read as weak, then the hits."""
    q, c, hits = result["query"], result.get("coverage") or {}, result["hits"]
    if result["confident"]:
        verdict = (f"Found features about “{q}”: {c['windows']}{'+' if c.get('capped') else ''} of {c['windows_total']} "
                   f"corpus windows ({c['documents']} of {c['documents_total']} documents) are about it.")
    else:
        verdict = result.get("message") or "No feature is clearly about it."
    border = "#2b8a3e" if result["confident"] else "#c92a2a"
    return _box(
        _el("div", _e(f"Features for “{q}”"), style=_TITLE),
        _el("div", _e(verdict), style=f"padding: 0.4em 0.7em; border-left: 3px solid {border}; background: {_PANEL}"),
        _closest(c.get("snippets") or []),
        _el("div", _e(f"{len(hits)} features · mode {result.get('mode', 'all')}"), style=_META + "; margin-top: 0.5em"),
        _el("ol", "".join(_hit(x) for x in hits[:MAX_ROWS]), style="padding-left: 1.6em; margin: 0.3em 0"),
        _more(len(hits) - MAX_ROWS, "hits"),
    )


# -- probe -------------------------------------------------------------------------------------------


def _probe_token(t: dict[str, Any]) -> str:
    """A token shaded by its strongest feature's relative activation (comparable across features, as the
    UI's probe view), its features listed in the tooltip."""
    feats = t["features"]
    lines = [f"“{_show(t['token'])}”"] + [f"#{f['feature_id']} {f.get('label') or ''}: {f['value']:.3f} "
                                         f"({100 * f['relative']:.0f}% of max)" for f in feats]
    return _token(t["token"], max((f["relative"] for f in feats), default=0.0), "\n".join(lines) if feats else None)


def activations_html(result: dict[str, Any]) -> str:
    """A probed text (``AtlasService.activations``): its tokens shaded, then the features that peaked
    highest in it, since a notebook cannot click a token to list them."""
    tokens = result["tokens"]
    peaks: dict[int, tuple[float, str]] = {}
    for t in tokens:
        for f in t["features"]:
            if f["relative"] > peaks.get(f["feature_id"], (-1.0, ""))[0]:
                peaks[f["feature_id"]] = (f["relative"], f.get("label") or "")
    strongest = sorted(peaks.items(), key=lambda kv: (-kv[1][0], kv[0]))
    return _box(
        _el("div", "Each token shaded by its strongest feature's activation over that feature's corpus maximum; "
                   "hover a token for its features.", style=_META),
        _el("div", "".join(_probe_token(t) for t in tokens[:MAX_TOKENS]), style=_RUN),
        _more(len(tokens) - MAX_TOKENS, "tokens"),
        table_html(["feature", "label", "peak (of its max)"], [[f, label, f"{100 * rel:.0f}%"] for f, (rel, label) in strongest],
                   caption="Strongest features in this text", max_rows=MAX_STRONGEST) if strongest else "",
    )


# -- tables ------------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    """One value as text: numbers right-aligned and short, long text clipped, whitespace shown as in tokens."""
    if value is None:
        return _el("td", _el("span", "–", style=_MUTED), style=_CELL)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):  # numpy's scalars register as Real
        text = str(value) if isinstance(value, numbers.Integral) else f"{float(value):.6g}"
        return _el("td", _e(text), style=_CELL + "; text-align: right; font-variant-numeric: tabular-nums")
    return _el("td", _e(_show(_clip(str(value), MAX_CELL_CHARS))), style=_CELL)


def table_html(columns: Sequence[str], rows: Sequence[Sequence[Any]], *, caption: str | None = None,
               max_rows: int = MAX_ROWS) -> str:
    """Any tabular result (neighbours, feature lists, SQL, contrast hits): at most ``max_rows`` rows, and a
    line saying how many more there were."""
    head = "".join(_el("th", _e(c), style=_CELL + "; text-align: left; font-weight: 600") for c in columns)
    body = "".join(_el("tr", "".join(_cell(v) for v in row)) for row in rows[:max_rows])
    if len(rows) > max_rows:
        body += _el("tr", _el("td", _e(f"… {len(rows) - max_rows:,} more rows"), colspan=max(1, len(columns)),
                              style=_CELL + "; " + _META))
    elif not rows:
        body = _el("tr", _el("td", "no rows", colspan=max(1, len(columns)), style=_CELL + "; " + _MUTED))
    cap = _el("caption", _e(caption), style="text-align: left; font-weight: 600; padding: 0.3em 0") if caption else ""
    table = _el("table", cap + _el("thead", _el("tr", head)) + _el("tbody", body),
                style="border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0")
    return _box(table)


# -- steering ----------------------------------------------------------------------------------------


def _continuation(prompt: str, run: dict[str, Any], max_activation: float | None) -> str:
    """A continuation after the end of its prompt, each token shaded by the first steered feature's
    activation as the model read it (app.js's steer view), its value and log-probability in the tooltip."""
    head = _el("span", _e(("…" + prompt[-MAX_PROMPT_CHARS:]) if len(prompt) > MAX_PROMPT_CHARS else prompt),
               style=_MUTED) if prompt else ""
    acts, logprobs = run.get("activations") or [], run.get("logprobs") or []
    body = []
    for i, t in enumerate(run["tokens"][:MAX_TOKENS]):
        v = acts[i][0] if i < len(acts) and acts[i] else 0.0
        rel = v / (max_activation or 1.0)
        lp = f" · logprob {logprobs[i]:.2f}" if i < len(logprobs) else ""
        body.append(_token(t, rel, f"activation {_num(v)} ({100 * rel:.0f}% of max){lp}"))
    if not run["tokens"]:
        body.append(_el("span", " (the model ended the text at once)", style=_MUTED))
    return _el("div", head + "".join(body), style=_RUN) + _more(len(run["tokens"]) - MAX_TOKENS, "tokens")


def steer_html(result: dict[str, Any]) -> str:
    """A steered generation (``AtlasService.steer``): default and steered continuations side by side,
    then the features steered, their values in units of each feature's corpus maximum."""
    feats = result["features"]
    first = feats[0] if feats else {}
    prompt = "" if (result.get("settings") or {}).get("chat") else result["prompt"]
    column = "flex: 1 1 20em; min-width: 0"
    columns = "".join(_el("div", _el("div", name, style=_HEAD) + _continuation(prompt, result[key], first.get("max_activation")),
                          style=column) for name, key in (("Default", "default"), ("Steered", "steered")))
    same = " · steering did not change the text" if result["default"]["text"] == result["steered"]["text"] else ""
    shaded = f"shaded by #{first['id']} {first.get('label') or ''}: " if first else ""
    rows = [[f["id"], f.get("label"), f["mode"], f["value"], f.get("max_activation"), _pct(f.get("density"))] for f in feats]
    return _box(
        _el("div", _e(f"{shaded}its activation as the model read each token, over its corpus maximum; "
                      f"hover a token for the value and its log-probability{same}"), style=_META),
        _el("div", columns, style="display: flex; flex-wrap: wrap; gap: 0 1.5em"),
        table_html(["feature", "label", "mode", "value (× max)", "max activation", "density"], rows, caption="Steered features"),
    )
