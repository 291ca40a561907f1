"""Training a TopK dictionary on cached activations (Gao et al. 2024, "Scaling and evaluating
sparse autoencoders"), with AuxK to revive dead latents.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .sae import TopKSAE

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    sae: TopKSAE
    input_scale: float
    steps: int
    tokens: int
    final_fvu: float
    dead_fraction: float  # latents idle for ``dead_tokens`` at the end of training


def geometric_median(x: torch.Tensor, iters: int = 30) -> torch.Tensor:
    """Weiszfeld's algorithm: a robust centre for ``b_dec`` (the mean is pulled by outliers)."""
    median = x.mean(0)
    for _ in range(iters):
        w = 1 / (x - median).norm(dim=1).clamp_min(1e-6)
        median = (w[:, None] * x).sum(0) / w.sum()
    return median


def input_scale(x: torch.Tensor) -> float:
    """Scalar s with E||s x||^2 = d_in, so hyperparameters carry across models and layers."""
    return float(math.sqrt(x.shape[1] / x.pow(2).sum(1).mean()))


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained, about the batch mean (not about zero)."""
    return (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()


def auxk_loss(sae: TopKSAE, pre: torch.Tensor, residual: torch.Tensor, dead: torch.Tensor, aux_k: int) -> torch.Tensor:
    """Let the top ``aux_k`` dead latents model what the live ones missed (Gao et al., A.2)."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return pre.new_zeros(())
    masked = pre.masked_fill(~dead, float("-inf"))
    values, indices = masked.topk(min(aux_k, n_dead), dim=-1, sorted=False)
    values = values.relu()
    recon = torch.nn.functional.embedding_bag(indices, sae.W_dec, per_sample_weights=values, mode="sum")
    return fvu(residual, recon).nan_to_num(0.0)


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def train_topk(
    acts: np.ndarray,
    *,
    d_sae: int,
    k: int,
    tokens: int,
    batch: int,
    lr: float,
    aux_k: int,
    aux_coef: float,
    dead_tokens: int,
    seed: int,
    device: torch.device,
    meta: dict | None = None,
    checkpoint: Path | None = None,
    checkpoint_every: int = 500,
) -> TrainResult:
    """``acts`` [n, d_in] float16 rows (training split, BOS excluded), in any order.

    With ``checkpoint``, the whole training state (weights, Adam, schedule, data order, RNG, dead
    latent counters) is saved there every ``checkpoint_every`` steps, and a run that finds one
    continues from it: a killed run resumes to the same result as an uninterrupted one.
    """
    gen = np.random.default_rng(seed)
    n, d_in = acts.shape
    sample = torch.from_numpy(acts[gen.choice(n, size=min(n, 16_384), replace=False)].astype(np.float32))
    scale = input_scale(sample)
    sae = TopKSAE.initialized(d_in, d_sae, k, seed=seed, meta=meta)
    with torch.no_grad():
        sae.b_dec.copy_(geometric_median(sample * scale))
    sae.to(device)
    # Adam's eps scaled down as in Gao et al.: gradients of a unit-variance objective are small.
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999), eps=6.25e-10)
    steps = max(1, tokens // batch)
    decay_from = int(steps * 0.8)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 1.0 if s < decay_from else max(0.0, (steps - s) / max(1, steps - decay_from))
    )
    since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)
    recent: list[float] = []
    order = gen.permutation(n)
    cursor = 0
    start = 0
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        sae.load_state_dict(state["sae"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        since_fired.copy_(state["since_fired"])
        gen.bit_generator.state = state["rng"]
        order, cursor, start, recent, scale = state["order"], state["cursor"], state["step"], state["recent"], state["scale"]
        log.info("train: resuming from step %d of %d", start, steps)
    bar = tqdm(total=steps * batch, initial=start * batch, desc=f"train topk d_sae={d_sae} k={k}", unit="tok", unit_scale=True)
    for step in range(start, steps):
        if checkpoint is not None and step > start and step % checkpoint_every == 0:
            _save_checkpoint(checkpoint, {
                "sae": sae.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "since_fired": since_fired,
                "rng": gen.bit_generator.state, "order": order, "cursor": cursor, "step": step, "recent": recent,
                "scale": scale,
            })
        if cursor + batch > n:  # a new epoch: a fresh shuffle across every context
            order, cursor = gen.permutation(n), 0
        idx = np.sort(order[cursor : cursor + batch])  # sorted: faster gather from a memory map
        cursor += batch
        x = torch.from_numpy(acts[idx].astype(np.float32)).to(device) * scale
        out = sae(x)
        loss = fvu(x, out.x_hat)
        dead = since_fired >= dead_tokens
        if aux_coef > 0 and bool(dead.any()):
            loss = loss + aux_coef * auxk_loss(sae, out.pre_acts, (x - out.x_hat).detach(), dead, aux_k)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_parallel_decoder_grad()
        opt.step()
        sched.step()
        sae.normalize_decoder()
        with torch.no_grad():
            fired = torch.zeros(d_sae, dtype=torch.bool, device=device)
            fired[out.code.indices[out.code.values > 0]] = True
            since_fired += len(idx)
            since_fired[fired] = 0
        recent.append(float(fvu(x, out.x_hat.detach())))
        recent = recent[-50:]
        bar.update(len(idx))
        if step % 20 == 0:
            bar.set_postfix(fvu=f"{np.mean(recent):.3f}", dead=f"{float(dead.float().mean()):.3f}")
    bar.close()
    sae.fold_input_scale(scale)
    sae.cpu().eval()
    return TrainResult(
        sae=sae,
        input_scale=scale,
        steps=steps,
        tokens=steps * batch,
        final_fvu=float(np.mean(recent)),
        dead_fraction=float((since_fired >= dead_tokens).float().mean()),
    )
