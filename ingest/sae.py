"""The sparse autoencoder, its architectures (``ARCHITECTURES``: one ``Architecture`` each, registered
below) and its file format (SAELens layout).

The class owns ``save``/``load`` so the model and its files cannot drift apart. Weights follow
SAELens names and shapes: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``,
``b_dec [d_in]`` and, for threshold architectures, ``threshold [d_sae]``; the encoder subtracts
``b_dec`` first (``apply_b_dec_to_input``).

Every public method works for every architecture: ``encode`` gives each row's active latents as a
``SparseCode`` in CSR layout (k per row for top-k, any number for the threshold architectures, whose
L0 varies), so nothing is cut, and ``decode(encode(x))`` is the reconstruction.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from featureatlas.store import manifest as M
from safetensors.torch import load_file, save_file
from torch import nn

from . import objectives
from .sparse_code import ForwardOutput, SparseCode

WEIGHTS_FILE = M.DICTIONARY_WEIGHTS
CFG_FILE = M.DICTIONARY_CFG


LAYER_NORM_EPS = 1e-5


@dataclass(frozen=True)
class Architecture:
    """All that sets one dictionary architecture apart, in one object: adding an architecture is
    registering one more (``register``). Elsewhere names appear only in help texts."""

    name: str
    saelens: str
    """Its name in a SAELens ``cfg.json`` ("standard" is SAELens's ReLU; threshold rules save as jumprelu)."""
    code: Callable[["SAE", torch.Tensor], SparseCode]
    """Inference: pre-activations [N, d_sae] to each row's active latents."""
    objective: Callable[..., objectives.StepOutput]
    """Training: the forward pass and loss (``objectives.py``)."""
    threshold: str | None = None
    """A threshold per latent: "learned" (a parameter with a gradient) or "running" (a buffer, an
    estimate kept while training)."""
    init_threshold: float = 0.0
    sparsity_coef: float = 0.0
    """Default weight of the objective's sparsity penalty (``--sparsity-coef``); 0 where it has none."""
    aux: bool = False
    """Trained with AuxK, which revives dead latents."""
    unit_decoder: bool = True
    """Decoder rows held at unit norm (relu's penalty weighs their norms instead)."""
    nested: bool = False
    """Its first ``prefixes`` latents are dictionaries of their own (matryoshka)."""
    reads_saelens: bool = False
    """A SAELens file naming ``saelens`` loads as this architecture (several save under one name)."""


ARCHITECTURES: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    ARCHITECTURES[arch.name] = arch
    return arch


def architecture_named(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {', '.join(ARCHITECTURES)}, got {name!r}")
    return ARCHITECTURES[name]


def _topk_code(sae: "SAE", pre: torch.Tensor) -> SparseCode:
    """The k largest per row of each of a stack's dictionaries (of the whole width otherwise): a
    rule per row, unlike the per-latent rules below, so it is the one that must see the stack."""
    picks = [pre[:, first : first + width].topk(min(k, width), dim=-1, sorted=False)
             for (first, width), k in zip(sae.blocks, sae.block_k)]
    values = torch.cat([v for v, _ in picks], 1)
    indices = torch.cat([i + first for (_, i), (first, _) in zip(picks, sae.blocks)], 1)
    return SparseCode.fixed(values.relu(), indices).active()


def _relu_code(sae: "SAE", pre: torch.Tensor) -> SparseCode:
    return SparseCode.from_dense(pre.relu())


def _threshold_code(sae: "SAE", pre: torch.Tensor) -> SparseCode:
    """A threshold per latent (clamped at 0: below it negatives would pass)."""
    return SparseCode.from_dense(pre * (pre > sae.threshold.clamp_min(0)))


# The k largest pre-activations per token (Gao et al. 2024).
register(Architecture("topk", "topk", _topk_code, objectives.topk_objective, aux=True, reads_saelens=True))
# The k * batch largest over a whole batch while training; at inference one learned threshold, so
# L0 varies per token around k (Bussmann et al. 2024).
register(Architecture("batchtopk", "jumprelu", _threshold_code, objectives.batchtopk_objective, threshold="running",
                      aux=True))
# ReLU, trained with an L1 penalty weighted by decoder norms (Anthropic, Scaling Monosemanticity).
register(Architecture("relu", "standard", _relu_code, objectives.relu_objective, sparsity_coef=5.0, unit_decoder=False,
                      reads_saelens=True))
# A learned threshold per latent, trained with an L0 penalty through straight-through estimators
# (Rajamanoharan et al. 2024).
register(Architecture("jumprelu", "jumprelu", _threshold_code, objectives.jumprelu_objective, threshold="learned",
                      init_threshold=objectives.JUMP_INIT_THRESHOLD, sparsity_coef=1.0, reads_saelens=True))
# BatchTopK whose nested prefixes each learn to reconstruct alone: one training gives a family of
# widths (Bussmann et al. 2025).
register(Architecture("matryoshka", "jumprelu", _threshold_code, objectives.matryoshka_objective, threshold="running",
                      aux=True, nested=True))
PREFIXES_KEY = "matryoshka_widths"  # where a nested dictionary's prefixes are kept in its metadata
# Where a stack's widths are kept in its metadata: dictionaries trained apart at one hook point (each
# width for itself, from one pass: ``train.train_saes``), their latents side by side, so the atlas
# keys every feature by one id and each dictionary is a range of ids (``SAE.stack``).
STACK_KEY = M.STACKED_WIDTHS


def default_prefixes(d_sae: int) -> list[int]:
    """d_sae/16, d_sae/4 and d_sae (1,024 / 4,096 / 16,384 for 16,384), without repeats."""
    return sorted({max(1, d_sae // 16), max(1, d_sae // 4), d_sae})


class SAE(nn.Module):
    def __init__(self, d_in: int, d_sae: int, k: int, *, architecture: str = "topk", layer_norm_input: bool = False,
                 meta: dict[str, Any] | None = None):
        super().__init__()
        self.arch = architecture_named(architecture)
        self.d_in, self.d_sae, self.k = d_in, d_sae, k
        # OpenAI's TopK dictionaries read each token layer-normed (x - mean) / (std + eps) and undo it
        # after decoding; ours never do.
        self.layer_norm_input = layer_norm_input
        self.meta = dict(meta or {})
        if self.arch.nested:  # kept with the weights, so a later change of the defaults cannot reinterpret a file
            widths = list(self.meta.get(PREFIXES_KEY) or default_prefixes(d_sae))
            if widths != sorted(set(widths)) or widths[0] < 1 or widths[-1] != d_sae:
                raise ValueError(f"{PREFIXES_KEY} must rise strictly from 1 or more to d_sae ({d_sae}), got {widths}")
            self.meta[PREFIXES_KEY] = widths
        if STACK_KEY in self.meta:
            stacked = [int(w) for w in self.meta[STACK_KEY]]
            if self.arch.nested or sum(stacked) != d_sae or min(stacked) < 1:
                raise ValueError(f"{STACK_KEY} must be widths of non-nested dictionaries summing to d_sae ({d_sae}), "
                                 f"got {stacked} for {architecture}")
            self.meta[STACK_KEY] = stacked
        # The encoder is held a latent per row, like nn.Linear's weight; ``W_enc`` (SAELens's shape,
        # what files hold) is its transpose as a view. Training's sparse gradient then writes
        # contiguous rows (3.6 ms instead of 9.9 into columns at d_sae=8192 here), a matmul reads
        # either layout at the same speed, and fused Adam wants a contiguous parameter (a
        # transposed one costs it 13 ms instead of 2).
        self.enc_weight = nn.Parameter(torch.empty(d_sae, d_in))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        if self.arch.threshold == "learned":
            self.threshold = nn.Parameter(torch.zeros(d_sae))
        elif self.arch.threshold == "running":
            self.register_buffer("threshold", torch.zeros(d_sae))  # one value, learned as a running estimate
        if STACK_KEY in self.meta:
            # Each stacked dictionary's own b_dec, which its encoder subtracts first (``b_dec`` is
            # zero): every tensor of the file is then its dictionaries' own, side by side, and a
            # dictionary is a slice of each (``part``, and the SAELens export in ``store/export.py``).
            self.register_buffer("part_b_dec", torch.zeros(len(self.meta[STACK_KEY]), d_in))

    @property
    def architecture(self) -> str:
        return self.arch.name

    @property
    def W_enc(self) -> torch.Tensor:  # noqa: N802 (SAELens's name)
        """[d_in, d_sae] encoder weights (a view: writes go to ``enc_weight``)."""
        return self.enc_weight.t()

    @classmethod
    def initialized(cls, d_in: int, d_sae: int, k: int, *, architecture: str = "topk", seed: int = 0,
                    meta: dict | None = None) -> "SAE":
        """Random unit decoder rows and the encoder tied to their transpose (Gao et al., sec. A.1)."""
        sae = cls(d_in, d_sae, k, architecture=architecture, meta=meta)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=gen))
            sae.normalize_decoder()
            sae.W_enc.copy_(sae.W_dec.T)
        return sae

    def _layer_norm(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean = x.mean(-1, keepdim=True)
        std = (x - mean).std(-1, keepdim=True)
        return (x - mean) / (std + LAYER_NORM_EPS), mean, std

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer_norm_input:
            x = self._layer_norm(x)[0]
        if STACK_KEY in self.meta:  # each dictionary subtracts its own b_dec: folded into its biases
            W = self.W_enc
            bias = torch.cat([self.b_enc[a : a + w] - self.part_b_dec[i] @ W[:, a : a + w]
                              for i, (a, w) in enumerate(self.blocks)])
            return x @ W + bias
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def _code(self, pre: torch.Tensor) -> SparseCode:
        """Rows are every leading index flattened: a [batch, seq, d_sae] input gives batch * seq rows."""
        return self.arch.code(self, pre.reshape(-1, self.d_sae))

    @property
    def prefixes(self) -> tuple[int, ...]:
        """The widths of a nested dictionary's own sub-dictionaries, widest (d_sae) last; (d_sae,) otherwise."""
        return tuple(self.meta[PREFIXES_KEY]) if self.arch.nested else (self.d_sae,)

    @property
    def blocks(self) -> tuple[tuple[int, int], ...]:
        """(first latent, width) of each dictionary of a stack, side by side; the whole otherwise."""
        if STACK_KEY not in self.meta:
            return ((0, self.d_sae),)
        firsts = [0, *itertools.accumulate(self.meta[STACK_KEY])]
        return tuple(zip(firsts, self.meta[STACK_KEY]))

    @property
    def block_k(self) -> tuple[int, ...]:
        """Each block's k (a stack's dictionaries each keep their own)."""
        return tuple(self.meta.get(M.STACKED_K) or [self.k] * len(self.blocks))

    @property
    def parts(self) -> tuple[tuple[int, int], ...]:
        """(first latent, width) of every dictionary these latents hold, the atlas's default (the
        widest) last: a nested dictionary's prefixes, which all start at 0; a stack's dictionaries;
        or the one dictionary."""
        return tuple((0, w) for w in self.prefixes) if self.arch.nested else self.blocks

    def part(self, i: int) -> "SAE":
        """``parts[i]`` as a dictionary of its own, which reconstructs alone."""
        first, width = self.parts[i]
        if self.arch.nested or STACK_KEY not in self.meta:
            return self.prefix(width)
        meta = {key: value for key, value in self.meta.items() if key not in (STACK_KEY, M.STACKED_K)}
        out = SAE(self.d_in, width, min(self.block_k[i], width), architecture=self.architecture, meta=meta)
        state = {name: t[first : first + width] for name, t in self.state_dict().items() if name not in ("b_dec", "part_b_dec")}
        out.load_state_dict({**state, "b_dec": self.part_b_dec[i]})
        return out.to(self.b_dec)

    @classmethod
    def stack(cls, saes: list["SAE"]) -> "SAE":
        """Dictionaries trained apart at one hook as one: their latents side by side (ids of the
        second start after the first's), each encoding with its own k and b_dec, so ``encode`` gives
        what each would alone, offset, in one matmul. Reconstruction stays per dictionary (``part``)."""
        if len(saes) < 2:
            raise ValueError("a stack needs two dictionaries or more")
        first = saes[0]
        if any(s.d_in != first.d_in or s.architecture != first.architecture or s.arch.nested or s.layer_norm_input
               or STACK_KEY in s.meta for s in saes):
            raise ValueError("stacked dictionaries must share d_in and a non-nested architecture, without input "
                             "normalisation or stacks of their own")
        meta = {**first.meta, STACK_KEY: [s.d_sae for s in saes], M.STACKED_K: [s.k for s in saes]}
        out = cls(first.d_in, sum(s.d_sae for s in saes), max(s.k for s in saes), architecture=first.architecture,
                  meta=meta)
        state = {name: torch.cat([s.state_dict()[name] for s in saes]) for name in out.state_dict()
                 if name not in ("b_dec", "part_b_dec")}
        state["b_dec"] = torch.zeros(first.d_in)
        state["part_b_dec"] = torch.stack([s.b_dec.detach() for s in saes])
        out.load_state_dict({name: t.detach().cpu() for name, t in state.items()})
        return out

    def prefix(self, width: int) -> "SAE":
        """The first ``width`` latents as a dictionary of their own (a matryoshka prefix)."""
        if not 1 <= width <= self.d_sae:
            raise ValueError(f"a prefix must have 1 to {self.d_sae} latents, got {width}")
        meta = {**self.meta, PREFIXES_KEY: [w for w in self.prefixes if w < width] + [width]} if self.arch.nested \
            else self.meta
        out = SAE(self.d_in, width, min(self.k, width), architecture=self.architecture,
                  layer_norm_input=self.layer_norm_input, meta=meta)
        state = {name: (t[:width] if name != "b_dec" else t) for name, t in self.state_dict().items()}
        out.load_state_dict(state)
        return out.to(self.b_dec)

    def encode(self, x: torch.Tensor) -> SparseCode:
        """Every active latent of every row: k per row for top-k, all above threshold otherwise."""
        return self._code(self.pre_activations(x))

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """[N, d_sae] inference activations, zeros for inactive latents (what SAELens's ``encode`` returns)."""
        return self.dense(self.encode(x)).view(*x.shape[:-1], self.d_sae)

    def decode(self, code: SparseCode) -> torch.Tensor:
        """[N, d_in] from the code, before any input normalisation is undone (``reconstruct`` does that)."""
        self._whole()
        # Gathers only the active decoder rows: L0 * d_in work per row instead of d_sae * d_in.
        return nn.functional.embedding_bag(code.indices, self.W_dec, code.offsets[:-1], per_sample_weights=code.values,
                                           mode="sum") + self.b_dec

    def dense(self, code: SparseCode) -> torch.Tensor:
        """[N, d_sae] with zeros outside the code."""
        out = code.values.new_zeros(code.n_rows, self.d_sae)
        return out.index_put_((code.row_ids(), code.indices), code.values)

    def _whole(self) -> None:
        if STACK_KEY in self.meta:
            raise ValueError("a stack of dictionaries reconstructs one dictionary at a time: use part(i)")

    def forward(self, x: torch.Tensor) -> ForwardOutput:
        self._whole()
        pre = self.pre_activations(x)
        code = self._code(pre)
        return ForwardOutput(self._denormalize(self.decode(code).view(x.shape), x), code, pre)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """[N, d_in] in the input's own units (an input layer norm undone)."""
        self._whole()
        return self._denormalize(self.decode(self.encode(x)).view(x.shape), x)

    def _denormalize(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if not self.layer_norm_input:
            return out
        _, mean, std = self._layer_norm(x)
        return out * (std + LAYER_NORM_EPS) + mean

    @torch.no_grad()
    def unit_decoder(self) -> torch.Tensor:
        """Decoder rows scaled to unit norm: the feature directions (a relu dictionary's rows are not)."""
        return self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Keep unit-norm rows unit-norm to first order: drop each row gradient's radial part."""
        if self.W_dec.grad is None:
            return
        # vecdot and addcmul_: no [d_sae, d_in] temporaries (each a full pass over memory); einsum
        # lowers to a batched matmul of 1x1 products, 4x slower
        radial = torch.linalg.vecdot(self.W_dec.grad, self.W_dec).unsqueeze(1)
        self.W_dec.grad.addcmul_(radial, self.W_dec, value=-1)

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """Turn a dictionary trained on ``x * scale`` into one that takes raw ``x``.

        Pre-activations become ``pre / scale`` (same choices, thresholds scaled alike), activations
        are in raw units, and decoder rows keep their norms: only biases and thresholds change.
        """
        self.b_enc.div_(scale)
        self.b_dec.div_(scale)
        if hasattr(self, "part_b_dec"):
            self.part_b_dec.div_(scale)
        if hasattr(self, "threshold"):
            self.threshold.div_(scale)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        state["W_enc"] = state.pop("enc_weight").t()
        tensors = {name: p.detach().float().cpu().contiguous() for name, p in state.items()}
        save_file(tensors, folder / WEIGHTS_FILE)
        cfg = {
            "architecture": self.arch.saelens,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "k": self.k,
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": True,
            "normalize_activations": "layer_norm" if self.layer_norm_input else "none",
            "reshape_activations": "none",
            **{k: v for k, v in self.meta.items() if k in ("model_name", "hook_name", "hook_layer")},
            "metadata": {**self.meta, "featureatlas_architecture": self.architecture},
        }
        (folder / CFG_FILE).write_text(json.dumps(cfg, indent=2))

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> "SAE":
        """A dictionary this class saved (other people's formats: ``loaders``)."""
        folder = Path(folder)
        cfg = json.loads((folder / CFG_FILE).read_text())
        meta = dict(cfg.get("metadata") or {})
        architecture = meta.pop("featureatlas_architecture", "topk")
        sae = cls(int(cfg["d_in"]), int(cfg["d_sae"]), int(cfg["k"]), architecture=architecture,
                  layer_norm_input=cfg.get("normalize_activations") == "layer_norm", meta=meta)
        state = load_file(folder / WEIGHTS_FILE)
        state["enc_weight"] = state.pop("W_enc").t()
        sae.load_state_dict(state)
        return sae.to(device)
