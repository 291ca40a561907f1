"""scripts/gpu_check as the GPU machine runs it: from a copy of the working tree, with our code
imported from that copy (not from the installed package), at tiny sizes on the CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
D_IN = 576
WIDTHS = (256, 1024)
TOO_WIDE = 1_000_000_000  # its memory estimate exceeds any machine: skipped before anything is allocated
ENCODE_WIDTH = 1024


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, dict]:
    """A partial checkout elsewhere (what pyproject maps, and the script), run in isolated mode (-I: no
    PYTHONPATH, no script folder on sys.path), so an import from /work/main's editable install would show."""
    tree = tmp_path_factory.mktemp("checkout")
    ignore = shutil.ignore_patterns("__pycache__", "web")
    for folder in ("ingest", "store", "api/toplevel"):
        shutil.copytree(ROOT / folder, tree / folder, ignore=ignore)
    for file in ("pyproject.toml", "api/__init__.py", "scripts/gpu_check"):
        (tree / file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / file, tree / file)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    args = ["--device", "cpu", "--widths", *map(str, WIDTHS), str(TOO_WIDE), "--seconds-per-test", "0.2", "--batch", "256",
            "--harvest-layers", "2", "--harvest-batches", "2", "--encode-width", str(ENCODE_WIDTH), "--encode-batch", "512",
            "--out", "check.json"]
    proc = subprocess.run([sys.executable, "-I", "scripts/gpu_check", *args], cwd=tree, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tree, proc, json.loads((tree / "check.json").read_text())


def test_imports_our_code_from_the_checkout_it_sits_in(run):
    tree, _, report = run
    assert set(report["imported_from"]) >= {"featureatlas.ingest.sae", "featureatlas.ingest.train"}
    for path in report["imported_from"].values():
        assert Path(path).resolve().is_relative_to(tree.resolve()), path
    assert report["package_dirs"]["featureatlas.ingest"] == str(tree / "ingest")


def test_report_has_the_device_and_its_matmul_limit(run):
    _, _, report = run
    assert report["device"].startswith("cpu") and report["torch"]
    assert report["compute_dtype"] == "float32"  # fp32 on a CPU, where bf16 is slower
    assert 0 < report["matmul_limit_tflops"] < 100
    assert report["flops_per_token"] == {"train": "6*d*F", "encode": "2*d*F", "harvest": "2*P + 2*(L+1)*d_model*(ctx+1)"}


def _measured(m: dict) -> None:
    assert m["skipped"] is None, m
    assert m["tokens_per_s"] > 0 and m["limit_tokens_per_s"] > 0 and m["steps"] >= 2
    assert m["fraction_of_limit"] == pytest.approx(m["tokens_per_s"] / m["limit_tokens_per_s"])
    assert 0 < m["fraction_of_limit"] <= 1.5


def test_every_measurement_is_timed_against_the_limit(run):
    _, _, report = run
    by_name: dict[str, list[dict]] = {}
    for m in report["measurements"]:
        assert {"name", "width", "tokens_per_s", "limit_tokens_per_s", "fraction_of_limit", "skipped"} <= set(m)
        by_name.setdefault(m["name"], []).append(m)
    (harvest,) = by_name["harvest (layer 1 of 2)"]
    _measured(harvest)
    assert harvest["flops_per_token"] > 2 * 2 * D_IN * D_IN  # at least the two blocks' attention projections
    ours = {m["width"]: m for m in by_name["train ours"]}
    for width in WIDTHS:
        _measured(ours[width])
        assert ours[width]["flops_per_token"] == 6 * D_IN * width
    (encode,) = by_name["encode fp32 (as the ingest)"]
    _measured(encode)
    assert encode["flops_per_token"] == 2 * D_IN * ENCODE_WIDTH
    assert "encode bf16 autocast" not in by_name  # only where bf16 is the compute dtype


def test_too_wide_is_skipped_with_its_reason_not_a_crash(run):
    _, _, report = run
    wide = [m for m in report["measurements"] if m["width"] == TOO_WIDE]
    assert {m["name"] for m in wide} == {"train ours", "train SAELens"}
    for m in wide:
        assert m["tokens_per_s"] is None and m["skipped"].startswith("needs about"), m


def test_saelens_is_compared_or_says_why_not(run):
    _, _, report = run
    ours = {m["width"]: m for m in report["measurements"] if m["name"] == "train ours"}
    theirs = {m["width"]: m for m in report["measurements"] if m["name"] == "train SAELens"}
    for width in WIDTHS:
        if importlib.util.find_spec("sae_lens") is None:
            assert ours[width]["saelens"] == {"skipped": "sae_lens is not installed here"}
            continue
        _measured(theirs[width])
        summary = ours[width]["saelens"]
        assert summary["tokens_per_s"] == theirs[width]["tokens_per_s"]
        assert summary["ours_speedup"] == pytest.approx(ours[width]["tokens_per_s"] / theirs[width]["tokens_per_s"])


def test_prints_the_table(run):
    _, proc, _ = run
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("measurement"))
    assert "tokens/s" in lines[header] and "of limit" in lines[header]
    rows = lines[header + 1 :]
    assert any(r.startswith("harvest") for r in rows) and any(r.startswith("encode fp32") for r in rows)
    assert sum(r.startswith("train ours") for r in rows) == len(WIDTHS) + 1
    assert any("skipped: needs about" in r for r in rows)
    assert "matmul limit" in proc.stdout and "6*d*F" in proc.stdout and "wrote check.json" in proc.stdout
