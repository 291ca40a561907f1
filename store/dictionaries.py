"""The dictionaries of an atlas, as rows of ``schema.DICTIONARIES``, and the families of its features.

An atlas's features come from one trained or loaded set of latents at one hook point, described
by its manifest (hook, dictionary, held-out metrics, training settings). Those latents can hold
several dictionaries, each a range of feature ids (``first_feature``, ``d_sae``): the prefixes of a
nested (matryoshka) one, all starting at 0, or widths trained apart and stacked side by side
(``--widths``). Their features form families across the widths (``ingest/families.py``).
Publishing writes the description as the ``dictionaries`` table, so SQL, the HTTP API and Python
list dictionaries by id; an atlas published before the table existed gets the same rows from its
manifest. Dictionaries at several layers in one atlas are not built yet.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import pyarrow as pa

from . import manifest as M
from .atlas import Atlas
from .schema import DICTIONARIES

# Training settings that describe a dictionary (the rest of the train config says where files live).
_TRAINING = ("architecture", "d_sae", "widths", "k", "sparsity_coef", "train_tokens", "train_batch", "lr", "aux_k", "aux_coef",
             "dead_tokens")
MAX_CHILDREN = 20  # children a feature page shows, closest first (a parent of 1,024 can have dozens)
_METRICS = ("l0", "variance_explained", "variance_explained_without_outliers", "loss_recovered", "dead_fraction")


def width_name(d_sae: int) -> str:
    """A width as people say it: 4096 is 4k, 16384 16k, 2**20 1M; any other number as it is."""
    if d_sae >= 2**20 and d_sae % 2**20 == 0:
        return f"{d_sae // 2**20}M"
    if d_sae >= 1024 and d_sae % 1024 == 0:
        return f"{d_sae // 1024}k"
    return str(d_sae)


def dictionary_id(layer: int | None, d_sae: int) -> str:
    """``L15-4k``: the layer it reads and its width (``L?`` when a loaded dictionary names no layer)."""
    return f"L{'?' if layer is None else layer}-{width_name(d_sae)}"


def saelens_cfg(atlas: Atlas) -> dict[str, Any]:
    """The dictionary's SAELens ``cfg.json``."""
    return json.loads((atlas.dictionary_dir / M.DICTIONARY_CFG).read_text())


def stacked_parts(cfg: dict[str, Any]) -> list[tuple[range, dict[str, Any]]]:
    """Each dictionary of a stack trained apart (``ingest/sae.py``'s ``SAE.stack``), from its
    ``cfg.json``: its feature ids (a range of the stack's latents) and the ``cfg.json`` of it alone,
    a SAELens dictionary of its own. Empty for one dictionary (or a nested one)."""
    meta = cfg.get("metadata") or {}
    widths = meta.get(M.STACKED_WIDTHS) or []
    ks = meta.get(M.STACKED_K) or [cfg.get("k")] * len(widths)
    own = {key: value for key, value in meta.items() if key not in (M.STACKED_WIDTHS, M.STACKED_K)}
    firsts = [0, *itertools.accumulate(widths)]
    return [(range(first, first + width), {**cfg, "d_sae": width, "k": min(int(k), width), "metadata": own})
            for first, width, k in zip(firsts, widths, ks)]


def dictionary_rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The atlas's dictionaries as ``DICTIONARIES`` rows, from its manifest, the default (the widest,
    the manifest's last part) first. In a nested (matryoshka) dictionary the first ``w`` latents
    are a dictionary of their own, trained to reconstruct alone, so feature ``i`` is the same latent
    in every prefix wider than ``i``; stacked dictionaries share no feature."""
    d, hook, metrics = manifest["dictionary"], manifest.get("hook") or {}, manifest.get("metrics") or {}
    source = d.get("source")  # "trained", or where a loaded dictionary came from: {format, path}
    trained = source == "trained"
    config = manifest.get("config") or {}
    train, run = config.get("train") or {}, config.get("run") or {}
    training = {key: train.get(key) for key in _TRAINING} | {"seed": run.get("seed")}
    # Atlases before stacks name a nested dictionary's "prefixes", and its metrics under that key.
    parts = [(int(f), int(w)) for f, w in d.get("parts") or [(0, w) for w in d.get("prefixes") or [d["d_sae"]]]]
    others = metrics.get("parts") or metrics.get("prefixes") or {}
    rows = []
    for first, width in [parts[-1], *parts[:-1]]:
        default = (first, width) == parts[-1]
        measured = metrics if default else others.get(str(width), {})
        rows.append({
            "dictionary": dictionary_id(hook.get("layer"), width),
            "is_default": default,
            "first_feature": first,
            "hook": hook.get("name"),
            "layer": hook.get("layer"),
            "architecture": d.get("architecture"),
            "source": source if isinstance(source, str) or source is None else f"loaded ({source.get('format')})",
            "d_in": d.get("d_in"),
            "d_sae": width,
            "k": None if d.get("k") is None else min(int(d["k"]), width),
            **{m: measured.get(m) for m in _METRICS},
            "training": json.dumps(training, sort_keys=True) if trained else None,
        })
    return rows


def feature_ids(row: dict[str, Any]) -> range:
    """The feature ids of the dictionary of ``row``."""
    return range(row["first_feature"], row["first_feature"] + row["d_sae"])


def dictionary_of(rows: list[dict[str, Any]], feature_id: int) -> str:
    """The narrowest dictionary of ``rows`` that holds ``feature_id`` (its prefix, in a nested one)."""
    return min((r for r in rows if feature_id in feature_ids(r)), key=lambda r: r["d_sae"])["dictionary"]


def dictionaries_table(manifest: dict[str, Any]) -> pa.Table:
    """The ``dictionaries`` table publishing writes to DuckDB."""
    rows = dictionary_rows(manifest)
    return DICTIONARIES.build({name: [r[name] for r in rows] for name in DICTIONARIES.names})


def read_dictionaries(atlas: Atlas) -> list[dict[str, Any]]:
    """The atlas's dictionaries, the default first, their training settings as a dict: its
    ``dictionaries`` table, or for an atlas published before the table existed, the same rows from
    its manifest."""
    if "dictionaries" in atlas.duckdb_tables:
        # Tables of older atlases lack first_feature: theirs were all prefixes, starting at 0.
        rows = [{"first_feature": 0} | r for r in
                atlas.query("select * from dictionaries order by is_default desc, d_sae").dicts()]
    else:
        rows = dictionary_rows(atlas.manifest)
    return [r | {"training": None if r["training"] is None else json.loads(r["training"])} for r in rows]


def family(atlas: Atlas, dictionaries: list[dict[str, Any]], feature_id: int) -> dict[str, Any]:
    """A feature's place across the dictionaries at one hook (a stack's widths, a nested one's
    prefixes): the narrowest dictionary that holds it, its parent in the dictionary before that
    one, and its children: the features of wider dictionaries linked to it (a feature of the
    narrowest can have children in each wider one; each member names its dictionary), the
    ``MAX_CHILDREN`` closest that fired, each with label, density, the link's decoder cosine and
    co-activation, and its strongest top example (tokens and activations, to shade); ``n_children``
    counts them all. ``dictionaries``: ``read_dictionaries(atlas)``, which a server reads once, as
    it checks once that the atlas has a ``families`` table (``Atlas.duckdb_tables``: atlases of older versions lack it)."""
    rows = dictionaries
    links = atlas.query("select feature_id, parent_id, decoder_cosine, coactivation from families "
                        "where feature_id = $f or parent_id = $f order by decoder_cosine desc, feature_id",
                        {"f": int(feature_id)}).dicts()
    parent = next((r for r in links if r["feature_id"] == feature_id), None)
    children = [r for r in links if r["parent_id"] == feature_id]
    info = atlas.summaries(([parent["parent_id"]] if parent else []) + [c["feature_id"] for c in children])
    # A child that never fired on the corpus is a dead latent, not a finer feature.
    children = [c for c in children if info[c["feature_id"]]["density"] > 0]
    shown = children[:MAX_CHILDREN]
    tops = atlas.top_examples(([parent["parent_id"]] if parent else []) + [c["feature_id"] for c in shown])

    def member(f: int, link: dict[str, Any]) -> dict[str, Any]:
        top = tops.get(f)
        return {"feature_id": f, "dictionary": dictionary_of(rows, f), "label": info[f]["label"],
                "density": info[f]["density"], "decoder_cosine": link["decoder_cosine"],
                "coactivation": link["coactivation"],
                "example": None if top is None else {"tokens": top["tokens"], "activations": top["activations"]}}

    return {"dictionary": dictionary_of(rows, feature_id),
            "parent": member(parent["parent_id"], parent) if parent else None,
            "children": [member(c["feature_id"], c) for c in shown], "n_children": len(children)}
