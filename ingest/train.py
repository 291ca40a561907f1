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
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from .sae import SAE, ForwardOutput, SparseCode

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


class _SelectedPreActs(torch.autograd.Function):
    """The pre-activations of selected latents, ``(x - b_dec) @ W_enc[:, j] + b_enc[j]``, whose values
    the caller already has from a dense pass run without autograd. The selection is in CSR form:
    row r's latents are ``cols[crow[r]:crow[r + 1]]`` (k per row for TopK, any number for BatchTopK).

    Autograd through the dense pass would push a [n, d_sae] gradient, zero outside the selection,
    through two more dense matmuls (for ``W_enc`` and, via ``x - b_dec``, for ``b_dec``); here the
    backward touches only the selected columns: one sparse [d_sae, n] x dense [n, d_in] product
    (~4 ms instead of ~80 at n=1024, k=32, d_sae=8192 on 2 CPU cores) and one matrix-vector product."""

    @staticmethod
    def forward(ctx, values, centred, W_enc, b_enc, b_dec, crow, cols):
        ctx.save_for_backward(centred, W_enc, crow, cols)
        return values.to(W_enc.dtype)  # a bf16 dense pass (autocast) selects; the rest stays fp32

    @staticmethod
    def backward(ctx, grad):
        centred, W_enc, crow, cols = ctx.saved_tensors
        d_sae = W_enc.shape[1]
        grad_w = _encoder_grad(centred, crow, cols, grad, d_sae, sparse=centred.device.type == "cpu")
        grad_b_enc = grad.new_zeros(d_sae).index_add_(0, cols, grad)
        return None, None, grad_w, grad_b_enc, -(W_enc @ grad_b_enc), None, None


def _encoder_grad(centred: torch.Tensor, crow: torch.Tensor, cols: torch.Tensor, grad: torch.Tensor, d_sae: int, *,
                  sparse: bool) -> torch.Tensor:
    """[d_in, d_sae] gradient of ``W_enc`` from the selected latents' gradients ``grad`` (CSR order),
    computed as its [d_sae, d_in] transpose, the layout ``W_enc`` is stored in: a sparse product on
    CPU (3.6 ms against 9.9 for dense @ sparse into columns); a dense one (scattered gradient) where
    dense matmuls are what the device is fast at."""
    n = len(crow) - 1
    if not sparse:
        rows = torch.repeat_interleave(torch.arange(n, device=grad.device), crow.diff())
        scattered = torch.zeros(n, d_sae, dtype=grad.dtype, device=grad.device).index_put_((rows, cols), grad)
        return (scattered.t() @ centred).t()
    with warnings.catch_warnings():  # "sparse CSR support is in beta": this product is long supported
        warnings.simplefilter("ignore", UserWarning)
        selected = torch.sparse_csr_tensor(crow, cols, grad, (n, d_sae), check_invariants=False)
        return (selected.t() @ centred).t()


Select = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _sparse_encoder(sae: SAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Select]:
    """The dense encoder pass without autograd: (x - b_dec, pre-activations, and the function that
    gives a fixed-width selection ``values, indices`` [n, w] its gradient)."""
    with torch.no_grad():
        centred = x - sae.b_dec
        pre = torch.mm(centred, sae.W_enc).add_(sae.b_enc)  # addmm would first copy the bias into every row

    def select(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        n, width = indices.shape
        crow = torch.arange(0, n * width + 1, width, device=x.device)
        flat = _SelectedPreActs.apply(values.reshape(-1), centred, sae.W_enc, sae.b_enc, sae.b_dec, crow,
                                      indices.reshape(-1))
        return flat.view(n, width)

    return centred, pre, select


def _topk_forward(sae: SAE, x: torch.Tensor) -> tuple[ForwardOutput, Select]:
    """The TopK training forward: gradients through the k selected latents only, and the k decoder
    rows gathered. Returns also the function that gives any other selection (AuxK's) its gradient."""
    _, pre, select = _sparse_encoder(sae, x)
    values, indices = pre.topk(sae.k, dim=-1, sorted=False)
    code = SparseCode.fixed(select(values, indices).relu(), indices)
    return ForwardOutput(sae.decode(code), code, pre), select


def _batchtopk_forward(sae: SAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Select]:
    """BatchTopK's training forward, sparse like TopK's: the k·n largest positive pre-activations of
    the whole batch, any number per row, with gradients through those alone and their decoder rows
    gathered. Returns (x_hat, pre, the kept values, the latents that fired, select)."""
    centred, pre, select = _sparse_encoder(sae, x)
    n, d_sae = pre.shape
    flat = pre.view(-1)
    keep = flat.topk(min(sae.k * n, flat.numel()), sorted=False).indices
    keep = keep[flat[keep] > 0].sort().values  # row-major order: the CSR layout
    rows, cols = keep // d_sae, keep % d_sae
    crow = torch.zeros(n + 1, dtype=torch.long, device=x.device)
    crow[1:] = torch.bincount(rows, minlength=n).cumsum(0)
    values = _SelectedPreActs.apply(flat[keep], centred, sae.W_enc, sae.b_enc, sae.b_dec, crow, cols)
    x_hat = torch.nn.functional.embedding_bag(cols, sae.W_dec, crow[:-1], per_sample_weights=values, mode="sum")
    fired = torch.zeros(d_sae, dtype=torch.bool, device=x.device)
    fired[cols] = True
    return x_hat + sae.b_dec, pre, values, fired, select


def auxk_loss(pre: torch.Tensor, W_dec: torch.Tensor, residual: torch.Tensor, dead: torch.Tensor, aux_k: int,
              select: Select | None = None) -> torch.Tensor:
    """Let the top ``aux_k`` dead latents model what the live ones missed (Gao et al., A.2).
    ``select`` gives the chosen values their gradient when ``pre`` was computed without one."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return pre.new_zeros(())
    masked = pre.masked_fill(~dead, float("-inf"))
    values, indices = masked.topk(min(aux_k, n_dead), dim=-1, sorted=False)
    if select is not None:
        values = select(values, indices)
    values = values.relu()
    recon = torch.nn.functional.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")
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
    select: Select | None = None  # set when ``pre`` carries no gradient (see ``_topk_forward``)


def _objective(sae: SAE, x: torch.Tensor, sparsity_coef: float, warm: float) -> StepOutput:
    """The training forward pass and loss. ``warm`` in [0, 1] ramps the relu penalty in."""
    if sae.architecture == "topk":
        out, select = _topk_forward(sae, x)
        fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=x.device)
        fired[out.code.indices[out.code.values > 0]] = True
        return StepOutput(out.x_hat, out.pre_acts, fired, fvu(x, out.x_hat), select)
    if sae.architecture == "batchtopk":
        x_hat, pre, kept, fired, select = _batchtopk_forward(sae, x)
        if len(kept):  # the inference threshold: a running estimate of the smallest kept activation
            with torch.no_grad():
                sae.threshold.mul_(BATCHTOPK_THRESHOLD_DECAY).add_((1 - BATCHTOPK_THRESHOLD_DECAY) * kept.min())
        return StepOutput(x_hat, pre, fired, fvu(x, x_hat), select)
    pre = sae.pre_activations(x)
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


class _Batches:
    """Shuffled batches of ``rows`` of ``acts``, each read one step ahead on a worker thread so the
    gather from the on-disk shards overlaps the current step's compute. Batches are sorted within
    (memory maps read faster in order); each epoch is a fresh permutation.

    ``state`` is the position *before* the next batch is drawn: a checkpoint that saves it resumes
    reading the very batches an uninterrupted run would have read."""

    def __init__(self, acts, rows: np.ndarray, batch: int, gen: np.random.Generator, *,
                 order: np.ndarray | None = None, cursor: int = 0):
        self.acts, self.rows, self.batch, self.gen = acts, rows, batch, gen
        self.order = gen.permutation(len(rows)) if order is None else order
        self.cursor = cursor
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batches")
        self._next = self._schedule()

    def _schedule(self) -> tuple[dict, Future]:
        state = {"rng": self.gen.bit_generator.state, "order": self.order, "cursor": self.cursor}
        if self.cursor + self.batch > len(self.rows):  # a new epoch
            self.order, self.cursor = self.gen.permutation(len(self.rows)), 0
        picked = self.rows[np.sort(self.order[self.cursor : self.cursor + self.batch])]
        self.cursor += self.batch
        return state, self._pool.submit(lambda: np.asarray(self.acts[picked], dtype=np.float32))

    @property
    def state(self) -> dict:
        return self._next[0]

    def next(self) -> np.ndarray:
        _, future = self._next
        self._next = self._schedule()
        return future.result()

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def train_sae(acts, *, rows: np.ndarray | None = None, architecture: str = "topk", d_sae: int, k: int,
              sparsity_coef: float | None = None, tokens: int, batch: int, lr: float, aux_k: int, aux_coef: float,
              dead_tokens: int, seed: int, device: torch.device, meta: dict | None = None, checkpoint: Path | None = None,
              checkpoint_every: int = 500, compute_dtype: torch.dtype = torch.float32) -> TrainResult:
    """Train on ``rows`` (default: all) of ``acts``, [n, d_in] float16 rows indexable by an int
    array: an ndarray or the harvest's ``ShardedActivations``, which streams them from disk.

    With ``checkpoint``, the whole training state (weights, Adam, schedule, data order, RNG, dead
    latent counters) is saved there every ``checkpoint_every`` steps, and a run that finds one
    continues from it: a killed run resumes to the same result as an uninterrupted one.

    ``compute_dtype`` bfloat16 runs the forward pass's matmuls under autocast (the dense encoder
    pass is most of a step; tensor cores run it several times faster on a GPU); the parameters,
    Adam, the selected latents' values and the loss stay fp32. On this kind of CPU bf16 is slower.
    """
    gen = np.random.default_rng(seed)
    rows = np.arange(len(acts)) if rows is None else np.asarray(rows, dtype=np.int64)
    sae, scale = _initialized(acts, rows, gen, d_sae, k, architecture=architecture, seed=seed, meta=meta)
    coef = SPARSITY_COEF.get(architecture, 0.0) if sparsity_coef is None else sparsity_coef
    sae.to(device)
    # Adam's eps scaled down as in Gao et al.: gradients of a unit-variance objective are small.
    # fused: one kernel for all of Adam's passes (5.5 ms a step instead of 35 here at d_sae=8192).
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999), eps=6.25e-10, fused=True)
    steps = max(1, tokens // batch)
    sched = _schedule(opt, steps)
    since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)
    start, recent, data, scale = _resume(checkpoint, sae, opt, sched, since_fired, gen, acts, rows, batch, scale, steps)
    bar = tqdm(total=steps * batch, initial=start * batch, desc=f"train {architecture} d_sae={d_sae} k={k}", unit="tok",
               unit_scale=True)
    for step in range(start, steps):
        if checkpoint is not None and step > start and step % checkpoint_every == 0:
            _save_checkpoint(checkpoint, {
                "sae": sae.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "since_fired": since_fired,
                **data.state, "step": step, "recent": recent, "scale": scale,
            })
        x = torch.from_numpy(data.next()).to(device) * scale
        dead = since_fired >= dead_tokens
        with torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
            out = _objective(sae, x, coef, min(1.0, step / max(1, steps // 20)))
            aux = aux_coef > 0 and architecture in ("topk", "batchtopk") and bool(dead.any())
            loss = out.loss + aux_coef * auxk_loss(out.pre, sae.W_dec, (x - out.x_hat).detach(), dead, aux_k, out.select) \
                if aux else out.loss
        _update(sae, opt, sched, loss, unit_decoder=architecture != "relu")  # relu's penalty weighs decoder norms
        with torch.no_grad():
            since_fired += len(x)
            since_fired[out.fired] = 0
        recent = [*recent, float(fvu(x, out.x_hat.detach()))][-50:]
        bar.update(len(x))
        if step % 20 == 0:
            bar.set_postfix(fvu=f"{np.mean(recent):.3f}", dead=f"{float(dead.float().mean()):.3f}")
    bar.close()
    data.close()
    sae.fold_input_scale(scale)
    sae.cpu().eval()
    return TrainResult(sae=sae, input_scale=scale, steps=steps, tokens=steps * batch, final_fvu=float(np.mean(recent)),
                       dead_fraction=float((since_fired >= dead_tokens).float().mean()))


def _schedule(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Constant, then linear decay to zero over the last 20% of steps."""
    decay_from = int(steps * 0.8)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 1.0 if s < decay_from else max(0.0, (steps - s) / max(1, steps - decay_from)))


def _initialized(acts, rows: np.ndarray, gen: np.random.Generator, d_sae: int, k: int, *, architecture: str, seed: int,
                 meta: dict | None) -> tuple[SAE, float]:
    """A fresh dictionary with ``b_dec`` at the geometric median of a sample, and the input scale
    that makes E||x||^2 = d_in on that sample."""
    n = len(rows)
    sample = torch.from_numpy(acts[np.sort(rows[gen.choice(n, size=min(n, 16_384), replace=False)])].astype(np.float32))
    scale = input_scale(sample)
    sae = SAE.initialized(acts.shape[1], d_sae, k, architecture=architecture, seed=seed, meta=meta)
    with torch.no_grad():
        sae.b_dec.copy_(geometric_median(sample * scale))
        if architecture == "jumprelu":
            sae.threshold.fill_(JUMP_INIT_THRESHOLD)
    return sae, scale


def _resume(checkpoint: Path | None, sae: SAE, opt, sched, since_fired: torch.Tensor, gen: np.random.Generator, acts,
            rows: np.ndarray, batch: int, scale: float, steps: int) -> tuple[int, list[float], "_Batches", float]:
    """(first step, recent FVUs, the batch stream, the input scale): restored from ``checkpoint``
    where one of this version exists, else a fresh start."""
    state = torch.load(checkpoint, map_location=since_fired.device, weights_only=False) \
        if checkpoint and checkpoint.is_file() else None
    if state is not None and state["sae"].keys() != sae.state_dict().keys():
        log.warning("train: %s holds another version's parameters; training from the start", checkpoint)
        state = None
    if state is None:
        return 0, [], _Batches(acts, rows, batch, gen), scale
    sae.load_state_dict(state["sae"])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    since_fired.copy_(state["since_fired"])
    gen.bit_generator.state = state["rng"]
    log.info("train: resuming from step %d of %d", state["step"], steps)
    data = _Batches(acts, rows, batch, gen, order=state["order"], cursor=state["cursor"])
    return state["step"], state["recent"], data, state["scale"]


def _update(sae: SAE, opt: torch.optim.Optimizer, sched, loss: torch.Tensor, *, unit_decoder: bool) -> None:
    """One optimiser step; unit-norm decoders lose their gradients' radial part and are renormalised
    (relu's are free: its penalty weighs decoder norms)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if unit_decoder:
        sae.remove_parallel_decoder_grad()
    opt.step()
    sched.step()
    if unit_decoder:
        sae.normalize_decoder()
