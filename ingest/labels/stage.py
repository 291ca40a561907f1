"""The labels stage of the ingest: labels, their scores and each feature's context embedding, from
the encode stage's tables (``featureatlas label`` re-runs the same labelling on a published atlas)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from featureatlas.store.schema import WINDOW, vector_matrix

from .. import windows as corpus_windows
from ..config import LabelConfig
from ..embed import embed
from ..stages import written_atomically
from .label import label_features, summarize
from .llm import make_chat
from .windows import KeyIndex

OUTPUTS = ("labels.parquet", "label_candidates.parquet")
EXAMPLE_COLUMNS = ("feature_id", "kind", "doc_id", "start", "tokens")  # what context_embeddings reads of an example
CONTEXT_CHUNK = 1 << 16  # (example, window) rows gathered at once: 100 MB of 384-dim vectors
LLM_CACHE = "llm-cache.jsonl"  # beside the stage folders: answers survive a change of labels settings


def shards(d_sae: int, cfg: LabelConfig) -> int:
    return -(-d_sae // cfg.label_shard_features)


def shard_features(d_sae: int, cfg: LabelConfig, i: int) -> range:
    """The feature ids shard ``i`` labels."""
    size = cfg.label_shard_features
    return range(i * size, min(d_sae, (i + 1) * size))


def run_shard(con: duckdb.DuckDBPyConnection, d_sae: int, cfg: LabelConfig, encode: Path, windows: Path, folder: Path,
              i: int, *, seed: int, device: str) -> dict[str, Any]:
    """Labels of the features of shard ``i`` (``label_shard_features`` of them), written atomically.
    ``con`` holds ``documents``, ``tokens`` and ``activations`` (those of the shard's features
    suffice); ``encode`` and ``windows`` are those stages' folders. A feature's trials are drawn
    with its own seed, so its label does not depend on which shard it is in."""
    t0 = time.perf_counter()
    features = list(shard_features(d_sae, cfg, i))
    # The call budget is the whole stage's: each shard gets its share.
    share = dataclasses.replace(cfg, llm_max_calls=-(-cfg.llm_max_calls // shards(d_sae, cfg)))
    chat = make_chat(share, device, folder.parent / LLM_CACHE) if cfg.needs_llm else None
    stats = pq.read_table(encode / "stats.parquet", columns=["feature_id", "logit_positive"]).to_pydict()
    promoted = {f: [x["token"] for x in row] for f, row in zip(stats["feature_id"], stats["logit_positive"])}
    embed_fn = lambda texts: embed(texts, name=cfg.embedder, progress=True)  # noqa: E731
    stored = pq.read_table(windows / corpus_windows.OUTPUTS[0], columns=["doc_id", "window_index", "embedding"])
    labels = label_features(con, features, cfg, embed_fn, seed=seed, chat=chat, logits=promoted, windows=stored)
    with written_atomically(folder / f"labels-{i:05d}.parquet") as tmp:
        pq.write_table(pa.table({"feature_id": pa.array(labels.features, pa.int32()), **labels.columns()}), tmp)
    with written_atomically(folder / f"candidates-{i:05d}.parquet") as tmp:
        pq.write_table(labels.candidates, tmp)
    return {"features": len(features), "windows": labels.summary["windows"], "seconds": time.perf_counter() - t0}


def run(d_sae: int, cfg: LabelConfig, encode: Path, windows: Path, folder: Path, shard: list[dict]) -> dict[str, Any]:
    """The shards' labels and candidates as one table each, with every feature's context
    embedding (``shard``: what each shard returned)."""
    labels = pa.concat_tables([pq.read_table(folder / f"labels-{i:05d}.parquet") for i in range(len(shard))])
    candidates = pa.concat_tables([pq.read_table(folder / f"candidates-{i:05d}.parquet") for i in range(len(shard))])
    stored = pq.read_table(windows / corpus_windows.OUTPUTS[0], columns=["doc_id", "window_index", "embedding"])
    context = context_embeddings(pq.read_table(encode / "examples.parquet", columns=list(EXAMPLE_COLUMNS)), stored, cfg, d_sae)
    table = labels.append_column("context_embedding", pa.FixedSizeListArray.from_arrays(context.ravel(), context.shape[1]))
    pq.write_table(table, folder / "labels.parquet")
    pq.write_table(candidates, folder / "label_candidates.parquet")
    summary = summarize(cfg, labels["label_score"].to_pylist(), labels["label_scores"].to_pylist(), shard[0]["windows"],
                        candidates["status"].to_pylist())
    return {"labels": summary}


def context_embeddings(examples: pa.Table, windows: pa.Table, cfg: LabelConfig, d_sae: int) -> np.ndarray:
    """[d_sae, dim] the unit mean embedding of each feature's first ``context_embedding_examples``
    top examples (zeros if none). An example's embedding is the mean of the stored embeddings of the
    corpus windows its tokens span (``windows``: the windows stage's table), so nothing is embedded
    here: embedding four snippets per feature cost ~110 ms a feature on two cores, 30 hours at a
    million features."""
    ex = examples.select(list(EXAMPLE_COLUMNS))
    top = ex.filter(pc.equal(ex["kind"], "top"))
    by_feature = np.argsort(top["feature_id"].to_numpy(), kind="stable")  # stable: strongest first, as written
    sorted_ids = top["feature_id"].to_numpy()[by_feature]
    rank = np.arange(len(sorted_ids)) - np.searchsorted(sorted_ids, sorted_ids)  # within its feature
    keep = by_feature[rank < cfg.context_embedding_examples]
    feature = top["feature_id"].to_numpy()[keep].astype(np.int64)
    doc = top["doc_id"].to_numpy()[keep].astype(np.int64)
    start = top["start"].to_numpy()[keep].astype(np.int64)
    length = pc.list_value_length(top["tokens"]).to_numpy()[keep].astype(np.int64)
    lo, hi = start // WINDOW, (start + np.maximum(length, 1) - 1) // WINDOW
    spans = hi - lo + 1
    example = np.repeat(np.arange(len(keep)), spans)  # one row per (example, window it spans)
    window = lo[example] + np.arange(len(example)) - np.repeat(np.cumsum(spans) - spans, spans)
    rows = KeyIndex(windows["doc_id"].to_numpy().astype(np.int64) << 32 | windows["window_index"].to_numpy())
    found = rows.find(doc[example] << 32 | window)
    if (found < 0).any():
        raise RuntimeError(f"the windows table lacks {int((found < 0).sum())} windows of the examples: rebuild the atlas")
    vectors = vector_matrix(windows["embedding"])
    out = np.zeros((d_sae, vectors.shape[1]), np.float32)
    weight = 1 / spans[example].astype(np.float32)  # each example weighs the same however many windows it spans
    for at in range(0, len(example), CONTEXT_CHUNK):  # gathered a chunk at a time: at 1M features, 9 GB at once
        part = slice(at, at + CONTEXT_CHUNK)
        np.add.at(out, feature[example[part]], vectors[found[part]] * weight[part, None])
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return np.where(norms > 0, out / np.maximum(norms, 1e-8), 0).astype(np.float32)
