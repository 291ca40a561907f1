"""The ingest on a real Ray cluster on this machine (worker processes, not a mock): the same atlas as
the local path, a worker killed mid-stage, a driver killed mid-stage, and two simulated nodes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from featureatlas.ingest.cluster import RayShards  # noqa: E402
from featureatlas.ingest.config import AtlasConfig  # noqa: E402
from featureatlas.ingest.stages import Stage, Stages, local_shards, shard_records  # noqa: E402

from .conftest import tiny_config  # noqa: E402


@pytest.fixture
def local_cluster():
    """A single-machine Ray cluster with two worker CPUs, stopped after the test."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "LANCE_LOG",
                                                                  "MKL_CBWR")}})
    yield
    ray.shutdown()


def test_the_ray_ingest_is_the_local_ingest(local_cluster, tiny_atlas, tiny_model_dir, corpus_dir, tmp_path):
    from featureatlas.ingest.pipeline import run_ingest
    from featureatlas.store.digest import atlas_digest

    cfg = tiny_config(tmp_path / "atlas", tiny_model_dir, corpus_dir, ray="auto")
    run_ingest(cfg)
    assert atlas_digest(tmp_path / "atlas") == atlas_digest(tiny_atlas)
    shards = {stage: len(list((tmp_path / "atlas" / "cache" / stage).glob("shard-*.json")))
              for stage in ("windows", "harvest", "encode", "labels")}
    assert shards == {"windows": 1, "harvest": 3, "encode": 3, "labels": 2}  # 6,000 tokens of 2,048; 64 features of 32


@dataclass
class Ctx:
    """What a test stage's shards share: where a shard leaves the mark of a process it killed."""

    marks: Path


def _square(ctx: Ctx, folder: Path, i: int) -> dict:
    # Shard 1 ends its worker process the first time it runs (as an OOM kill or a lost node would).
    mark = ctx.marks / f"killed-{i}"
    if i == 1 and not mark.exists():
        mark.touch()
        os._exit(1)
    tmp = folder / f".part-{i}.tmp"
    tmp.write_text(str(i * i))
    tmp.rename(folder / f"part-{i}.txt")
    return {"value": i * i}


def _total(ctx: Ctx, folder: Path) -> dict:
    total = sum(r["value"] for r in shard_records(folder))
    (folder / "total.txt").write_text(str(total))
    return {"total": total}


SQUARES = Stage("squares", 1, ("train",), (), ("total.txt",), _total, shards=lambda ctx: 6, run_shard=_square)


def test_a_killed_worker_is_retried_and_the_result_is_unchanged(local_cluster, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    runner = RayShards(lambda: Ctx(marks), workers=2)
    try:
        summary = Stages(tmp_path / "ray", AtlasConfig(), runner).ensure(SQUARES, Ctx(marks))
    finally:
        runner.close()
    assert (marks / "killed-1").exists()  # a worker did die
    assert summary["total"] == sum(i * i for i in range(6))
    assert sorted(p.name for p in (tmp_path / "ray" / "squares").glob("part-*.txt")) == [f"part-{i}.txt" for i in range(6)]


def test_a_killed_driver_resumes_from_the_finished_shards(local_cluster, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    (marks / "killed-1").touch()  # no worker deaths here

    def dies_after_two(stage, ctx, folder, todo):
        for n, done in enumerate(local_shards(stage, ctx, folder, todo)):
            if n == 2:
                raise KeyboardInterrupt("driver killed")
            yield done

    with pytest.raises(KeyboardInterrupt):
        Stages(tmp_path, AtlasConfig(), dies_after_two).ensure(SQUARES, Ctx(marks))
    assert len(list((tmp_path / "squares").glob("shard-*.json"))) == 2
    runner = RayShards(lambda: Ctx(marks), workers=2)
    try:
        stages = Stages(tmp_path, AtlasConfig(), runner)
        assert stages.ensure(SQUARES, Ctx(marks))["total"] == sum(i * i for i in range(6))
    finally:
        runner.close()
    assert sum(runner.nodes.values()) == 4  # only the missing shards ran


def test_shards_spread_over_two_nodes(tmp_path):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    marks = tmp_path / "marks"
    marks.mkdir()
    (marks / "killed-1").touch()
    runner = RayShards(lambda: Ctx(marks), workers=2)
    try:
        assert Stages(tmp_path, AtlasConfig(), runner).ensure(SQUARES, Ctx(marks))["total"] == 55
        assert len(runner.nodes) == 2 and sum(runner.nodes.values()) == 6  # one actor on each node
    finally:
        runner.close()
        ray.shutdown()
        cluster.shutdown()


def test_a_label_shard_is_the_same_bits_with_any_threads_any_shard_size_and_in_a_ray_actor(
        local_cluster, tiny_atlas, tiny_model_dir, corpus_dir, tmp_path):
    """Issue 32: the labels of a feature depend on nothing but the atlas and the settings; not on
    torch's threads, the features it shares a shard with, or the process that labels it."""
    import hashlib

    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import torch
    from featureatlas.ingest.pipeline import STAGES, Ingest
    from threadpoolctl import threadpool_limits

    labels = next(s for s in STAGES if s.name == "labels")
    cfg = tiny_config(tiny_atlas, tiny_model_dir, corpus_dir)
    ctx = Ingest.open(cfg)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):  # torch's (the embedder) and the BLAS's numpy calls (the scorers)
            torch.set_num_threads(threads)
            with threadpool_limits(threads, user_api="blas"):
                labels.run_shard(ctx, _folder(tmp_path / f"threads-{threads}"), 0)
    finally:
        torch.set_num_threads(before)
    runner = RayShards(lambda: Ingest.open(cfg), workers=1)
    try:
        list(runner(labels, None, _folder(tmp_path / "ray"), [0]))
    finally:
        runner.close()
    files = ("labels-00000.parquet", "candidates-00000.parquet")
    digests = {run: [hashlib.sha256((tmp_path / run / f).read_bytes()).hexdigest() for f in files]
               for run in ("threads-1", "threads-2", "ray")}
    assert digests["threads-1"] == digests["threads-2"] == digests["ray"]

    # Half the shard: its features' rows are those of the whole shard, every column.
    half = Ingest.open(tiny_config(tiny_atlas, tiny_model_dir, corpus_dir, label_shard_features=16))
    labels.run_shard(half, _folder(tmp_path / "half"), 0)
    for f in files:
        whole = pq.read_table(tmp_path / "threads-1" / f)
        assert pq.read_table(tmp_path / "half" / f).equals(whole.filter(pc.less(whole["feature_id"], 16)))


def _folder(path: Path) -> Path:
    path.mkdir()
    return path
