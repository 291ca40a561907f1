"""An atlas on an S3-compatible object store: moto's server (``moto[server]``, a pip package) on
loopback stands in for S3. It speaks the S3 REST API that pyarrow's filesystem uses; it does not
model S3's consistency, multipart limits or IAM policies (any credentials pass)."""

from __future__ import annotations

import json
import logging
import shutil
import socket

import pytest
from pyarrow import fs

moto_server = pytest.importorskip("moto.server")

import featureatlas as fa  # noqa: E402
from featureatlas.store.digest import atlas_digest  # noqa: E402
from featureatlas.store.errors import DamagedAtlas  # noqa: E402
from featureatlas.store.manifest import read  # noqa: E402

from .conftest import tiny_config  # noqa: E402

BUCKET = "atlases"


@pytest.fixture
def s3(monkeypatch, tmp_path):
    """An empty bucket on a local S3 server, reached the way a user's would be: the environment."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for name, value in (("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}"), ("AWS_ACCESS_KEY_ID", "test"),
                        ("AWS_SECRET_ACCESS_KEY", "test"), ("AWS_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    fs.S3FileSystem(endpoint_override=f"http://127.0.0.1:{port}", allow_bucket_creation=True).create_dir(BUCKET)
    yield fs.S3FileSystem(endpoint_override=f"http://127.0.0.1:{port}")
    server.stop()


@pytest.fixture
def publish(tmp_path, tiny_atlas, tiny_model_dir, corpus_dir):
    """``publish(uri, **changes)``: the tiny atlas built to ``uri`` from the cache folder in
    ``FEATUREATLAS_CACHE``. The first time, the build's work folder gets the tiny atlas's finished
    stages, so the ingest only (re-)labels, publishes and uploads."""
    from featureatlas.ingest.pipeline import run_ingest
    from featureatlas.store.location import work_folder

    def build(uri: str, **changes) -> dict:
        if not (work_folder(uri) / "cache").exists():
            shutil.copytree(tiny_atlas / "cache", work_folder(uri) / "cache", ignore=shutil.ignore_patterns(".staging"))
        return run_ingest(tiny_config(tmp_path / "unused", tiny_model_dir, corpus_dir, **changes).replace(atlas=uri))

    return build


def test_an_atlas_published_to_s3_opens_from_another_machine(s3, monkeypatch, tmp_path, tiny_atlas, publish, capsys):
    from featureatlas.api.cli import main

    uri = f"s3://{BUCKET}/runs/tiny"
    monkeypatch.setenv("FEATUREATLAS_CACHE", str(tmp_path / "builder"))
    manifest = publish(uri)
    folder = manifest["published"]["folder"]
    assert json.loads(s3.open_input_stream(f"{BUCKET}/runs/tiny/manifest.json").read()) == manifest
    assert s3.get_file_info(f"{BUCKET}/runs/tiny/{folder}/analytics.duckdb").size > 0
    assert s3.get_file_info(f"{BUCKET}/runs/tiny/cache").type.name == "NotFound"  # the stages' cache stays local

    # A reader elsewhere (another cache): a mirror of the current publish, the same atlas.
    monkeypatch.setenv("FEATUREATLAS_CACHE", str(tmp_path / "reader"))
    with fa.open(uri) as atlas:
        assert atlas.d_sae == 64 and str(atlas.path).startswith(str(tmp_path / "reader"))
        assert atlas_digest(atlas.path) == atlas_digest(tiny_atlas)
        n = list(atlas.sql("select count(*) as n from activations"))[0]["n"]
    assert n > 0 and main(["sql", "--atlas", uri, "--json", "select count(*) as n from activations"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == [[n]]

    # Published again (another label setting): the reader's mirror follows the new manifest, and
    # the publish before stays on the store for readers mid-download; older ones go.
    monkeypatch.setenv("FEATUREATLAS_CACHE", str(tmp_path / "builder"))
    second = publish(uri, context_embedding_examples=1)
    assert second["published"]["folder"] != folder
    monkeypatch.setenv("FEATUREATLAS_CACHE", str(tmp_path / "reader"))
    with fa.open(uri) as atlas:
        assert read(atlas.path)["published"]["folder"] == second["published"]["folder"]
    both = {folder.split("/")[1], second["published"]["folder"].split("/")[1]}
    # The folder before stays in the mirror (a server that opened it goes on answering) and on the store.
    assert {p.name for p in (atlas.path / "data").iterdir()} == both
    assert {info.base_name for info in s3.get_file_info(fs.FileSelector(f"{BUCKET}/runs/tiny/data"))} == both


def test_a_uri_with_no_atlas_or_with_secrets_in_it_is_refused(s3, monkeypatch, tmp_path, tiny_model_dir, corpus_dir):
    from featureatlas.ingest.pipeline import run_ingest
    from featureatlas.store.errors import BadParameter

    monkeypatch.setenv("FEATUREATLAS_CACHE", str(tmp_path))
    with pytest.raises(DamagedAtlas, match="no manifest.json"):
        fa.open(f"s3://{BUCKET}/nothing-here")
    # A bucket that is not there fails before the ingest does any work.
    with pytest.raises(BadParameter, match="cannot read s3://no-such-bucket/atlas"):
        run_ingest(tiny_config(tmp_path / "unused", tiny_model_dir, corpus_dir).replace(atlas="s3://no-such-bucket/atlas"))
    assert not (tmp_path / "work").exists()
    with pytest.raises(BadParameter, match="not in the URI"):
        fa.open(f"s3://AKIA:secret@{BUCKET}/atlas")
    with pytest.raises(BadParameter, match="names no bucket"):
        fa.open("s3:///atlas")


def test_a_server_over_s3_follows_a_new_publish_there(s3, monkeypatch, tmp_path, publish):
    """The server reads a mirror; its follower brings each publish on the store into the mirror,
    and the server then answers from it, as it would after a local publish."""
    import time

    from featureatlas.api.app import create_app
    from featureatlas.api.live import RemoteFollower
    from featureatlas.store.atlas import Atlas
    from featureatlas.store.location import readable
    from litestar.testing import TestClient

    uri = f"s3://{BUCKET}/runs/served"
    monkeypatch.setenv("FEATUREATLAS_CACHE", str(tmp_path / "cache"))  # one machine builds and serves
    first = publish(uri)
    with TestClient(create_app(Atlas(readable(uri)), follow=RemoteFollower(uri, every_s=0.2))) as client:
        assert client.get("/healthz").json()["created_at"] == first["created_at"]
        second = publish(uri, context_embedding_examples=1)
        deadline = time.monotonic() + 60
        while client.get("/healthz").json()["created_at"] != second["created_at"]:
            assert time.monotonic() < deadline, "the server never moved to the new publish"
            time.sleep(0.2)
        assert client.get("/api/features/3").status_code == 200


def test_a_follower_that_cannot_refresh_the_mirror_says_so_and_goes_on(s3, caplog):
    """A store with no atlas at the URI, or one that does not answer: logged, and tried again.
    (Its own test: the app above replaces the root logger's handlers, caplog's among them.)"""
    import time

    from featureatlas.api.live import RemoteFollower

    follower = RemoteFollower(f"s3://{BUCKET}/runs/none", every_s=0.05)
    with caplog.at_level(logging.WARNING, logger="featureatlas.api.live"):
        follower.start()
        try:
            deadline = time.monotonic() + 30
            while caplog.text.count("could not refresh the mirror of s3://atlases/runs/none") < 2:
                assert time.monotonic() < deadline, caplog.text[-2000:]
                time.sleep(0.05)
        finally:
            follower.close()
    assert not follower._thread.is_alive()
