"""The UI in real headless Chromium (Debian's, at /usr/bin/chromium) against a real server on
loopback: search and open a result, shaded examples that follow the API, the probe, the map, the
keyboard, steering from a shared URL, a phone-width dark page, and no console errors anywhere. Screenshots go to
tests/output/browser/ for a person to look at."""

import math
import re
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

import pytest
from featureatlas.api.app import create_app
from featureatlas.api.edge import CSP
from featureatlas.store.atlas import Atlas

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = Path(__file__).parent / "output" / "browser"

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is installed by scripts/setup")
if not CHROMIUM.exists():
    pytest.skip("no /usr/bin/chromium (scripts/setup installs it where it runs as root)", allow_module_level=True)


def _serve(app):
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not srv.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(tiny_atlas):
    yield from _serve(create_app(Atlas(tiny_atlas)))


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM))
        yield b
        b.close()


# Every Content-Security-Policy violation on the page, whether or not the browser also logs it.
CSP_WATCH = """window.cspViolations = [];
document.addEventListener("securitypolicyviolation",
                          (e) => window.cspViolations.push(`${e.violatedDirective} ${e.blockedURI}`));"""


@pytest.fixture
def page(browser, request):
    """A fresh page that fails the test on any console error, uncaught exception or CSP violation,
    and on any document served without the security headers."""
    context = browser.new_context(viewport={"width": 1200, "height": 850})
    context.add_init_script(CSP_WATCH)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("response", lambda r: errors.append(f"no CSP on {r.url}")
          if r.request.resource_type == "document" and "content-security-policy" not in r.headers else None)
    pg.console_errors = errors
    yield pg
    SHOTS.mkdir(parents=True, exist_ok=True)
    pg.screenshot(path=str(SHOTS / f"{request.node.name}.png"), full_page=True)
    violations = pg.evaluate("window.cspViolations")
    context.close()
    assert not errors, f"console errors: {errors}"
    assert not violations, f"CSP violations: {violations}"


def ready(pg, view: str, timeout: float = 60_000) -> None:
    # Predicates are functions, not expressions: Playwright evaluates an expression with eval,
    # which the page's CSP refuses.
    pg.wait_for_function(f"() => ['{view}', 'error'].includes(document.body.dataset.ready)", timeout=timeout)
    assert pg.evaluate("document.body.dataset.ready") == view, pg.inner_text("main")


def api(pg, server: str, path: str, body=None):
    r = pg.request.post(server + path, data=body) if body is not None else pg.request.get(server + path)
    assert r.ok, r.text()
    return r.json()


def alpha(css: str) -> float:
    """The alpha of a computed ``rgba(...)``/``rgb(... / a)`` colour; 0 for none."""
    numbers = [float(x) for x in re.findall(r"[\d.]+", css)]
    return numbers[3] if len(numbers) == 4 else (1.0 if len(numbers) == 3 else 0.0)


def test_home_search_and_open_a_result(page, server):
    page.goto(server + "/")
    ready(page, "home")
    assert "64" in page.inner_text(".stats")  # the dictionary size
    page.fill("#searchbar input", "def")
    page.press("#searchbar input", "Enter")
    ready(page, "search")
    assert page.url.endswith("/search?q=def")
    hits = page.locator("ol.hits > li")
    assert hits.count() > 0
    expected = api(page, server, "/api/search?q=def&k=20")["hits"]
    assert hits.count() == len(expected)
    first = hits.first.locator("a").first
    assert first.inner_text().startswith(f"#{expected[0]['feature_id']}")
    first.click()
    ready(page, "feature")
    assert page.url.endswith(f"/features/{expected[0]['feature_id']}")
    assert page.inner_text("h1").startswith(f"#{expected[0]['feature_id']}")
    page.go_back()  # history works: the search comes back
    ready(page, "search")


def test_feature_page_shading_follows_the_activations(page, server):
    live = api(page, server, "/api/features?sort=max_activation&limit=1")["features"][0]["feature_id"]
    detail = api(page, server, f"/api/features/{live}")
    page.goto(f"{server}/features/{live}")
    ready(page, "feature")
    page.wait_for_function("() => performance.getEntriesByName('fa:feature-complete').length > 0")
    rows = page.locator("#top-examples .example")
    assert rows.count() == len(detail["top_examples"])
    for i, example in enumerate(detail["top_examples"]):
        spans = rows.nth(i).locator("span.tok")
        assert spans.count() == len(example["tokens"])
        shown = spans.evaluate_all(
            "els => els.map(e => [e.dataset.act ? Number(e.dataset.act) : 0, getComputedStyle(e).backgroundColor])")
        values = [v if v > 0 else 0.0 for v in example["activations"]]
        assert [round(v, 3) for v, _ in shown] == [round(v, 3) for v in values]
        # opacity grows with the activation: unshaded where it is 0, darkest at the maximum
        for (v, bg), (w, bg2) in zip(shown, shown[1:] + shown[:1]):
            if v < w:
                assert alpha(bg) <= alpha(bg2) + 1e-6
        assert all((alpha(bg) > 0) == (v > 0) for v, bg in shown)
    # the neighbour lists link to features
    assert page.locator("section:has(h2:text('Decoder neighbours')) a").count() > 0
    assert page.locator("svg.histogram rect").count() == len(detail["histogram"])


def test_unknown_feature_shows_an_error(page, server):
    page.goto(f"{server}/features/999999")
    ready(page, "error")
    assert "no feature 999999" in page.inner_text("main")
    # the browser logs the API's 404s; nothing else may fail
    page.console_errors[:] = [e for e in page.console_errors if "404" not in e]


def test_probe_shades_a_pasted_sentence(page, server):
    text = "The bridge spans the bay."
    page.goto(f"{server}/probe")
    ready(page, "probe")
    page.fill("#probe-text", text)
    page.click("button[type=submit]")
    page.wait_for_selector("#probe-tokens button")
    expected = api(page, server, "/api/activations", {"text": text, "k": 8})["tokens"]
    buttons = page.locator("#probe-tokens button")
    assert buttons.count() == len(expected)
    shades = buttons.evaluate_all("els => els.map(e => Number(e.dataset.act))")
    strongest = [max([f["relative"] for f in t["features"]], default=0) for t in expected]
    assert shades == pytest.approx([round(s, 3) for s in strongest], abs=1e-3)
    assert any(s > 0 for s in shades)
    # a click lists that token's features
    buttons.nth(1).click()
    listed = page.locator("section[aria-label='features of the selected token'] li")
    assert listed.count() == len(expected[1]["features"])


def test_map_draws_and_a_click_opens_the_feature(page, server):
    page.goto(f"{server}/map")
    ready(page, "map")
    assert page.locator("h2:text('Highlighted')").count() == 0  # nothing asked for, nothing listed
    canvas = page.locator("#map-canvas")
    painted = canvas.evaluate("""c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                                       let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n; }""")
    assert painted > 64  # every feature is at least a few pixels
    doc = api(page, server, "/api/map")
    # pick the feature farthest from all others so the click cannot land on a neighbour
    pts = list(zip(doc["x"], doc["y"]))
    target = max(range(len(pts)), key=lambda i: min(math.dist(pts[i], p) for j, p in enumerate(pts) if j != i))
    at = canvas.evaluate(f"c => c.locate({doc['feature_id'][target]})")
    canvas.hover(position=at)
    assert f"#{doc['feature_id'][target]}" in page.inner_text(".tooltip")
    canvas.click(position=at)
    ready(page, "feature")
    assert page.url.endswith(f"/features/{doc['feature_id'][target]}")


def test_map_highlights_a_feature_and_works_from_the_keyboard(page, server):
    page.goto(f"{server}/map?highlight=x,3,,-1")
    ready(page, "map")
    links = page.locator("section:has(h2:text('Highlighted')) a")
    assert [a.split()[0] for a in links.all_inner_texts()] == ["#3"]  # what is not a feature id is dropped
    page.goto(f"{server}/map?feature=5")
    ready(page, "map")
    assert links.count() >= 2 and links.first.inner_text().startswith("#5")
    page.select_option("select", "cluster")  # recolour by label cluster
    assert page.locator(".legend span").count() >= 2
    page.focus("#map-canvas")
    for key in ("+", "ArrowLeft", "ArrowRight", "-"):
        page.keyboard.press(key)
    page.keyboard.press("Enter")  # opens the feature nearest the centre cross
    ready(page, "feature")
    assert re.search(r"/features/\d+$", page.url)


def test_map_levels_arrive_after_the_first_draw_and_a_republish_is_refused(page, tiny_atlas, monkeypatch):
    import featureatlas.store.map_view as mv

    monkeypatch.setattr(mv, "LOD_FIRST", 5)  # the tiny map in levels of 5, 20, ... points
    for base in _serve(create_app(Atlas(tiny_atlas))):
        head = api(page, base, "/api/map/head")
        assert len(head["levels"]) > 1
        page.goto(f"{base}/map")
        ready(page, "map-full")
        assert page.inner_text(".toolbar .meta").startswith(f"{head['n']:,} features")  # all levels joined
        assert page.locator("#map-canvas").evaluate(f"c => c.locate({head['n'] - 1})") is not None
        # A level that answers for another atlas than the head's (a publish mid-load) is not joined.
        page.route("**/api/map/points/1", lambda route: route.fulfill(
            response=(r := route.fetch()), headers={**r.headers, "x-atlas-version": "a later publish"}))
        page.goto(f"{base}/map")
        ready(page, "map-error")
        assert "published again" in page.inner_text("[role=alert]")
        assert page.inner_text(".toolbar .meta").startswith(f"{head['levels'][0]} of {head['n']:,}")


def live_feature(pg, server: str) -> int:
    return api(pg, server, "/api/features?sort=max_activation&limit=1")["features"][0]["feature_id"]


def shown_tokens(tokens: list[str]) -> list[str]:
    """Tokens as the page shows them (dom.js ``showToken``)."""
    return [t.replace("\n", "⏎").replace("\t", "⇥") for t in tokens]


def test_steer_runs_from_a_shared_url(page, server):
    live = live_feature(page, server)
    page.goto(f"{server}/steer?f={live}:1:clamp&prompt=The bridge")
    ready(page, "steer")
    # the form is filled from the URL, and it ran once
    assert page.input_value("#steer-prompt") == "The bridge"
    row = page.locator(".steer-feature")
    assert row.count() == 1
    assert row.locator(".steer-id").input_value() == str(live)
    assert float(row.locator(".steer-value").input_value()) == 1
    assert row.locator(".steer-mode").input_value() == "clamp"
    body = {"prompt": "The bridge", "features": [{"id": live, "value": 1, "mode": "clamp"}]}
    expected = api(page, server, "/api/steer", body)  # greedy: the same text the page got
    top = expected["features"][0]["max_activation"]
    assert row.locator(".steer-label").inner_text() == (expected["features"][0]["label"] or "(no label)")
    for run in ("default", "steered"):
        spans = page.locator(f"#steer-result [data-run={run}] span.tok")
        assert spans.count() == len(expected[run]["tokens"]) > 0
        assert spans.evaluate_all("els => els.map(e => e.textContent)") == shown_tokens(expected[run]["tokens"])
        shades = spans.evaluate_all("els => els.map(e => Number(e.dataset.act))")
        assert shades == pytest.approx([round(a[0] / top, 3) for a in expected[run]["activations"]], abs=1e-3)
        assert f"logprob {expected[run]['logprobs'][0]:.2f}" in spans.first.get_attribute("title")
    # Run writes the form back into the URL, so the steer can be shared
    page.fill(".steer-value", "2.5")
    page.select_option(".steer-mode", "add")
    page.click("#steer-form button[type=submit]")
    ready(page, "steer")
    assert page.url == f"{server}/steer?f={live}:2.5:add&prompt=The+bridge"
    assert page.locator("#steer-result [data-run=steered] span.tok").count() > 0


HOSTILE = '<img src=x onerror="window.pwned=1"><b>bold</b>'


def test_steer_shows_model_and_label_text_as_text(page, server):
    live = live_feature(page, server)

    def poison(route):
        # the real answer, with a token and the label replaced by markup
        response = route.fetch()
        data = response.json()
        if "steered" in data:
            data["default"]["tokens"][0] = data["steered"]["tokens"][0] = HOSTILE
            data["features"][0]["label"] = HOSTILE
        else:
            data["label"] = HOSTILE
        route.fulfill(response=response, json=data)

    page.route("**/api/steer", poison)
    page.route(re.compile(r"/api/features/\d+$"), poison)
    page.goto(f"{server}/steer?{urlencode({'f': f'{live}:2:clamp', 'prompt': HOSTILE})}")
    ready(page, "steer")
    assert page.locator("main img, main b").count() == 0
    assert not page.evaluate("window.pwned")
    assert page.locator("#steer-result [data-run=default] span.tok").first.text_content() == HOSTILE
    assert page.locator("#steer-result [data-run=default] .example > span.muted").text_content() == HOSTILE  # the prompt
    assert page.locator(".steer-label").inner_text() == HOSTILE
    assert HOSTILE in page.locator("main p.meta").inner_text()  # the shading line names the feature


def test_steer_errors_are_shown_plainly(page, server):
    live = live_feature(page, server)
    # a 400 names the field
    page.goto(f"{server}/steer?f={live}:1:clamp&f={live}:2:add&prompt=The bridge")
    ready(page, "steer")
    assert page.inner_text("[role=alert]") == f"features[1].id: feature {live} is given twice"
    # a 503 says when to try again; the page shows that it is running meanwhile
    held = []
    page.route("**/api/steer", lambda route: held.append(route))
    page.click(".steer-feature:nth-child(2) button")  # remove the duplicate
    page.click("#steer-form button[type=submit]")
    page.wait_for_selector("text=running…")
    assert page.is_disabled("#steer-form button[type=submit]")
    while not held:
        page.wait_for_timeout(20)
    held[0].fulfill(status=503, headers={"Retry-After": "7"}, json={"error": "model busy", "detail": "the model is busy"})
    ready(page, "steer")
    assert page.inner_text("[role=alert]") == "model busy, try again in 7 s"
    assert page.is_enabled("#steer-form button[type=submit]")
    # the browser logs the API's 400 and 503; nothing else may fail
    page.console_errors[:] = [e for e in page.console_errors if not re.search(r"\b(400|503)\b", e)]


def test_feature_page_links_to_steer(page, server):
    live = live_feature(page, server)
    page.goto(f"{server}/features/{live}")
    ready(page, "feature")
    link = page.get_by_role("link", name="Steer with this feature")
    assert link.get_attribute("href") == f"/steer?f={live}:2:clamp"
    link.click()
    ready(page, "steer")
    assert page.url == f"{server}/steer?f={live}:2:clamp"
    assert page.locator(".steer-id").input_value() == str(live)
    assert float(page.input_value(".steer-value")) == 2
    assert page.locator("#steer-result").count() == 0  # no prompt yet: nothing ran
    page.wait_for_selector(".steer-label a")  # the feature's label, looked up


def test_phone_width_dark_mode(browser, server):
    context = browser.new_context(viewport={"width": 390, "height": 800}, color_scheme="dark")
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    SHOTS.mkdir(parents=True, exist_ok=True)
    steer = f"/steer?f={live_feature(pg, server)}:2:clamp&prompt=The bridge"
    for path, view in (("/", "home"), ("/features/3", "feature"), ("/map", "map"), (steer, "steer")):
        pg.goto(server + path)
        ready(pg, view)
        assert pg.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1"), f"{path} scrolls sideways"
        name = path.split("?")[0].strip("/").replace("/", "-") or "home"
        pg.screenshot(path=str(SHOTS / f"phone-dark-{name}.png"), full_page=True)
    background = pg.evaluate("getComputedStyle(document.body).backgroundColor")
    assert sum(float(x) for x in re.findall(r"\d+", background)[:3]) < 150  # a dark page
    context.close()
    assert not errors


def test_the_policy_blocks_what_the_ui_never_does(page, server):
    """The UI runs under the CSP (every test checks it sees no violation); markup injected past
    the ``h`` helper would not run: an inline script and a style attribute are both refused."""
    response = page.goto(server + "/")
    ready(page, "home")
    assert response.headers["content-security-policy"] == CSP
    page.evaluate("""() => { const s = document.createElement("script"); s.textContent = "window.ran = 1";
                            document.body.append(s);
                            document.body.insertAdjacentHTML("beforeend", '<p id="styled" style="color: red">x</p>'); }""")
    page.wait_for_function("() => window.cspViolations.length >= 2")
    assert not page.evaluate("window.ran")
    assert page.evaluate("getComputedStyle(document.getElementById('styled')).color") != "rgb(255, 0, 0)"
    page.evaluate("window.cspViolations.length = 0")  # provoked on purpose
    page.console_errors[:] = [e for e in page.console_errors if "Content Security Policy" not in e]


TOKEN = "browser-token-0123456789"


@pytest.fixture(scope="module")
def guarded_server(tiny_atlas):
    """The server as `featureatlas serve` runs it beyond loopback: with a token."""
    yield from _serve(create_app(Atlas(tiny_atlas), token=TOKEN))


def test_with_a_token_the_ui_works_after_one_visit_with_it(page, guarded_server):
    page.goto(f"{guarded_server}/search?q=bridge&token={TOKEN}")
    ready(page, "search")  # its API requests carried the cookie
    assert page.url == f"{guarded_server}/search?q=bridge"  # the token left the URL
    assert page.locator("ol.hits > li").count() > 0
    cookie = next(c for c in page.context.cookies() if c["name"] == "featureatlas_token")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and not page.evaluate("document.cookie")
    page.goto(f"{guarded_server}/probe")  # later pages need no token in the URL
    ready(page, "probe")
    page.fill("#probe-text", "The bridge spans the bay.")
    page.click("button[type=submit]")
    page.wait_for_selector("#probe-tokens button")


def test_with_a_token_the_ui_without_it_says_what_to_do(page, guarded_server):
    assert page.goto(guarded_server + "/").status == 200  # the page itself is open ...
    ready(page, "error")  # ... and its data is not: the error says how to get in
    assert "token required" in page.inner_text("main") and "/?token=" in page.inner_text("main")
    page.console_errors[:] = [e for e in page.console_errors if "401" not in e]


@pytest.fixture(scope="module")
def nested_server(tmp_path_factory, tiny_model_dir, corpus_dir):
    """A server over an atlas of one matryoshka dictionary: its prefixes are dictionaries with families."""
    from featureatlas.ingest.pipeline import run_ingest

    from .conftest import tiny_config

    root = tmp_path_factory.mktemp("nested") / "atlas"
    run_ingest(tiny_config(root, tiny_model_dir, corpus_dir, architecture="matryoshka", sparsity_coef=0.5))
    yield from _serve(create_app(Atlas(root)))


def test_feature_page_shows_the_family_across_a_nested_dictionarys_prefixes(page, nested_server):
    widths = sorted(d["d_sae"] for d in api(page, nested_server, "/api/dictionaries")["dictionaries"])
    added = range(widths[0], widths[1])  # the latents the second prefix adds: one that fired
    child = next(f for f in added if api(page, nested_server, f"/api/features/{f}")["n_active"] > 0)
    detail = api(page, nested_server, f"/api/features/{child}")["family"]
    parent = detail["parent"]["feature_id"]
    page.goto(f"{nested_server}/features/{child}")
    ready(page, "feature")
    family = page.locator("#family")
    assert detail["dictionary"] in family.locator("h2").inner_text()
    assert family.locator(f"a[href='/features/{parent}']").count() == 1
    page.goto(f"{nested_server}/features/{parent}")
    ready(page, "feature")
    assert page.locator(f"#family a[href='/features/{child}']").count() == 1
    children = api(page, nested_server, f"/api/features/{parent}")["family"]["children"]
    assert page.locator("#family ul.family > li").count() == len(children)  # the narrowest prefix: no parent
    page.screenshot(path=str(SHOTS / "feature_family.png"), full_page=True)


def test_search_keeps_to_one_dictionary_when_asked(page, nested_server):
    dictionaries = [d["dictionary"] for d in api(page, nested_server, "/api/dictionaries")["dictionaries"]]
    page.goto(f"{nested_server}/search?q=the")
    ready(page, "search")
    picker = page.locator("#dictionary-picker")
    assert picker.locator("[aria-current]").inner_text() == "every dictionary"
    narrowest = min(api(page, nested_server, "/api/dictionaries")["dictionaries"], key=lambda d: d["d_sae"])
    page.goto(nested_server + picker.locator(f"a:text-is('{narrowest['dictionary']}')").get_attribute("href"))
    ready(page, "search")
    assert page.locator("#dictionary-picker [aria-current]").inner_text() == narrowest["dictionary"]
    shown = [int(a.get_attribute("href").rsplit("/", 1)[1]) for a in page.locator("ol.hits > li > a").all()]
    assert shown and all(narrowest["first_feature"] <= f < narrowest["first_feature"] + narrowest["d_sae"] for f in shown)
    assert len(dictionaries) == 3
