"""Dictionary quality on the held-out split: L0, variance explained, dead fraction, loss recovered."""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from .model import SubjectModel
from .sae import SAE
from .tokens import TokenizedCorpus

# Part of the evaluate stage's key: bump it when the metrics change, so old results are recomputed.
METRICS_VERSION = 4  # 3: each prefix of a nested dictionary measured too; 4: under "parts", a stack's widths too


@torch.no_grad()
def reconstruction_metrics(sae: SAE, acts: np.ndarray, *, batch: int = 4096) -> dict[str, float]:
    """``acts`` [n, d_in]: held-out rows, BOS excluded. ``err`` is kept per token (not summed on
    the fly) so the metric can be restricted without a second pass.

    FVU is computed about the mean of the held-out rows: 1 - sum||x - x_hat||^2 / sum||x - mean||^2.
    About zero it would flatter the dictionary, as the residual stream has a large constant part.
    """
    x_all = torch.from_numpy(np.asarray(acts, dtype=np.float32))
    err = torch.empty(len(x_all))
    l0 = 0.0
    fired = torch.zeros(sae.d_sae, dtype=torch.bool)
    for i in range(0, len(x_all), batch):
        x = x_all[i : i + batch]
        active = sae.activations(x) > 0  # all of them: a threshold architecture's L0 is not capped
        err[i : i + batch] = (x - sae.reconstruct(x)).pow(2).sum(1)
        l0 += float(active.sum())
        fired |= active.any(0)
    # A handful of tokens (mostly the first after BOS) carry norms ~100x the median and dominate the
    # pooled variance; we also report the figure without them so neither number hides the other.
    norm = x_all.norm(dim=1)
    typical = norm <= OUTLIER_NORM_RATIO * norm.median()
    fvu = float(err.sum() / _variance(x_all))
    fvu_typical = float(err[typical].sum() / _variance(x_all[typical]))
    return {
        "eval_tokens": int(len(x_all)),
        "l0": l0 / len(x_all),
        "fvu": fvu,
        "variance_explained": 1 - fvu,
        "variance_explained_without_outliers": 1 - fvu_typical,
        "outlier_tokens": int((~typical).sum()),
        "dead_fraction": float(1 - fired.float().mean()),
    }


OUTLIER_NORM_RATIO = 10.0


def _variance(x: torch.Tensor) -> torch.Tensor:
    """Total squared deviation about the mean, in float64 (sums over ~1e6 tokens of large norms)."""
    x = x.double()
    return (x - x.mean(0)).pow(2).sum()


def loss_recovered(
    model: SubjectModel, saes: list[SAE], corpus: TokenizedCorpus, layer: int, *, contexts: int, batch: int
) -> list[dict[str, float]]:
    """Per dictionary of ``saes`` (all at block ``layer``): CE of the model with the block's output
    replaced by its reconstruction, against the clean model and against zero-ablation:
    (CE_zero - CE_sae) / (CE_zero - CE_clean). The clean and zero-ablated passes do not depend on the
    dictionary, so they run once for all of them (a Matryoshka dictionary's prefixes are measured together)."""
    length = int(np.diff(corpus.ctx_offset).max())
    chosen = [c for c in np.flatnonzero(corpus.ctx_eval) if corpus.ctx_offset[c + 1] - corpus.ctx_offset[c] == length]
    chosen = chosen[:contexts]
    if not chosen:
        return [{} for _ in saes]
    variants = {"ce_clean": None, "ce_zero": torch.zeros_like}
    variants |= {f"ce_sae{j}": sae.to(model.device).reconstruct for j, sae in enumerate(saes)}
    totals = dict.fromkeys(variants, 0.0)
    bar = tqdm(total=len(chosen) * len(variants), desc="loss recovered", unit="ctx")
    for i in range(0, len(chosen), batch):
        ids = torch.from_numpy(np.stack([corpus.context_ids(c) for c in chosen[i : i + batch]]).astype(np.int64))
        for name, replace in variants.items():
            totals[name] += float(model.loss_with_replacement(ids, layer, replace)) * len(ids)
            bar.update(len(ids))
    bar.close()
    for sae in saes:
        sae.cpu()
    ce = {name: total / len(chosen) for name, total in totals.items()}
    return [{"ce_clean": ce["ce_clean"], "ce_sae": ce[f"ce_sae{j}"], "ce_zero": ce["ce_zero"],
             "loss_recovered": (ce["ce_zero"] - ce[f"ce_sae{j}"]) / (ce["ce_zero"] - ce["ce_clean"]),
             "ce_eval_contexts": len(chosen)} for j in range(len(saes))]
