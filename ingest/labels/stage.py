"""The labels stage of the ingest: labels, their scores and each feature's context embedding, from
the encode stage's tables (``featureatlas label`` re-runs the same labelling on a published atlas)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import windows as corpus_windows
from ..config import LabelConfig
from ..embed import embed
from ..encode import example_texts
from .label import label_features
from .llm import make_chat

OUTPUTS = ("labels.parquet", "label_candidates.parquet")
LLM_CACHE = "llm-cache.jsonl"  # beside the stage folders: answers survive a change of labels settings


def run(con: duckdb.DuckDBPyConnection, d_sae: int, cfg: LabelConfig, encode: Path, windows: Path, folder: Path, *,
        seed: int, device: str) -> dict[str, Any]:
    """``con`` holds ``documents``, ``tokens`` and ``activations``; ``encode`` and ``windows`` are
    those stages' folders."""
    chat = make_chat(cfg, device, folder.parent / LLM_CACHE) if cfg.needs_llm else None
    stats = pq.read_table(encode / "stats.parquet", columns=["feature_id", "logit_positive"]).to_pydict()
    promoted = {f: [x["token"] for x in row] for f, row in zip(stats["feature_id"], stats["logit_positive"])}
    embed_fn = lambda texts: embed(texts, name=cfg.embedder, progress=True)  # noqa: E731
    stored = pq.read_table(windows / corpus_windows.OUTPUTS[0], columns=["doc_id", "window_index", "embedding"])
    labels = label_features(con, list(range(d_sae)), cfg, embed_fn, seed=seed, chat=chat, logits=promoted, windows=stored)
    context = context_embeddings(pq.read_table(encode / "examples.parquet"), cfg, d_sae)
    table = pa.table({"feature_id": pa.array(labels.features, pa.int32()), **labels.columns(),
                      "context_embedding": pa.FixedSizeListArray.from_arrays(context.ravel(), context.shape[1])})
    pq.write_table(table, folder / "labels.parquet")
    pq.write_table(labels.candidates, folder / "label_candidates.parquet")
    return {"labels": labels.summary}


def context_embeddings(examples: pa.Table, cfg: LabelConfig, d_sae: int) -> np.ndarray:
    """[d_sae, dim] the unit mean embedding of each feature's first top examples (zeros if none)."""
    snippets = example_texts(examples, cfg.context_embedding_examples, d_sae)
    flat = [t for per in snippets for t in per]
    flat_emb = embed(flat, name=cfg.embedder, progress=True)
    out = np.zeros((d_sae, flat_emb.shape[1]), np.float32)
    i = 0
    for f, per in enumerate(snippets):
        if per:
            v = flat_emb[i : i + len(per)].mean(0)
            out[f] = v / max(float(np.linalg.norm(v)), 1e-8)
            i += len(per)
    return out
