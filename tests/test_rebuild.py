"""An atlas republished under a running server, and atlases that are damaged: the server answers
every request from one whole atlas, and a damaged one is a clear error naming the file."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import threading
import time

import duckdb
import pytest
from featureatlas.api.app import create_app
from featureatlas.ingest.labels.relabel import relabel
from featureatlas.ingest.pipeline import run_ingest
from featureatlas.store import manifest as M
from featureatlas.store.atlas import Atlas
from featureatlas.store.errors import DamagedAtlas
from featureatlas.store.publish import DiskFull, publish
from litestar.testing import TestClient

from .conftest import tiny_config


def _answers(client, feature: int) -> tuple:
    """What one pass of the loop reads: each answer from one request, so each must be whole."""
    page = client.get(f"/api/features/{feature}")
    listing = client.get("/api/features", params={"sort": "feature_id", "order": "asc", "limit": 64})
    sql = client.post("/api/sql", json={"sql": "select feature_id, label, label_score from features order by 1"})
    for r in (page, listing, sql):
        assert r.status_code == 200, r.text
    page = page.json()
    return ((page["label"], page["label_score"]),
            tuple((f["label"], f["label_score"]) for f in listing.json()["features"]),
            tuple((row[1], row[2]) for row in sql.json()["rows"]))


def test_a_server_answers_from_one_whole_atlas_while_it_is_republished(tiny_atlas, tiny_model_dir, corpus_dir,
                                                                         tmp_path):
    root = tmp_path / "atlas"
    shutil.copytree(tiny_atlas, root, symlinks=True)
    seen: list[tuple] = []
    failures: list[BaseException] = []
    stop = threading.Event()
    with TestClient(create_app(Atlas(root))) as client:
        live = client.get("/api/features", params={"limit": 1}).json()["features"][0]["feature_id"]

        def ask() -> None:
            while not stop.is_set():
                try:
                    seen.append(_answers(client, live))
                except BaseException as e:  # noqa: BLE001 (reported by the test below)
                    failures.append(e)
                    return

        before = _answers(client, live)
        asker = threading.Thread(target=ask)
        asker.start()
        try:
            # A full publish (label scores change with the first scorer), then a re-label.
            run_ingest(tiny_config(root, tiny_model_dir, corpus_dir, label_scorers=["token", "embedding"]))
            published = _answers_of(Atlas(root), live)
            relabel(root, {"label_scorers": ["embedding", "token"]})
            relabelled = _answers_of(Atlas(root), live)
            deadline = time.time() + 60
            while _answers(client, live) != relabelled and time.time() < deadline:
                time.sleep(0.5)
            final = _answers(client, live)
        finally:
            stop.set()
            asker.join()
    assert not failures, failures[0]
    assert published != before and final == relabelled  # the server followed both changes
    assert any(answers == published for answers in seen)
    for answers in seen:
        for i, answer in enumerate(answers):
            assert answer in {before[i], published[i], relabelled[i]}, "an answer mixed two atlases"
    # The parts the server was reading when the atlas changed are still there; older ones are gone.
    folders = sorted(p.name for p in (root / M.DATA).iterdir())
    assert len(folders) == 2 and (root / M.LANCE).is_symlink()


def _answers_of(atlas: Atlas, feature: int) -> tuple:
    """The same answers read straight from one atlas, without a server."""
    from featureatlas.api.service import AtlasService
    from featureatlas.store.sql import execute_sql

    row = AtlasService(atlas).feature(feature)
    listing = atlas.list_features(sort="feature_id", descending=False, limit=64)
    rows = execute_sql(atlas, "select feature_id, label, label_score from features order by 1").rows
    atlas.close()
    return ((row["label"], row["label_score"]), tuple((f["label"], f["label_score"]) for f in listing),
            tuple((r[1], r[2]) for r in rows))


@pytest.fixture
def atlas_copy(tiny_atlas, tmp_path):
    root = tmp_path / "atlas"
    shutil.copytree(tiny_atlas, root, symlinks=True)
    return root


def test_a_missing_part_is_named(atlas_copy):
    base = Atlas(atlas_copy).base
    (base / M.DICTIONARY / M.DICTIONARY_WEIGHTS).unlink()
    with pytest.raises(DamagedAtlas, match=r"sae_weights.safetensors.*missing.*featureatlas ingest"):
        Atlas(atlas_copy)


def test_a_truncated_database_is_named(atlas_copy):
    atlas = Atlas(atlas_copy)
    path = atlas.duckdb_path
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DamagedAtlas, match=r"analytics.duckdb.*cannot be opened"):
        Atlas(atlas_copy).query("select 1")


@pytest.mark.parametrize("text, match", [("{\"dictionary\": {", "not valid JSON"), ("[1, 2]", "not a Feature Atlas"),
                                         (None, "newer Feature Atlas")])
def test_a_bad_manifest_is_named(atlas_copy, text, match):
    path = atlas_copy / M.MANIFEST
    if text is None:
        text = json.dumps({**json.loads(path.read_text()), "format": M.FORMAT + 1})
    path.write_text(text)
    with pytest.raises(DamagedAtlas, match=match):
        Atlas(atlas_copy)


def test_the_cli_says_what_is_damaged_without_a_traceback(atlas_copy, capsys):
    from featureatlas.api.cli import main

    (atlas_copy / M.MANIFEST).write_text("{")
    assert main(["sql", "select 1", "--atlas", str(atlas_copy)]) == 2
    err = capsys.readouterr().err
    assert "manifest.json" in err and "Traceback" not in err


@pytest.mark.parametrize("full", [OSError(errno.ENOSPC, "No space left on device"),
                                  duckdb.IOException('IO Error: Could not write file "x": No space left on device')])
def test_a_disk_that_fills_while_publishing_leaves_the_atlas_as_it_was(atlas_copy, full):
    manifest = json.loads((atlas_copy / M.MANIFEST).read_text())
    before = sorted(p.name for p in (atlas_copy / M.DATA).iterdir())

    def build(staging):
        (staging / M.DICTIONARY).mkdir()
        raise full

    with pytest.raises(DiskFull, match="atlas is unchanged"):
        publish(atlas_copy, build, manifest)
    assert json.loads((atlas_copy / M.MANIFEST).read_text()) == manifest
    assert sorted(p.name for p in (atlas_copy / M.DATA).iterdir()) == before
    assert not (atlas_copy / M.CACHE / ".staging").exists()
    assert Atlas(atlas_copy).query("select count(*) from features").rows == [(64,)]


def test_a_manifest_write_syncs_the_file_then_its_folder(tmp_path, monkeypatch):
    """The rename of a manifest is durable only once the folder's entry is on disk: fsync the file
    before the rename, then the folder."""
    synced = []
    real = os.fsync

    def record(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    M.write(tmp_path, {"dictionary": {}})
    assert synced == [False, True] and json.loads((tmp_path / M.MANIFEST).read_text()) == {"dictionary": {}}


def test_a_folder_that_refuses_fsync_still_gets_its_manifest(tmp_path, monkeypatch, caplog):
    """Some network file systems refuse fsync on a folder: the rename has happened, so it is logged."""
    real = os.fsync

    def refuse_folders(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        real(fd)

    monkeypatch.setattr(os, "fsync", refuse_folders)
    M.write(tmp_path, {"dictionary": {}})
    assert json.loads((tmp_path / M.MANIFEST).read_text()) == {"dictionary": {}}
    assert "could not sync folder" in caplog.text
