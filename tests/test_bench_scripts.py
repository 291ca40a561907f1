"""The search and browser benchmarks run end to end at a tiny size: their synthetic atlases must
open like built ones (they stopped opening once atlases had to hold their dictionary, and nothing
noticed until a million-feature run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FEATURES = 300


def run(script: str, *args: str, out: Path) -> dict:
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--out", str(out), *args],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_bench_search_builds_serves_and_measures_a_synthetic_atlas(tmp_path):
    result = run("bench_search.py", "--sizes", str(FEATURES), "--requests", "30", "--workdir", str(tmp_path),
                 out=tmp_path / "search.json")[str(FEATURES)]
    assert result["recall_at_10"] == 1.0  # exact search at this size
    assert result["neighbors_p50_ms"] > 0 and result["search_p50_ms"] > 0
    # The atlas is kept in the workdir and reused by a second run.
    assert (tmp_path / f"atlas-{FEATURES}" / "manifest.json").is_file()


def test_bench_ui_draws_a_synthetic_map(tmp_path):
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("no /usr/bin/chromium (scripts/setup installs it where it runs as root)")
    pytest.importorskip("playwright.sync_api")
    result = run("bench_ui.py", "--page-features", "0", "--map-features", str(FEATURES), "--maps", "2",
                 "--workdir", str(tmp_path), out=tmp_path / "ui.json")["map"][str(FEATURES)]
    assert result["levels"] == 1 and result["runs"] == 2
    assert result["first_ms"] > 0 and result["frame_p50_ms"] > 0


def test_bench_ray_builds_both_ways_and_finds_them_identical(tmp_path, tiny_model_dir, corpus_dir):
    pytest.importorskip("ray")
    from .conftest import tiny_config

    cfg = tiny_config(tmp_path / "unused", tiny_model_dir, corpus_dir)
    settings = {k: v for group in cfg.to_dict().values() for k, v in group.items()
                if v is not None and k not in ("atlas", "model_cache", "ray")}
    toml = tmp_path / "tiny.toml"
    toml.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items()))  # JSON scalars and lists are TOML
    result = run("bench_ray.py", "--workdir", str(tmp_path / "work"), "--model-cache", cfg.model.model_cache,
                 "--", "--config", str(toml), out=tmp_path / "ray.json")
    assert result["identical"] is True and result["overhead"] > 0
    assert result["ray"]["shards"]["labels"] == {"shards": 2, "mean_shard_s": result["ray"]["shards"]["labels"]["mean_shard_s"],
                                                 "features": 64}


def test_bench_widths_trains_a_family_three_ways_on_a_built_atlas(tmp_path, tiny_atlas):
    report = run("bench_widths.py", "--atlas", str(tiny_atlas), "--widths", "16", "64", "--k", "4", "--tokens", "2048",
                 "--batch", "256", out=tmp_path / "widths.json")
    assert set(report["runs"]) == {"widest", "together", "matryoshka"}
    assert set(report["runs"]["together"]["fvu"]) == set(report["runs"]["matryoshka"]["fvu"]) == {"16", "64"}
    assert report["runs"]["widest"]["over_widest_alone"] == 1.0
