import json
from dataclasses import dataclass

import pytest
from featureatlas.ingest.config import AtlasConfig
from featureatlas.ingest.stages import Stage, Stages, shard_records


@dataclass
class Ctx:
    fail_at: int | None
    ran: list


def _shard(ctx: Ctx, folder, i: int) -> dict:
    if i == ctx.fail_at:
        raise KeyboardInterrupt("killed")
    ctx.ran.append(i)
    (folder / f"part-{i}.txt").write_text(str(i * i))
    return {"value": i * i}


def _merge(ctx: Ctx, folder) -> dict:
    total = sum(r["value"] for r in shard_records(folder))
    (folder / "total.json").write_text(json.dumps(total))
    return {"total": total}


SQUARES = Stage("squares", 1, ("train",), (), ("total.json",), _merge, shards=lambda ctx: 4, run_shard=_shard)


def test_a_killed_sharded_stage_redoes_only_its_missing_shards(tmp_path):
    cfg = AtlasConfig()
    with pytest.raises(KeyboardInterrupt):
        Stages(tmp_path, cfg).ensure(SQUARES, Ctx(fail_at=2, ran=[]))
    again = Ctx(fail_at=None, ran=[])
    stages = Stages(tmp_path, cfg)
    assert stages.ensure(SQUARES, again)["total"] == 0 + 1 + 4 + 9
    assert again.ran == [2, 3] and stages.record["squares"]["status"] == "done"
    # Finished: reused whole, no shard runs.
    third = Ctx(fail_at=0, ran=[])
    assert Stages(tmp_path, cfg).ensure(SQUARES, third)["total"] == 14 and third.ran == []
    # Another key (a changed setting of a group it reads) starts over, shards and all.
    fresh = Ctx(fail_at=None, ran=[])
    assert Stages(tmp_path, cfg.replace(d_sae=8)).ensure(SQUARES, fresh)["total"] == 14 and fresh.ran == [0, 1, 2, 3]


def test_a_stage_that_leaves_out_a_declared_output_fails(tmp_path):
    broken = Stage("broken", 1, (), (), ("missing.parquet",), lambda ctx, folder: {})
    with pytest.raises(RuntimeError, match="missing.parquet"):
        Stages(tmp_path, AtlasConfig()).ensure(broken, None)
