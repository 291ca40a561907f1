import pytest
from litestar.testing import TestClient

from featureatlas.api.app import create_app
from featureatlas.store.atlas import Atlas


@pytest.fixture(scope="module")
def client(tiny_atlas):
    with TestClient(create_app(Atlas(tiny_atlas))) as c:
        yield c


def test_health_and_summary(client):
    assert client.get("/healthz").json()["features"] == 64
    summary = client.get("/api/atlas").json()
    assert summary["dictionary"]["d_sae"] == 64 and "variance_explained" in summary["metrics"]


def test_browse_sorted_and_paged(client):
    page = client.get("/api/features", params={"sort": "max_activation", "limit": 5, "offset": 2}).json()
    values = [f["max_activation"] for f in page["features"]]
    assert len(values) == 5 and values == sorted(values, reverse=True)
    first = client.get("/api/features", params={"sort": "max_activation", "limit": 7}).json()["features"]
    assert [f["feature_id"] for f in first[2:7]] == [f["feature_id"] for f in page["features"]]


def test_feature_detail(client):
    live = client.get("/api/features", params={"limit": 1}).json()["features"][0]["feature_id"]
    f = client.get(f"/api/features/{live}").json()
    assert f["feature_id"] == live and f["top_examples"] and len(f["histogram_edges"]) == len(f["histogram"]) + 1
    assert "label_embedding" not in f and "decoder" not in f


@pytest.mark.parametrize(
    "url, status",
    [
        ("/api/features/64", 404),
        ("/api/features/-1", 404),
        ("/api/features/abc", 404),
        ("/api/features?sort=label; drop table features", 400),
        ("/api/features?limit=0", 400),
        ("/api/features?limit=100000", 400),
        ("/api/features?order=sideways", 400),
        ("/api/features?offset=-3", 400),
    ],
)
def test_errors_are_json_4xx(client, url, status):
    r = client.get(url)
    assert r.status_code == status
    assert set(r.json()) == {"error", "detail"}


def test_openapi_schema_lists_the_routes(client):
    paths = client.get("/schema/openapi.json").json()["paths"]
    assert {"/healthz", "/api/atlas", "/api/features", "/api/features/{feature_id}"} <= set(paths)
