"""The Neuronpedia export (``store.neuronpedia``): every column Neuronpedia's importer reads, with
the JSON type its database declares; the atlas read back whole; bounded, complete batches."""

from __future__ import annotations

import gzip
import json
from collections import defaultdict
from pathlib import Path

import pytest
from featureatlas.store import neuronpedia as NP
from featureatlas.store.atlas import Atlas
from featureatlas.store.errors import BadParameter

NUM = (int, float)


class Null:
    """A nullable column: None or ``spec``."""

    def __init__(self, spec):
        self.spec = spec


def matches(value, spec) -> bool:
    if isinstance(spec, Null):
        return value is None or matches(value, spec.spec)
    if isinstance(spec, list):  # a Postgres array: a JSON array of spec[0]
        return isinstance(value, list) and all(matches(v, spec[0]) for v in value)
    if spec is NUM or spec is int:
        return isinstance(value, spec) and not isinstance(value, bool)
    return isinstance(value, spec)


# The columns of each table as hijohnnylin/neuronpedia apps/webapp/prisma/schema.prisma declares them
# (String -> str, Float -> number, Int -> int, X[] -> array, X? -> nullable), restricted to those
# utils/neuronpedia-utils/neuronpedia_utils/export-data.py exports and the SAEDashboard converter
# (convert-saedashboard-to-neuronpedia-export.py, db_models/) fills. The importer
# (apps/webapp/lib/db/import.ts) inserts each line with jsonb_to_recordset under these names.
NEURON = {
    "modelId": str, "layer": str, "index": str, "sourceSetName": Null(str), "creatorId": Null(str),
    "maxActApprox": Null(NUM), "frac_nonzero": NUM,
    "freq_hist_data_bar_heights": [NUM], "freq_hist_data_bar_values": [NUM],
    "logits_hist_data_bar_heights": [NUM], "logits_hist_data_bar_values": [NUM],
    "neg_str": [str], "neg_values": [NUM], "pos_str": [str], "pos_values": [NUM],
    "neuron_alignment_indices": [int], "neuron_alignment_values": [NUM], "neuron_alignment_l1": [NUM],
    "correlated_neurons_indices": [int], "correlated_neurons_pearson": [NUM], "correlated_neurons_l1": [NUM],
    "correlated_features_indices": [int], "correlated_features_pearson": [NUM], "correlated_features_l1": [NUM],
    "decoder_weights_dist": [NUM], "topkCosSimIndices": [int], "topkCosSimValues": [NUM],
    "hasVector": bool, "vector": [NUM], "vectorLabel": Null(str), "vectorDefaultSteerStrength": Null(NUM),
    "hookName": Null(str), "umap_x": Null(NUM), "umap_y": Null(NUM),
}
ACTIVATION = {
    "id": str, "modelId": str, "layer": str, "index": str, "creatorId": str, "tokens": [str], "values": [NUM],
    "maxValue": NUM, "minValue": NUM, "maxValueTokenIndex": int, "qualifyingTokenIndex": Null(int),
    "binMin": Null(NUM), "binMax": Null(NUM), "binContains": Null(NUM), "dataIndex": Null(str), "dataSource": Null(str),
    "dfaValues": [NUM], "dfaTargetIndex": Null(int), "dfaMaxValue": Null(NUM),
}
EXPLANATION = {
    "id": str, "modelId": str, "layer": str, "index": str, "authorId": str, "description": str,
    "typeName": Null(str), "explanationModelName": Null(str), "notes": Null(str),
}
# The metadata rows the importer passes to prisma.*.create: their required fields (no default in
# schema.prisma), which must be there, and the optional ones we fill.
MODEL = {"id": str, "creatorId": str, "layers": int, "neuronsPerLayer": int, "owner": str,
         "displayName": str, "displayNameShort": str, "dimension": Null(int)}
SOURCESET = {"modelId": str, "name": str, "description": str, "creatorName": str, "creatorId": str, "urls": [str]}
SOURCE = {"id": str, "modelId": str, "setName": str, "creatorId": str, "num_prompts": Null(int),
          "num_tokens_in_prompt": Null(int), "dataset": Null(str), "saelensConfig": dict}


def folder_of(paths: list[Path]) -> Path:
    return next(p for p in paths if p.name == "model.jsonl").parent


def gz_lines(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def atlas(tiny_atlas) -> Atlas:
    return Atlas(tiny_atlas)


@pytest.fixture(scope="module")
def written(atlas, tmp_path_factory) -> list[Path]:
    return NP.write_neuronpedia(atlas, tmp_path_factory.mktemp("np"), batch_size=20)


@pytest.fixture(scope="module")
def export(written) -> NP.NeuronpediaExport:
    return NP.read_neuronpedia(folder_of(written))


def test_every_column_the_importer_reads_has_its_type(written, export):
    for rows, spec in ((export.features, NEURON), (export.activations, ACTIVATION), (export.explanations, EXPLANATION)):
        assert rows
        for row in rows:
            assert set(row) == set(spec)  # a misspelt column would be dropped silently by the importer
            bad = {k: row[k] for k, s in spec.items() if not matches(row[k], s)}
            assert not bad, bad
    for row, spec in ((export.model, MODEL), (export.sourceset, SOURCESET), (export.source, SOURCE)):
        bad = {k: row.get(k, "<missing>") for k, s in spec.items() if k not in row or not matches(row[k], s)}
        assert not bad, bad
    # the importer takes the columns from a file's first line: every line of a file has the same keys
    for path in written:
        if path.name.endswith(".jsonl.gz"):
            lines = gz_lines(path)
            assert lines and all(line.keys() == lines[0].keys() for line in lines), path


def test_rows_reference_their_model_and_source(atlas, written, export):
    model, source = export.model["id"], export.source["id"]
    assert folder_of(written).parts[-2:] == (model, source)
    assert source.split("-", 1) == [str(atlas.manifest["hook"]["layer"]), export.sourceset["name"]]
    assert export.source["setName"] == export.sourceset["name"] and export.sourceset["modelId"] == model
    for row in (*export.features, *export.activations, *export.explanations):
        assert (row["modelId"], row["layer"]) == (model, source)
    assert {f["sourceSetName"] for f in export.features} == {export.sourceset["name"]}
    assert export.source["saelensConfig"]["d_sae"] == atlas.d_sae
    ids = [r["id"] for r in (*export.activations, *export.explanations)]
    assert len(set(ids)) == len(ids)


def test_features_read_back_equal_the_atlas(atlas, export):
    columns = ["feature_id", "density", "max_activation", "histogram", "logit_positive", "logit_negative", "map_x"]
    rows = {r["feature_id"]: r for r in atlas.features.search().select(columns).limit(atlas.d_sae).to_list()}
    assert sorted(int(f["index"]) for f in export.features) == sorted(rows)
    for f in export.features:
        r = rows[int(f["index"])]
        assert f["frac_nonzero"] == r["density"] and f["maxActApprox"] == r["max_activation"]
        assert f["freq_hist_data_bar_heights"] == r["histogram"]
        n, top = len(r["histogram"]), r["max_activation"]
        assert f["freq_hist_data_bar_values"] == pytest.approx([(i + 0.5) * top / n for i in range(n)])
        assert list(zip(f["pos_str"], f["pos_values"])) == [(t["token"], t["value"]) for t in r["logit_positive"]]
        assert list(zip(f["neg_str"], f["neg_values"])) == [(t["token"], t["value"]) for t in r["logit_negative"]]
        assert f["umap_x"] == pytest.approx(r["map_x"])


def test_labels_read_back_as_explanations(atlas, export):
    rows = atlas.features.search().select(["feature_id", "label", "label_source"]).limit(atlas.d_sae).to_list()
    labelled = {str(r["feature_id"]): r["label"] for r in rows if r["label"] and r["label_source"] != "none"}
    assert labelled
    assert {e["index"]: e["description"] for e in export.explanations} == labelled
    assert len(export.explanations) == len(labelled)
    source = {str(r["feature_id"]): r["label_source"] for r in rows}
    assert all(source[e["index"]] in e["notes"] for e in export.explanations)


def test_examples_read_back_as_activations(atlas, export):
    want: dict[str, list] = defaultdict(list)
    for ex in atlas.examples.search().limit(atlas.examples.count_rows()).to_list():
        want[str(ex["feature_id"])].append((ex["kind"] == "top", str(ex["doc_id"]), ex["tokens"], ex["activations"]))
    got: dict[str, list] = defaultdict(list)
    top_bin = {f["index"]: f["maxActApprox"] for f in export.features}
    for a in export.activations:
        top = a["binMin"] == -1
        assert (a["binMax"] == top_bin[a["index"]]) if top else (a["binMax"] is None)
        assert a["values"][a["qualifyingTokenIndex"]] == a["maxValue"] == max(a["values"])
        assert a["values"][a["maxValueTokenIndex"]] == a["maxValue"] and a["minValue"] == min(a["values"])
        got[a["index"]].append((top, a["dataIndex"], a["tokens"], a["values"]))
    assert sum(map(len, want.values())) == len(export.activations) > 0
    assert {k: sorted(v) for k, v in got.items()} == {k: sorted(v) for k, v in want.items()}


def test_batches_hold_each_feature_once_in_its_range(atlas, written):
    batches = defaultdict(dict)
    for path in written:
        if path.name.endswith(".jsonl.gz"):
            batches[path.parent.name][int(path.name.split("-")[1].split(".")[0])] = gz_lines(path)
    n_batches = -(-atlas.d_sae // 20)
    assert n_batches > 1 and sorted(batches["features"]) == list(range(n_batches))
    seen = []
    for part, files in batches.items():
        for n, lines in files.items():
            indexes = {int(line["index"]) for line in lines}
            assert indexes <= set(range(20 * n, 20 * (n + 1))), (part, n)
            if part == "features":
                assert len(lines) == len(indexes) == min(20, atlas.d_sae - 20 * n)
                seen += indexes
    assert sorted(seen) == list(range(atlas.d_sae))


def test_streaming_and_reexport_give_the_same_files(atlas, export, written, tmp_path, monkeypatch):
    """Example rows read a few at a time give the same export (ids included), and a re-export with
    bigger batches into the same folder leaves no batch of the earlier one behind."""
    before = {p: p.stat().st_mtime_ns for p in atlas.root.rglob("*") if p.is_file()}
    monkeypatch.setattr(NP, "READ_ROWS", 7)
    out = tmp_path / "np"
    NP.write_neuronpedia(atlas, out, batch_size=20)
    again = NP.write_neuronpedia(atlas, out, batch_size=1000)
    assert sorted(p.name for p in folder_of(again).rglob("batch-*")) == ["batch-0.jsonl.gz"] * 3
    assert NP.read_neuronpedia(folder_of(again)) == export
    assert {p: p.stat().st_mtime_ns for p in atlas.root.rglob("*") if p.is_file()} == before  # the atlas is untouched


def test_ids_are_derived_and_checked(atlas, tmp_path):
    manifest = {"model": {"name": "/models/SmolLM2-135M-Instruct/"}, "hook": {"layer": 15}, "dictionary": {"d_sae": 16384}}
    assert NP.default_ids(manifest) == ("smollm2-135m-instruct", "15-featureatlas-res-16k")
    paths = NP.write_neuronpedia(atlas, tmp_path, model_id="tiny", source_id="2-res-mine", batch_size=1000)
    assert folder_of(paths) == tmp_path / "tiny" / "2-res-mine"
    for bad in ({"model_id": "Tiny Llama"}, {"source_id": "res-mine"}, {"batch_size": 0}):
        with pytest.raises(BadParameter):
            NP.write_neuronpedia(atlas, tmp_path, **bad)


def test_an_empty_part_writes_no_file(tmp_path):
    """The importer takes a file's columns from its first line, so an empty batch file (a range of
    silent or unlabelled features) would fail the whole import: none is written."""
    assert NP._write_jsonl(tmp_path / "explanations" / "batch-0.jsonl.gz", iter([])) is None
    assert not (tmp_path / "explanations").exists()
