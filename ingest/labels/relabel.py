"""`featureatlas label`: re-label a published atlas in place, from its own analytics database.

Everything labelling needs (documents, tokens, the sparse code of every token, logit effects) is
already in the atlas, so no model runs here unless an LLM explainer or judge is configured, or the
intervention scorer, which steers the atlas's own model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
from featureatlas.store import manifest as M
from featureatlas.store.atlas import Atlas
from featureatlas.store.errors import BadParameter
from featureatlas.store.publish import update_labels
from featureatlas.store.schema import FEATURES

from ..config import AtlasConfig, config_of
from ..embed import embed
from ..model import load_model
from ..sae import SAE
from . import intervention
from .label import Labels, label_features
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
    missing = [c for c in FEATURES.label_names if c not in atlas.features.schema.names]
    if missing:
        raise BadParameter("--atlas", f"{atlas.root} was published by an older Feature Atlas, without the label columns "
                                      f"{', '.join(missing)}; re-run `featureatlas ingest` on it (finished stages are reused)")
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
    if intervention.SCORER in cfg.labels.label_scorers:
        _score_interventions(atlas, cfg, labels)
    table = pa.table({"feature_id": pa.array(labels.features, pa.int32()), **labels.columns()})
    summary = {**labels.summary, "features": "all" if features is None else features}
    update_labels(atlas.root, table, labels.candidates, summary, cfg.to_dict())
    return summary


def _score_interventions(atlas: Atlas, cfg: AtlasConfig, labels: Labels) -> None:
    """Steers the atlas's model with each labelled feature (seconds each) and adds the scores."""
    rows = atlas.features.search().select(["feature_id", "max_activation"]).limit(atlas.d_sae).to_arrow().to_pydict()
    maxima = {f: float(m or 0.0) for f, m in zip(rows["feature_id"], rows["max_activation"])}
    vectors = {f: labels.embeddings[i] for i, (f, src) in enumerate(zip(labels.features, labels.source)) if src != "none"}
    model = load_model(cfg.model.model, device=cfg.run.device, dtype=cfg.run.dtype, cache_dir=cfg.model.model_cache)
    sae = SAE.load(atlas.dictionary_dir)
    scores = intervention.score_labels(model, sae, int(atlas.manifest["hook"]["layer"]), vectors, maxima, cfg)
    intervention.merge_scores(labels.features, labels.score, labels.scores, scores,
                              primary=cfg.labels.label_scorers[0] == intervention.SCORER)
    labels.summary["intervention_score_mean"] = float(sum(scores.values()) / len(scores)) if scores else None
    kept = [s for s in labels.score if s is not None]
    labels.summary["label_score_mean"] = float(sum(kept) / len(kept)) if kept else None
