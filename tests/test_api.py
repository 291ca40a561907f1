import hashlib
from pathlib import Path

import pytest
from featureatlas.api.app import create_app
from featureatlas.api.service import AtlasService, concept_of, reads_as_text
from featureatlas.ingest.labels.kinds import KEEP_SHARE
from featureatlas.store.atlas import Atlas
from featureatlas.store.calibrate import CONFIDENT_MATCH, WEIGHTS
from featureatlas.store.errors import NotFound
from featureatlas.store.search import KIND_MIN_SHARE, SEARCH_MODES, kind_index
from litestar.testing import TestClient

from .conftest import SQL


def test_health_and_summary(client):
    assert client.get("/healthz").json()["features"] == 64
    summary = client.get("/api/atlas").json()
    assert summary["dictionary"]["d_sae"] == 64 and "variance_explained" in summary["metrics"]


def test_dictionaries_list_the_atlas_dictionary_in_http_sql_and_from_an_old_manifest(client, tiny_atlas, tmp_path):
    import shutil

    import duckdb
    from featureatlas.store import manifest as M
    from featureatlas.store.dictionaries import dictionary_id, read_dictionaries, width_name

    summary = client.get("/api/atlas").json()
    body = client.get("/api/dictionaries").json()
    (row,) = body["dictionaries"]
    layer = summary["hook"]["layer"]
    assert body["default"] == row["dictionary"] == dictionary_id(layer, 64) == f"L{layer}-64"
    assert row["is_default"] and row["d_sae"] == 64 and row["hook"] == summary["hook"]["name"]
    assert row["architecture"] == summary["dictionary"]["architecture"] and row["k"] == summary["dictionary"]["k"]
    for metric in ("variance_explained", "loss_recovered", "l0"):
        assert row[metric] == pytest.approx(summary["metrics"][metric])
    assert row["training"]["d_sae"] == 64 and "seed" in row["training"]
    sql = client.post("/api/sql", json={"sql": "select dictionary, d_sae, json_extract(training, '$.d_sae') as w "
                                               "from dictionaries"}).json()
    assert sql["rows"] == [[row["dictionary"], 64, "64"]]
    assert [width_name(n) for n in (64, 1024, 4096, 16384, 2**20, 3000)] == ["64", "1k", "4k", "16k", "1M", "3000"]
    # An atlas published before the table existed: the same rows, from its manifest.
    old = tmp_path / "old"
    shutil.copytree(tiny_atlas, old)
    atlas = Atlas(old)
    con = duckdb.connect(str(atlas.duckdb_path))
    con.execute("drop table dictionaries")
    con.close()
    assert read_dictionaries(Atlas(old)) == body["dictionaries"] and M.read(old) == atlas.manifest


def test_browse_sorted_and_paged(client):
    page = client.get("/api/features", params={"sort": "max_activation", "limit": 5, "offset": 2}).json()
    values = [f["max_activation"] for f in page["features"]]
    assert len(values) == 5 and values == sorted(values, reverse=True)
    first = client.get("/api/features", params={"sort": "max_activation", "limit": 7}).json()["features"]
    assert [f["feature_id"] for f in first[2:7]] == [f["feature_id"] for f in page["features"]]


def test_feature_detail(client, live):
    f = client.get(f"/api/features/{live}").json()
    assert f["feature_id"] == live and f["top_examples"] and len(f["histogram_edges"]) == len(f["histogram"]) + 1
    assert "label_embedding" not in f and "decoder" not in f


def test_decoder_neighbors_are_exact_cosine_ranks(client, tiny_atlas, live):
    import numpy as np

    feats = Atlas(tiny_atlas).features.to_arrow()
    dec = np.stack(feats["decoder"].to_numpy(zero_copy_only=False))[np.argsort(feats["feature_id"].to_numpy())]
    sims = dec @ dec[live]
    sims[live] = -2
    expected = list(np.argsort(-sims)[:5])
    got = client.get(f"/api/features/{live}/neighbors", params={"k": 5}).json()["neighbors"]
    assert [n["feature_id"] for n in got] == expected
    assert got[0]["similarity"] == pytest.approx(float(sims[expected[0]]), abs=1e-4)


def test_vectors_of_a_few_features_come_in_the_order_asked(tiny_atlas, monkeypatch):
    atlas = Atlas(tiny_atlas)
    every = atlas.vectors("label_embedding")
    ids = [7, 2, 7, 0]
    assert atlas.vectors_of(ids, "label_embedding") == pytest.approx(every[ids])
    assert atlas.vectors_of([], "label_embedding").shape == (0, 0)
    assert atlas.feature_row(atlas.d_sae, ["label"]) is None
    # Where ids are not row offsets the rows are found by filter, and come back in the same order.
    label = atlas.feature_row(7, ["label"])["label"]
    monkeypatch.setattr(Atlas, "d_sae", property(lambda self: 0))
    assert atlas.vectors_of(ids, "label_embedding") == pytest.approx(every[ids])
    assert atlas.feature_row(7, ["label"])["label"] == label


def test_coactivation_neighbors_are_jaccard(client, tiny_atlas, live):
    con = SQL(Atlas(tiny_atlas))
    got = client.get(f"/api/features/{live}/neighbors", params={"k": 3, "by": "coactivation"}).json()["neighbors"]
    assert got and all(0 < n["similarity"] <= 1 for n in got)
    g = got[0]["feature_id"]
    both, a, b = con.execute(
        """select count(*) filter (where x.feature_id is not null and y.feature_id is not null),
                  count(x.feature_id), count(y.feature_id)
           from (select * from activations where feature_id = ?) x
           full join (select * from activations where feature_id = ?) y using (doc_id, position)""",
        [live, g],
    ).fetchone()
    assert got[0]["similarity"] == pytest.approx(both / (a + b - both), abs=1e-5)


def test_search_fuses_signals_and_explains_hits(client):
    body = client.get("/api/search", params={"q": "features about the suspension bridge in San Francisco", "k": 5}).json()
    assert body["concept"] == "the suspension bridge in San Francisco"  # "features about" is not the concept
    assert 0 < len(body["hits"]) <= 5
    evidence = [h["evidence"] for h in body["hits"]]
    assert evidence == sorted(evidence, reverse=True)
    for h in body["hits"]:
        assert set(h["matched_by"]) <= set(SEARCH_MODES) and h["matched_by"]
        assert h["snippet"] and "[[" in h["snippet"] and h["description"]
        assert set(h["signals"]) <= {"label", "context", "corpus", "kind"}
        weighted = sum(WEIGHTS[m] * e for m, e in h["signals"].items()) * (0.5 if h["down_weighted"] else 1)
        assert h["evidence"] == pytest.approx(weighted, abs=0.05) and 0 <= h["score"] <= 1
        assert h["strong"] == (h["match"] >= CONFIDENT_MATCH)
    assert body["confident"] == any(h["strong"] for h in body["hits"][:3])
    signals = {s for h in body["hits"] for s in h["matched_by"]}
    assert "label" in signals and "inference" not in signals  # a topic: the model is not run on it
    cover = body["coverage"]
    assert cover["windows_total"] > 0 and cover["documents_total"] > 0 and len(cover["snippets"]) == 3
    assert 0 <= cover["documents"] <= cover["documents_total"] and cover["tokens"] == 16 * cover["windows"]


@pytest.mark.parametrize("query, text", [("football", False), ("the suspension bridge in San Francisco", False),
                                         ("French language text", False), ("def add(a, b):", True),
                                         ("To be, or not to be", True), ("the cat sat on the mat by the door", True)])
def test_only_text_is_run_through_the_model(query, text):
    assert reads_as_text(query) is text


def test_search_runs_text_through_the_model_and_remembers_answers(tiny_atlas):
    service = AtlasService(Atlas(tiny_atlas))
    first = service.search("def add(a, b): return a + b", k=10)
    assert "inference" in {s for h in first["hits"] for s in h["matched_by"]}
    first["hits"].clear()  # the caller's copy: the remembered answer is untouched
    again = service.search("def add(a, b): return a + b", k=10)
    assert again["hits"] and again == service._search("def add(a, b): return a + b", 10, None)[0]
    alone = service.search("football", mode="inference")  # asked for alone, a topic is run too
    assert alone["hits"] and all(set(h["matched_by"]) == {"inference"} for h in alone["hits"])


def test_search_through_the_corpus_ranks_features_by_firing_on_matched_windows(client, tiny_atlas):
    body = client.get("/api/search", params={"q": "def return self", "k": 5, "mode": "corpus"}).json()
    assert body["hits"] and all(set(h["matched_by"]) == {"corpus"} for h in body["hits"])
    atlas = Atlas(tiny_atlas)
    windows = atlas.n_windows
    for h in body["hits"]:
        fired = SQL(atlas).execute("select n_windows from features where feature_id = ?", [h["feature_id"]]).fetchone()[0]
        assert 0 < fired < windows and h["signals"]["corpus"] >= 0



def test_a_warmed_up_service_answers_as_a_cold_one(tiny_atlas):
    """Warming up holds summaries, snippets, feature rows, examples and the corpus windows' text in
    memory: the answers are the ones read per query from LanceDB and DuckDB."""
    cold, warm = AtlasService(Atlas(tiny_atlas)), AtlasService(Atlas(tiny_atlas))
    warm.warm_up()
    assert cold._held_snippets is None and warm._held_snippets is not None and warm._windows is not None
    assert cold.atlas._held_examples is None and warm.atlas._held_examples is not None
    for f in range(0, warm.atlas.d_sae, 7):
        assert warm.feature(f) == cold.feature(f)
    with pytest.raises(NotFound):
        warm.feature(warm.atlas.d_sae)
    for q in ("def return self", "the king and queen", "zzzz qqqq"):
        assert warm._search(q, 5, None)[0] == cold._search(q, 5, None)[0]
    ids = list(range(warm.atlas.d_sae))
    summaries = warm.atlas.summaries(ids)
    summaries[ids[0]]["label"] = "changed"  # the caller's copy
    rows = warm.atlas.query("select feature_id, label, description, density, max_activation from features").dicts()
    assert warm.atlas.summaries(ids) == {r.pop("feature_id"): r for r in rows}

@pytest.mark.parametrize("query,concept", [
    ("features about war and battles", "war and battles"),
    ("a feature that fires on French text", "French text"),
    ("units of measurement", "units of measurement"),  # no "about": the words are the concept
    ("feature film", "feature film"),
    ("features", "features"),
])
def test_the_concept_of_a_query(query, concept):
    assert concept_of(query) == concept


def test_a_search_the_corpus_cannot_answer_says_so(client):
    body = client.get("/api/search", params={"q": "zzzz qqqq xxxx", "k": 3}).json()
    assert body["confident"] is False and body["coverage"]["windows"] == 0
    assert body["message"].startswith("No feature in this atlas is clearly about 'zzzz qqqq xxxx'")
    assert "does not mention it" in body["message"]


@pytest.mark.parametrize("mode", SEARCH_MODES)
def test_search_modes_use_one_signal(client, mode):
    hits = client.get("/api/search", params={"q": "bridge", "k": 3, "mode": mode}).json()["hits"]
    assert all(set(h["matched_by"]) == {mode} for h in hits)


def test_search_answers_the_mode_it_prints(client):
    body = client.get("/api/search", params={"q": "bridge", "k": 3, "mode": "all"})
    assert body.status_code == 200 and body.json()["mode"] == "all"
    assert body.json()["hits"] == client.get("/api/search", params={"q": "bridge", "k": 3}).json()["hits"]


@pytest.mark.parametrize("query", ["commas", "capital letters", "indentation", "digits"])
def test_the_kind_signal_finds_features_of_the_kind_asked_for(client, tiny_atlas, query):
    atlas = Atlas(tiny_atlas)
    index = kind_index(atlas)
    assert index is not None and "uppercase" in index.ranked and "parameter" in index.ranked
    body = client.get("/api/search", params={"q": query, "k": 5, "mode": "kind"}).json()
    stored = dict(zip(*atlas.features.search().select(["feature_id", "kinds"]).limit(atlas.d_sae).to_arrow().to_pydict()
                      .values()))
    asked = next(name for name, entry in atlas.manifest["labels"]["kinds"].items() if query in entry["asks"])
    want = [f for f, _ in index.ranked[asked][:5]]
    assert [h["feature_id"] for h in body["hits"]] == want  # the kind's own ranking, best first
    shares = []
    for h in body["hits"]:
        share = {k["kind"]: k["share"] for k in stored[h["feature_id"]]}
        assert share[asked] >= KEEP_SHARE and h["signals"]["kind"] > 0
        shares.append(share[asked] >= KIND_MIN_SHARE)
    assert shares == sorted(shares, reverse=True)  # features mostly of the kind come first ...
    for rows in index.ranked.values():  # ... and score above the rest, which search fuses by
        assert [s for _, s in rows] == sorted((s for _, s in rows), reverse=True)
    assert client.get("/api/search", params={"q": "war and battles", "mode": "kind"}).json()["hits"] == []


def test_activations_per_token(client):
    body = client.post("/api/activations", json={"text": "The bridge spans the bay.", "k": 3}).json()
    assert body["tokens"] and all(len(t["features"]) <= 3 for t in body["tokens"])
    vals = [f["value"] for f in body["tokens"][0]["features"]]
    assert vals == sorted(vals, reverse=True) and all(v > 0 for v in vals)
    f = body["tokens"][0]["features"][0]
    maximum = client.get(f"/api/features/{f['feature_id']}").json()["max_activation"]
    assert f["relative"] == pytest.approx(f["value"] / maximum, rel=1e-5)


def test_contrast(client):
    body = client.post(
        "/api/search/contrast",
        json={"positive": ["The bridge spans the bay.", "A suspension bridge"], "negative": ["def add(a, b):"], "k": 5},
    ).json()
    assert len(body["hits"]) <= 5
    assert all(h["score"] > 0 for h in body["hits"])


def test_sql_happy_path_and_truncation(client):
    r = client.post("/api/sql", json={"sql": "select feature_id, density from features order by feature_id limit 3"}).json()
    assert r["columns"] == ["feature_id", "density"] and [row[0] for row in r["rows"]] == [0, 1, 2]
    assert r["truncated"] is False and r["elapsed_ms"] >= 0
    r = client.post("/api/sql", json={"sql": "select * from range(5000)"}).json()
    assert len(r["rows"]) == 1000 and r["truncated"] is True
    r = client.post("/api/sql", json={"sql": "select count(*) from activations where feature_id = $f", "params": {"f": 1}})
    assert r.status_code == 200


def _tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize(
    "sql",
    [
        "COPY features TO '/tmp/x.csv'",
        "ATTACH '/tmp/other.duckdb' AS other",
        "INSTALL httpfs",
        "LOAD httpfs",
        "select * from read_csv('/etc/passwd')",
        "select * from read_text('/etc/hostname')",
        "select * from 'http://127.0.0.1:9/x.parquet'",
        "PRAGMA enable_external_access",
        "SET enable_external_access = true",
        "DROP TABLE features",
        "DELETE FROM activations",
        "UPDATE features SET label = 'x'",
        "CREATE TABLE t AS SELECT 1",
        "select 1; drop table features",
        "select 1; select 2",
        "with recursive r(n) as (select 1 union all select n + 1 from r) select count(*) from r",
        "select from where",
        "select string_agg(repeat('x', 1000000), '') from range(4000)",  # 4 GB: over the memory limit
        "",
    ],
)
def test_sql_guards_refuse_and_leave_the_atlas_unchanged(client, tiny_atlas, sql):
    before = _tree_hash(tiny_atlas)
    r = client.post("/api/sql", json={"sql": sql})
    assert r.status_code == 400, r.text
    assert set(r.json()) == {"error", "detail"}
    assert _tree_hash(tiny_atlas) == before
    # The connection still works afterwards (an interrupt or refusal leaves no bad state).
    assert client.post("/api/sql", json={"sql": "select count(*) from features"}).json()["rows"] == [[64]]


@pytest.mark.parametrize(
    "method, url, body, status",
    [
        ("get", "/api/features/64", None, 404),
        ("get", "/api/features/-1", None, 404),
        ("get", "/api/features/abc", None, 404),
        ("get", "/api/features?sort=label; drop table features", None, 400),
        ("get", "/api/features?limit=0", None, 400),
        ("get", "/api/features?limit=100000", None, 400),
        ("get", "/api/features?order=sideways", None, 400),
        ("get", "/api/features?offset=-3", None, 400),
        ("get", "/api/features/64/neighbors", None, 404),
        ("get", "/api/features/1/neighbors?by=magic", None, 400),
        ("get", "/api/features/1/neighbors?k=0", None, 400),
        ("get", "/api/search", None, 400),
        ("get", "/api/search?q=", None, 400),
        ("get", "/api/search?q=x&mode=psychic", None, 400),
        ("get", "/api/search?q=x&k=1000", None, 400),
        ("post", "/api/activations", {"text": ""}, 400),
        ("post", "/api/activations", {"text": "word " * 2000}, 400),
        ("post", "/api/activations", {"txt": "x"}, 400),
        ("post", "/api/activations", {"text": "x", "k": 0}, 400),
        ("post", "/api/search/contrast", {"positive": []}, 400),
        ("post", "/api/search/contrast", {"positive": ["a"] * 17}, 400),
        ("post", "/api/sql", {"sql": 5}, 400),
        ("post", "/api/sql", {}, 400),
    ],
)
def test_errors_are_json_4xx(client, method, url, body, status):
    r = client.get(url) if method == "get" else client.post(url, json=body)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error", "detail"}


def test_openapi_schema_lists_the_routes(client):
    paths = client.get("/schema/openapi.json").json()["paths"]
    assert {"/healthz", "/api/atlas", "/api/dictionaries", "/api/features", "/api/features/{feature_id}", "/api/search",
            "/api/sql", "/api/activations", "/api/search/contrast", "/api/features/{feature_id}/neighbors"} <= set(paths)


@pytest.mark.parametrize("failure", [RuntimeError("disk on fire"), ValueError("a bug, not a bad request")])
def test_an_internal_error_is_a_logged_500_with_a_request_id(tiny_atlas, failure):
    """Only ``UserError``s are 4xx: a ValueError from a bug is ours, logged with the id the body and
    the header carry, and its message is never shown."""
    import logging

    from featureatlas.api import app as app_module

    atlas = Atlas(tiny_atlas)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append

    def broken(*_a, **_kw):
        raise failure

    with TestClient(create_app(atlas)) as c:
        # after start-up: it reads a page itself, and Litestar's logging set-up replaces root handlers
        atlas.list_features = broken
        app_module.log.addHandler(handler)
        try:
            r = c.get("/api/features")
        finally:
            app_module.log.removeHandler(handler)
    assert r.status_code == 500
    body = r.json()
    assert body["error"] == "internal error" and str(failure) not in r.text
    assert body["request_id"] and r.headers["x-request-id"] == body["request_id"]
    logged = [rec for rec in records if body["request_id"] in rec.getMessage()]
    assert logged and logged[0].exc_info[1] is failure


def test_an_internal_query_past_its_time_limit_is_a_503(tiny_atlas):
    atlas = Atlas(tiny_atlas)
    original = atlas.query
    with TestClient(create_app(atlas)) as c:
        # every internal query becomes one too slow for its limit (interrupted, not left running)
        atlas.query = lambda sql, params=None, **kw: original("select count(*) from range(3000000000)", time_limit_ms=50)
        r = c.get("/api/features/1/neighbors", params={"by": "coactivation"})
    assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"] == "query too slow"
