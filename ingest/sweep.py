"""Scaling laws at small scale: how held-out FVU falls with training compute, and how to split a
compute budget between features and tokens (the method the seed paper used to size its largest run).

A grid of TopK dictionaries (feature counts × token budgets, fixed k, so FVU is at fixed L0) is trained
on an atlas's cached activations. Training compute is C = 6 · d_in · F · T FLOPs (forward and backward
through the encoder, which dominates at k ≪ F). The compute frontier is the set of runs that no other run
beats on both compute and FVU; on it we fit FVU = a · C^-b and, as power laws of C, the feature count
and token budget of the frontier runs, which give the compute-optimal allocation for a target compute.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from featureatlas.store.errors import BadParameter

from .evaluate import reconstruction_metrics
from .train import train_sae

log = logging.getLogger(__name__)


@dataclass
class Run:
    features: int
    tokens: int
    compute: float  # FLOPs
    fvu: float  # held-out, without the outlier tokens (see evaluate.py)
    dead_fraction: float
    seconds: float


def run_grid(train: np.ndarray, held: np.ndarray, *, features: list[int], tokens: list[int], k: int, batch: int,
             seed: int, device: torch.device) -> list[Run]:
    runs = []
    for f in features:
        for t in tokens:
            t0 = time.perf_counter()
            sae = train_sae(train, d_sae=f, k=min(k, f), tokens=t, batch=batch, lr=2e-4 / (f / 16384) ** 0.5, aux_k=256,
                            aux_coef=1 / 32, dead_tokens=min(200_000, t // 2), seed=seed, device=device).sae
            m = reconstruction_metrics(sae, held)
            # Typical tokens: the few outliers (norm > 10x the median) would otherwise dominate the pooled FVU.
            fvu = 1 - m["variance_explained_without_outliers"]
            runs.append(Run(f, t, 6.0 * train.shape[1] * f * t, fvu, m["dead_fraction"], time.perf_counter() - t0))
            log.info("sweep: F=%d T=%d FVU=%.4f", f, t, fvu)
    return runs


def frontier(runs: list[Run]) -> list[Run]:
    """Runs that no cheaper-or-equal run beats on FVU, by increasing compute."""
    out: list[Run] = []
    for r in sorted(runs, key=lambda r: (r.compute, r.fvu)):
        if not out or r.fvu < out[-1].fvu:
            out.append(r)
    return out


def power_law(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(a, b) with y ≈ a · x^b, least squares in log-log space."""
    b, log_a = np.polyfit(np.log(x), np.log(y), 1)
    return float(np.exp(log_a)), float(b)


def fit(runs: list[Run], target_compute: float) -> dict:
    front = frontier(runs)
    if len(front) < 2:
        raise BadParameter("--features", "the compute frontier has fewer than two runs: widen the grid "
                                         "(more feature counts or token budgets)")
    c = np.array([r.compute for r in front])
    loss_a, loss_b = power_law(c, np.array([r.fvu for r in front]))
    feat_a, feat_b = power_law(c, np.array([r.features for r in front], dtype=float))
    tok_a, tok_b = power_law(c, np.array([r.tokens for r in front], dtype=float))
    return {
        "fvu_vs_compute": {"a": loss_a, "exponent": loss_b},
        "features_vs_compute": {"a": feat_a, "exponent": feat_b},
        "tokens_vs_compute": {"a": tok_a, "exponent": tok_b},
        "frontier": [asdict(r) for r in front],
        "target_compute": target_compute,
        "optimal_features": feat_a * target_compute**feat_b,
        "optimal_tokens": tok_a * target_compute**tok_b,
        "predicted_fvu": loss_a * target_compute**loss_b,
    }


def plot(runs: list[Run], result: dict, out: Path) -> list[Path]:
    """Two PNGs: FVU vs compute with the frontier and its fit; features vs tokens, frontier marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    front = {(r["features"], r["tokens"]) for r in result["frontier"]}
    c = np.array([r.compute for r in runs])
    fig, ax = plt.subplots(figsize=(6, 4.2))
    sc = ax.scatter(c, [r.fvu for r in runs], c=np.log2([r.features for r in runs]), cmap="viridis", s=36, zorder=3)
    fc = np.array([r["compute"] for r in result["frontier"]])
    ax.plot(fc, [r["fvu"] for r in result["frontier"]], "o", mfc="none", mec="crimson", ms=11, label="frontier")
    grid = np.geomspace(c.min(), max(c.max(), result["target_compute"]), 50)
    law = result["fvu_vs_compute"]
    ax.plot(grid, law["a"] * grid ** law["exponent"], "--", color="crimson",
            label=f"FVU = {law['a']:.3g} · C^{law['exponent']:.3f}")
    ax.set(xlabel="training compute C = 6·d_in·F·T (FLOPs)", ylabel="held-out FVU",
           title="TopK dictionaries: FVU vs compute (fixed k)")
    loss_png = _save(fig, ax, sc, "log2 features", out / "sweep_fvu_vs_compute.png")

    fig, ax = plt.subplots(figsize=(6, 4.2))
    sc = ax.scatter([r.tokens for r in runs], [r.features for r in runs], c=[r.fvu for r in runs], cmap="magma_r", s=60)
    for r in runs:
        if (r.features, r.tokens) in front:
            ax.plot(r.tokens, r.features, "s", mfc="none", mec="crimson", ms=13)
    ax.plot(result["optimal_tokens"], result["optimal_features"], "*", color="crimson", ms=14,
            label=f"optimal at C={result['target_compute']:.2g}")
    ax.set(xlabel="training tokens T", ylabel="features F", title="Grid (colour: FVU; squares: frontier)")
    grid_png = _save(fig, ax, sc, "held-out FVU", out / "sweep_features_vs_tokens.png")
    return [loss_png, grid_png]


def _save(fig, ax, points, colour_label: str, path: Path) -> Path:
    """Log-log axes, a colour bar for ``points``, the legend; written as PNG and closed."""
    import matplotlib.pyplot as plt

    ax.set(xscale="log", yscale="log")
    fig.colorbar(points, label=colour_label)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write(runs: list[Run], result: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "sweep.json"
    path.write_text(json.dumps({"runs": [asdict(r) for r in runs], **result}, indent=2))
    return path
