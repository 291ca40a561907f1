"""The sparse autoencoder in its four architectures, and its file format (SAELens layout).

- ``topk`` (Gao et al. 2024): the k largest pre-activations per token.
- ``batchtopk`` (Bussmann et al. 2024): top ``k * batch`` over a whole batch while training; at
  inference one learned threshold, so L0 varies per token around k.
- ``relu`` (Anthropic, Scaling Monosemanticity): ReLU, trained with an L1 penalty weighted by
  decoder norms.
- ``jumprelu`` (Rajamanoharan et al. 2024): a learned threshold per latent, trained with an L0
  penalty through straight-through estimators.

The class owns ``save``/``load`` so the model and its files cannot drift apart. Weights follow
SAELens names and shapes: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``,
``b_dec [d_in]`` and, for threshold architectures, ``threshold [d_sae]``; the encoder subtracts
``b_dec`` first (``apply_b_dec_to_input``).

Every public method works for all four: ``encode`` gives each row's active latents as a
``SparseCode`` in CSR layout (k per row for top-k, any number for the threshold architectures, whose
L0 varies), so nothing is cut, and ``decode(encode(x))`` is the reconstruction.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import torch
from featureatlas.store import manifest as M
from safetensors.torch import load_file, save_file
from torch import nn

from .config import ARCHITECTURES

WEIGHTS_FILE = M.DICTIONARY_WEIGHTS
CFG_FILE = M.DICTIONARY_CFG


class SparseCode(NamedTuple):
    """Each row's active latents in CSR layout: row i's are ``[offsets[i], offsets[i + 1])`` of
    ``values`` and ``indices``. Variable width, so a jumprelu row with 300 actives keeps all 300."""

    values: torch.Tensor
    """[nnz] activations (>= 0; training's fixed-width codes may hold zeros)."""
    indices: torch.Tensor
    """[nnz] latent ids."""
    offsets: torch.Tensor
    """[N + 1] int64 row starts."""

    @classmethod
    def fixed(cls, values: torch.Tensor, indices: torch.Tensor) -> "SparseCode":
        """From [N, w] selections, zeros kept (training differentiates through every slot)."""
        n, width = values.shape
        offsets = torch.arange(0, n * width + 1, width, device=values.device)
        return cls(values.reshape(-1), indices.reshape(-1), offsets)

    @classmethod
    def from_dense(cls, acts: torch.Tensor) -> "SparseCode":
        """The nonzero entries of [N, d_sae] activations, row by row in latent order."""
        rows, cols = acts.nonzero(as_tuple=True)
        return cls(acts[rows, cols], cols, _offsets(rows, len(acts)))

    @property
    def n_rows(self) -> int:
        return len(self.offsets) - 1

    def row_ids(self) -> torch.Tensor:
        """[nnz] the row of each entry."""
        return torch.repeat_interleave(torch.arange(self.n_rows, device=self.offsets.device), self.offsets.diff())

    def active(self) -> "SparseCode":
        """Without the zero entries (a top-k row whose k-th pre-activation was negative)."""
        keep = self.values > 0
        return SparseCode(self.values[keep], self.indices[keep], _offsets(self.row_ids()[keep], self.n_rows))

    def padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([N, w] values, [N, w] indices), each row sorted strongest first and padded with zeros to
        the widest row's width w."""
        rows = self.row_ids()
        width = int(self.offsets.diff().max()) if self.n_rows else 0
        order = torch.argsort(self.values, descending=True, stable=True)
        order = order[torch.argsort(rows[order], stable=True)]  # by row, strongest first within one
        slot = torch.arange(len(order), device=rows.device) - self.offsets[rows[order]]
        values = self.values.new_zeros(self.n_rows, width)
        indices = self.indices.new_zeros(self.n_rows, width)
        values[rows[order], slot] = self.values[order]
        indices[rows[order], slot] = self.indices[order]
        return values, indices


def _offsets(rows: torch.Tensor, n: int) -> torch.Tensor:
    """CSR row starts from the (sorted) row of each entry."""
    out = torch.zeros(n + 1, dtype=torch.long, device=rows.device)
    out[1:] = torch.bincount(rows, minlength=n).cumsum(0)
    return out


class ForwardOutput(NamedTuple):
    x_hat: torch.Tensor
    """[N, d_in] reconstruction."""
    code: SparseCode
    """The active latents of each row."""
    pre_acts: torch.Tensor
    """[N, d_sae] encoder pre-activations, kept for the AuxK loss."""


LAYER_NORM_EPS = 1e-5
# Our architecture names as SAELens spells them (its "standard" is a ReLU dictionary).
SAELENS_NAMES = {"topk": "topk", "batchtopk": "jumprelu", "relu": "standard", "jumprelu": "jumprelu"}


class SAE(nn.Module):
    def __init__(self, d_in: int, d_sae: int, k: int, *, architecture: str = "topk", layer_norm_input: bool = False,
                 meta: dict[str, Any] | None = None):
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
        self.d_in, self.d_sae, self.k, self.architecture = d_in, d_sae, k, architecture
        # OpenAI's TopK dictionaries read each token layer-normed (x - mean) / (std + eps) and undo it
        # after decoding; ours never do.
        self.layer_norm_input = layer_norm_input
        self.meta = dict(meta or {})
        # The encoder is held a latent per row, like nn.Linear's weight; ``W_enc`` (SAELens's shape,
        # what files hold) is its transpose as a view. Training's sparse gradient then writes
        # contiguous rows (3.6 ms instead of 9.9 into columns at d_sae=8192 here), a matmul reads
        # either layout at the same speed, and fused Adam wants a contiguous parameter (a
        # transposed one costs it 13 ms instead of 2).
        self.enc_weight = nn.Parameter(torch.empty(d_sae, d_in))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        if architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(d_sae))
        elif architecture == "batchtopk":
            self.register_buffer("threshold", torch.zeros(d_sae))  # one value, learned as a running estimate

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
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def _code(self, pre: torch.Tensor) -> SparseCode:
        """Rows are every leading index flattened: a [batch, seq, d_sae] input gives batch * seq rows."""
        pre = pre.reshape(-1, self.d_sae)
        if self.architecture == "topk":
            values, indices = pre.topk(self.k, dim=-1, sorted=False)
            return SparseCode.fixed(values.relu(), indices).active()
        if self.architecture == "relu":
            return SparseCode.from_dense(pre.relu())
        # jumprelu and batchtopk at inference: a threshold per latent (below 0 would let negatives through)
        return SparseCode.from_dense(pre * (pre > self.threshold.clamp_min(0)))

    def encode(self, x: torch.Tensor) -> SparseCode:
        """Every active latent of every row: k per row for top-k, all above threshold otherwise."""
        return self._code(self.pre_activations(x))

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """[N, d_sae] inference activations, zeros for inactive latents (what SAELens's ``encode`` returns)."""
        return self.dense(self.encode(x)).view(*x.shape[:-1], self.d_sae)

    def decode(self, code: SparseCode) -> torch.Tensor:
        """[N, d_in] from the code, before any input normalisation is undone (``reconstruct`` does that)."""
        # Gathers only the active decoder rows: L0 * d_in work per row instead of d_sae * d_in.
        return nn.functional.embedding_bag(code.indices, self.W_dec, code.offsets[:-1], per_sample_weights=code.values,
                                           mode="sum") + self.b_dec

    def dense(self, code: SparseCode) -> torch.Tensor:
        """[N, d_sae] with zeros outside the code."""
        out = code.values.new_zeros(code.n_rows, self.d_sae)
        return out.index_put_((code.row_ids(), code.indices), code.values)

    def forward(self, x: torch.Tensor) -> ForwardOutput:
        pre = self.pre_activations(x)
        code = self._code(pre)
        return ForwardOutput(self._denormalize(self.decode(code).view(x.shape), x), code, pre)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """[N, d_in] in the input's own units (an input layer norm undone)."""
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
            "architecture": SAELENS_NAMES[self.architecture],
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
