"""Search by inference: run text through an atlas's model and dictionary.

Loaded lazily (the model takes seconds) and once per process; safe to call from several threads.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch
from featureatlas.store.atlas import Atlas
from featureatlas.store.errors import BadParameter, UserError

from .config import config_of
from .model import SubjectModel, load_model
from .sae import SAE

MAX_PROBE_TOKENS = 512


@dataclass
class ProbeResult:
    tokens: list[str]  # the text's tokens, BOS excluded
    values: np.ndarray  # [n_tokens, w] activations, descending per token, zero-padded to the widest token
    indices: np.ndarray  # [n_tokens, w] feature ids

    def feature_maxima(self, d_sae: int) -> np.ndarray:
        """[d_sae] each feature's largest activation anywhere in the text.

        The first token is skipped when there are others: right after BOS the residual stream is
        an outlier (norms ~100x the median) and fires "start of text" features whatever the text.
        """
        skip = 1 if len(self.tokens) > 1 else 0
        out = np.zeros(d_sae, dtype=np.float32)
        np.maximum.at(out, self.indices[skip:].ravel(), self.values[skip:].ravel())
        return out


class Probe:
    def __init__(self, atlas: Atlas, *, device: str | None = None):
        self.atlas = atlas
        self._device = device
        self._lock = threading.Lock()
        self._loaded: tuple[SubjectModel, SAE, int] | None = None

    def _load(self) -> tuple[SubjectModel, SAE, int]:
        with self._lock:
            if self._loaded is None:
                cfg = config_of(self.atlas.manifest)
                try:
                    model = load_model(cfg.model.model, device=self._device or cfg.run.device, dtype=cfg.run.dtype,
                                       cache_dir=cfg.model.model_cache)
                except UserError as e:  # the server's set-up, not the request, is wrong: a logged 500
                    raise RuntimeError(f"the atlas's model cannot be loaded: {e}") from e
                sae = SAE.load(self.atlas.dictionary_dir, device=model.device)
                self._loaded = (model, sae, int(self.atlas.manifest["hook"]["layer"]))
        return self._loaded

    @torch.no_grad()
    def run(self, text: str) -> ProbeResult:
        if not text or not text.strip():
            raise BadParameter("text", "is empty")
        model, sae, layer = self._load()
        ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > MAX_PROBE_TOKENS:
            raise BadParameter("text", f"is {len(ids)} tokens; the limit is {MAX_PROBE_TOKENS}")
        x = torch.tensor([[model.bos_id, *ids]])
        resid = model.residual(x, layer)[0, 1:]
        values, indices = sae.encode(resid.to(sae.W_enc.dtype)).padded()
        tokens = [model.tokenizer.decode([i]) for i in ids]
        return ProbeResult(tokens, values.float().cpu().numpy(), indices.cpu().numpy())
