"""``featureatlas export``: Parquet of every table read back equal, the dictionary in SAELens's layout
loaded by SAELens itself, and the command's errors. (Neuronpedia's format: tests/test_neuronpedia.py.)"""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch
from featureatlas.api.cli import main
from featureatlas.ingest.sae import SAE
from featureatlas.store.atlas import Atlas
from featureatlas.store.export import DUCKDB_ONLY, LANCE_TABLES, export


def test_parquet_reads_back_equal_to_every_table(tiny_atlas, tmp_path, monkeypatch):
    import featureatlas.store.export as E

    monkeypatch.setattr(E, "BATCH_ROWS", 7)  # many batches per file: the stream's seams are checked too
    atlas = Atlas(tiny_atlas)
    written = export(atlas, "parquet", tmp_path)
    assert sorted(p.name for p in written) == sorted([f"{t}.parquet" for t in LANCE_TABLES + DUCKDB_ONLY] + ["manifest.json"])
    for name in LANCE_TABLES:  # whole rows, vectors and embeddings included, in row order
        table = getattr(atlas, name).to_arrow()
        assert pq.read_table(tmp_path / f"{name}.parquet").equals(table), name
    con = atlas.batch_connection()
    for name in DUCKDB_ONLY:
        table = con.sql(f"select * from {name}").to_arrow_table()
        # a TopK dictionary has no families: that table comes back empty, with its columns
        assert (table.num_rows > 0 or name == "families") and pq.read_table(tmp_path / f"{name}.parquet").equals(table), name
    assert (tmp_path / "manifest.json").read_text() == (tiny_atlas / "manifest.json").read_text()
    assert not list(tmp_path.glob("*.tmp"))


def test_the_saelens_export_is_the_dictionary_saelens_loads(tiny_atlas, tmp_path, capsys):
    assert main(["export", "--format", "saelens", "--atlas", str(tiny_atlas)]) == 0  # without --out: where it is
    assert str((tiny_atlas / "dictionary").absolute()) in capsys.readouterr().out
    assert main(["export", "--format", "saelens", "--atlas", str(tiny_atlas), "--out", str(tmp_path / "sae")]) == 0
    ours = SAE.load(tmp_path / "sae")
    x = torch.randn(32, ours.d_in, generator=torch.Generator().manual_seed(0)) * 3
    sae_lens = pytest.importorskip("sae_lens")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "sae"), device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), ours.activations(x), rtol=1e-5, atol=1e-5)


def test_the_neuronpedia_export_from_the_command_line(tiny_atlas, tmp_path, capsys):
    assert main(["export", "--format", "neuronpedia", "--atlas", str(tiny_atlas), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed and all(line.startswith("wrote ") for line in printed)
    (source,) = {p.parent for p in tmp_path.glob("*/*/source.jsonl")}
    assert {p.name for p in source.iterdir()} >= {"model.jsonl", "sourceset.jsonl", "source.jsonl", "features", "activations"}


@pytest.mark.parametrize("args, flag", [
    (["--format", "parquet"], "--out"),
    (["--format", "parquet", "--out", "{atlas}/exported"], "--out"),
])
def test_export_errors_exit_2_and_write_nothing(tiny_atlas, capsys, args, flag):
    before = sorted(p.name for p in tiny_atlas.iterdir())
    assert main(["export", "--atlas", str(tiny_atlas), *(a.format(atlas=tiny_atlas) for a in args)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"featureatlas: error: {flag}")
    assert sorted(p.name for p in tiny_atlas.iterdir()) == before
