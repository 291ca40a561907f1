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
