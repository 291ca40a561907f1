"""`featureatlas label`: re-label a published atlas in place, from its own analytics database.

Everything labelling needs (documents, tokens, the sparse code of every token, logit effects) is
already in the atlas, so no model runs here unless an LLM explainer or judge is configured.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
from featureatlas.store import manifest as M
from featureatlas.store.atlas import Atlas
from featureatlas.store.errors import BadParameter
from featureatlas.store.publish import update_labels

from ..config import AtlasConfig, config_of
from ..embed import embed
from .label import label_features
from .llm import make_chat
from .stage import LLM_CACHE


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
        raise BadParameter("--features", f"expected ids and ranges like 3,7,100-120, got {spec!r}") from None
    bad = [f for f in out if not 0 <= f < d_sae]
    if bad or not out:
        raise BadParameter("--features", f"feature ids must be in 0..{d_sae - 1}")
    return sorted(out)


def atlas_config(atlas: Atlas, overrides: dict[str, Any]) -> AtlasConfig:
    """The config the atlas was built with, with the labelling options changed."""
    cfg = config_of(atlas.manifest).replace(**{k: v for k, v in overrides.items() if v is not None})
    cfg.validate()
    return cfg


def stored_windows(atlas: Atlas) -> pa.Table:
    """The published window embeddings, which a re-label judges on (no need to embed the corpus again)."""
    return atlas.windows.search().select(["doc_id", "window_index", "embedding"]).limit(atlas.windows.count_rows()).to_arrow()


def relabel(root: str | Path, overrides: dict[str, Any], features: str | None = None) -> dict[str, Any]:
    """Re-label ``features`` (all by default) of the atlas at ``root``; returns the label summary."""
    atlas = Atlas(root)
    if not atlas.has_table("windows"):
        raise BadParameter("--atlas", f"{atlas.root} was published by an older Feature Atlas without corpus windows; "
                                      "re-run `featureatlas ingest` on it (finished stages are reused)")
    cfg = atlas_config(atlas, overrides)
    ids = parse_features(features, atlas.d_sae)
    chat = make_chat(cfg.labels, cfg.run.device, atlas.root / M.CACHE / LLM_CACHE) if cfg.labels.needs_llm else None
    logits = {}
    if cfg.labels.label_explainer == "llm":
        rows = atlas.features.search().select(["feature_id", "logit_positive"]).limit(atlas.d_sae).to_arrow().to_pydict()
        logits = {f: [x["token"] for x in row or []] for f, row in zip(rows["feature_id"], rows["logit_positive"])}
    con = atlas.batch_connection()
    try:
        labels = label_features(con, ids, cfg.labels, lambda t: embed(t, name=cfg.labels.embedder, progress=True),
                                seed=cfg.run.seed, chat=chat, logits=logits, windows=stored_windows(atlas))
    finally:
        con.close()
    table = pa.table({"feature_id": pa.array(labels.features, pa.int32()), **labels.columns()})
    summary = {**labels.summary, "features": "all" if features is None else features}
    update_labels(atlas.root, table, labels.candidates, summary, cfg.to_dict())
    return summary
