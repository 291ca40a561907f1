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
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args, "--out", str(out)],
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
