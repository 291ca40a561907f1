"""The Python API (``import featureatlas as fa``): each method, its errors, and that the HTTP route,
the CLI and the Python call answer the same question the same way."""

from __future__ import annotations

import json

import featureatlas as fa
import pyarrow as pa
import pytest
import torch
from featureatlas.api.cli import main
from featureatlas.store.errors import BadParameter, NotFound, QueryRefused


@pytest.fixture(scope="module")
def atlas(tiny_atlas):
    with fa.open(tiny_atlas) as opened:
        yield opened


def _same(value):
    """As JSON carries it (the CLI prints with ``default=str``; HTTP encodes tuples as lists)."""
    return json.loads(json.dumps(value, default=str))


def _cli(capsys, *args: str, atlas) -> dict:
    assert main([*args, "--atlas", str(atlas), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _without_timing(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "elapsed_ms"}


# Each query kind three ways: (HTTP request, CLI arguments, Python call). ``{live}`` is a feature that fired.
QUERIES = {
    "search": (("get", "/api/search", {"q": "bridge", "k": 5}), ["search", "bridge", "-k", "5"],
               lambda a, live: a.search("bridge", k=5)),
    "search one signal": (("get", "/api/search", {"q": "code", "mode": "label"}), ["search", "code", "--mode", "label"],
                          lambda a, live: a.search("code", mode="label")),
    "neighbors": (("get", "/api/features/{live}/neighbors", {"k": 4, "by": "coactivation"}),
                  ["neighbors", "{live}", "-k", "4", "--by", "coactivation"],
                  lambda a, live: a.neighbors(live, 4, "coactivation")),
    "feature": (("get", "/api/features/{live}", None), ["feature", "{live}"], lambda a, live: a.feature(live)),
    "features": (("get", "/api/features", {"sort": "max_activation", "order": "asc", "limit": 7, "offset": 2}),
                 ["features", "--sort", "max_activation", "--order", "asc", "--limit", "7", "--offset", "2"],
                 lambda a, live: a.features("max_activation", descending=False, limit=7, offset=2)),
    "activations": (("post", "/api/activations", {"text": "The bridge spans the bay.", "k": 3}),
                    ["probe", "The bridge spans the bay.", "-k", "3"],
                    lambda a, live: a.activations("The bridge spans the bay.", 3)),
    "contrast": (("post", "/api/search/contrast", {"positive": ["The bridge", "A bridge deck"], "negative": ["def add(a, b):"]}),
                 ["contrast", "--positive", "The bridge", "A bridge deck", "--negative", "def add(a, b):"],
                 lambda a, live: a.contrast(["The bridge", "A bridge deck"], ["def add(a, b):"])),
    "steer": (("post", "/api/steer", {"prompt": "The bridge", "features": [{"id": "{live}", "value": 4}], "max_new_tokens": 5}),
              ["steer", "The bridge", "--feature", "{live}=4", "--max-new-tokens", "5"],
              lambda a, live: a.steer("The bridge", {live: 4}, max_new_tokens=5)),
    "dictionaries": (("get", "/api/dictionaries", None), ["dictionaries"], lambda a, live: a.dictionaries),
    "sql": (("post", "/api/sql", {"sql": "select feature_id, label, density from features order by density desc limit 5"}),
            ["sql", "select feature_id, label, density from features order by density desc limit 5"],
            lambda a, live: a.sql("select feature_id, label, density from features order by density desc limit 5")),
}


def _fill(value, live: int):
    """``{live}`` replaced by the feature id, in strings, lists and dicts (as an int where it is all of a value)."""
    if isinstance(value, str):
        return value.replace("{live}", str(live))
    if isinstance(value, list):
        return [_fill(v, live) for v in value]
    if isinstance(value, dict):
        return {k: (live if v == "{live}" else _fill(v, live)) for k, v in value.items()}
    return value


@pytest.mark.parametrize("kind", QUERIES)
def test_http_cli_and_python_give_the_same_answer(kind, atlas, client, live, tiny_atlas, capsys):
    (method, path, params), argv, call = QUERIES[kind]
    path, params = _fill(path, live), _fill(params, live)
    response = client.get(path, params=params) if method == "get" else client.post(path, json=params)
    assert response.status_code == 200, response.text
    over_http = _without_timing(response.json())
    on_the_cli = _without_timing(_cli(capsys, *_fill(argv, live), atlas=tiny_atlas))
    from_python = _without_timing(_same(call(atlas, live).data))
    assert from_python == over_http == on_the_cli


def test_info_is_the_http_summary(atlas, client, tiny_atlas):
    assert _same(atlas.info) == client.get("/api/atlas").json()
    assert atlas.info["dictionary"]["d_sae"] == atlas.d_sae == 64
    assert atlas.path == tiny_atlas and "64 features" in repr(atlas)
    mine = atlas.info
    mine["hook"]["layer"] = 99  # the caller's copy: the atlas (and the model it loads) is unchanged
    assert atlas.info["hook"]["layer"] != 99


def test_open_takes_a_path_or_a_file_uri_and_refuses_the_rest(tiny_atlas, tmp_path):
    spaced = tmp_path / "my atlas #2"
    spaced.symlink_to(tiny_atlas)
    with fa.open(spaced.as_uri()) as by_uri:  # file:///.../my%20atlas%20%232
        assert by_uri.path == spaced and by_uri.d_sae == 64
    with fa.open(f"file://localhost{tiny_atlas}") as by_host:
        assert by_host.path == tiny_atlas
    with fa.open(str(tiny_atlas)) as by_string:
        assert by_string.d_sae == 64
    with pytest.raises(BadParameter, match="gs:// is not an atlas location"):
        fa.open("gs://bucket/atlas")
    with pytest.raises(BadParameter, match="not in the URI"):
        fa.open("s3://key:secret@bucket/atlas")
    with pytest.raises(BadParameter, match="another machine"):
        fa.open(f"file://server{tiny_atlas}")
    with pytest.raises(NotFound, match="not a finished atlas"):
        fa.open(tmp_path)
    with pytest.raises(NotFound):  # a folder name with a colon is a path, not a scheme
        fa.open("atlas:v2")
    with pytest.raises(AttributeError):
        fa.no_such_thing  # noqa: B018
    assert {"open", "OpenAtlas", "Result"} <= set(dir(fa)) and "open" not in fa.__all__  # * leaves the builtin alone


def test_results_are_arrow_tables_with_pandas_one_call_away(atlas):
    pandas = pytest.importorskip("pandas")
    hits = atlas.search("bridge", k=4)
    table = hits.to_arrow()
    assert isinstance(table, pa.Table) and table.num_rows == len(hits) == 4
    assert table.column("feature_id").to_pylist() == [h["feature_id"] for h in hits] == [h["feature_id"] for h in hits["hits"]]
    frame = hits.to_pandas()
    assert isinstance(frame, pandas.DataFrame) and list(frame["label"]) == [h["label"] for h in hits]
    tokens = atlas.activations("The bridge spans the bay.").to_arrow()
    assert tokens.column_names == ["position", "token", "features"]
    assert pa.types.is_list(tokens.schema.field("features").type)
    assert tokens.column("position").to_pylist() == list(range(tokens.num_rows))


def test_to_polars(atlas):
    polars = pytest.importorskip("polars")
    frame = atlas.features(limit=5).to_polars()
    assert isinstance(frame, polars.DataFrame) and frame.height == 5


def test_an_empty_answer_still_names_its_columns(atlas):
    none = atlas.contrast(["The bridge spans the bay."], ["The bridge spans the bay."])  # nothing fires on one and not the other
    assert len(none) == 0 and none.to_arrow().column_names == ["feature_id", "label", "score", "density"]
    assert list(none.to_pandas().columns) == ["feature_id", "label", "score", "density"]
    assert atlas.features(offset=10_000).to_arrow().column_names[:2] == ["feature_id", "label"]


def test_feature_rows_are_its_examples_top_first(atlas, live):
    feature = atlas.feature(live)
    kinds = [e["kind"] for e in feature]
    assert kinds == sorted(kinds, key=lambda k: k != "top") and kinds[0] == "top"
    assert len(feature) == len(feature["top_examples"]) + len(feature["quantile_examples"])
    assert feature.to_arrow().column("feature_id").to_pylist() == [live] * len(feature)
    with pytest.raises(NotFound):
        atlas.feature(64)


def test_sql_has_the_servers_limits(atlas):
    many = atlas.sql("select * from range(5000) t(i)")
    assert many["truncated"] and len(many) == 1000
    assert many.to_arrow().column("i").to_pylist()[:3] == [0, 1, 2]
    empty = atlas.sql("select feature_id, label from features where false")
    assert len(empty) == 0 and empty.to_arrow().column_names == ["feature_id", "label"]
    assert atlas.sql("select ? + 1 as n", [41])["rows"] == [[42]]
    pair = atlas.sql("select 1 as id, 'a' as id")
    assert pair.to_arrow().column_names == ["id", "id"] and pair.to_arrow().column(1).to_pylist() == ["a"]
    with pytest.raises(BadParameter, match="JSON values") as caught:
        atlas.sql("select ?", [object()])
    assert caught.value.where == "params"
    for refused in ("drop table features", "select 1; select 2", "copy features to '/tmp/x.csv'",
                    "select * from read_csv('/etc/passwd')"):
        with pytest.raises(QueryRefused):
            atlas.sql(refused)
    with pytest.raises(QueryRefused, match=r"\[time limit\]"):
        atlas.sql("with recursive r(i) as (select 1 union all select i + 1 from r) select count(*) from r")


def test_sql_whole_results_are_arrow_and_still_read_only(atlas):
    whole = atlas.sql("select i, i * 2 as twice from range(5000) t(i)", limit=None)
    table = whole.to_arrow()
    assert table.num_rows == 5000 and str(table.schema.field("i").type) == "int64"  # DuckDB's types, not guessed
    assert whole["row_count"] == 5000 and not whole["truncated"] and len(whole) == 5000
    assert "5000 rows" in repr(whole) and whole._rows is not None and callable(whole._rows)  # shown, not converted
    assert whole.rows[4999] == {"i": 4999, "twice": 9998} and "4,950 more" not in whole._repr_html_()
    assert "5,000 rows" in whole._repr_html_()
    assert atlas.sql("select ? + 1 as n", [41], limit=None).rows == [{"n": 42}]
    assert len(atlas.sql("select * from range(5000) t(i)", limit=2500)) == 2500
    pair = atlas.sql("select 1 as id, 'a' as id", limit=None).to_arrow()
    assert pair.column_names == ["id", "id"] and pair.column(1).to_pylist() == ["a"]
    same = atlas.sql("select feature_id, label from features order by feature_id", limit=None).to_arrow()
    assert same.to_pylist() == atlas.sql("select feature_id, label from features order by feature_id").to_arrow().to_pylist()
    for refused in ("drop table features", "select 1; select 2", "copy features to '/tmp/x.csv'",
                    "select * from read_csv('/etc/passwd')", "select nope from features"):
        with pytest.raises(QueryRefused):
            atlas.sql(refused, limit=None)
    for bad in (0, -1, 2.5, True, "10"):
        with pytest.raises(BadParameter) as caught:
            atlas.sql("select 1", limit=bad)
        assert caught.value.where == "limit"


def test_bad_input_names_the_parameter(atlas, live):
    for call, name in [(lambda: atlas.search("  "), "q"), (lambda: atlas.search("x", k=0), "k"),
                       (lambda: atlas.search("x", mode="psychic"), "mode"),
                       (lambda: atlas.neighbors(live, by="vibes"), "by"),
                       (lambda: atlas.features(sort="label; drop table features"), "sort"),
                       (lambda: atlas.features(limit=10_000), "limit"),
                       (lambda: atlas.contrast("one string"), "positive"),
                       (lambda: atlas.steer("x", [live]), "features"),
                       (lambda: atlas.steer("x", {live: 2}, mode="twist"), "features[0].mode"),
                       (lambda: atlas.activations("x" * 5000), "text"),
                       (lambda: atlas.search("x" * 1001), "q"), (lambda: atlas.search(5), "q"),
                       (lambda: atlas.feature(3.7), "feature_id"), (lambda: atlas.neighbors(True), "feature_id"),
                       (lambda: atlas.neighbors(live, k=2.5), "k"), (lambda: atlas.features(limit=5.0), "limit"),
                       (lambda: atlas.contrast([1]), "positive[0]"), (lambda: atlas.contrast(["a"], "b"), "negative"),
                       (lambda: atlas.steer("x", {"3": 2}), "features[0].id"),
                       (lambda: atlas.steer("x", {live: "big"}), "features[0].value"),
                       (lambda: atlas.steer("x", {live: (2.0,)}), "features[0].value"),
                       (lambda: atlas.steer("x", {live: 2}, max_new_tokens=4.0), "max_new_tokens"),
                       (lambda: atlas.activations(None), "text")]:
        with pytest.raises(BadParameter) as caught:
            call()
        assert caught.value.where == name


def test_numpy_ids_are_taken_and_answered_as_ints(atlas, live):
    import numpy as np

    feature = atlas.feature(np.int64(live))
    assert type(feature["feature_id"]) is int and json.dumps(feature.data, default=None)
    assert atlas.neighbors(np.int32(live), k=np.int64(3))["feature_id"] == live


def test_a_closed_atlas_refuses_sql_and_answers_the_rest(tiny_atlas):
    with fa.open(tiny_atlas) as opened:
        assert opened.sql("select 1 as one")["rows"] == [[1]]
    with pytest.raises(ValueError, match="closed"):
        opened.sql("select 1")
    assert len(opened.features(limit=2)) == 2


def test_steer_takes_a_mode_per_feature(atlas, live):
    result = atlas.steer("The bridge", {live: (-1.0, "add")}, max_new_tokens=3)
    assert [f["mode"] for f in result["features"]] == ["add"]
    assert [r["run"] for r in result] == ["default", "steered"]
    assert len(result.to_arrow().column("tokens")[0]) == 3


def test_the_dictionary_is_the_torch_module_the_atlas_was_encoded_with(atlas, live):
    sae = atlas.dictionary
    assert isinstance(sae, torch.nn.Module) and sae.W_dec.shape == (64, atlas.model.d_model)
    assert atlas.dictionary is sae  # loaded once, and shared with the model once that loaded
    text = "The Golden Gate Bridge is a suspension bridge."
    probed = atlas.activations(text, k=64)
    model = atlas.model
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        resid = model.residual(torch.tensor([[model.bos_id, *ids]]), atlas.info["hook"]["layer"])[0, 1:]
        dense = sae.activations(resid.to(sae.W_enc.dtype))
        recon = sae.decode(sae.encode(resid))
    assert atlas.dictionary is sae  # the model's load kept this copy
    for position, token in enumerate(probed["tokens"]):
        expected = {i: v for i, v in enumerate(dense[position].tolist()) if v > 0}
        assert {f["feature_id"]: pytest.approx(f["value"], rel=1e-5) for f in token["features"]} == expected
    assert recon.shape == resid.shape


def test_notebook_display_draws_each_result(atlas, live):
    import html

    feature = atlas.feature(live)
    page = feature._repr_html_()
    assert html.escape(feature["label"]) in page and "Top examples" in page and "background: rgba(" in page
    assert "Features for “bridge”" in atlas.search("bridge")._repr_html_()
    assert ">one</th>" in atlas.sql("select 1 as one")._repr_html_()
    assert "neighbours of #" in atlas.neighbors(live)._repr_html_()
    assert "Strongest features in this text" in atlas.activations("The bridge")._repr_html_()
    assert ">64</td>" in atlas._repr_html_()  # the summary's feature count


def test_opening_never_writes(tiny_atlas):
    before = {p: p.stat().st_mtime_ns for p in tiny_atlas.rglob("*") if p.is_file()}
    with fa.open(tiny_atlas) as opened:
        opened.features(limit=3)
        opened.sql("select count(*) from activations")
    assert {p: p.stat().st_mtime_ns for p in tiny_atlas.rglob("*") if p.is_file()} == before


def test_a_feature_by_its_index_within_a_dictionary(atlas):
    default = atlas.dictionaries.data["default"]
    assert atlas.feature(default, 5).data["feature_id"] == atlas.feature(5).data["feature_id"] == 5
    with pytest.raises(BadParameter, match="index"):
        atlas.feature(default)
    with pytest.raises(NotFound):
        atlas.feature("L99-1M", 5)
