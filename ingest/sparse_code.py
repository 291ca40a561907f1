"""The sparse code of a batch of rows (which latents are active, with what value): what a dictionary's
encoder gives, its decoder reads and training differentiates through."""

from __future__ import annotations

from typing import NamedTuple

import torch


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
        return cls(acts[rows, cols], cols, row_offsets(rows, len(acts)))

    @property
    def n_rows(self) -> int:
        return len(self.offsets) - 1

    def row_ids(self) -> torch.Tensor:
        """[nnz] the row of each entry."""
        return torch.repeat_interleave(torch.arange(self.n_rows, device=self.offsets.device), self.offsets.diff())

    def active(self) -> "SparseCode":
        """Without the zero entries (a top-k row whose k-th pre-activation was negative)."""
        keep = self.values > 0
        return SparseCode(self.values[keep], self.indices[keep], row_offsets(self.row_ids()[keep], self.n_rows))

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


def row_offsets(rows: torch.Tensor, n: int) -> torch.Tensor:
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
