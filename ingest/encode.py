"""Encode every corpus token through the dictionary, then summarise each feature.

The per-token sparse code (every active latent of every token) is the ground truth; everything else — density,
histograms, top and quantile examples, top tokens — is a query over it, run in DuckDB so the same
SQL a user can run later is what built the feature pages.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from featureatlas.store.schema import WINDOW
from tqdm import tqdm

from .config import AnalysisConfig
from .model import SubjectModel
from .sae import SAE
from .stages import written_atomically
from .tokens import TokenizedCorpus

# Part of the encode stage's key: bump it when its outputs change.
ENCODE_VERSION = 3
OUTPUTS = ("stats.parquet", "examples.parquet", "activations.parquet")


@dataclass
class Codes:
    """The sparse code of every corpus token in CSR layout, aligned with ``TokenizedCorpus.ids``:
    token t's active features are ``[offsets[t], offsets[t + 1])`` of ``indices`` and ``values``.
    Every active latent is kept, however many a token has (BOS rows are empty)."""

    values: np.ndarray  # [nnz] float32, > 0
    indices: np.ndarray  # [nnz] int32
    offsets: np.ndarray  # [n_tokens + 1] int64

    def tokens(self) -> np.ndarray:
        """[nnz] the token of each entry."""
        return np.repeat(np.arange(len(self.offsets) - 1), np.diff(self.offsets))

    @cached_property
    def _by_key(self) -> tuple[int, np.ndarray, np.ndarray]:
        """(width, sorted keys token * width + feature, their values): every entry findable by key."""
        width = int(self.indices.max()) + 1 if len(self.indices) else 1
        keys = self.tokens() * width + self.indices
        order = np.argsort(keys)
        return width, keys[order], self.values[order]

    def values_at(self, tokens: np.ndarray, features: np.ndarray) -> np.ndarray:
        """The activation of each (token, feature) pair, 0 where the feature is silent (a feature is
        active at most once per token)."""
        width, keys, values = self._by_key
        if not len(keys):
            return np.zeros(len(tokens), np.float32)
        want = tokens.astype(np.int64) * width + features
        at = np.clip(np.searchsorted(keys, want), 0, len(keys) - 1)
        return np.where((keys[at] == want) & (features < width), values[at], 0).astype(np.float32)


# A feature that fires in fewer corpus windows than this is counted as rare in the manifest: too
# little text for its label to be judged on held-out documents (a fifth of them each).
RARE_WINDOWS = 10
# Pre-activation cells ([tokens, d_sae] float32) held at once by the encode: 8,192 tokens at 32k
# features, 256 at a million (whose 8,192 would need 32 GiB).
ENCODE_CELLS = 1 << 28


def encode_batch(d_sae: int) -> int:
    """Tokens per encode batch at this width: as many as the pre-activation budget allows, up to 8,192."""
    return max(1, min(8192, ENCODE_CELLS // d_sae))


@torch.no_grad()
def encode_tokens(sae: SAE, acts: np.ndarray, is_bos: np.ndarray, *, device: torch.device) -> Codes:
    values, indices, counts = [], [], []
    batch = encode_batch(sae.d_sae)
    sae = sae.to(device)
    for i in tqdm(range(0, len(acts), batch), desc="encode", unit="batch"):
        x = torch.from_numpy(np.asarray(acts[i : i + batch], dtype=np.float32)).to(device)
        code = sae.encode(x)
        rows = code.row_ids().cpu().numpy()
        keep = ~is_bos[i + rows]  # BOS is recorded in the harvest but never part of the dictionary's data
        values.append(code.values.cpu().numpy()[keep])
        indices.append(code.indices.cpu().numpy().astype(np.int32)[keep])
        counts.append(np.bincount(rows[keep], minlength=len(x)))
    sae.cpu()
    return _codes(values, indices, counts)


def _codes(values: list[np.ndarray], indices: list[np.ndarray], counts: list[np.ndarray]) -> Codes:
    offsets = np.zeros(sum(len(c) for c in counts) + 1, dtype=np.int64)
    np.cumsum(np.concatenate(counts) if counts else [], out=offsets[1:])
    return Codes(np.concatenate(values).astype(np.float32) if values else np.zeros(0, np.float32),
                 np.concatenate(indices) if indices else np.zeros(0, np.int32), offsets)


def codes_path(folder: Path, i: int) -> Path:
    return folder / f"codes-{i:05d}.npz"


def encode_shard(sae: SAE, acts: np.ndarray, is_bos: np.ndarray, folder: Path, i: int, *, device: torch.device) -> dict:
    """The code of one harvest shard's rows (``acts``, with their ``is_bos``), written atomically:
    the dictionary pass is the encode's model-sized work, and shards of it run anywhere."""
    t0 = time.perf_counter()
    codes = encode_tokens(sae, acts, is_bos, device=device)
    with written_atomically(codes_path(folder, i)) as tmp:
        np.savez(tmp, values=codes.values, indices=codes.indices, counts=np.diff(codes.offsets))
    return {"tokens": len(acts), "seconds": time.perf_counter() - t0}


def load_codes(folder: Path, shards: int) -> Codes:
    """Every shard's code, joined in corpus token order."""
    parts = [np.load(codes_path(folder, i)) for i in range(shards)]
    return _codes([p["values"] for p in parts], [p["indices"] for p in parts], [p["counts"] for p in parts])


def sparse_records(codes: Codes, corpus: TokenizedCorpus) -> pa.Table:
    """One row per (token, active feature): the table behind SQL analytics."""
    ctx = corpus.token_context()
    pos_in_ctx = corpus.token_position()
    doc_pos = corpus.ctx_start[ctx] + pos_in_ctx - 1  # BOS is position -1, but has no records
    tok = codes.tokens()
    return pa.table(
        {
            "tok": pa.array(tok.astype(np.int64)),
            "ctx": pa.array(ctx[tok]),
            "doc_id": pa.array(corpus.ctx_doc[ctx[tok]]),
            "position": pa.array(doc_pos[tok].astype(np.int32)),
            "token_id": pa.array(corpus.ids[tok]),
            "feature_id": pa.array(codes.indices),
            "value": pa.array(codes.values),
        }
    )


def feature_stats(con: duckdb.DuckDBPyConnection, cfg: AnalysisConfig, n_tokens: int) -> pa.Table:
    """Per feature: density, windows fired in, mean (while active) and max activation, histogram, top tokens.
    ``con`` has the sparse records registered as ``acts``."""
    bins = cfg.histogram_bins
    return con.sql(
        f"""
        with base as (
            select feature_id, count(*) as n, avg(value) as mean_activation, max(value) as max_activation,
                   count(distinct (doc_id::bigint << 32) + position // {WINDOW}) as n_windows
            from acts group by feature_id
        ),
        hist as (
            select a.feature_id, least(floor(a.value / b.max_activation * {bins}), {bins - 1})::int as bin, count(*) as c
            from acts a join base b using (feature_id) group by all
        ),
        hist_list as (
            select feature_id, list(c order by bin) as counts, list(bin order by bin) as bins from hist group by feature_id
        ),
        tok as (
            select feature_id, token_id, count(*) as c, sum(value) as s from acts group by all
        ),
        tok_top as (
            select feature_id, list(token_id order by s desc)[1:10] as top_token_ids from tok group by feature_id
        )
        select b.feature_id, b.n / {n_tokens}::double as density, b.n as n_active, b.n_windows,
               b.mean_activation, b.max_activation, h.counts as hist_counts, h.bins as hist_bins, t.top_token_ids
        from base b join hist_list h using (feature_id) join tok_top t using (feature_id)
        order by feature_id
        """
    ).to_arrow_table()


def example_picks(con: duckdb.DuckDBPyConnection, cfg: AnalysisConfig) -> pa.Table:
    """Which (feature, context) pairs to show: the top contexts by max activation, then a few
    contexts from each lower quantile band, chosen by a hash so the pick is deterministic."""
    return con.sql(
        f"""
        with per_ctx as (
            select feature_id, ctx, max(value) as v, arg_max(tok, value) as max_tok from acts group by all
        ),
        ranked as (
            select *, row_number() over (partition by feature_id order by v desc, ctx) as rnk from per_ctx
        ),
        rest as (
            select *, ntile({cfg.quantile_bands}) over (partition by feature_id order by v, ctx) as band
            from ranked where rnk > {cfg.top_examples}
        ),
        quant as (
            select *, row_number() over (partition by feature_id, band order by hash(ctx, feature_id)) as pick from rest
        )
        select feature_id, ctx, v, max_tok, 'top' as kind, rnk as ordinal from ranked where rnk <= {cfg.top_examples}
        union all
        select feature_id, ctx, v, max_tok, 'quantile' as kind, band as ordinal from quant where pick <= {cfg.quantile_examples}
        order by feature_id, kind desc, v desc, ctx
        """
    ).to_arrow_table()


def build_examples(picks: pa.Table, codes: Codes, corpus: TokenizedCorpus, vocab: list[str], cfg: AnalysisConfig, *,
                   chunk: int = 1 << 18) -> pa.Table:
    """Token windows around each pick's strongest token, with the feature's activation per token.
    Built with array operations ``chunk`` picks at a time, never a Python object per token: a
    million-feature dictionary has millions of examples (about 33 tokens each)."""
    vocab_array = pa.array(vocab, pa.string())
    parts = [_examples_chunk(picks.slice(i, chunk), codes, corpus, vocab_array, cfg)
             for i in tqdm(range(0, max(picks.num_rows, 1), chunk), desc="examples", unit="chunk")]
    return pa.concat_tables(parts)


def _examples_chunk(picks: pa.Table, codes: Codes, corpus: TokenizedCorpus, vocab: pa.Array,
                    cfg: AnalysisConfig) -> pa.Table:
    feature = picks["feature_id"].to_numpy().astype(np.int64)
    ctx = picks["ctx"].to_numpy().astype(np.int64)
    strongest = picks["max_tok"].to_numpy().astype(np.int64)
    first = corpus.ctx_offset[ctx].astype(np.int64) + 1  # skip BOS
    a = np.maximum(first, strongest - cfg.example_window_before)
    b = np.minimum(corpus.ctx_offset[ctx + 1].astype(np.int64), strongest + cfg.example_window_after + 1)
    length = b - a
    offsets = np.zeros(len(a) + 1, np.int32)
    np.cumsum(length, out=offsets[1:])
    token = np.repeat(a - offsets[:-1], length) + np.arange(offsets[-1])  # every shown token, corpus index
    start = corpus.ctx_start[ctx].astype(np.int64) + (a - first)
    return pa.table({
        "feature_id": picks["feature_id"].cast(pa.int32()),
        "kind": picks["kind"],
        "doc_id": pa.array(corpus.ctx_doc[ctx].astype(np.int32)),
        "start": pa.array(start.astype(np.int32)),
        "tokens": pa.ListArray.from_arrays(pa.array(offsets), vocab.take(pa.array(corpus.ids[token]))),
        "activations": pa.ListArray.from_arrays(pa.array(offsets),
                                                pa.array(codes.values_at(token, np.repeat(feature, length)))),
        "max_activation": picks["v"].cast(pa.float32()),
        "max_position": pa.array((start + strongest - a).astype(np.int32)),
    })


@torch.no_grad()
def logit_effects(sae: SAE, model: SubjectModel, vocab: list[str], n: int, *, chunk: int = 512) -> tuple[list, list]:
    """Top ``n`` promoted and suppressed tokens of each decoder direction through the final norm's
    gain and the unembedding (a direct effect: it ignores every later layer)."""
    gain, unembed = model.unembedding()
    unembed = unembed.to(model.device)
    pos: list = []
    neg: list = []
    for i in tqdm(range(0, sae.d_sae, chunk), desc="logit effects", unit="chunk"):
        logits = (sae.unit_decoder()[i : i + chunk].to(model.device) * gain.to(model.device)) @ unembed.T
        for sign, out in ((1, pos), (-1, neg)):
            vals, idx = (sign * logits).topk(n, dim=-1)
            for vs, ids in zip((sign * vals).cpu().tolist(), idx.cpu().tolist()):
                out.append([{"token": vocab[t], "value": round(v, 4)} for t, v in zip(ids, vs)])
    return pos, neg


def run(sae: SAE, model: SubjectModel, corpus: TokenizedCorpus, codes: Codes, is_bos: np.ndarray, vocab: list[str],
        cfg: AnalysisConfig, folder: Path, shards: list[dict]) -> dict:
    """The encode stage once its shards are done (``codes``, what ``encode_shard`` returned as
    ``shards``): every token's code (``activations.parquet``, the SQL table), each feature's
    statistics and logit effects (``stats.parquet``) and its examples."""
    encode_seconds = sum(r["seconds"] for r in shards)
    records = sparse_records(codes, corpus)
    n_encoded = int((~is_bos).sum())
    con = duckdb.connect()
    con.register("acts", records)
    stats = feature_stats(con, cfg, n_encoded)
    examples = build_examples(example_picks(con, cfg), codes, corpus, vocab, cfg)
    con.close()
    logit_pos, logit_neg = logit_effects(sae, model, vocab, cfg.logit_effects)
    columns = stat_columns(stats, sae.d_sae, cfg.histogram_bins, vocab)
    pq.write_table(pa.table({**columns, "logit_positive": logit_pos, "logit_negative": logit_neg}), folder / "stats.parquet")
    pq.write_table(examples, folder / "examples.parquet")
    pq.write_table(records.select(["doc_id", "position", "feature_id", "value"]), folder / "activations.parquet")
    # The dictionary pass alone (reading the harvest included), set against the matmul limit by scripts/bench_scale.py.
    return {"encoded_tokens": n_encoded, "encode_tokens_per_s": round(sum(r["tokens"] for r in shards) / encode_seconds, 1),
            "activation_rows": records.num_rows, "examples": examples.num_rows,
            "features_fired": int(sum(1 for n in columns["n_active"] if n > 0)),
            "features_rare": int(sum(1 for n in columns["n_windows"] if 0 < n < RARE_WINDOWS))}


def stat_columns(stats: pa.Table, d_sae: int, bins: int, vocab: list[str]) -> dict[str, list]:
    """``feature_stats``'s rows (fired features only) as one value per feature, silent ones zero."""
    s = stats.to_pydict()
    by_feature = {f: j for j, f in enumerate(s["feature_id"])}
    scalars = ("density", "n_active", "n_windows", "mean_activation", "max_activation")
    cols: dict[str, list] = {"feature_id": list(range(d_sae)), **{k: [] for k in (*scalars, "top_tokens", "histogram")}}
    for f in range(d_sae):
        j = by_feature.get(f)
        hist = [0] * bins
        if j is not None:
            for b, c in zip(s["hist_bins"][j], s["hist_counts"][j]):
                hist[b] = c
        for k in scalars:
            cols[k].append(s[k][j] if j is not None else 0)
        cols["top_tokens"].append([vocab[t] for t in s["top_token_ids"][j]] if j is not None else [])
        cols["histogram"].append(hist)
    return cols
