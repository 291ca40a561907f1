"""Training a dictionary on cached activations, in any of ``config.ARCHITECTURES``.

One loop for all four; what differs is the forward pass and the sparsity term (``_objective``):
- topk / batchtopk (Gao et al. 2024; Bussmann et al. 2024): the reconstruction alone, with AuxK to
  revive dead latents; decoder rows kept at unit norm.
- relu (Anthropic, Scaling Monosemanticity, April 2024 update): squared error plus
  ``sparsity_coef * sum_i f_i * ||W_dec,i||`` on inputs scaled to E||x||^2 = d_in, the penalty warmed
  up over the first 5% of steps; decoder norms are free (the penalty keeps them honest).
- jumprelu (Rajamanoharan et al. 2024): squared error plus ``sparsity_coef * L0``, thresholds learned
  through straight-through estimators with a rectangle kernel of width ``JUMP_BANDWIDTH``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from .sae import SAE

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    sae: SAE
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


def auxk_loss(sae: SAE, pre: torch.Tensor, residual: torch.Tensor, dead: torch.Tensor, aux_k: int) -> torch.Tensor:
    """Let the top ``aux_k`` dead latents model what the live ones missed (Gao et al., A.2)."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return pre.new_zeros(())
    masked = pre.masked_fill(~dead, float("-inf"))
    values, indices = masked.topk(min(aux_k, n_dead), dim=-1, sorted=False)
    values = values.relu()
    recon = torch.nn.functional.embedding_bag(indices, sae.W_dec, per_sample_weights=values, mode="sum")
    return fvu(residual, recon).nan_to_num(0.0)


JUMP_BANDWIDTH = 0.05
JUMP_INIT_THRESHOLD = 0.05
# Defaults of ``sparsity_coef`` (relu: Anthropic's lambda with E||x||^2 = d_in).
SPARSITY_COEF = {"relu": 5.0, "jumprelu": 1.0}
BATCHTOPK_THRESHOLD_DECAY = 0.99


class _JumpReLU(torch.autograd.Function):
    """pre * H(pre - t): the true gradient for pre; for t, a rectangle-kernel estimate."""

    @staticmethod
    def forward(ctx, pre, threshold):
        ctx.save_for_backward(pre, threshold)
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        near = ((pre - threshold).abs() < JUMP_BANDWIDTH / 2).to(pre.dtype)
        grad_t = -(threshold / JUMP_BANDWIDTH) * near * grad
        return grad * (pre > threshold), grad_t.sum(0)


class _Step(torch.autograd.Function):
    """H(pre - t), with the same kernel for the threshold's gradient (none for pre)."""

    @staticmethod
    def forward(ctx, pre, threshold):
        ctx.save_for_backward(pre, threshold)
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        near = ((pre - threshold).abs() < JUMP_BANDWIDTH / 2).to(pre.dtype)
        return None, (-(1.0 / JUMP_BANDWIDTH) * near * grad).sum(0)


class StepOutput(NamedTuple):
    x_hat: torch.Tensor
    pre: torch.Tensor
    fired: torch.Tensor  # [d_sae] bool: latents active on some row of the batch
    loss: torch.Tensor  # without AuxK


def _objective(sae: SAE, x: torch.Tensor, sparsity_coef: float, warm: float) -> StepOutput:
    """The training forward pass and loss. ``warm`` in [0, 1] ramps the relu penalty in."""
    if sae.architecture == "topk":
        out = sae(x)
        fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=x.device)
        fired[out.code.indices[out.code.values > 0]] = True
        return StepOutput(out.x_hat, out.pre_acts, fired, fvu(x, out.x_hat))
    pre = sae.pre_activations(x)
    if sae.architecture == "batchtopk":
        post = pre.relu()
        keep = post.flatten().topk(sae.k * len(x), sorted=False).indices
        acts = torch.zeros_like(post).flatten().scatter_(0, keep, post.flatten()[keep]).view_as(post)
        with torch.no_grad():  # the inference threshold: a running estimate of the smallest kept activation
            kept = acts[acts > 0]
            if len(kept):
                t = sae.threshold
                t.mul_(BATCHTOPK_THRESHOLD_DECAY).add_((1 - BATCHTOPK_THRESHOLD_DECAY) * kept.min())
        x_hat = acts @ sae.W_dec + sae.b_dec
        loss = fvu(x, x_hat)
    else:
        if sae.architecture == "relu":
            acts = pre.relu()
            penalty = warm * (acts * sae.W_dec.norm(dim=1)).sum(-1)
        else:
            threshold = sae.threshold.clamp_min(1e-6)
            acts = _JumpReLU.apply(pre, threshold)
            penalty = _Step.apply(pre, threshold).sum(-1)
        x_hat = acts @ sae.W_dec + sae.b_dec
        loss = ((x - x_hat).pow(2).sum(-1) + sparsity_coef * penalty).mean() / x.shape[1]
    return StepOutput(x_hat, pre, (acts > 0).any(0), loss)


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def train_sae(
    acts: np.ndarray,
    *,
    architecture: str = "topk",
    d_sae: int,
    k: int,
    sparsity_coef: float | None = None,
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
    sae = SAE.initialized(d_in, d_sae, k, architecture=architecture, seed=seed, meta=meta)
    coef = SPARSITY_COEF.get(architecture, 0.0) if sparsity_coef is None else sparsity_coef
    unit_decoder = architecture != "relu"  # relu's penalty weighs decoder norms, so they stay free
    with torch.no_grad():
        sae.b_dec.copy_(geometric_median(sample * scale))
        if architecture == "jumprelu":
            sae.threshold.fill_(JUMP_INIT_THRESHOLD)
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
    bar = tqdm(total=steps * batch, initial=start * batch, desc=f"train {architecture} d_sae={d_sae} k={k}", unit="tok",
               unit_scale=True)
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
        out = _objective(sae, x, coef, min(1.0, step / max(1, steps // 20)))
        loss = out.loss
        dead = since_fired >= dead_tokens
        if architecture in ("topk", "batchtopk") and aux_coef > 0 and bool(dead.any()):
            loss = loss + aux_coef * auxk_loss(sae, out.pre, (x - out.x_hat).detach(), dead, aux_k)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if unit_decoder:
            sae.remove_parallel_decoder_grad()
        opt.step()
        sched.step()
        if unit_decoder:
            sae.normalize_decoder()
        with torch.no_grad():
            since_fired += len(idx)
            since_fired[out.fired] = 0
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
