"""The dictionaries of an atlas, as rows of ``schema.DICTIONARIES``.

An atlas holds one dictionary today, described by its manifest (hook, dictionary, held-out metrics,
training settings). Publishing writes that description as the ``dictionaries`` table, so SQL, the
HTTP API and Python list dictionaries by id the way they will once an atlas holds several layers
and widths; an atlas published before the table existed gets the same rows from its manifest.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from .atlas import Atlas
from .schema import DICTIONARIES

# Training settings that describe a dictionary (the rest of the train config says where files live).
_TRAINING = ("architecture", "d_sae", "k", "sparsity_coef", "train_tokens", "train_batch", "lr", "aux_k", "aux_coef",
             "dead_tokens")
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


def dictionary_rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The atlas's dictionaries as ``DICTIONARIES`` rows, from its manifest (the first is the default)."""
    d, hook, metrics = manifest["dictionary"], manifest.get("hook") or {}, manifest.get("metrics") or {}
    trained = d.get("source") == "trained"
    config = manifest.get("config") or {}
    train, run = config.get("train") or {}, config.get("run") or {}
    training = {key: train.get(key) for key in _TRAINING} | {"seed": run.get("seed")}
    row = {
        "dictionary": dictionary_id(hook.get("layer"), int(d["d_sae"])),
        "is_default": True,
        "hook": hook.get("name"),
        "layer": hook.get("layer"),
        "architecture": d.get("architecture"),
        "source": d.get("source"),
        "d_in": d.get("d_in"),
        "d_sae": d["d_sae"],
        "k": d.get("k"),
        **{m: metrics.get(m) for m in _METRICS},
        "training": json.dumps(training, sort_keys=True) if trained else None,
    }
    return [row]


def dictionaries_table(manifest: dict[str, Any]) -> pa.Table:
    """The ``dictionaries`` table publishing writes to DuckDB."""
    rows = dictionary_rows(manifest)
    return DICTIONARIES.build({name: [r[name] for r in rows] for name in DICTIONARIES.names})


def read_dictionaries(atlas: Atlas) -> list[dict[str, Any]]:
    """The atlas's dictionaries, the default first, their training settings as a dict: its
    ``dictionaries`` table, or for an atlas published before the table existed, the same rows from
    its manifest."""
    present = atlas.query("select count(*) from information_schema.tables where table_name = 'dictionaries'").rows[0][0]
    rows = atlas.query("select * from dictionaries order by is_default desc, dictionary").dicts() if present else \
        dictionary_rows(atlas.manifest)
    return [r | {"training": None if r["training"] is None else json.loads(r["training"])} for r in rows]
