"""The ingest: a list of stages in data-flow order (corpus, windows, harvest, train, evaluate,
encode, families, labels, intervention, map), then publish. Each stage is skipped when its inputs did not change, so a re-run or a
resumed run only does what is left (``ingest/stages.py``)."""

from __future__ import annotations

import functools
import importlib.util
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from featureatlas.store import manifest as M
from featureatlas.store.dictionaries import dictionaries_table, dictionary_id
from featureatlas.store.errors import BadConfig
from featureatlas.store.location import is_remote, remote_manifest, upload, work_folder
from featureatlas.store.publish import publish, write_duckdb, write_lance
from featureatlas.store.schema import vector_matrix
from threadpoolctl import threadpool_limits

from . import encode, families, tables, windows
from .config import AtlasConfig
from .corpus import corpus_fingerprint
from .embed import VERSION as EMBED_VERSION
from .embed import embed
from .evaluate import METRICS_VERSION, loss_recovered, reconstruction_metrics
from .feature_map import MAP_VERSION, coactivation, feature_map, function_vectors
from .harvest import harvest_shard, harvest_summary, load_activations, shard_plan
from .labels import intervention
from .labels import stage as label_stage
from .labels.label import LABELS_VERSION
from .loaders import load_dictionary
from .model import SubjectModel, load_model, resolve_dtype
from .sae import SAE
from .stages import ShardRunner, Stage, Stages, local_shards, shard_records, stage_key
from .tokens import TokenizedCorpus, tokenize_corpus
from .train import DictionarySpec, train_saes

log = logging.getLogger(__name__)
# Part of the publish key: bump it when the published layout changes.
PUBLISH_FORMAT = 5


def hook_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


@dataclass
class Ingest:
    """What the stages of one ingest share: the config, the model, the hook layer, a dictionary to
    load instead of training, and each finished stage's results, read from its folder when asked."""

    cfg: AtlasConfig
    model: SubjectModel
    layer: int
    loaded: SAE | None
    corpus_hash: str
    stages: Stages

    @classmethod
    def open(cls, cfg: AtlasConfig, runner: ShardRunner = local_shards) -> "Ingest":
        """Loads the model and checks every input before anything is written; ``runner`` runs the
        sharded stages' shards."""
        corpus_hash = corpus_fingerprint(cfg.corpus.corpus)
        model = load_model(cfg.model.model, device=cfg.run.device, dtype=cfg.run.dtype,
                           cache_dir=cfg.model.model_cache, layer=cfg.model.layer)
        loaded = _loaded_dictionary(cfg, model)
        named = loaded.meta.get("hook_layer") if loaded is not None else None
        layer = cfg.model.layer if cfg.model.layer is not None else named if named is not None else model.n_layers // 2
        return cls(cfg, model, layer, loaded, corpus_hash, Stages(work_folder(cfg.run.atlas) / M.CACHE, cfg, runner))

    def folder(self, stage: str) -> Path:
        return self.stages.folder(stage)

    @cached_property
    def corpus(self) -> TokenizedCorpus:
        return TokenizedCorpus.load(self.folder("corpus"))

    @cached_property
    def is_bos(self) -> np.ndarray:
        return self.corpus.token_position() == 0

    @cached_property
    def is_eval(self) -> np.ndarray:
        return self.corpus.ctx_eval[self.corpus.token_context()]

    @cached_property
    def acts(self):
        return load_activations(self.folder("harvest"), self.corpus, self.cfg.harvest.shard_tokens)

    @cached_property
    def sae(self) -> SAE:
        return SAE.load(self.folder("train") / M.DICTIONARY)

    @cached_property
    def vocab(self) -> list[str]:
        """Display text of every token id the unembedding can produce."""
        size = self.model.model.get_output_embeddings().weight.shape[0]
        return [self.model.tokenizer.decode([i]) for i in range(size)]

    @cached_property
    def documents(self) -> pa.Table:
        """The published ``documents`` table (the labels stage reads it too: built once)."""
        return tables.documents_table(self.corpus)

    @cached_property
    def tokens(self) -> pa.Table:
        return tables.tokens_table(self.corpus, self.is_bos, self.is_eval, self.vocab)

    @cached_property
    def corpus_windows(self) -> pa.Table:
        """Every corpus window's text, not yet embedded (the windows stage's shards embed it)."""
        return windows.cut_windows(self.documents, self.tokens)

    @property
    def train_dtype(self) -> torch.dtype:
        return resolve_dtype(self.cfg.run.dtype, self.model.device)


def _run_corpus(ctx: Ingest, folder: Path) -> dict[str, Any]:
    corpus = tokenize_corpus(ctx.cfg.corpus, ctx.model.tokenizer, ctx.model.bos_id)  # raises on an empty corpus
    corpus.save(folder)
    return {"documents": len(corpus.documents), "contexts": corpus.n_contexts, "tokens": corpus.n_tokens,
            "eval_contexts": int(corpus.ctx_eval.sum())}


def _windows_shard(ctx: Ingest, folder: Path, i: int) -> dict[str, Any]:
    embed_fn = lambda texts: embed(texts, name=ctx.cfg.labels.embedder, progress=True)  # noqa: E731
    return windows.embed_shard(ctx.corpus_windows, embed_fn, folder, i)


def _run_windows(ctx: Ingest, folder: Path) -> dict[str, Any]:
    return windows.run(ctx.corpus_windows, folder)


def _harvest_shard(ctx: Ingest, folder: Path, i: int) -> dict[str, Any]:
    return harvest_shard(ctx.model, ctx.corpus, ctx.layer, folder, i, batch=ctx.cfg.harvest.harvest_batch,
                         shard_tokens=ctx.cfg.harvest.shard_tokens)


def _finish_harvest(ctx: Ingest, folder: Path) -> dict[str, Any]:
    typical = ctx.acts[np.flatnonzero(~ctx.is_bos)[:20_000]]
    return {**harvest_summary(ctx.corpus, shard_records(folder)), "bos_mean_norm": _mean_norm(ctx.acts[ctx.is_bos]),
            "token_mean_norm": _mean_norm(typical)}


def _run_train(ctx: Ingest, folder: Path) -> dict[str, Any]:
    meta = {"model_name": ctx.cfg.model.model, "hook_name": hook_name(ctx.layer), "hook_layer": ctx.layer,
            "context_size": ctx.cfg.corpus.context_len, "prepend_bos": True}
    if ctx.loaded is not None:  # saved in our layout, with our hook, like a trained one
        ctx.loaded.meta.update(meta)
        ctx.loaded.save(folder / M.DICTIONARY)
        return {"loaded_from": ctx.cfg.train.dictionary, "format": ctx.loaded.meta["loaded_from"]["format"],
                "architecture": ctx.loaded.architecture}
    t = ctx.cfg.train
    # Each width from a seed of its own: from one seed, a wider dictionary's first latents would start
    # as copies of the narrower one's, and families would measure the shared start, not splitting.
    specs = [DictionarySpec(width, t.k, t.lr_for(width), t.architecture, t.sparsity_coef, t.aux_k, t.aux_coef,
                            t.dead_tokens, dict(meta), seed=ctx.cfg.run.seed + i) for i, width in enumerate(t.dictionary_widths)]
    results = train_saes(ctx.acts, specs, rows=np.flatnonzero(~ctx.is_bos & ~ctx.is_eval), tokens=t.train_tokens,
                         batch=t.train_batch, seed=ctx.cfg.run.seed, device=ctx.model.device,
                         checkpoint=folder / "checkpoint.pt", compute_dtype=ctx.train_dtype)
    sae = results[0].sae if len(results) == 1 else SAE.stack([r.sae for r in results])
    sae.save(folder / M.DICTIONARY)
    (folder / "checkpoint.pt").unlink(missing_ok=True)
    last = results[-1]  # the widest: the atlas's default dictionary
    summary = {"steps": last.steps, "tokens": last.tokens, "input_scale": last.input_scale,
               "train_fvu": last.final_fvu, "train_dead_fraction": last.dead_fraction}
    if len(results) > 1:
        summary["parts"] = {str(s.d_sae): {"train_fvu": r.final_fvu, "train_dead_fraction": r.dead_fraction}
                            for s, r in zip(specs, results)}
    return summary


def _train_inputs(ctx: Ingest) -> Any:
    """A loaded dictionary's files (a replaced file is noticed), or the training dtype."""
    if ctx.loaded is not None:
        return ["loaded", _fingerprint(Path(ctx.cfg.train.dictionary).expanduser())]
    return str(ctx.train_dtype)


def _run_evaluate(ctx: Ingest, folder: Path) -> dict[str, Any]:
    """Held-out metrics of the default dictionary, and under ``parts`` by width of every other one
    these latents hold (a nested dictionary's prefixes, a stack's narrower widths: each a
    dictionary of its own in the atlas, ``store/dictionaries.py``)."""
    held = ctx.acts[~ctx.is_bos & ctx.is_eval]
    parts = ctx.sae.parts  # the default last
    saes = [ctx.sae.part(i) for i in range(len(parts))] if len(parts) > 1 else [ctx.sae]
    losses = loss_recovered(ctx.model, saes, ctx.corpus, ctx.layer, contexts=ctx.cfg.evaluate.ce_eval_contexts,
                            batch=ctx.cfg.harvest.harvest_batch)
    measured = [reconstruction_metrics(sae, held) | loss for sae, loss in zip(saes, losses)]
    metrics = measured[-1]
    if len(parts) > 1:
        metrics["parts"] = {str(width): m for (_, width), m in zip(parts[:-1], measured[:-1])}
    return metrics


def _encode_shard(ctx: Ingest, folder: Path, i: int) -> dict[str, Any]:
    a, b = ctx.acts.starts[i], ctx.acts.starts[i + 1]
    return encode.encode_shard(ctx.sae, ctx.acts.shards[i], ctx.is_bos[a:b], folder, i, device=ctx.model.device)


def _run_encode(ctx: Ingest, folder: Path) -> dict[str, Any]:
    records = shard_records(folder)
    codes = encode.load_codes(folder, len(records))
    return encode.run(ctx.sae, ctx.model, ctx.corpus, codes, ctx.is_bos, ctx.vocab, ctx.cfg.analysis, folder, records)


def _run_families(ctx: Ingest, folder: Path) -> dict[str, Any]:
    """Parents and children across the dictionaries these latents hold (``ingest/families.py``); an
    empty table for one dictionary."""
    parts = list(ctx.sae.parts)
    return families.run(ctx.sae.unit_decoder().numpy(), parts, {w: dictionary_id(ctx.layer, w) for _, w in parts},
                        ctx.folder("encode"), folder)


def _labels_shard(ctx: Ingest, folder: Path, i: int) -> dict[str, Any]:
    con = tables.analytics_connection(ctx.documents, ctx.tokens, ctx.folder("encode"),
                                      label_stage.shard_features(ctx.sae.d_sae, ctx.cfg.labels, i))
    try:
        return label_stage.run_shard(con, ctx.sae.d_sae, ctx.cfg.labels, ctx.folder("encode"), ctx.folder("windows"),
                                     folder, i, seed=ctx.cfg.run.seed, device=ctx.cfg.run.device)
    finally:
        con.close()


def _run_labels(ctx: Ingest, folder: Path) -> dict[str, Any]:
    return label_stage.run(ctx.sae.d_sae, ctx.cfg.labels, ctx.folder("encode"), ctx.folder("windows"), folder,
                           shard_records(folder))


def _run_intervention(ctx: Ingest, folder: Path) -> dict[str, Any]:
    """The intervention score of a sample of labelled live features (of every one when intervention
    is a label scorer); the publish step merges it into their ``label_scores``."""
    stats = pq.read_table(ctx.folder("encode") / "stats.parquet", columns=["feature_id", "max_activation"]).to_pydict()
    maxima = dict(zip(stats["feature_id"], stats["max_activation"]))
    labels = pq.read_table(ctx.folder("labels") / "labels.parquet", columns=["feature_id", "label_source", "label_embedding"])
    vectors = vector_matrix(labels["label_embedding"])
    labelled = [f for f, src in zip(labels["feature_id"].to_pylist(), labels["label_source"].to_pylist())
                if src != "none" and maxima[f] > 0]
    if intervention.SCORER not in ctx.cfg.labels.label_scorers:
        labelled = intervention.sample(labelled, ctx.cfg.intervention.intervention_features, ctx.cfg.run.seed)
    scores = intervention.score_labels(ctx.model, ctx.sae, ctx.layer, {f: vectors[f] for f in labelled}, maxima, ctx.cfg)
    pq.write_table(pa.table({"feature_id": pa.array(list(scores), pa.int32()),
                             "score": pa.array(list(scores.values()), pa.float32())}), folder / "intervention.parquet")
    return {"scored": len(scores), "mean": float(np.mean(list(scores.values()))) if scores else None}


def _run_map(ctx: Ingest, folder: Path) -> dict[str, Any]:
    """The layout of ``map_layout``: by decoder direction, or by what features do, from the encode
    stage's activations and the labels stage's context embeddings (``ingest/feature_map.py``)."""
    # Under one BLAS thread: the layout's SVD and UMAP's spectral start follow the thread count in
    # their last bits, and UMAP turns those into another map (the same atlas built with 1 and 2 BLAS
    # threads differed only in map_x/map_y). One thread gives the same map whatever the cores.
    with threadpool_limits(1, user_api="blas"):
        return _lay_out(ctx, folder)


def _lay_out(ctx: Ingest, folder: Path) -> dict[str, Any]:
    decoder = ctx.sae.unit_decoder().numpy()
    seed = ctx.cfg.run.seed
    vectors = decoder
    if ctx.cfg.map.map_layout == "function":
        acts = pq.read_table(ctx.folder("encode") / "activations.parquet", columns=["feature_id", "doc_id", "value"])
        coact = coactivation(acts["feature_id"].to_numpy(), acts["doc_id"].to_numpy(), acts["value"].to_numpy(),
                             ctx.sae.d_sae, seed=seed)
        labels = pq.read_table(ctx.folder("labels") / "labels.parquet", columns=["feature_id", "context_embedding"])
        embedded = vector_matrix(labels["context_embedding"])
        context = np.zeros((ctx.sae.d_sae, embedded.shape[1]), np.float32)
        context[labels["feature_id"].to_numpy()] = embedded
        vectors = function_vectors(coact, context, decoder, seed=seed)
    xy = feature_map(vectors, neighbors=ctx.cfg.map.map_neighbors, seed=seed)
    pq.write_table(pa.table({"map_x": xy[:, 0], "map_y": xy[:, 1]}), folder / "map.parquet")
    return {"features": len(xy), "layout": ctx.cfg.map.map_layout}


STAGES: list[Stage[Ingest]] = [
    # The tokenizer and the corpus files' fingerprint are inputs too: the same settings over changed
    # files, or another model's tokenizer, give other contexts.
    Stage("corpus", 1, ("corpus",), (), ("contexts.npz", "documents.jsonl"), _run_corpus,
          inputs=lambda ctx: [ctx.cfg.model.model, ctx.corpus_hash]),
    # Only the embedder of the labels group matters here: another scorer or explainer keeps the windows.
    # Sharded by windows: each shard embeds SHARD_WINDOWS of them.
    Stage("windows", windows.WINDOWS_VERSION, (), ("corpus",), windows.OUTPUTS, _run_windows,
          inputs=lambda ctx: [ctx.cfg.labels.embedder, EMBED_VERSION],
          shards=lambda ctx: windows.shards(ctx.corpus_windows), run_shard=_windows_shard),
    # Sharded by tokens: each shard a range of contexts through the model.
    # The layer is the one in use (a loaded dictionary's own when --layer is not given).
    Stage("harvest", 1, ("harvest", "model"), ("corpus",), (), _finish_harvest,
          inputs=lambda ctx: [ctx.layer, str(ctx.model.dtype)],
          shards=lambda ctx: len(shard_plan(ctx.corpus, ctx.cfg.harvest.shard_tokens)), run_shard=_harvest_shard),
    # 2: BatchTopK's running threshold starts at its first batch's value (was 0).
    Stage("train", 2, ("train", "run"), ("harvest",), (M.DICTIONARY,), _run_train, inputs=_train_inputs),
    Stage("evaluate", METRICS_VERSION, ("evaluate",), ("train",), (), _run_evaluate),
    # Sharded as the harvest is: the dictionary pass over each harvest shard, then the statistics
    # and examples over all of them.
    Stage("encode", encode.ENCODE_VERSION, ("analysis",), ("train",), encode.OUTPUTS, _run_encode,
          shards=lambda ctx: len(ctx.acts.shards), run_shard=_encode_shard),
    Stage("families", families.FAMILIES_VERSION, (), ("train", "encode"), families.OUTPUTS, _run_families),
    # Sharded by features (label_shard_features a shard), then joined with every feature's context embedding.
    Stage("labels", LABELS_VERSION, ("labels", "run"), ("encode", "windows"), label_stage.OUTPUTS, _run_labels,
          shards=lambda ctx: label_stage.shards(ctx.sae.d_sae, ctx.cfg.labels), run_shard=_labels_shard),
    # Generation with features clamped: its own stage, so a change of its settings leaves the labels be.
    # (Whether intervention is a label scorer, which decides sample or all, is in the labels key.)
    Stage("intervention", 1, ("intervention", "run"), ("train", "encode", "labels"), ("intervention.parquet",),
          _run_intervention),
    # The function layout reads the encode stage's activations and the labels stage's context
    # embeddings, so a re-label (another explainer or scorer) lays the map out again (~30 s here).
    Stage("map", MAP_VERSION, ("map", "run"), ("train", "encode", "labels"), ("map.parquet",), _run_map),
]


def run_ingest(cfg: AtlasConfig) -> dict[str, Any]:
    """Builds (or refreshes) the atlas at ``cfg.run.atlas`` and returns its manifest. An atlas on an
    object store is built in a local work folder and uploaded (``store/location.py``)."""
    if is_remote(cfg.run.atlas):
        remote_manifest(cfg.run.atlas)  # an unreachable bucket or bad credentials fail now, not after the work
    runner = ray_runner(cfg) if cfg.run.ray else local_shards
    try:
        ctx = Ingest.open(cfg, runner)
        summaries = {stage.name: ctx.stages.ensure(stage, ctx) for stage in STAGES}
    finally:
        if runner is not local_shards:
            runner.close()
    root = work_folder(cfg.run.atlas)
    published = ("evaluate", "windows", "encode", "families", "labels", "intervention", "map")
    publish_key = stage_key(PUBLISH_FORMAT, [ctx.stages.keys[s] for s in published])
    if (M.read(root) or {}).get("publish_key") == publish_key:
        log.info("publish   skipped: %s already holds these results", root)
    else:
        manifest = _manifest(ctx, summaries)
        manifest["publish_key"] = publish_key
        publish(root, lambda staging: _build(ctx, staging, manifest), manifest)
        log.info("atlas published at %s", root)
    if is_remote(cfg.run.atlas) and (remote_manifest(cfg.run.atlas) or {}).get("publish_key") != publish_key:
        upload(root, cfg.run.atlas)
        log.info("atlas uploaded to %s", cfg.run.atlas)
    return M.read(root) or {}


def ray_runner(cfg: AtlasConfig):
    """The shards of every sharded stage on the Ray cluster ``--ray`` names (``ingest/cluster.py``);
    each actor opens the same ingest with the local runner."""
    if importlib.util.find_spec("ray") is None:
        raise BadConfig("--ray", "needs Ray: pip install 'featureatlas[ray]'")
    from .cluster import RayShards, connect

    connect(cfg.run.ray)
    gpu = cfg.run.device.startswith("cuda")
    # An actor sees only the GPU Ray gave it, as cuda:0; a relative atlas folder would resolve
    # against the worker's working directory, not the driver's.
    atlas = cfg.run.atlas if is_remote(cfg.run.atlas) else str(work_folder(cfg.run.atlas).resolve())
    worker_cfg = cfg.replace(ray="", atlas=atlas, device="cuda" if gpu else cfg.run.device)
    return RayShards(functools.partial(Ingest.open, worker_cfg), workers=cfg.run.ray_workers, gpus=1 if gpu else 0,
                     threads=cfg.run.threads)


def _build(ctx: Ingest, staging: Path, manifest: dict[str, Any]) -> dict[str, int]:
    """Every published part, from the stages' outputs and the manifest that will name them;
    returns the LanceDB table versions."""
    ctx.sae.save(staging / M.DICTIONARY)
    features = tables.features_table(ctx.sae, ctx.folder("encode"), ctx.folder("labels"), ctx.folder("map"),
                                     ctx.folder("intervention"), primary=ctx.cfg.labels.label_scorers[0])
    encode = ctx.folder("encode")
    corpus_windows = pq.read_table(ctx.folder("windows") / windows.OUTPUTS[0])
    versions = write_lance(staging / M.LANCE, features, pq.read_table(encode / "examples.parquet"), corpus_windows,
                           ctx.sae.d_in)
    write_duckdb(staging / M.DUCKDB, {
        "documents": ctx.documents,
        "tokens": ctx.tokens,
        "windows": corpus_windows,
        "activations": pq.read_table(encode / "activations.parquet"),
        "features": features,
        "label_candidates": pq.read_table(ctx.folder("labels") / "label_candidates.parquet"),
        "dictionaries": dictionaries_table(manifest),
        "families": pq.read_table(ctx.folder("families") / families.OUTPUTS[0]),
    })
    return versions


def _loaded_dictionary(cfg: AtlasConfig, model: SubjectModel) -> SAE | None:
    """The dictionary ``--dictionary`` names, checked against the model's hook point."""
    if not cfg.train.dictionary:
        return None
    sae = load_dictionary(cfg.train.dictionary, k=cfg.train.k)
    if sae.d_in != model.d_model:
        raise BadConfig("--dictionary", f"its d_in is {sae.d_in} but {cfg.model.model}'s residual stream has d_model "
                                        f"{model.d_model}: it was trained on another model or hook point")
    layer = cfg.model.layer if cfg.model.layer is not None else sae.meta.get("hook_layer")
    if layer is not None and not 0 <= layer < model.n_layers:
        raise BadConfig("--layer", f"the dictionary's hook layer {layer} is outside the model's 0..{model.n_layers - 1}")
    return sae


def _fingerprint(path: Path) -> list:
    """Names, sizes and modification times: enough to notice a replaced dictionary file."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def _mean_norm(rows: np.ndarray) -> float:
    return float(np.linalg.norm(rows.astype(np.float32), axis=1).mean())


def _firing(d_sae: int, encoded: dict[str, Any]) -> dict[str, Any]:
    """How many features never fired on the whole corpus, and how many fired too rarely to judge a
    label on (a wide dictionary over a short corpus has many of both, and says so)."""
    fired, rare = encoded["features_fired"], encoded.get("features_rare")
    return {"dead": d_sae - fired, "rare": rare, "live": None if rare is None else fired - rare,
            "rare_below_windows": encode.RARE_WINDOWS}


def _manifest(ctx: Ingest, summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    cfg, corpus, sae, model = ctx.cfg, ctx.corpus, ctx.sae, ctx.model
    sources: dict[str, int] = {}
    for d in corpus.ctx_doc:
        sources[corpus.documents[d].source] = sources.get(corpus.documents[d].source, 0) + 1
    norms = {k: summaries["harvest"][k] for k in ("bos_mean_norm", "token_mean_norm")}
    return {
        "format": 2,
        "created_at": M.now(),
        "model": {"name": cfg.model.model, "n_layers": model.n_layers, "d_model": model.d_model, "dtype": str(model.dtype),
                  "vocab_size": len(ctx.vocab)},
        "hook": {"layer": ctx.layer, "name": hook_name(ctx.layer), "point": "residual stream after block"},
        "dictionary": {"architecture": sae.architecture, "source": sae.meta.get("loaded_from", "trained"),
                       "d_in": sae.d_in, "d_sae": sae.d_sae, "k": sae.k, "format": "saelens", "path": M.DICTIONARY,
                       "parts": [list(p) for p in sae.parts]},
        "metrics": {k: v for k, v in summaries["evaluate"].items() if k != "seconds"},
        "families": {k: v for k, v in summaries["families"].items() if k != "seconds"},
        "corpus": {"sources": cfg.corpus.corpus, "weights": cfg.corpus.corpus_weights, "hash": ctx.corpus_hash,
                   "documents": len(corpus.documents), "contexts": corpus.n_contexts,
                   "contexts_by_source": sources, "context_len": cfg.corpus.context_len},
        "tokens": {"harvested": corpus.n_tokens, "bos": int(ctx.is_bos.sum()),
                   "train": int((~ctx.is_bos & ~ctx.is_eval).sum()), "eval": int((~ctx.is_bos & ctx.is_eval).sum()), **norms},
        "labels": summaries["labels"].get("labels"),
        "firing": _firing(sae.d_sae, summaries["encode"]),
        "stages": ctx.stages.record,
        "config": cfg.to_dict(),
        "versions": M.package_versions(),
    }

