"""The feature map: both layouts keep neighbours together, the clusters and regions find planted
groups and are named by them, and the ``/api/map`` document matches the atlas."""

import shutil

import lancedb
import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse as sp
from featureatlas.api.app import create_app
from featureatlas.ingest.feature_map import (
    MIN_UMAP_POINTS,
    coactivation,
    cosine_neighbors,
    feature_map,
    function_vectors,
    gather_components,
)
from featureatlas.ingest.pipeline import run_ingest
from featureatlas.store import manifest
from featureatlas.store.atlas import Atlas
from featureatlas.store.map_view import kmeans_2d, label_clusters, map_regions, region_source
from litestar.testing import TestClient

from .conftest import SQL, tiny_config


def planted(groups: int, per: int, dim: int, spread: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors in ``groups`` tight groups, and each vector's group."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((groups, dim))
    group = np.repeat(np.arange(groups), per)
    x = centres[group] + spread * rng.standard_normal((groups * per, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), group


def test_umap_layout_keeps_groups_together():
    decoder, group = planted(4, 20, 64, 0.3)
    xy = feature_map(decoder, neighbors=10)
    assert xy.shape == (80, 2) and xy.dtype == np.float32
    assert np.abs(xy).max() == pytest.approx(1.0)
    d = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    nearest = d.argsort(1)[:, :5]
    assert (group[nearest] == group[:, None]).mean() > 0.95


def test_past_the_landmark_count_the_rest_are_placed_among_their_groups(monkeypatch):
    """A wide dictionary is laid out from a sample: the placed features still land with their group,
    and a feature identical to a landmark lands on it."""
    import featureatlas.ingest.feature_map as fm

    monkeypatch.setattr(fm, "LANDMARKS", 60)
    vectors, group = planted(4, 50, 64, 0.3)
    xy = feature_map(vectors, neighbors=10)
    assert xy.shape == (200, 2) and np.isfinite(xy).all()
    assert np.abs(xy).max() == pytest.approx(1.0)
    assert ten_nn_purity(xy, group) > 0.9
    marks = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
    unit = np.eye(3, 8, dtype=np.float32)
    placed = fm.place_by_landmarks(np.vstack([unit, (unit[0] + 0.2 * unit[1])[None] / np.hypot(1, 0.2)]), unit, marks)
    assert placed[:3] == pytest.approx(marks, abs=1e-3)
    assert placed[3] == pytest.approx(marks[0], abs=0.05)  # nearer the first landmark


def co_firing(groups: int, per: int, docs_per_group: int, seed: int = 0) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """Activations (feature_id, doc_id, value) of features that fire in their own group's documents,
    plus a little everywhere, and each feature's group."""
    rng = np.random.default_rng(seed)
    group = np.repeat(np.arange(groups), per)
    rows = []
    for f, g in enumerate(group):
        own = g * docs_per_group + rng.choice(docs_per_group, docs_per_group // 2, replace=False)
        stray = rng.choice(groups * docs_per_group, 2, replace=False)
        for d in np.concatenate([own, stray]):
            rows.append((f, d, rng.uniform(1, 5) if d in own else 0.3))
    f, d, v = (np.array(c) for c in zip(*rows))
    return (f.astype(np.int32), d.astype(np.int32), v.astype(np.float32)), group


def ten_nn_purity(xy: np.ndarray, group: np.ndarray, k: int = 10) -> float:
    d = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    return float((group[d.argsort(1)[:, :k]] == group[:, None]).mean())


def test_function_layout_puts_co_firing_features_together():
    (f, d, v), group = co_firing(groups=4, per=25, docs_per_group=12)
    n = len(group)
    coact = coactivation(f, d, v, n + 1)  # one more feature that never fired
    assert coact.shape == (n + 1, 32) and np.all(coact[n] == 0)
    # features of a group fire in the same documents: their co-activation rows point the same way
    sim = coact[:n] @ coact[:n].T
    assert sim[group[:, None] == group[None]].mean() > 0.4 > 0.1 > sim[group[:, None] != group[None]].mean()
    rng = np.random.default_rng(1)
    context = rng.standard_normal((n + 1, 384)).astype(np.float32)  # embeddings that say nothing
    decoder = rng.standard_normal((n + 1, 48)).astype(np.float32)  # nearly orthogonal, like a real dictionary
    vectors = function_vectors(coact, context, decoder)
    assert vectors.shape == (n + 1, 64) and np.isfinite(vectors).all()
    assert np.linalg.norm(vectors, axis=1) == pytest.approx(1, abs=1e-5)  # the silent feature has a place too
    xy = feature_map(vectors, neighbors=10, seed=3)
    assert xy.shape == (n + 1, 2) and xy.dtype == np.float32 and np.isfinite(xy).all()
    assert np.abs(xy).max() == pytest.approx(1.0)
    assert ten_nn_purity(xy[:n], group) > 0.9
    assert ten_nn_purity(xy[:n][np.random.default_rng(0).permutation(n)], group) < 0.4  # what chance gives
    assert np.array_equal(xy, feature_map(vectors, neighbors=10, seed=3))  # the same seed, the same map


def test_exact_neighbours_come_nearest_first_after_the_point_itself():
    x, _ = planted(3, 10, 16, 0.5)
    x[5] = x[4]  # a duplicate is still not its twin's "itself"
    index, distance = cosine_neighbors(x, 6)
    full = 1 - x @ x.T
    assert (index[:, 0] == np.arange(len(x))).all() and (distance[:, 0] == 0).all()
    assert (np.diff(distance, axis=1) >= -1e-6).all()
    for i in range(len(x)):
        assert distance[i, 1:] == pytest.approx(np.sort(np.delete(full[i], i))[:5], abs=1e-5)


def test_far_components_are_gathered_next_to_the_main_one():
    rng = np.random.default_rng(0)
    main = rng.uniform(-1, 1, (300, 2))
    near, far = main[:4] * 0.1 + [1, 0], main[:4] * 0.1 + [40, 40]  # small components: one near, one far
    xy = np.concatenate([main, near, far]).astype(np.float32)
    component = np.repeat([0, 1, 2], [300, 4, 4])
    graph = sp.csr_matrix(component[:, None] == component[None])
    out = gather_components(xy.copy(), graph)
    assert np.array_equal(out[:304], xy[:304])  # the largest stays, and so does a component already near it
    moved = out[304:] - xy[304:]
    centre, radius = main.mean(0), np.linalg.norm(main - main.mean(0), axis=1).max()
    away = far.mean(0) - centre
    assert np.allclose(moved, moved[0], atol=1e-4)  # whole
    cross = moved[0, 0] * away[1] - moved[0, 1] * away[0]
    assert moved[0] @ away < 0 and abs(cross) < 1e-3 * np.linalg.norm(away) ** 2  # straight in
    gap = np.linalg.norm(out[304:] - centre, axis=1).min()
    assert radius < gap < 1.5 * radius  # outside the main component, but next to it
    # large components (each a quarter of the points) keep their places
    blobs = np.repeat(rng.uniform(-30, 30, (4, 2)), 25, axis=0) + rng.standard_normal((100, 2))
    group = np.repeat(np.arange(4), 25)
    assert np.array_equal(gather_components(blobs.copy(), sp.csr_matrix(group[:, None] == group[None])), blobs)


def test_tiny_dictionaries_are_laid_out_without_umap():
    decoder, _ = planted(2, 3, 16, 0.1)
    assert len(decoder) < MIN_UMAP_POINTS
    xy = feature_map(decoder)
    assert xy.shape == (6, 2) and np.isfinite(xy).all()
    assert feature_map(decoder[:1]).shape == (1, 2)


def test_label_clusters_recover_planted_groups():
    emb, group = planted(5, 40, 384, 0.5, seed=3)
    emb[:7] = 0  # unlabelled features: never a cluster's centre
    centroids = label_clusters(emb, k=5)
    assign = (emb @ centroids.T).argmax(1)[7:]
    # each planted group lands in one cluster, and different groups in different ones
    majority = [np.bincount(assign[group[7:] == g]).argmax() for g in range(5)]
    assert len(set(majority)) == 5
    assert np.mean([np.mean(assign[group[7:] == g] == m) for g, m in enumerate(majority)]) > 0.95


def test_regions_are_named_by_their_main_source_and_particular_words():
    rng = np.random.default_rng(0)
    centres = np.array([[-0.7, -0.7], [0.7, -0.7], [0.0, 0.7]])
    xy = np.repeat(centres, 120, axis=0) + 0.05 * rng.standard_normal((360, 2))  # sqrt(360 / 40): three regions
    labels = ([f'French text about ville and "la" {i}' for i in range(120)]
              + [f"Python code: def and class names {i}" for i in range(120)]
              + [f"the token {w}" for w in rng.choice(["thou", "thee", "lord", "sir"], 120)])
    sources = ["wiki-fr"] * 120 + ["/data/my-code"] * 90 + ["wiki-en"] * 30 + [None] * 120
    regions = map_regions(xy, labels, sources)
    assert [r["size"] for r in regions] == [120, 120, 120]
    names = {r["name"]: r for r in regions}
    assert "French: ville" in names  # not "about", "and", "text", nor "French" twice; "la" is too short
    assert names["French: ville"]["x"] == pytest.approx(-0.7, abs=0.1)  # named where its points are
    code = next(name for name in names if name.startswith("my-code: "))  # a user source by its file name
    assert {"def", "class"} <= set(code.split(": ")[1].split("/"))
    plays = next(name for name in names if ":" not in name)  # no main source: its words alone
    assert len(plays.split("/")) == 3 and set(plays.split("/")) <= {"thou", "thee", "lord", "sir"}


def test_kmeans_2d_finds_separate_blobs():
    rng = np.random.default_rng(2)
    xy = np.repeat(rng.uniform(-1, 1, (5, 2)) * 10, 30, axis=0) + rng.standard_normal((150, 2)) * 0.1
    assign = kmeans_2d(xy, 5)
    assert len(set(assign)) == 5 and all(len(set(assign[i * 30:(i + 1) * 30])) == 1 for i in range(5))


def test_a_region_is_named_after_a_source_only_when_most_of_its_features_fire_there_most():
    assert region_source(["wiki-fr", "wiki-fr", "python"]) == "French"
    assert region_source(["wiki-fr", "wiki-es", "python", None]) == ""
    assert region_source([None, None, "python"]) == ""
    assert region_source(["/corpora/notes.jsonl"] * 2) == "notes.jsonl"


def test_map_document_matches_the_atlas(tiny_atlas):
    atlas = Atlas(tiny_atlas)
    with TestClient(create_app(atlas)) as client:
        doc = client.get("/api/map").json()
        features = client.get("/api/features", params={"sort": "feature_id", "order": "asc", "limit": 100}).json()["features"]
    n = atlas.d_sae
    assert doc["n"] == n and doc["feature_id"] == list(range(n))
    assert all(len(doc[c]) == n for c in ("x", "y", "density", "label", "cluster"))
    assert max(map(abs, doc["x"] + doc["y"])) <= 1.0001
    assert doc["density"] == pytest.approx([f["density"] for f in features], abs=1e-6)
    assert doc["label"] == [f["label"] for f in features]
    ids = {c["id"] for c in doc["clusters"]}
    assert set(doc["cluster"]) - {-1} == ids
    assert sum(c["size"] for c in doc["clusters"]) == sum(c >= 0 for c in doc["cluster"])
    # the function layout by default, and named regions on it
    assert doc["layout"] == "function" and doc["regions"]
    assert all(r["name"] and abs(r["x"]) <= 1.0001 and abs(r["y"]) <= 1.0001 for r in doc["regions"])
    assert sum(r["size"] for r in doc["regions"]) <= n
    # the stored layout is in DuckDB too, for SQL
    row = SQL(atlas).execute("select map_x, map_y from features where feature_id = 3").fetchone()
    assert row == pytest.approx((doc["x"][3], doc["y"][3]), abs=1e-4)


def decode_levels(head: dict, blocks: list[bytes]) -> dict[str, np.ndarray]:
    """The binary levels of ``map_levels`` read back as the browser does, joined in level order."""
    out: dict[str, list] = {name: [] for name, _ in head["columns"]}
    for count, block in zip(head["levels"], blocks):
        assert len(block) == 4 * count * len(head["columns"])
        for k, (name, kind) in enumerate(head["columns"]):
            out[name].append(np.frombuffer(block, "<i4" if kind == "int32" else "<f4", count, 4 * count * k))
    return {name: np.concatenate(parts) for name, parts in out.items()}


def test_binary_levels_of_detail_hold_every_point_once_and_match_the_json(tiny_atlas, monkeypatch):
    import featureatlas.store.map_view as mv

    with TestClient(create_app(Atlas(tiny_atlas))) as client:
        doc = client.get("/api/map").json()
        head = client.get("/api/map/head").json()
        answers = [client.get(f"/api/map/points/{i}") for i in range(len(head["levels"]))]
        blocks = [r.content for r in answers]
        # Each level names the atlas it came from, so a browser never joins two across a publish.
        assert {r.headers["x-atlas-version"] for r in answers} == {head["version"]} != {"None"}
        assert client.get(f"/api/map/points/{len(head['levels'])}").status_code == 404
    assert head["n"] == doc["n"] and head["levels"] == [doc["n"]]  # a small map is one level
    assert head["regions"] == doc["regions"] and head["clusters"] == doc["clusters"]
    points = decode_levels(head, blocks)
    order = np.argsort(points["feature_id"])
    assert points["feature_id"][order].tolist() == doc["feature_id"]
    for name in ("x", "y", "density", "cluster"):
        assert points[name][order] == pytest.approx(np.array(doc[name], np.float32), abs=1e-4)
    # A wide map is cut into levels, each four times the last, every one a spread-out sample.
    monkeypatch.setattr(mv, "LOD_FIRST", 5)
    data = mv.map_data(Atlas(tiny_atlas))
    head, blocks = mv.map_levels(data)
    n = len(data.feature_id)
    assert head["levels"][:2] == [5, 20] and sum(head["levels"]) == n
    points = decode_levels(head, blocks)
    assert sorted(points["feature_id"].tolist()) == list(range(n))
    first = points["feature_id"][:5]
    assert np.ptp(first) > n / 4  # not the first five ids
    assert points["x"][5:25] == pytest.approx(data.xy[points["feature_id"][5:25], 0].astype(np.float32))


def test_pages_and_static_files_are_served(tiny_atlas):
    with TestClient(create_app(Atlas(tiny_atlas))) as client:
        for path in ("/", "/search?q=x", "/features/3", "/map", "/probe"):
            r = client.get(path)
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
            assert '<main id="view"' in r.text
        for name in ("app.js", "dom.js", "map.js", "style.css"):
            assert client.get(f"/static/{name}").status_code == 200
        assert client.get("/static/../app.py").status_code == 404
        assert client.get("/static/nothing.js").status_code == 404
        assert client.get("/features/abc").status_code == 404
        # the pages stay out of the API schema
        assert not any(p in client.get("/schema/openapi.json").json()["paths"] for p in ("/", "/map", "/features/{feature_id}"))


def _unpin(root):
    """Readers open the latest LanceDB versions, as for an atlas published before versions were pinned."""
    m = manifest.read(root)
    del m["published"]
    manifest.write(root, m)


def test_an_atlas_without_a_map_says_how_to_get_one(tiny_atlas, tmp_path):
    old = tmp_path / "old-atlas"
    shutil.copytree(tiny_atlas, old, symlinks=True)
    lancedb.connect(str(old / "lance")).open_table("features").drop_columns(["map_x", "map_y"])
    _unpin(old)  # atlases from before maps also predate pinned versions: readers open the latest
    with TestClient(create_app(Atlas(old))) as client:
        r = client.get("/api/map")
        assert r.status_code == 404 and "featureatlas ingest" in r.json()["detail"]
        assert client.get("/api/features/3").status_code == 200  # everything else still works


def test_map_stays_in_feature_order_after_rows_are_rewritten(tiny_atlas, tmp_path):
    """A re-label rewrites rows through merge_insert, and LanceDB moves them to the end of the table."""
    atlas_dir = tmp_path / "relabelled"
    shutil.copytree(tiny_atlas, atlas_dir, symlinks=True)
    table = lancedb.connect(str(atlas_dir / "lance")).open_table("features")
    rows = table.search().where("feature_id in (3, 40)").limit(2).to_arrow()
    rows = rows.set_column(rows.schema.get_field_index("label"), "label", pa.array(["label three", "label forty"]))
    table.merge_insert("feature_id").when_matched_update_all().execute(rows.select(table.schema.names))
    assert table.search().select(["feature_id"]).limit(100).to_arrow()["feature_id"].to_pylist()[-2:] != [62, 63]
    _unpin(atlas_dir)
    atlas = Atlas(atlas_dir)
    with TestClient(create_app(atlas)) as client:
        doc = client.get("/api/map").json()
    assert doc["feature_id"] == list(range(atlas.d_sae))
    assert doc["label"][3] == "label three" and doc["label"][40] == "label forty"
    xy = SQL(atlas).execute("select map_x, map_y from features where feature_id = 40").fetchone()
    assert (doc["x"][40], doc["y"][40]) == pytest.approx(xy, abs=1e-4)



def test_the_decoder_layout_is_still_an_option(tiny_atlas, tiny_model_dir, corpus_dir, tmp_path):
    """A re-run with ``map_layout=decoder`` redoes the map alone, from the decoder directions."""
    root = tmp_path / "decoder-map"
    shutil.copytree(tiny_atlas, root, symlinks=True)
    manifest_ = run_ingest(tiny_config(root, tiny_model_dir, corpus_dir, map_layout="decoder"))
    assert manifest_["stages"]["map"]["status"] == "done" and manifest_["stages"]["encode"]["status"] != "done"
    atlas = Atlas(root)
    with TestClient(create_app(atlas)) as client:
        doc = client.get("/api/map").json()
    decoder = np.stack(atlas.features.search().select(["feature_id", "decoder"]).limit(atlas.d_sae).to_pandas()
                       .sort_values("feature_id")["decoder"].to_numpy())
    assert doc["layout"] == "decoder"
    assert np.stack([doc["x"], doc["y"]], 1) == pytest.approx(feature_map(decoder), abs=1e-3)


def test_the_map_is_the_same_whatever_the_blas_threads(tiny_atlas, tiny_model_dir, corpus_dir, tmp_path):
    """The tiny atlas was built with this machine's BLAS threads; built again on one, every column of
    every feature is the same, the map's coordinates included (they followed the thread count)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="blas"):
        run_ingest(tiny_config(tmp_path / "atlas", tiny_model_dir, corpus_dir))
    ours, theirs = (Atlas(p).features.to_arrow().sort_by("feature_id") for p in (tmp_path / "atlas", tiny_atlas))
    assert ours.column("map_x").to_pylist() == theirs.column("map_x").to_pylist()
    assert ours.equals(theirs)
