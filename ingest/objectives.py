"""What each architecture minimises while it trains: its forward pass and its loss (the objectives
the registry in ``sae.py`` names), and the sparse gradients they share.

- topk / batchtopk (Gao et al. 2024; Bussmann et al. 2024): the reconstruction alone, with AuxK to
  revive dead latents; decoder rows kept at unit norm.
- matryoshka (Bussmann et al. 2025): BatchTopK, plus the reconstruction of every nested prefix of
  the dictionary on its own, so its first latents make a smaller dictionary of their own.
- relu (Anthropic, Scaling Monosemanticity, April 2024 update): squared error plus
  ``sparsity_coef * sum_i f_i * ||W_dec,i||`` on inputs scaled to E||x||^2 = d_in, the penalty warmed
  up over the first 5% of steps; decoder norms are free (the penalty keeps them honest).
- jumprelu (Rajamanoharan et al. 2024): squared error plus ``sparsity_coef * L0``, thresholds learned
  through straight-through estimators with a rectangle kernel of width ``JUMP_BANDWIDTH``.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Callable, NamedTuple

import torch

from .sparse_code import ForwardOutput, SparseCode, row_offsets

if TYPE_CHECKING:
    from .sae import SAE


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


def topk_forward(sae: SAE, x: torch.Tensor) -> tuple[ForwardOutput, Select]:
    """The TopK training forward: gradients through the k selected latents only, and the k decoder
    rows gathered. Returns also the function that gives any other selection (AuxK's) its gradient."""
    _, pre, select = _sparse_encoder(sae, x)
    values, indices = pre.topk(sae.k, dim=-1, sorted=False)
    code = SparseCode.fixed(select(values, indices).relu(), indices)
    return ForwardOutput(sae.decode(code), code, pre), select


def batchtopk_forward(sae: SAE, x: torch.Tensor) -> tuple[ForwardOutput, Select]:
    """BatchTopK's training forward, sparse like TopK's: the k·n largest positive pre-activations of
    the whole batch, any number per row, with gradients through those alone and their decoder rows
    gathered."""
    centred, pre, select = _sparse_encoder(sae, x)
    n, d_sae = pre.shape
    flat = pre.view(-1)
    keep = flat.topk(min(sae.k * n, flat.numel()), sorted=False).indices
    keep = keep[flat[keep] > 0].sort().values  # row-major order: the CSR layout
    rows, cols = keep // d_sae, keep % d_sae
    crow = row_offsets(rows, n)
    values = _SelectedPreActs.apply(flat[keep], centred, sae.W_enc, sae.b_enc, sae.b_dec, crow, cols)
    code = SparseCode(values, cols, crow)
    return ForwardOutput(sae.decode(code), code, pre), select


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
    select: Select | None = None  # set when ``pre`` carries no gradient (see ``topk_forward``)


def topk_objective(sae: SAE, x: torch.Tensor, sparsity_coef: float, warm: float) -> StepOutput:
    out, select = topk_forward(sae, x)
    fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=x.device)
    fired[out.code.indices[out.code.values > 0]] = True
    return StepOutput(out.x_hat, out.pre_acts, fired, fvu(x, out.x_hat), select)


def batchtopk_objective(sae: SAE, x: torch.Tensor, sparsity_coef: float, warm: float) -> StepOutput:
    out, select = batchtopk_forward(sae, x)
    _track_threshold(sae, out.code)
    return StepOutput(out.x_hat, out.pre_acts, _fired(sae, out.code), fvu(x, out.x_hat), select)


def matryoshka_objective(sae: SAE, x: torch.Tensor, sparsity_coef: float, warm: float) -> StepOutput:
    """BatchTopK's loss plus each inner prefix's FVU, every prefix decoding from its own latents
    alone (as SAELens sums the inner losses onto the outer one)."""
    out, select = batchtopk_forward(sae, x)
    _track_threshold(sae, out.code)
    loss = fvu(x, out.x_hat)
    rows = out.code.row_ids()
    for width in sae.prefixes[:-1]:
        inner = out.code.indices < width
        code = SparseCode(out.code.values[inner], out.code.indices[inner],
                          row_offsets(rows[inner], out.code.n_rows))
        loss = loss + fvu(x, sae.decode(code))
    return StepOutput(out.x_hat, out.pre_acts, _fired(sae, out.code), loss, select)


def relu_objective(sae: SAE, x: torch.Tensor, sparsity_coef: float, warm: float) -> StepOutput:
    pre = sae.pre_activations(x)
    acts = pre.relu()
    return _penalised(sae, x, pre, acts, warm * (acts * sae.W_dec.norm(dim=1)).sum(-1), sparsity_coef)


def jumprelu_objective(sae: SAE, x: torch.Tensor, sparsity_coef: float, warm: float) -> StepOutput:
    pre = sae.pre_activations(x)
    threshold = sae.threshold.clamp_min(1e-6)
    return _penalised(sae, x, pre, _JumpReLU.apply(pre, threshold), _Step.apply(pre, threshold).sum(-1), sparsity_coef)


def _penalised(sae: SAE, x: torch.Tensor, pre: torch.Tensor, acts: torch.Tensor, penalty: torch.Tensor,
               sparsity_coef: float) -> StepOutput:
    """Squared error plus a sparsity penalty, over a dense code (relu and jumprelu)."""
    x_hat = acts @ sae.W_dec + sae.b_dec
    loss = ((x - x_hat).pow(2).sum(-1) + sparsity_coef * penalty).mean() / x.shape[1]
    return StepOutput(x_hat, pre, (acts > 0).any(0), loss)


def _track_threshold(sae: SAE, code: SparseCode) -> None:
    """The inference threshold: a running estimate of the smallest kept activation, started at the
    first batch's (from zero, a short run ended with a threshold far too low: L0 in the hundreds)."""
    if len(code.values):
        with torch.no_grad():
            smallest = code.values.min()
            if not bool(sae.threshold.any()):
                sae.threshold.fill_(float(smallest))
            else:
                sae.threshold.mul_(BATCHTOPK_THRESHOLD_DECAY).add_((1 - BATCHTOPK_THRESHOLD_DECAY) * smallest)


def _fired(sae: SAE, code: SparseCode) -> torch.Tensor:
    fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=code.indices.device)
    fired[code.indices] = True
    return fired

