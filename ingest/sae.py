"""The TopK sparse autoencoder, and its file format (SAELens layout).

The class owns ``save``/``load`` so the model and its files cannot drift apart. Weights follow
SAELens names and shapes: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``,
``b_dec [d_in]``; the encoder subtracts ``b_dec`` first (``apply_b_dec_to_input``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS_FILE = "sae_weights.safetensors"
CFG_FILE = "cfg.json"


class SparseCode(NamedTuple):
    values: torch.Tensor
    """[N, k] activations of the chosen latents (>= 0)."""
    indices: torch.Tensor
    """[N, k] latent ids."""


class ForwardOutput(NamedTuple):
    x_hat: torch.Tensor
    """[N, d_in] reconstruction."""
    code: SparseCode
    """The k active latents per row."""
    pre_acts: torch.Tensor
    """[N, d_sae] encoder pre-activations, kept for the AuxK loss."""


class TopKSAE(nn.Module):
    def __init__(self, d_in: int, d_sae: int, k: int, *, meta: dict[str, Any] | None = None):
        super().__init__()
        self.d_in, self.d_sae, self.k = d_in, d_sae, k
        self.meta = dict(meta or {})
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    @classmethod
    def initialized(cls, d_in: int, d_sae: int, k: int, *, seed: int = 0, meta: dict | None = None) -> "TopKSAE":
        """Random unit decoder rows and the encoder tied to their transpose (Gao et al., sec. A.1)."""
        sae = cls(d_in, d_sae, k, meta=meta)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=gen))
            sae.normalize_decoder()
            sae.W_enc.copy_(sae.W_dec.T)
        return sae

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> SparseCode:
        values, indices = self.pre_activations(x).topk(self.k, dim=-1, sorted=False)
        return SparseCode(values.relu(), indices)

    def decode(self, code: SparseCode) -> torch.Tensor:
        # Gathers only the k active decoder rows: k * d_in work per row instead of d_sae * d_in.
        flat = nn.functional.embedding_bag(
            code.indices.reshape(-1, self.k), self.W_dec, per_sample_weights=code.values.reshape(-1, self.k), mode="sum"
        )
        return flat.reshape(*code.values.shape[:-1], self.d_in) + self.b_dec

    def dense(self, code: SparseCode) -> torch.Tensor:
        """[N, d_sae] activations with zeros outside the top k (what SAELens's ``encode`` returns)."""
        out = torch.zeros(*code.values.shape[:-1], self.d_sae, dtype=code.values.dtype, device=code.values.device)
        return out.scatter_(-1, code.indices, code.values)

    def forward(self, x: torch.Tensor) -> ForwardOutput:
        pre = self.pre_activations(x)
        values, indices = pre.topk(self.k, dim=-1, sorted=False)
        code = SparseCode(values.relu(), indices)
        return ForwardOutput(self.decode(code), code, pre)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Keep unit-norm rows unit-norm to first order: drop each row gradient's radial part."""
        if self.W_dec.grad is None:
            return
        radial = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
        self.W_dec.grad.sub_(radial * self.W_dec)

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """Turn a dictionary trained on ``x * scale`` into one that takes raw ``x``.

        Pre-activations become ``pre / scale`` (same top-k choice), activations are in raw units, and
        decoder rows stay unit norm: only the biases change.
        """
        self.b_enc.div_(scale)
        self.b_dec.div_(scale)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {name: p.detach().float().cpu().contiguous() for name, p in self.named_parameters()}
        save_file(tensors, folder / WEIGHTS_FILE)
        cfg = {
            "architecture": "topk",
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "k": self.k,
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": True,
            "normalize_activations": "none",
            "reshape_activations": "none",
            **{k: v for k, v in self.meta.items() if k in ("model_name", "hook_name", "hook_layer")},
            "metadata": self.meta,
        }
        (folder / CFG_FILE).write_text(json.dumps(cfg, indent=2))

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> "TopKSAE":
        folder = Path(folder)
        cfg = json.loads((folder / CFG_FILE).read_text())
        if cfg.get("architecture") != "topk":
            raise ValueError(f"{folder}: architecture {cfg.get('architecture')!r} is not topk")
        k = int(cfg.get("k") or cfg.get("activation_fn_kwargs", {}).get("k"))
        sae = cls(int(cfg["d_in"]), int(cfg["d_sae"]), k, meta=cfg.get("metadata") or {})
        sae.load_state_dict(load_file(folder / WEIGHTS_FILE))
        return sae.to(device)
