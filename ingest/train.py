"""Training dictionaries on cached activations, in any architecture of ``sae.ARCHITECTURES`` (each
one's forward pass and loss are in ``objectives.py``).

One loop for all, and for several dictionaries at once: ``train_saes`` reads each batch once and
steps every dictionary on it (sparsify and SAELens train several SAEs this way), so a family of
widths costs one pass over the cache. A dictionary trained in a group is the one it would be alone:
the same initialisation, batches and updates.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .objectives import auxk_loss, fvu
from .sae import SAE, architecture_named

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


@dataclass
class DictionarySpec:
    """One dictionary to train (``train_saes``)."""

    d_sae: int
    k: int
    lr: float
    architecture: str = "topk"
    sparsity_coef: float | None = None  # None: the architecture's default
    aux_k: int = 256
    aux_coef: float = 1 / 32
    dead_tokens: int = 200_000
    meta: dict = field(default_factory=dict)
    seed: int | None = None  # its initialisation's seed (default: the run's); see train_saes


class _Learner:
    """One dictionary being trained: its weights, optimiser, schedule and dead-latent counters."""

    def __init__(self, spec: DictionarySpec, sae: SAE, steps: int, device: torch.device):
        self.spec, self.sae = spec, sae.to(device)
        self.coef = sae.arch.sparsity_coef if spec.sparsity_coef is None else spec.sparsity_coef
        # Adam's eps scaled down as in Gao et al.: gradients of a unit-variance objective are small.
        # fused: one kernel for all of Adam's passes (5.5 ms a step instead of 35 here at d_sae=8192).
        self.opt = torch.optim.Adam(sae.parameters(), lr=spec.lr, betas=(0.9, 0.999), eps=6.25e-10, fused=True)
        self.sched = _schedule(self.opt, steps)
        self.since_fired = torch.zeros(spec.d_sae, dtype=torch.long, device=device)
        self.recent: list[float] = []

    def step(self, x: torch.Tensor, warm: float, compute_dtype: torch.dtype) -> None:
        spec, sae = self.spec, self.sae
        dead = self.since_fired >= spec.dead_tokens
        with torch.autocast(x.device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
            out = sae.arch.objective(sae, x, self.coef, warm)
            loss = out.loss
            if spec.aux_coef > 0 and sae.arch.aux and bool(dead.any()):
                loss = loss + spec.aux_coef * auxk_loss(out.pre, sae.W_dec, (x - out.x_hat).detach(), dead, spec.aux_k,
                                                        out.select)
        _update(sae, self.opt, self.sched, loss, unit_decoder=sae.arch.unit_decoder)
        with torch.no_grad():
            self.since_fired += len(x)
            self.since_fired[out.fired] = 0
        self.recent = [*self.recent, float(fvu(x, out.x_hat.detach()))][-50:]

    @property
    def dead_fraction(self) -> float:
        return float((self.since_fired >= self.spec.dead_tokens).float().mean())

    def state(self) -> dict:
        return {"sae": self.sae.state_dict(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
                "since_fired": self.since_fired, "recent": self.recent}

    def restore(self, state: dict) -> None:
        self.sae.load_state_dict(state["sae"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.since_fired.copy_(state["since_fired"])
        self.recent = state["recent"]


def train_sae(acts, *, rows: np.ndarray | None = None, architecture: str = "topk", d_sae: int, k: int,
              sparsity_coef: float | None = None, tokens: int, batch: int, lr: float, aux_k: int, aux_coef: float,
              dead_tokens: int, seed: int, device: torch.device, meta: dict | None = None, checkpoint: Path | None = None,
              checkpoint_every: int = 500, compute_dtype: torch.dtype = torch.float32) -> TrainResult:
    """One dictionary (``train_saes`` with one spec)."""
    spec = DictionarySpec(d_sae, k, lr, architecture, sparsity_coef, aux_k, aux_coef, dead_tokens, dict(meta or {}))
    return train_saes(acts, [spec], rows=rows, tokens=tokens, batch=batch, seed=seed, device=device,
                      checkpoint=checkpoint, checkpoint_every=checkpoint_every, compute_dtype=compute_dtype)[0]


def train_saes(acts, specs: list[DictionarySpec], *, rows: np.ndarray | None = None, tokens: int, batch: int, seed: int,
               device: torch.device, checkpoint: Path | None = None, checkpoint_every: int = 500,
               compute_dtype: torch.dtype = torch.float32) -> list[TrainResult]:
    """Train every dictionary of ``specs`` on the same batches of ``rows`` (default: all) of ``acts``,
    [n, d_in] float16 rows indexable by an int array: an ndarray or the harvest's
    ``ShardedActivations``, which streams them from disk. Each batch is read once for all.

    With ``checkpoint``, the whole training state (weights, Adam, schedule, data order, RNG, dead
    latent counters) is saved there every ``checkpoint_every`` steps, and a run that finds one
    continues from it: a killed run resumes to the same result as an uninterrupted one.

    ``compute_dtype`` bfloat16 runs the forward pass's matmuls under autocast (the dense encoder
    pass is most of a step; tensor cores run it several times faster on a GPU); the parameters,
    Adam, the selected latents' values and the loss stay fp32. On this kind of CPU bf16 is slower.
    """
    if not specs:
        raise ValueError("train_saes needs at least one DictionarySpec")
    for spec in specs:
        architecture_named(spec.architecture)  # an unknown name fails before the slow part
    gen = np.random.default_rng(seed)
    rows = np.arange(len(acts)) if rows is None else np.asarray(rows, dtype=np.int64)
    sample, scale = _sample(acts, rows, gen)
    scaled = sample * scale
    centre = geometric_median(scaled)
    steps = max(1, tokens // batch)
    learners = [_Learner(spec, _initialized(acts.shape[1], spec, scaled, centre, seed if spec.seed is None else spec.seed),
                         steps, device) for spec in specs]
    start, data, scale = _resume(checkpoint, learners, gen, acts, rows, batch, scale, steps)
    names = ", ".join(f"{s.architecture} d_sae={s.d_sae} k={s.k}" for s in specs)
    bar = tqdm(total=steps * batch, initial=start * batch, desc=f"train {names}", unit="tok", unit_scale=True)
    for step in range(start, steps):
        if checkpoint is not None and step > start and step % checkpoint_every == 0:
            _save_checkpoint(checkpoint, {"learners": [learner.state() for learner in learners], **data.state,
                                          "step": step, "scale": scale, "specs": _identity(learners)})
        x = torch.from_numpy(data.next()).to(device) * scale
        for learner in learners:
            learner.step(x, min(1.0, step / max(1, steps // 20)), compute_dtype)
        bar.update(len(x))
        if step % 20 == 0:
            bar.set_postfix(fvu=" ".join(f"{np.mean(learner.recent):.3f}" for learner in learners),
                            dead=" ".join(f"{learner.dead_fraction:.3f}" for learner in learners))
    bar.close()
    data.close()
    out = []
    for learner in learners:
        learner.sae.fold_input_scale(scale)
        learner.sae.cpu().eval()
        out.append(TrainResult(sae=learner.sae, input_scale=scale, steps=steps, tokens=steps * batch,
                               final_fvu=float(np.mean(learner.recent)), dead_fraction=learner.dead_fraction))
    return out


def _schedule(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Constant, then linear decay to zero over the last 20% of steps."""
    decay_from = int(steps * 0.8)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 1.0 if s < decay_from else max(0.0, (steps - s) / max(1, steps - decay_from)))


def _sample(acts, rows: np.ndarray, gen: np.random.Generator) -> tuple[torch.Tensor, float]:
    """Up to 16,384 rows, and the input scale that makes E||x||^2 = d_in on them."""
    n = len(rows)
    sample = torch.from_numpy(acts[np.sort(rows[gen.choice(n, size=min(n, 16_384), replace=False)])].astype(np.float32))
    return sample, input_scale(sample)


# About this many rows of the sample fit the encoder's starting scale.
INIT_ROWS = 4096


def _initialized(d_in: int, spec: DictionarySpec, sample: torch.Tensor, centre: torch.Tensor, seed: int) -> SAE:
    """A fresh dictionary with ``b_dec`` at ``centre`` (the geometric median of the scaled ``sample``)
    and its encoder, the decoder's transpose, scaled so that its first reconstruction of the sample
    has the least-squares scale. Unscaled, a wide dictionary overshoots many times over: at 16,384
    features BatchTopK's first codes summed to ~15x the inputs (hundreds of latents on a token) and
    training diverged (held-out FVU 15 after 200k tokens; 0.108 with this start); TopK at 4,096
    gained too (0.0619 against 0.0655 after 300k tokens)."""
    sae = SAE.initialized(d_in, spec.d_sae, spec.k, architecture=spec.architecture, seed=seed, meta=spec.meta)
    with torch.no_grad():
        sae.b_dec.copy_(centre)
        x = sample[::max(1, len(sample) // INIT_ROWS)]  # spread over the cache: the sample is in row order
        # numpy's float64 sums: torch's split by thread count, and the local and Ray builds must agree to the bit
        made = (sae.arch.objective(sae, x, 0.0, 1.0).x_hat - centre).double().cpu().numpy()
        scale = float((made * (x - centre).double().cpu().numpy()).sum() / max(float((made * made).sum()), 1e-12))
        if scale > 0:
            sae.enc_weight.mul_(scale)
            sae.b_enc.mul_(scale)
        if sae.arch.threshold == "learned":
            sae.threshold.fill_(sae.arch.init_threshold)
        elif sae.arch.threshold == "running":
            sae.threshold.zero_()  # the fit above moved it; the first training batch starts it
    return sae


def _resume(checkpoint: Path | None, learners: list[_Learner], gen: np.random.Generator, acts, rows: np.ndarray,
            batch: int, scale: float, steps: int) -> tuple[int, "_Batches", float]:
    """(first step, the batch stream, the input scale): restored from ``checkpoint`` where one of
    this version and these dictionaries exists, else a fresh start."""
    state = torch.load(checkpoint, map_location=learners[0].since_fired.device, weights_only=False) \
        if checkpoint and checkpoint.is_file() else None
    if state is not None and state.get("specs") != _identity(learners):
        log.warning("train: %s holds another version's or other dictionaries' parameters; training from the start",
                    checkpoint)
        state = None
    if state is None:
        return 0, _Batches(acts, rows, batch, gen), scale
    for learner, saved in zip(learners, state["learners"]):
        learner.restore(saved)
    gen.bit_generator.state = state["rng"]
    log.info("train: resuming from step %d of %d", state["step"], steps)
    data = _Batches(acts, rows, batch, gen, order=state["order"], cursor=state["cursor"])
    return state["step"], data, state["scale"]


def _identity(learners: list[_Learner]) -> list:
    """What a checkpoint must match to be resumed: each dictionary's settings and parameter shapes."""
    return [(dataclasses.asdict(learner.spec), {name: tuple(t.shape) for name, t in learner.sae.state_dict().items()})
            for learner in learners]


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
