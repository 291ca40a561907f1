import pytest
from featureatlas.api.cli import main


@pytest.fixture
def base(tmp_path, tiny_model_dir, corpus_dir):
    atlas = tmp_path / "atlas"
    return atlas, ["ingest", "--atlas", str(atlas), "--model", str(tiny_model_dir), "--corpus", str(corpus_dir),
                   "--tokens", "3000", "--eval-fraction", "0.3", "--d-sae", "32", "--k", "4", "--train-tokens", "5000"]


@pytest.mark.parametrize(
    "extra, flag",
    [
        (["--corpus", "{tmp}/missing.txt"], "--corpus"),
        (["--corpus", "{tmp}/empty.txt"], "--corpus"),
        (["--model", "{tmp}/no-model"], "--model"),
        (["--layer", "99"], "--layer"),
        (["--d-sae", "0"], "--d-sae"),
        (["--k", "64"], "--k"),
        (["--device", "cuda"], "--device"),
        (["--architecture", "gated"], "--architecture"),
        (["--architecture", "relu", "--sparsity-coef", "-1"], "--sparsity-coef"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(base, tmp_path, capsys, extra, flag, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "empty.txt").write_text("")
    atlas, args = base
    code = main(args + [e.format(tmp=tmp_path) for e in extra])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("featureatlas: error: " + flag)
    assert not atlas.exists()


def test_ingest_then_info(base, capsys):
    atlas, args = base
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "variance_explained=" in out
    assert main(["info", "--atlas", str(atlas)]) == 0
    assert "held-out metrics" in capsys.readouterr().out


def test_info_on_a_missing_atlas(tmp_path, capsys):
    assert main(["info", "--atlas", str(tmp_path / "none")]) == 2
    assert "--atlas" in capsys.readouterr().err


def test_query_commands_print_tables_and_json(tiny_atlas, capsys):
    import json

    assert main(["sql", "select count(*) as n from features", "--atlas", str(tiny_atlas), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == [[64]]
    assert main(["search", "bridge", "-k", "3", "--atlas", str(tiny_atlas)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(("Found features about 'bridge'", "No feature in this atlas is clearly about 'bridge'"))
    assert out[1].split()[:3] == ["feature", "evidence", "density"] and 2 < len(out) <= 6
    assert main(["neighbors", "1", "-k", "4", "--atlas", str(tiny_atlas), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["neighbors"]) == 4
    assert main(["probe", "the bridge", "--atlas", str(tiny_atlas), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"]
    live = main(["sql", "select feature_id from features where max_activation > 0 limit 1", "--atlas", str(tiny_atlas),
                 "--json"]) == 0 and json.loads(capsys.readouterr().out)["rows"][0][0]
    assert main(["steer", "The bridge", "--feature", f"{live}=3", "--max-new-tokens", "4", "--atlas", str(tiny_atlas)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[2:5]] == ["default", "steered", f"#{live}"]
    assert main(["steer", "The bridge", "--feature", f"{live}=-1", "--mode", "add", "--max-new-tokens", "4",
                 "--atlas", str(tiny_atlas), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["features"][0]["mode"] == "add"


@pytest.mark.parametrize(
    "args, flag",
    [
        (["sql", "drop table features"], "sql"),
        (["neighbors", "100000"], "feature_id"),
        (["search", "x", "-k", "0"], "k"),
        (["steer", "x", "--feature", "3"], "--feature"),
        (["steer", "x", "--feature", "3=big"], "--feature"),
        (["steer", "x", "--feature", "3=1", "--max-new-tokens", "999"], "max_new_tokens"),
        (["serve", "--follow-every", "0"], "--follow-every"),
        (["serve", "--follow-every", "-1"], "--follow-every"),
        (["serve", "--follow-every", "nan"], "--follow-every"),
        (["serve", "--follow-every", "inf"], "--follow-every"),
    ],
)
def test_query_command_errors_exit_2(tiny_atlas, capsys, args, flag):
    assert main(args + ["--atlas", str(tiny_atlas)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"featureatlas: error: {flag}")


def test_an_atlas_from_before_corpus_windows_is_refused_with_what_to_do(tiny_atlas, tmp_path, capsys):
    import json
    import shutil

    root = tmp_path / "old"
    shutil.copytree(tiny_atlas, root, symlinks=True)
    manifest = json.loads((root / "manifest.json").read_text())
    del manifest["published"]["lance"]["windows"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(root / "lance" / "windows.lance")  # through the link to the current parts
    assert main(["search", "bridge", "--atlas", str(root)]) == 2
    err = capsys.readouterr().err
    assert "--atlas" in err and "re-run `featureatlas ingest`" in err


def test_sweep_fits_a_power_law_and_draws_it(tiny_atlas, tmp_path, capsys):
    import json

    out = tmp_path / "sweep"
    assert main(["sweep", "--atlas", str(tiny_atlas), "--features", "8", "16", "32", "--tokens", "2048", "8192",
                 "--k", "2", "--batch", "256", "--out", str(out)]) == 0
    result = json.loads((out / "sweep.json").read_text())
    assert len(result["runs"]) == 6 and len(result["frontier"]) >= 2
    computes = [r["compute"] for r in result["frontier"]]
    fvus = [r["fvu"] for r in result["frontier"]]
    assert computes == sorted(computes) and fvus == sorted(fvus, reverse=True)
    assert result["fvu_vs_compute"]["exponent"] < 0  # more compute, lower FVU
    assert result["optimal_features"] > 0 and result["optimal_tokens"] > 0
    for png in ("sweep_fvu_vs_compute.png", "sweep_features_vs_tokens.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "frontier: FVU =" in capsys.readouterr().out
