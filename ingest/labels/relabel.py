"""`featureatlas label`: re-label a published atlas in place, from its own analytics database.

Everything labelling needs (documents, tokens, the sparse code of every token, logit effects) is
already in the atlas, so no model runs here unless an LLM explainer or judge is configured.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
from featureatlas.store.atlas import CACHE, DUCKDB, Atlas
from featureatlas.store.publish import update_labels

from ..config import AtlasConfig, ConfigError
from ..embed import embed
from .label import label_features
from .llm import make_chat


def parse_features(spec: str | None, d_sae: int) -> list[int]:
    """"3,7,100-120" -> ids; None -> every feature."""
    if not spec:
        return list(range(d_sae))
    out: set[int] = set()
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ConfigError("--features", f"expected ids and ranges like 3,7,100-120, got {spec!r}") from None
    bad = [f for f in out if not 0 <= f < d_sae]
    if bad or not out:
        raise ConfigError("--features", f"feature ids must be in 0..{d_sae - 1}")
    return sorted(out)


def atlas_config(atlas: Atlas, overrides: dict[str, Any]) -> AtlasConfig:
    """The config the atlas was built with, with the labelling options changed."""
    known = {f.name for f in dataclasses.fields(AtlasConfig)}
    values = {k: v for k, v in atlas.manifest.get("config", {}).items() if k in known}
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = AtlasConfig(**values)
    cfg.validate()
    return cfg


def relabel(root: str | Path, overrides: dict[str, Any], features: str | None = None) -> dict[str, Any]:
    """Re-label ``features`` (all by default) of the atlas at ``root``; returns the label summary."""
    atlas = Atlas(root)
    if "label_scores" not in atlas.features.schema.names:
        raise ConfigError("--atlas", f"{atlas.root} was published by an older Feature Atlas without label scores; "
                                     "re-run `featureatlas ingest` on it (finished stages are reused)")
    cfg = atlas_config(atlas, overrides)
    ids = parse_features(features, atlas.d_sae)
    needs_llm = cfg.label_explainer == "llm" or "detection" in cfg.label_scorers
    chat = make_chat(cfg, atlas.root / CACHE / "llm-cache.jsonl") if needs_llm else None
    logits = {}
    if cfg.label_explainer == "llm":
        rows = atlas.features.search().select(["feature_id", "logit_positive"]).limit(atlas.d_sae).to_arrow().to_pydict()
        logits = {f: [x["token"] for x in row or []] for f, row in zip(rows["feature_id"], rows["logit_positive"])}
    con = duckdb.connect(str(atlas.root / DUCKDB), read_only=True)
    try:
        labels = label_features(con, ids, cfg, lambda t: embed(t, name=cfg.embedder, progress=True), chat=chat, logits=logits)
    finally:
        con.close()
    table = pa.table({"feature_id": pa.array(labels.features, pa.int32()), **labels.columns()})
    summary = {**labels.summary, "features": "all" if features is None else features}
    update_labels(atlas.root, table, labels.candidates, summary)
    return summary
