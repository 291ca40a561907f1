"""What every answer of the HTTP server keeps to, whatever the request: security headers on every
response, HEAD wherever GET works, the token beyond loopback, body and field limits checked before
any work, and an OpenAPI schema that schemathesis (all its checks) finds true.

FEATUREATLAS_SCHEMATHESIS_EXAMPLES sets schemathesis' examples per operation (default 15, enough
for CI; run it with 100 or more before a release), FEATUREATLAS_SCHEMATHESIS_SEED its seed."""

from __future__ import annotations

import json
import os
import time
import tomllib
from pathlib import Path

import pytest
import schemathesis
from featureatlas.api import cli
from featureatlas.api.app import MAX_BODY, create_app, openapi_document
from featureatlas.api.edge import COOKIE, SECURITY_HEADERS, TOKEN_ENV, is_loopback
from featureatlas.api.service import MAX_PROMPT_CHARS, MAX_PROMPTS
from featureatlas.ingest.probe import Probe
from featureatlas.store.atlas import SORTABLE, Atlas
from featureatlas.store.errors import BadParameter
from featureatlas.store.sql import MAX_SQL_CHARS
from litestar.testing import TestClient

TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EXAMPLES = int(os.environ.get("FEATUREATLAS_SCHEMATHESIS_EXAMPLES", "15"))
SEED = int(os.environ.get("FEATUREATLAS_SCHEMATHESIS_SEED", "15"))
SCHEMATHESIS_TOML = Path(__file__).with_name("schemathesis.toml")


def _security_headers(headers) -> dict[str, str]:
    return {k: headers.get(k) for k in SECURITY_HEADERS}


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/", 200),
    ("GET", "/features/3", 200),
    ("GET", "/static/app.js", 200),
    ("GET", "/static/nothing.js", 404),
    ("GET", "/healthz", 200),
    ("GET", "/schema", 200),
    ("GET", "/api/atlas", 200),
    ("GET", "/api/features/99999", 404),
    ("GET", "/api/features?limit=0", 400),
    ("GET", "/nowhere", 404),
    ("PUT", "/api/atlas", 405),
    ("POST", "/", 405),
    ("HEAD", "/", 200),
    ("OPTIONS", "/api/atlas", 204),
])
def test_every_answer_carries_the_security_headers(client, method, path, status):
    r = client.request(method, path)
    assert r.status_code == status, r.text
    assert _security_headers(r.headers) == SECURITY_HEADERS


def test_a_500_carries_them_too(tiny_atlas):
    atlas = Atlas(tiny_atlas)
    with TestClient(create_app(atlas)) as c:
        atlas.list_features = lambda **_: 1 / 0  # after start-up, which reads a page itself
        r = c.get("/api/features")
    assert r.status_code == 500 and set(r.json()) == {"error", "detail", "request_id"}
    assert _security_headers(r.headers) == SECURITY_HEADERS


def test_the_policy_is_strict():
    csp = dict(d.strip().split(" ", 1) for d in SECURITY_HEADERS["content-security-policy"].split(";"))
    assert csp["default-src"] == csp["script-src"] == csp["style-src"] == csp["connect-src"] == "'self'"
    assert csp["object-src"] == csp["base-uri"] == csp["frame-ancestors"] == "'none'"
    assert not any("unsafe" in v or "*" in v for v in csp.values())


@pytest.mark.parametrize("path", ["/", "/features/3", "/static/app.js", "/healthz", "/schema", "/api/atlas",
                                  "/api/features?limit=2", "/api/features/99999", "/nowhere"])
def test_head_answers_like_get_without_the_body(client, path):
    got, head = client.get(path), client.head(path)
    assert head.status_code == got.status_code and head.content == b""
    assert dict(head.headers) == dict(got.headers)  # content-length too: what GET would send
    assert int(head.headers["content-length"]) == len(got.content)


def test_head_is_allowed_where_get_is_and_only_there(client):
    r = client.put("/api/atlas")
    assert r.status_code == 405 and "HEAD" in r.headers["allow"] and "GET" in r.headers["allow"]
    r = client.head("/api/sql")  # a POST-only route: HEAD is no more allowed than GET
    assert r.status_code == 405 and "POST" in r.headers["allow"] and "GET" not in r.headers["allow"]
    assert "HEAD" not in r.headers["allow"]


# -- the token --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(tiny_atlas):
    """The app as `featureatlas serve` runs it beyond loopback: with a token."""
    with TestClient(create_app(Atlas(tiny_atlas), token=TOKEN)) as c:
        yield c


@pytest.mark.parametrize("path", ["/api/atlas", "/api/features/1", "/api/nowhere", "/schema", "/schema/openapi.json"])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": TOKEN},
                                     {"Cookie": f"{COOKIE}=wrong-token-0123456789"}])
def test_with_a_token_the_api_refuses_requests_without_it(guarded, path, headers):
    guarded.cookies.clear()
    r = guarded.get(path, headers=headers)
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert set(r.json()) == {"error", "detail"} and "Authorization: Bearer" in r.json()["detail"]
    assert _security_headers(r.headers) == SECURITY_HEADERS


@pytest.mark.parametrize("path", ["//api/atlas", "///api/features/1", "/api//atlas", "//schema"])
def test_the_token_holds_for_paths_the_router_normalises(guarded, path):
    """The router merges slashes; the guard sees the path as the router does."""
    guarded.cookies.clear()
    assert guarded.get(f"{guarded.base_url}{path}").status_code == 401
    assert guarded.get(f"{guarded.base_url}{path}", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_with_a_token_the_api_answers_the_token_and_the_rest_stays_open(guarded):
    guarded.cookies.clear()
    assert guarded.get("/api/atlas", headers=AUTH).status_code == 200
    assert guarded.get("/api/atlas", headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200
    assert guarded.post("/api/sql", json={"sql": "select 1"}, headers=AUTH).json()["rows"] == [[1]]
    for path in ("/healthz", "/", "/features/3", "/static/app.js"):
        assert guarded.get(path).status_code == 200, path
    schema = guarded.get("/schema/openapi.json", headers=AUTH).json()
    assert schema["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer",
                                                                 "description": "the token the server was started with"}
    assert all(op["security"] == [{"bearer": []}] for path, ops in schema["paths"].items() if path.startswith("/api")
               for op in ops.values())
    assert "security" not in schema["paths"]["/healthz"]["get"]


def test_a_visit_with_the_token_sets_a_strict_cookie_the_api_accepts(guarded):
    guarded.cookies.clear()
    r = guarded.get("/search", params={"q": "bridge", "token": TOKEN}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/search?q=bridge"  # the token leaves the URL
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}={TOKEN};") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert "Path=/" in cookie and r.headers["cache-control"] == "no-store"
    assert guarded.get("/api/atlas").status_code == 200  # the cookie alone, as the UI's fetches send it
    # A post with the cookie must be JSON, which another origin (another port: the same site) cannot
    # send without a CORS preflight; a form-encodable body is refused before any work.
    sql = '{"sql": "select 1"}'
    assert guarded.post("/api/sql", content=sql, headers={"content-type": "text/plain"}).status_code == 415
    assert guarded.post("/api/sql", content=sql, headers={"content-type": "application/json"}).status_code == 200
    guarded.cookies.clear()
    r = guarded.get("/", params={"token": "wrong-token-0123456789"}, follow_redirects=False)
    assert r.status_code == 401 and "set-cookie" not in r.headers
    assert guarded.get("/api/atlas").status_code == 401


@pytest.mark.parametrize("token", ["", "short", "has spaces in it, sixteen+", "semi;colon-0123456789"])
def test_a_weak_or_unsafe_token_is_refused(tiny_atlas, token):
    with pytest.raises(BadParameter, match="16 of the characters"):
        create_app(Atlas(tiny_atlas), token=token)


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.3.2.1", True), ("::1", True), ("[::1]", True), ("localhost", True), ("LOCALHOST", True),
    ("0.0.0.0", False), ("::", False), ("192.168.1.5", False), ("example.com", False), ("", False),
])
def test_what_counts_as_loopback(host, loopback):
    assert is_loopback(host) is loopback


@pytest.fixture
def served(monkeypatch):
    """What `featureatlas serve` would hand uvicorn, without starting it."""
    import uvicorn
    from threadpoolctl import threadpool_info

    def blas_threads() -> list[int]:
        return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]

    calls: list[dict] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append({"app": app, "blas": blas_threads(), **kw}))
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    return calls


def test_serve_refuses_to_listen_beyond_loopback_without_a_token(served, capsys):
    # checked first: the atlas (here none) is not even opened
    assert cli.main(["serve", "--host", "0.0.0.0", "--atlas", "/nonexistent"]) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "--host" in err and TOKEN_ENV in err and not served


def test_serve_takes_the_token_from_the_environment_or_the_flag(served, monkeypatch, tiny_atlas):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    assert cli.main(["serve", "--host", "0.0.0.0", "--atlas", str(tiny_atlas)]) == 0
    monkeypatch.delenv(TOKEN_ENV)
    assert cli.main(["serve", "--host", "::", "--token", TOKEN, "--atlas", str(tiny_atlas)]) == 0
    assert cli.main(["serve", "--atlas", str(tiny_atlas)]) == 0  # loopback: open, as before
    assert [(c["host"], c["app"].token) for c in served] == [("0.0.0.0", TOKEN), ("::", TOKEN), ("127.0.0.1", None)]
    # BLAS keeps to one thread while serving, and the process gets its threads back after
    from threadpoolctl import threadpool_info

    assert all(set(c["blas"]) == {1} for c in served)
    assert {p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"} != {1} or os.cpu_count() == 1
    assert cli.main(["serve", "--host", "0.0.0.0", "--token", "weak", "--atlas", str(tiny_atlas)]) == cli.EXIT_BAD_INPUT


# -- limits -------------------------------------------------------------------------------------------


@pytest.fixture
def probe_calls(monkeypatch) -> list[str]:
    """Every text the model is asked to read."""
    calls: list[str] = []
    original = Probe.run

    def run(self, text, **kw):
        calls.append(text)
        return original(self, text, **kw)

    monkeypatch.setattr(Probe, "run", run)
    return calls


def test_a_huge_body_is_refused_before_it_is_read(client, probe_calls):
    body = b'{"text": "' + b"word " * 400_000 + b'"}'  # 2 MB
    start = time.perf_counter()
    r = client.post("/api/activations", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 413 and time.perf_counter() - start < 2, r.text
    assert r.json() == {"error": "request body too large", "detail": f"this route takes bodies of at most {MAX_BODY:,} bytes"}
    assert _security_headers(r.headers) == SECURITY_HEADERS
    # without a content-length (chunked), it is cut off at the limit while it streams
    r = client.post("/api/activations", content=iter([body[i : i + 65536] for i in range(0, len(body), 65536)]),
                    headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert not probe_calls


@pytest.mark.parametrize("path, body, key", [
    ("/api/activations", {"text": "x" * (MAX_PROMPT_CHARS + 1)}, "text"),
    ("/api/activations", {"text": " \n\t "}, "text"),
    ("/api/search/contrast", {"positive": ["x" * (MAX_PROMPT_CHARS + 1)]}, "positive[0]"),
    ("/api/search/contrast", {"positive": ["a"], "negative": [""]}, "negative[0]"),
    ("/api/search/contrast", {"positive": ["a"], "negative": ["b"] * (MAX_PROMPTS + 1)}, "negative"),
    ("/api/steer", {"prompt": "x" * (MAX_PROMPT_CHARS + 1), "features": [{"id": 1, "value": 1}]}, "prompt"),
    ("/api/steer", {"prompt": "x", "features": [{"id": -1, "value": 1}]}, "features[0].id"),
    ("/api/sql", {"sql": "x" * (MAX_SQL_CHARS + 1)}, "sql"),
])
def test_over_long_or_blank_text_is_a_400_before_the_model_reads_it(client, probe_calls, path, body, key):
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == f"bad parameter: {key}"
    assert [(e["key"], e["source"]) for e in r.json()["detail"]] == [(key, "body")]
    assert not probe_calls


def test_the_schema_states_the_limits_and_the_error_shape(client):
    schema = client.get("/schema").json()
    assert schema == client.get("/schema/openapi.json").json()  # /schema is the document itself (no CDN viewer)
    assert schema == json.loads(json.dumps(openapi_document()))  # the docs' HTTP reference renders this one
    parts = schema["components"]["schemas"]
    text = parts["ActivationsRequest"]["properties"]["text"]
    assert (text["minLength"], text["maxLength"], text["pattern"]) == (1, MAX_PROMPT_CHARS, r"\S")
    positive = parts["ContrastRequest"]["properties"]["positive"]
    assert positive["maxItems"] == MAX_PROMPTS and positive["items"]["maxLength"] == MAX_PROMPT_CHARS
    assert parts["SQLRequest"]["properties"]["sql"]["maxLength"] == MAX_SQL_CHARS
    assert parts["SteerFeature"]["properties"]["mode"]["enum"] == ["clamp", "add"]
    params = {p["name"]: p["schema"] for p in schema["paths"]["/api/features"]["get"]["parameters"]}
    assert params["sort"]["enum"] == list(SORTABLE) and params["order"]["enum"] == ["asc", "desc"]
    assert parts["ErrorBody"]["required"] == ["detail", "error"]
    for path, ops in schema["paths"].items():
        for op in ops.values():
            errors = {s: r for s, r in op["responses"].items() if s >= "400"}
            assert "500" in errors and ("401" in errors) == path.startswith("/api"), path
            assert all(r["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
                       for r in errors.values()), path


# -- schemathesis -------------------------------------------------------------------------------------


def _schemathesis_config() -> schemathesis.Config:
    """tests/schemathesis.toml (which the CLI reads too), with this run's seed, examples and token."""
    config = tomllib.loads(SCHEMATHESIS_TOML.read_text())
    config.update(seed=SEED, auth={"openapi": {"bearer": {"bearer": TOKEN}}})
    config["generation"]["max-examples"] = EXAMPLES
    return schemathesis.Config.from_dict(config)


@pytest.fixture(scope="module")
def api_schema(tiny_atlas):
    """The guarded app's schema, in process: every request goes through the same ASGI entry as a real one."""
    from schemathesis.python import asgi

    app = create_app(Atlas(tiny_atlas), token=TOKEN)
    yield schemathesis.openapi.from_asgi("/schema/openapi.json", app, config=_schemathesis_config(), headers=AUTH)
    asgi.shutdown_lifespans()  # the app's on_shutdown, now rather than at exit


@pytest.fixture
def _node_id(request):
    """schemathesis 4.32's ``from_fixture`` reads ``Node._nodeid``, which pytest 9 no longer has."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.mark.usefixtures("_node_id")
@schema.parametrize()
def test_the_schema_holds_under_schemathesis(case):
    """All of schemathesis' checks, over its examples, coverage and fuzzing phases: no 5xx; status
    codes, content types, headers and bodies as documented; valid data accepted and invalid data
    refused; 405 with Allow for undeclared methods; the token enforced (``ignored_auth`` drops it and
    forges one). ``use_after_free``, ``ensure_resource_availability`` and ``object_level_authorization``
    run too but find nothing to act on: nothing here creates or deletes, and there is one identity.
    The stateful phase is the CLI's (tests/schemathesis.toml)."""
    case.call_and_validate()
