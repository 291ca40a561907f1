"""An atlas as a Neuronpedia dataset: the folder Neuronpedia's importer loads into its database.

The format is the one Neuronpedia itself reads, not a look-alike:

- hijohnnylin/neuronpedia ``apps/webapp/app/api/admin/import/route.ts`` imports
  ``<modelId>/<sourceId>/`` from its datasets bucket: ``model.jsonl``, ``sourceset.jsonl`` and
  ``source.jsonl`` (one Prisma row each, plain JSONL), then every ``features/*.jsonl.gz``,
  ``activations/*.jsonl.gz`` and ``explanations/*.jsonl.gz`` (gzipped JSONL, one database row a line).
- ``apps/webapp/lib/db/import.ts`` (``importJsonlString``) inserts those lines with Postgres'
  ``jsonb_to_recordset``, taking the *first line's keys* as the columns: so every line of a file has
  the same keys, named as the columns of ``Neuron``, ``Activation`` and ``Explanation`` in
  ``apps/webapp/prisma/schema.prisma``, and an empty file would fail (none is written).
- ``utils/neuronpedia-utils/neuronpedia_utils/export-data.py`` writes the same layout from a live
  database (``batch-<n>.jsonl.gz``, 1,024 features a batch); ``convert-saedashboard-to-neuronpedia-export.py``
  and its ``db_models/`` (read at zazer0/neuronpedia, a fork) turn SAEDashboard's ``batch-<n>.json``
  (jbloomAus/SAEDashboard ``sae_dashboard/neuronpedia/neuronpedia_dashboard.py``) into it. Fields we
  cannot compute get the value that converter writes for them.

Layout under ``out``: ``<model_id>/<source_id>/`` as above, ready to copy to the ``v1/`` prefix a
Neuronpedia instance imports from. A stack of dictionaries trained apart (``--widths``) is a source
per dictionary, as Neuronpedia keeps Gemma Scope's widths ("20-gemmascope-res-16k", "...-65k"), each
feature indexed within its own dictionary. Written in feature ranges of ``batch_size``, so memory stays
bounded however many features the atlas has.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import math
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from .atlas import Atlas
from .dictionaries import saelens_cfg, stacked_parts, width_name
from .errors import BadParameter

# Features per batch file, as Neuronpedia's own exporter writes them (export-data.py).
BATCH_FEATURES = 1024
# Example rows read from LanceDB per Arrow batch while a feature range streams out.
READ_ROWS = 4096
# The "bot" user Neuronpedia's seed creates (apps/webapp/prisma/seed.ts) and its webapp's default
# DEFAULT_CREATOR_USER_ID (apps/webapp/lib/env.ts): Activation.creatorId and Explanation.authorId are
# foreign keys, so rows must name a user that exists on the importing instance.
BOT_USER_ID = "clkht01d40000jv08hvalcvly"
# Model.id's rule (the zod comment in schema.prisma), lowercased as Neuronpedia stores it; a source id
# is "<layer>-<source set>", the layer first (Neuronpedia parses it back out of the id).
MODEL_ID = re.compile(r"^[a-z0-9_-]{1,128}$")
SOURCE_ID = re.compile(r"^[0-9]+-[a-z0-9][a-z0-9_.-]*$")
# Every SAE of ours reads the residual stream ("res" in Neuronpedia's set names, as in "res-jb").
SET_PREFIX = "featureatlas-res"
FEATURE_COLUMNS = ["feature_id", "label", "label_source", "label_score", "density", "max_activation", "histogram",
                   "logit_positive", "logit_negative"]
MAP_COLUMNS = ["map_x", "map_y"]  # atlases published before feature maps lack them
EXAMPLE_COLUMNS = ["feature_id", "kind", "doc_id", "start", "tokens", "activations", "max_position"]
PARTS = ("features", "activations", "explanations")


class NeuronpediaExport(NamedTuple):
    """A Neuronpedia dataset folder read back: its rows as Neuronpedia's importer would insert them."""

    model: dict[str, Any]
    """The ``Model`` row."""
    sourceset: dict[str, Any]
    """The ``SourceSet`` row."""
    source: dict[str, Any]
    """The ``Source`` row."""
    features: list[dict[str, Any]]
    """``Neuron`` rows, batch files in order."""
    activations: list[dict[str, Any]]
    """``Activation`` rows: our top and quantile examples."""
    explanations: list[dict[str, Any]]
    """``Explanation`` rows: our labels."""


def write_neuronpedia(atlas: Atlas, out: Path, *, model_id: str | None = None, source_id: str | None = None,
                      batch_size: int = BATCH_FEATURES, creator_id: str = BOT_USER_ID) -> list[Path]:
    """Write ``atlas`` as the Neuronpedia dataset ``out/<model_id>/<source_id>/`` (a stack: a source
    per dictionary); returns the files written. ``model_id`` and ``source_id`` default to names
    derived from the manifest (``default_ids``). A re-export replaces the previous one's batch files."""
    if batch_size < 1:
        raise BadParameter("batch_size", f"must be at least 1, got {batch_size}")
    cfg = saelens_cfg(atlas)
    parts = stacked_parts(cfg)
    if parts and source_id is not None:
        raise BadParameter("source_id", "this atlas holds a stack of dictionaries, exported as a source each, "
                                        "named by width: leave source_id out")
    written = []
    for features, saelens in parts or [(range(atlas.d_sae), cfg)]:
        ids = _checked_ids(atlas.manifest, model_id, source_id, len(features))
        written += _write_source(atlas, Path(out), ids, features, saelens, batch_size, creator_id)
    return written


def _write_source(atlas: Atlas, out: Path, ids: dict[str, str], features: range, saelens: dict[str, Any],
                  batch_size: int, creator_id: str) -> list[Path]:
    """One Neuronpedia source: the features ``features`` of the atlas, indexed from 0."""
    folder = out / ids["modelId"] / ids["layer"]
    for part in PARTS:  # a smaller re-export must not leave the previous one's extra batches to be imported
        for stale in (folder / part).glob("batch-*.jsonl.gz"):
            stale.unlink()
    written = [_write_jsonl(folder / name, [row], gz=False)
               for name, row in _metadata(atlas, ids, creator_id, len(features), saelens).items()]
    set_name = ids["layer"].split("-", 1)[1]
    columns = FEATURE_COLUMNS + [c for c in MAP_COLUMNS if c in atlas.features.schema.names]
    first = features.start
    for n, lo in enumerate(range(features.start, features.stop, batch_size)):
        hi = min(lo + batch_size, features.stop)
        where = f"feature_id >= {lo} and feature_id < {hi}"
        rows = atlas.features.search().where(where).select(columns).limit(hi - lo).to_list()
        rows.sort(key=lambda r: r["feature_id"])
        name = f"batch-{n}.jsonl.gz"
        parts = {
            "features": (_neuron(r, ids, set_name, creator_id, first) for r in rows),
            "activations": _activations(atlas, where, {r["feature_id"]: r["max_activation"] for r in rows}, ids,
                                        creator_id, first),
            "explanations": (e for r in rows if (e := _explanation(r, ids, creator_id, first)) is not None),
        }
        written += [p for part, lines in parts.items() if (p := _write_jsonl(folder / part / name, lines)) is not None]
    return written


def default_ids(manifest: dict[str, Any], width: int | None = None) -> tuple[str, str]:
    """Neuronpedia's model id and source id for an atlas: the model's folder or file name, lowercased
    to Neuronpedia's id alphabet ("SmolLM2-135M-Instruct" -> "smollm2-135m-instruct"), and
    "<layer>-featureatlas-res-<width>" after Neuronpedia's "<layer>-<set>" ids ("6-res-jb",
    "20-gemmascope-res-16k"), the width (``width``, default the dictionary's) telling several
    dictionaries of one layer apart."""
    name = Path(str(manifest["model"]["name"]).rstrip("/")).name.removesuffix(".gguf")
    model_id = re.sub(r"[^a-z0-9_-]+", "-", name.lower()).strip("-")[:128] or "model"
    size = width_name(int(manifest["dictionary"]["d_sae"] if width is None else width)).lower()
    return model_id, f"{int(manifest['hook']['layer'])}-{SET_PREFIX}-{size}"


def read_neuronpedia(folder: Path) -> NeuronpediaExport:
    """The rows of the dataset folder ``folder`` (``<model_id>/<source_id>``), batches in order."""
    folder = Path(folder)

    def lines(part: str) -> list[dict[str, Any]]:
        rows = []
        for path in sorted((folder / part).glob("batch-*.jsonl.gz"), key=lambda p: int(p.name.split("-")[1].split(".")[0])):
            with gzip.open(path, "rt", encoding="utf-8") as f:
                rows += [json.loads(line) for line in f if line.strip()]
        return rows

    meta = {name: json.loads((folder / f"{name}.jsonl").read_text()) for name in ("model", "sourceset", "source")}
    return NeuronpediaExport(**meta, **{part: lines(part) for part in PARTS})


def _checked_ids(manifest: dict[str, Any], model_id: str | None, source_id: str | None, width: int) -> dict[str, str]:
    """The ``modelId`` and ``layer`` (Neuronpedia's name for the source id) every row carries."""
    default_model, default_source = default_ids(manifest, width)
    model_id = default_model if model_id is None else model_id
    source_id = default_source if source_id is None else source_id
    if not MODEL_ID.match(model_id):
        raise BadParameter("model_id", f"{model_id!r} is not a Neuronpedia model id: lowercase letters, digits, '-' "
                                       "and '_' only, at most 128 characters")
    if not SOURCE_ID.match(source_id):
        raise BadParameter("source_id", f"{source_id!r} is not a Neuronpedia source id: '<layer>-<set>' such as "
                                        f"{default_source!r}, lowercase")
    return {"modelId": model_id, "layer": source_id}


def _metadata(atlas: Atlas, ids: dict[str, str], creator_id: str, d_sae: int,
              saelens: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The three rows the importer creates (when absent) before any feature: the Model, the
    SourceSet and the Source that every Neuron row references. Only Prisma fields (the importer
    passes each line to ``prisma.*.create``), and required ones without a value get the
    converter's (db_models/model.py: ``neuronsPerLayer`` 0, ``owner`` ""); ``instruct`` is left to
    the schema's default, as the manifest does not say. No ``release.jsonl``: the importer treats it
    as optional."""
    m = atlas.manifest
    model_id, source_id = ids["modelId"], ids["layer"]
    set_name = source_id.split("-", 1)[1]
    name = Path(str(m["model"]["name"]).rstrip("/")).name
    d = m["dictionary"]
    corpus = m.get("corpus", {})
    model = {"id": model_id, "displayName": name, "displayNameShort": name, "creatorId": creator_id,
             "dimension": m["model"].get("d_model"), "layers": int(m["model"].get("n_layers", 0)),
             "neuronsPerLayer": 0,  # the MLP width, which the manifest does not record
             "owner": "", "inferenceEnabled": False, "visibility": "PUBLIC"}
    sourceset = {"modelId": model_id, "name": set_name, "creatorId": creator_id, "creatorName": "Feature Atlas",
                 "description": f"Residual stream - {d_sae:,} ({d['architecture']}, Feature Atlas)",
                 "type": "", "urls": [], "hasDashboards": True, "visibility": "PUBLIC"}
    source = {"id": source_id, "modelId": model_id, "setName": set_name, "creatorId": creator_id,
              "hasDashboards": True, "inferenceEnabled": False, "visibility": "PUBLIC",
              "saelensConfig": saelens,
              "num_prompts": corpus.get("contexts"), "num_tokens_in_prompt": corpus.get("context_len"),
              "dataset": ", ".join(map(str, corpus.get("sources", []))) or None}
    return {"model.jsonl": model, "sourceset.jsonl": sourceset, "source.jsonl": source}


def _neuron(row: dict[str, Any], ids: dict[str, str], set_name: str, creator_id: str, first: int) -> dict[str, Any]:
    """One ``Neuron`` row, with every column export-data.py writes. Empty lists stand where we have
    nothing to say, as the converter writes them: neuron alignment and correlations (SAEDashboard's
    feature tables), the histogram of logit effects over the whole vocabulary (we keep only the top
    ones), attention-head weights, decoder neighbours, and a steering vector (Neuronpedia steers
    with the SAE named in the Source, not a per-feature copy)."""
    heights, values = _histogram(row["histogram"], float(row["max_activation"]))
    return {
        **ids, "index": str(row["feature_id"] - first), "sourceSetName": set_name, "creatorId": creator_id,
        "maxActApprox": float(row["max_activation"]), "frac_nonzero": float(row["density"]),
        "freq_hist_data_bar_heights": heights, "freq_hist_data_bar_values": values,
        "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": [],
        # logit_negative comes most negative first, as SAEDashboard's bottom logits do
        "pos_str": [t["token"] for t in row["logit_positive"]], "pos_values": [t["value"] for t in row["logit_positive"]],
        "neg_str": [t["token"] for t in row["logit_negative"]], "neg_values": [t["value"] for t in row["logit_negative"]],
        "neuron_alignment_indices": [], "neuron_alignment_values": [], "neuron_alignment_l1": [],
        "correlated_neurons_indices": [], "correlated_neurons_pearson": [], "correlated_neurons_l1": [],
        "correlated_features_indices": [], "correlated_features_pearson": [], "correlated_features_l1": [],
        "decoder_weights_dist": [], "topkCosSimIndices": [], "topkCosSimValues": [],
        "hasVector": False, "vector": [], "vectorLabel": None, "vectorDefaultSteerStrength": 10, "hookName": None,
        # the feature map: a UMAP of the decoder directions, which is what Neuronpedia's umap columns hold
        "umap_x": _finite(row.get("map_x")), "umap_y": _finite(row.get("map_y")),
    }


def _histogram(counts: list[int], max_activation: float) -> tuple[list[int], list[float]]:
    """Bar heights and bar positions. Ours are counts of the active values in equal-width bins over
    [0, max_activation]; Neuronpedia draws bar i at values[i] with height heights[i], so the two
    lists are parallel: bin centres, not the n + 1 edges."""
    width = max_activation / len(counts) if counts else 0.0
    return [int(c) for c in counts], [(i + 0.5) * width for i in range(len(counts))]


def _activations(atlas: Atlas, where: str, max_activation: dict[int, float], ids: dict[str, str],
                 creator_id: str, first: int) -> Iterator[dict[str, Any]]:
    """``Activation`` rows of the features matching ``where``, streamed from the examples table.
    Top examples are Neuronpedia's "top activations" group (SAEDashboard's converter writes bin_min
    -1, bin_max the feature's maximum, bin_contains -1 for it). Our quantile examples come from
    rank bands, not activation intervals, and the band is not stored: their bin fields stay null,
    which the importer allows and the feature page sorts by activation."""
    query = atlas.examples.search().where(where).select(EXAMPLE_COLUMNS).limit(atlas.examples.count_rows())
    for batch in query.to_batches(READ_ROWS):
        for ex in batch.to_pylist():
            f, values = ex["feature_id"], ex["activations"]
            top, peak = ex["kind"] == "top", max(values)
            row = f"activation/{ex['kind']}/{ex['doc_id']}/{ex['start']}/{ex['max_position']}"
            yield {
                "id": _row_id(ids, f, row), **ids, "index": str(f - first), "creatorId": creator_id,
                "tokens": ex["tokens"], "values": values, "maxValue": peak, "minValue": min(values),
                "maxValueTokenIndex": values.index(peak),
                "qualifyingTokenIndex": ex["max_position"] - ex["start"],  # the token that picked the window
                "binMin": -1.0 if top else None, "binMax": max_activation.get(f) if top else None,
                "binContains": -1.0 if top else None,
                "dataIndex": str(ex["doc_id"]), "dataSource": None,  # our documents table's id
                "dfaValues": [], "dfaTargetIndex": None, "dfaMaxValue": None,  # attention-only
            }


def _explanation(row: dict[str, Any], ids: dict[str, str], creator_id: str, first: int) -> dict[str, Any] | None:
    """Our label as an ``Explanation`` row, or None for a feature without one. ``typeName`` and
    ``explanationModelName`` are foreign keys into Neuronpedia's own explainer tables, which hold
    none of our labellers, so they stay null (allowed); who wrote the label goes in ``notes``."""
    if not row.get("label") or row.get("label_source") in (None, "none"):
        return None
    score = _finite(row.get("label_score"))
    note = f"Feature Atlas label by {row['label_source']}" + (f", held-out score {score:.3f}" if score is not None else "")
    return {"id": _row_id(ids, row["feature_id"], "explanation"), **ids, "index": str(row["feature_id"] - first),
            "authorId": creator_id, "description": row["label"], "typeName": None, "explanationModelName": None,
            "notes": note}


def _row_id(ids: dict[str, str], feature: int, what: str) -> str:
    """A primary key shaped like the cuids Neuronpedia uses (25 lowercase characters), but derived
    from what the row is (for an example: its kind, document and window), whatever order rows are
    read in: importing the same export twice then adds nothing (``ON CONFLICT DO NOTHING``)."""
    key = f"featureatlas/{ids['modelId']}/{ids['layer']}/{feature}/{what}"
    return "f" + hashlib.blake2b(key.encode(), digest_size=12).hexdigest()


def _finite(value: float | None) -> float | None:
    """JSON has no NaN: a missing or non-finite optional number is null."""
    return float(value) if value is not None and math.isfinite(value) else None


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]], *, gz: bool = True) -> Path | None:
    """Write ``rows`` one JSON object a line, to a temporary name then renamed, so an interrupted
    export leaves no half file to import; None (and no file) when there are no rows. NaN is refused:
    it would be a bug upstream, and Neuronpedia could not parse the line."""
    rows = iter(rows)
    first = next(rows, None)
    if first is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with (gzip.open(tmp, "wt", encoding="utf-8", compresslevel=5) if gz else open(tmp, "w", encoding="utf-8")) as f:
            for row in itertools.chain([first], rows):
                f.write(json.dumps(row, allow_nan=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
