"""The ingest, stage by stage in data-flow order: corpus, harvest, train, evaluate, encode, label,
publish. Each stage is skipped when its inputs did not change, so a re-run or a resumed run only
does what is left."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import logging
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from featureatlas.store.atlas import CACHE, DICTIONARY, DUCKDB, LANCE, MANIFEST
from featureatlas.store.publish import publish, write_duckdb, write_lance

from . import encode as enc
from .config import AtlasConfig, ConfigError
from .corpus import corpus_fingerprint
from .embed import embed
from .evaluate import METRICS_VERSION, loss_recovered, reconstruction_metrics
from .feature_map import MAP_VERSION, feature_map
from .harvest import harvest, load_activations
from .labels.label import LABELS_VERSION, label_features
from .labels.llm import make_chat
from .loaders import load_dictionary
from .model import SubjectModel, load_model, resolve_dtype
from .sae import SAE
from .stages import Stages, stage_key
from .tokens import TokenizedCorpus, tokenize_corpus
from .train import train_sae

log = logging.getLogger(__name__)
# Part of the publish key: bump it when the published layout changes.
PUBLISH_FORMAT = 2
PACKAGES = ("featureatlas", "torch", "transformers", "sentence-transformers", "duckdb", "lancedb", "litestar")


def hook_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def vocabulary(model: SubjectModel) -> list[str]:
    """Display text of every token id the unembedding can produce."""
    size = model.model.get_output_embeddings().weight.shape[0]
    return [model.tokenizer.decode([i]) for i in range(size)]


def run_ingest(cfg: AtlasConfig) -> dict[str, Any]:
    """Builds (or refreshes) the atlas at ``cfg.atlas`` and returns its manifest."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    root = Path(cfg.atlas)
    corpus_hash = corpus_fingerprint(cfg.corpus)  # checks user paths before anything is written
    model = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, cache_dir=cfg.model_cache, layer=cfg.layer)
    loaded = _loaded_dictionary(cfg, model)  # checked before anything is written
    named_layer = loaded.meta.get("hook_layer") if loaded is not None else None
    layer = cfg.layer if cfg.layer is not None else named_layer if named_layer is not None else model.n_layers // 2
    stages = Stages(root / CACHE)

    # corpus -> contexts
    corpus_key = stage_key(
        cfg.corpus, cfg.corpus_weights, cfg.tokens, cfg.context_len, cfg.max_contexts_per_doc, cfg.eval_fraction,
        cfg.model, corpus_hash,
    )
    if stages.finished("corpus", corpus_key) is None:
        corpus = tokenize_corpus(cfg, model.tokenizer, model.bos_id)  # raises on an empty corpus: nothing written yet
        with stages.run("corpus", corpus_key) as s:
            corpus.save(stages.folder("corpus"))
            s.update(documents=len(corpus.documents), contexts=corpus.n_contexts, tokens=corpus.n_tokens,
                     eval_contexts=int(corpus.ctx_eval.sum()))
    corpus = TokenizedCorpus.load(stages.folder("corpus"))
    is_bos = corpus.token_position() == 0
    is_eval = corpus.ctx_eval[corpus.token_context()]

    # harvest -> activation shards
    harvest_key = stage_key(corpus_key, layer, str(model.dtype), cfg.shard_tokens)
    if stages.finished("harvest", harvest_key) is None:
        with stages.run("harvest", harvest_key) as s:
            s.update(harvest(model, corpus, layer, stages.folder("harvest"),
                             batch=cfg.harvest_batch, shard_tokens=cfg.shard_tokens))
    acts = load_activations(stages.folder("harvest"), corpus, cfg.shard_tokens)
    norms = {"bos_mean_norm": _mean_norm(acts[is_bos]), "token_mean_norm": _mean_norm(acts[np.flatnonzero(~is_bos)[:20_000]])}

    # train (or load) -> dictionary
    meta = {"model_name": cfg.model, "hook_name": hook_name(layer), "hook_layer": layer, "context_size": cfg.context_len,
            "prepend_bos": True}
    if loaded is not None:
        train_key = stage_key(harvest_key, "loaded", _fingerprint(Path(cfg.dictionary).expanduser()), cfg.k)
    else:
        # fp32 adds nothing to the key, so dictionaries trained before the dtype was a choice stay valid
        train_dtype = resolve_dtype(cfg.dtype, model.device)
        train_key = stage_key(harvest_key, cfg.architecture, cfg.sparsity_coef, cfg.d_sae, cfg.k, cfg.train_tokens,
                              cfg.train_batch, cfg.lr_value, cfg.aux_k, cfg.aux_coef, cfg.dead_tokens, cfg.seed,
                              *([] if train_dtype == torch.float32 else [str(train_dtype)]))
    if stages.finished("train", train_key) is None:
        with stages.run("train", train_key) as s:
            if loaded is not None:  # saved in our layout, with our hook, like a trained one
                loaded.meta.update(meta)
                loaded.save(stages.folder("train") / DICTIONARY)
                s.update(loaded_from=str(cfg.dictionary), format=loaded.meta["loaded_from"]["format"],
                         architecture=loaded.architecture)
            else:
                result = train_sae(
                    acts, rows=np.flatnonzero(~is_bos & ~is_eval), architecture=cfg.architecture, d_sae=cfg.d_sae, k=cfg.k,
                    sparsity_coef=cfg.sparsity_coef, tokens=cfg.train_tokens, batch=cfg.train_batch,
                    lr=cfg.lr_value, aux_k=cfg.aux_k, aux_coef=cfg.aux_coef, dead_tokens=cfg.dead_tokens, seed=cfg.seed,
                    device=model.device, meta=meta, checkpoint=stages.folder("train") / "checkpoint.pt",
                    compute_dtype=train_dtype,
                )
                result.sae.save(stages.folder("train") / DICTIONARY)
                (stages.folder("train") / "checkpoint.pt").unlink(missing_ok=True)
                s.update(steps=result.steps, tokens=result.tokens, input_scale=result.input_scale,
                         train_fvu=result.final_fvu, train_dead_fraction=result.dead_fraction)
    sae = SAE.load(stages.folder("train") / DICTIONARY)

    # evaluate on the held-out split
    eval_key = stage_key(train_key, cfg.ce_eval_contexts, METRICS_VERSION)
    metrics = stages.finished("evaluate", eval_key)
    if metrics is None:
        with stages.run("evaluate", eval_key) as metrics:
            metrics.update(reconstruction_metrics(sae, acts[~is_bos & is_eval]))
            metrics.update(loss_recovered(model, sae, corpus, layer, contexts=cfg.ce_eval_contexts, batch=cfg.harvest_batch))

    # encode + label -> per-feature tables
    vocab = vocabulary(model)
    analysis_key = stage_key(train_key, LABELS_VERSION, cfg.top_examples, cfg.quantile_examples, cfg.quantile_bands,
                             cfg.histogram_bins,
                             cfg.example_window_before, cfg.example_window_after, cfg.logit_effects, cfg.embedder,
                             cfg.context_embedding_examples, cfg.label_explainer, cfg.label_scorers,
                             cfg.label_pool_windows, cfg.llm_url, cfg.llm_model)
    folder = stages.folder("analysis")
    if stages.finished("analysis", analysis_key) is None:
        with stages.run("analysis", analysis_key) as s:
            s.update(_analyse(cfg, model, sae, corpus, acts, is_bos, vocab, folder))
    del acts

    # the feature map: depends on the dictionary alone, so a re-label keeps it
    map_key = stage_key(train_key, MAP_VERSION, cfg.map_neighbors, cfg.seed)
    if stages.finished("map", map_key) is None:
        with stages.run("map", map_key) as s:
            xy = feature_map(sae.unit_decoder().numpy(), neighbors=cfg.map_neighbors, seed=cfg.seed)
            pq.write_table(pa.table({"map_x": xy[:, 0], "map_y": xy[:, 1]}), stages.folder("map") / "map.parquet")
            s.update(features=len(xy))

    # publish, unless the atlas on disk was built from exactly these stage outputs
    publish_key = stage_key(analysis_key, map_key, eval_key, PUBLISH_FORMAT)
    existing = json.loads((root / MANIFEST).read_text()) if (root / MANIFEST).is_file() else {}
    if existing.get("publish_key") == publish_key:
        log.info("publish   skipped: %s already holds these results", root)
        return existing
    manifest = _manifest(cfg, model, layer, sae, corpus, is_bos, is_eval, metrics, stages, corpus_hash, norms)
    manifest["publish_key"] = publish_key
    manifest["labels"] = stages.record["analysis"]["summary"].get("labels")

    def build(staging: Path) -> None:
        sae.save(staging / DICTIONARY)
        features = pq.read_table(folder / "features.parquet")
        xy = pq.read_table(stages.folder("map") / "map.parquet")
        for name in xy.column_names:
            features = features.append_column(name, xy[name])
        write_lance(staging / LANCE, features, pq.read_table(folder / "examples.parquet"), sae.d_in)
        write_duckdb(staging / DUCKDB, {
            "documents": _documents_table(corpus),
            "tokens": _tokens_table(corpus, is_bos, is_eval, vocab),
            "activations": pq.read_table(folder / "activations.parquet"),
            "features": features,
            "label_candidates": pq.read_table(folder / "label_candidates.parquet"),
        })

    publish(root, build, manifest)
    log.info("atlas published at %s", root)
    return manifest


def _loaded_dictionary(cfg: AtlasConfig, model: SubjectModel) -> SAE | None:
    """The dictionary ``--dictionary`` names, checked against the model's hook point."""
    if not cfg.dictionary:
        return None
    sae = load_dictionary(cfg.dictionary, k=cfg.k)
    if sae.d_in != model.d_model:
        raise ConfigError("--dictionary", f"its d_in is {sae.d_in} but {cfg.model}'s residual stream has d_model "
                                          f"{model.d_model}: it was trained on another model or hook point")
    layer = cfg.layer if cfg.layer is not None else sae.meta.get("hook_layer")
    if layer is not None and not 0 <= layer < model.n_layers:
        raise ConfigError("--layer", f"the dictionary's hook layer {layer} is outside the model's 0..{model.n_layers - 1}")
    return sae


def _fingerprint(path: Path) -> list:
    """Names, sizes and modification times: enough to notice a replaced dictionary file."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def _analyse(cfg, model, sae, corpus, acts, is_bos, vocab, folder: Path) -> dict[str, Any]:
    codes = enc.encode_tokens(sae, acts, is_bos, device=model.device)
    records = enc.sparse_records(codes, corpus)
    n_encoded = int((~is_bos).sum())
    con = duckdb.connect()
    con.register("acts", records)
    stats = enc.feature_stats(con, cfg, n_encoded).to_pydict()
    examples = enc.build_examples(enc.example_picks(con, cfg), codes, corpus, vocab, cfg)
    con.close()
    logit_pos, logit_neg = enc.logit_effects(sae, model, vocab, cfg.logit_effects)

    # Labels read the same tables a user's SQL sees once the atlas is published.
    is_eval = corpus.ctx_eval[corpus.token_context()]
    con = duckdb.connect()
    con.register("documents", _documents_table(corpus))
    con.register("tokens", _tokens_table(corpus, is_bos, is_eval, vocab))
    con.register("activations", records.select(["doc_id", "position", "feature_id", "value"]))
    chat = make_chat(cfg, folder.parent / "llm-cache.jsonl") if cfg.label_explainer == "llm" or "detection" in cfg.label_scorers \
        else None
    promoted = {f: [x["token"] for x in row] for f, row in enumerate(logit_pos)}
    labels = label_features(con, list(range(sae.d_sae)), cfg, lambda t: embed(t, name=cfg.embedder, progress=True),
                            chat=chat, logits=promoted)
    con.close()
    snippets = enc.example_texts(examples, cfg.context_embedding_examples, sae.d_sae)
    flat = [t for per in snippets for t in per]
    flat_emb = embed(flat, name=cfg.embedder, progress=True)
    context_emb = np.zeros_like(labels.embeddings)
    i = 0
    for f, per in enumerate(snippets):
        if per:
            v = flat_emb[i : i + len(per)].mean(0)
            context_emb[f] = v / max(float(np.linalg.norm(v)), 1e-8)
            i += len(per)

    by_feature = {f: j for j, f in enumerate(stats["feature_id"])}
    names = ("density", "n_active", "mean_activation", "max_activation", "top_tokens", "histogram")
    cols: dict[str, list] = {k: [] for k in names}
    for f in range(sae.d_sae):
        j = by_feature.get(f)
        hist = [0] * cfg.histogram_bins
        if j is None:
            cols["density"].append(0.0)
            cols["n_active"].append(0)
            cols["mean_activation"].append(0.0)
            cols["max_activation"].append(0.0)
            cols["top_tokens"].append([])
        else:
            for b, c in zip(stats["hist_bins"][j], stats["hist_counts"][j]):
                hist[b] = c
            for k in ("density", "n_active", "mean_activation", "max_activation"):
                cols[k].append(stats[k][j])
            cols["top_tokens"].append([vocab[t] for t in stats["top_token_ids"][j]])
        cols["histogram"].append(hist)
    features = pa.table({
        "feature_id": np.arange(sae.d_sae, dtype=np.int32),
        "decoder": pa.FixedSizeListArray.from_arrays(sae.unit_decoder().numpy().astype(np.float32).ravel(), sae.d_in),
        **labels.columns(),
        "context_embedding": pa.FixedSizeListArray.from_arrays(context_emb.ravel(), context_emb.shape[1]),
        **cols,
        "logit_positive": logit_pos,
        "logit_negative": logit_neg,
    })
    pq.write_table(features, folder / "features.parquet")
    pq.write_table(examples, folder / "examples.parquet")
    pq.write_table(records.select(["doc_id", "position", "feature_id", "value"]), folder / "activations.parquet")
    pq.write_table(labels.candidates, folder / "label_candidates.parquet")
    return {"encoded_tokens": n_encoded, "activation_rows": records.num_rows, "examples": examples.num_rows,
            "features_fired": int(sum(1 for n in cols["n_active"] if n > 0)), "labels": labels.summary}


def _documents_table(corpus: TokenizedCorpus) -> pa.Table:
    docs = corpus.documents
    return pa.table({
        "doc_id": np.arange(len(docs), dtype=np.int32),
        "doc_key": [d.doc_id for d in docs],
        "source": [d.source for d in docs],
        "title": [d.title for d in docs],
        "text": [d.text for d in docs],
    })


def _tokens_table(corpus: TokenizedCorpus, is_bos: np.ndarray, is_eval: np.ndarray, vocab: list[str]) -> pa.Table:
    ctx = corpus.token_context()
    keep = ~is_bos
    position = corpus.ctx_start[ctx] + corpus.token_position() - 1
    return pa.table({
        "doc_id": corpus.ctx_doc[ctx][keep],
        "position": position[keep].astype(np.int32),
        "token_id": corpus.ids[keep],
        "token": np.array(vocab, dtype=object)[corpus.ids[keep]],
        "split": np.where(is_eval[keep], "eval", "train"),
    })


def _mean_norm(rows: np.ndarray) -> float:
    return float(np.linalg.norm(rows.astype(np.float32), axis=1).mean())


def _manifest(cfg, model, layer, sae, corpus, is_bos, is_eval, metrics, stages, corpus_hash, norms) -> dict[str, Any]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    sources: dict[str, int] = {}
    for d in corpus.ctx_doc:
        src = corpus.documents[d].source
        sources[src] = sources.get(src, 0) + 1
    return {
        "format": 1,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": cfg.model, "n_layers": model.n_layers, "d_model": model.d_model, "dtype": str(model.dtype),
                  "vocab_size": int(model.model.get_output_embeddings().weight.shape[0])},
        "hook": {"layer": layer, "name": hook_name(layer), "point": "residual stream after block"},
        "dictionary": {"architecture": sae.architecture, "source": sae.meta.get("loaded_from", "trained"),
                       "d_in": sae.d_in, "d_sae": sae.d_sae, "k": sae.k,
                       "format": "saelens", "path": DICTIONARY},
        "metrics": metrics,
        "corpus": {"sources": cfg.corpus, "weights": cfg.corpus_weights, "hash": corpus_hash,
                   "documents": len(corpus.documents), "contexts": corpus.n_contexts,
                   "contexts_by_source": sources, "context_len": cfg.context_len},
        "tokens": {"harvested": corpus.n_tokens, "bos": int(is_bos.sum()),
                   "train": int((~is_bos & ~is_eval).sum()), "eval": int((~is_bos & is_eval).sum()), **norms},
        "stages": stages.record,
        "config": cfg.to_dict(),
        "versions": versions,
    }
