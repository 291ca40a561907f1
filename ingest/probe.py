"""The atlas's model and dictionary at query time: search by inference (``run``) and steering (``steer``).

Loaded lazily (the model takes seconds) and once per process. Safe to call from several threads:
the model's forward hooks are per module, so one forward pass at a time holds it (``busy``); a
caller that cannot wait (a search's inference signal) asks with a timeout.
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
from .steer import Edit, Steered, check_edits, steer

MAX_PROBE_TOKENS = 512
MAX_NEW_TOKENS = 256
MAX_TEMPERATURE = 2.0
MAX_SEED = 2**63 - 1  # what torch.Generator takes


class ModelBusy(Exception):
    """The model stayed busy past the caller's timeout."""


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
        self._lock = threading.RLock()  # load() takes it, then dictionary() again
        self.busy = threading.Lock()
        self._loaded: tuple[SubjectModel, SAE, int] | None = None
        self._dictionary: SAE | None = None

    def dictionary(self) -> SAE:
        """The atlas's dictionary, loaded on first use without the model (milliseconds, where the
        model takes seconds); ``load`` moves this same copy to the model's device."""
        with self._lock:
            if self._dictionary is None:
                self._dictionary = SAE.load(self.atlas.dictionary_dir)
            return self._dictionary

    def load(self) -> tuple[SubjectModel, SAE, int]:
        """(model, dictionary, hook layer), loaded on first use."""
        with self._lock:
            if self._loaded is None:
                cfg = config_of(self.atlas.manifest)
                try:
                    model = load_model(cfg.model.model, device=self._device or cfg.run.device, dtype=cfg.run.dtype,
                                       cache_dir=cfg.model.model_cache)
                except UserError as e:  # the server's set-up, not the request, is wrong: a logged 500
                    raise RuntimeError(f"the atlas's model cannot be loaded: {e}") from e
                sae = self._dictionary = self.dictionary().to(model.device)
                self._loaded = (model, sae, int(self.atlas.manifest["hook"]["layer"]))
        return self._loaded

    def _hold(self, timeout: float | None) -> None:
        if not self.busy.acquire(timeout=-1 if timeout is None else timeout):
            raise ModelBusy(f"the model stayed busy for {timeout} s")

    @torch.no_grad()
    def run(self, text: str, *, timeout: float | None = None) -> ProbeResult:
        """Every token's active features; ``timeout``: seconds to wait for the model (``ModelBusy`` past it)."""
        if not text or not text.strip():
            raise BadParameter("text", "is empty")
        model, sae, layer = self.load()
        ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > MAX_PROBE_TOKENS:
            raise BadParameter("text", f"is {len(ids)} tokens; the limit is {MAX_PROBE_TOKENS}")
        x = torch.tensor([[model.bos_id, *ids]])
        self._hold(timeout)
        try:
            resid = model.residual(x, layer)[0, 1:]
        finally:
            self.busy.release()
        values, indices = sae.encode(resid.to(sae.W_enc.dtype)).padded()
        tokens = [model.tokenizer.decode([i]) for i in ids]
        return ProbeResult(tokens, values.float().cpu().numpy(), indices.cpu().numpy())

    def prompt_ids(self, prompt: str, *, chat: bool = False) -> list[int]:
        """The prompt as the model reads it: after BOS, or inside the model's chat template."""
        if not prompt or not prompt.strip():
            raise BadParameter("prompt", "is empty")
        model, _, _ = self.load()
        tok = model.tokenizer
        if chat:
            if not getattr(tok, "chat_template", None):
                raise BadParameter("chat", f"{model.name} has no chat template")
            ids = list(tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                               tokenize=True, return_dict=True)["input_ids"])
        else:
            ids = [model.bos_id, *tok(prompt, add_special_tokens=False)["input_ids"]]
        if len(ids) > MAX_PROBE_TOKENS:
            raise BadParameter("prompt", f"is {len(ids)} tokens; the limit is {MAX_PROBE_TOKENS}")
        return ids

    def steer(self, prompts: list[str], edits: list[Edit], *, max_new_tokens: int = 32, temperature: float = 0.0,
              seed: int = 0, chat: bool = False, generated_only: bool = False) -> Steered:
        """Default and steered continuations of each prompt (``steer.steer``); values are in units of
        each feature's maximum activation over the corpus, which the atlas stores."""
        if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
            raise BadParameter("max_new_tokens", f"must be between 1 and {MAX_NEW_TOKENS}, got {max_new_tokens}")
        if not 0 <= temperature <= MAX_TEMPERATURE:  # also refuses nan
            raise BadParameter("temperature", f"must be between 0 (greedy) and {MAX_TEMPERATURE:g}, got {temperature}")
        if not 0 <= seed <= MAX_SEED:
            raise BadParameter("seed", f"must be between 0 and {MAX_SEED}, got {seed}")
        ids = [int(e.feature) for e in edits if 0 <= e.feature < self.atlas.d_sae]
        maxima = {f: float(s["max_activation"] or 0.0) for f, s in self.atlas.summaries(ids).items()}
        check_edits(edits, maxima, self.atlas.d_sae)
        tokens = [self.prompt_ids(p, chat=chat) for p in prompts]
        model, sae, layer = self.load()
        self._hold(None)
        try:
            return steer(model, sae, layer, tokens, edits, maxima, max_new_tokens=max_new_tokens,
                         temperature=temperature, seed=seed, generated_only=generated_only)
        finally:
            self.busy.release()
