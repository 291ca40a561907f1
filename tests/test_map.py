"""The feature map: the layout keeps neighbours together, the clusters find planted groups, and the
``/api/map`` document matches the atlas."""

import shutil

import lancedb
import numpy as np
import pyarrow as pa
import pytest
from featureatlas.api.app import create_app
from featureatlas.ingest.feature_map import MIN_UMAP_POINTS, feature_map
from featureatlas.store import manifest
from featureatlas.store.atlas import Atlas
from featureatlas.store.map_view import label_clusters
from litestar.testing import TestClient

from .conftest import SQL


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
    # the stored layout is in DuckDB too, for SQL
    row = SQL(atlas).execute("select map_x, map_y from features where feature_id = 3").fetchone()
    assert row == pytest.approx((doc["x"][3], doc["y"][3]), abs=1e-4)


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
    shutil.copytree(tiny_atlas, old)
    lancedb.connect(str(old / "lance")).open_table("features").drop_columns(["map_x", "map_y"])
    _unpin(old)  # atlases from before maps also predate pinned versions: readers open the latest
    with TestClient(create_app(Atlas(old))) as client:
        r = client.get("/api/map")
        assert r.status_code == 404 and "featureatlas ingest" in r.json()["detail"]
        assert client.get("/api/features/3").status_code == 200  # everything else still works


def test_map_stays_in_feature_order_after_rows_are_rewritten(tiny_atlas, tmp_path):
    """A re-label rewrites rows through merge_insert, and LanceDB moves them to the end of the table."""
    atlas_dir = tmp_path / "relabelled"
    shutil.copytree(tiny_atlas, atlas_dir)
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
