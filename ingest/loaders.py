"""Other people's dictionaries, read into our ``SAE`` (``featureatlas ingest --dictionary PATH``).

Every format is mapped onto one parameterisation, ``pre = (x - b_dec) @ W_enc + b_enc``, followed by
the architecture's activation. A format whose encoder does not subtract the decoder bias first
(Gemma Scope; SAELens with ``apply_b_dec_to_input: false``) has it folded into ``b_enc``:
``x W + b = (x - b_dec) W + (b + b_dec W)``, so encodings are unchanged.

| format | files | architectures |
| --- | --- | --- |
| ours / SAELens | ``cfg.json`` + ``sae_weights.safetensors`` | standard (relu), topk, jumprelu; pre-6.0 configs |
| EleutherAI sparsify | ``cfg.json`` + ``sae.safetensors`` (``encoder.weight [F, D]``) | topk |
| dictionary_learning | ``ae.pt`` + ``config.json`` | AutoEncoder (relu), AutoEncoderTopK, BatchTopKSAE |
| Gemma Scope | ``params.npz`` | jumprelu |
| OpenAI sparse_autoencoder | a ``.pt`` state dict | TopK (layer-normed input), ReLU |

A folder of several dictionaries of one hook point, one per subfolder in any format above (a
release with several widths, such as SAELens's or Gemma Scope's), loads as one stack of them
(``SAE.stack``), narrowest first: one atlas with a dictionary per width.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from featureatlas.store.errors import BadConfig
from safetensors.torch import load_file

from .sae import ARCHITECTURES, CFG_FILE, SAE, WEIGHTS_FILE

FORMATS = ("saelens", "sparsify", "dictionary_learning", "gemmascope", "openai")


def detect_format(path: Path) -> str:
    if path.is_file() and path.suffix == ".pt":
        return "openai"
    if path.is_file() and path.name.endswith(".npz"):
        return "gemmascope"
    if (path / CFG_FILE).is_file() and (path / WEIGHTS_FILE).is_file():
        return "saelens"
    if (path / "cfg.json").is_file() and (path / "sae.safetensors").is_file():
        return "sparsify"
    if (path / "ae.pt").is_file() and (path / "config.json").is_file():
        return "dictionary_learning"
    if (path / "params.npz").is_file():
        return "gemmascope"
    inner = sorted(p.parent.name for p in path.glob("*/sae.safetensors")) if path.is_dir() else []
    hint = f" (it holds one dictionary per hook point: pass one of {', '.join(inner)})" if inner else ""
    raise BadConfig("--dictionary", f"{path}: not a dictionary in any known format ({', '.join(FORMATS)}){hint}")


def load_dictionary(path: str | Path, *, k: int) -> SAE:
    """``k``: for formats without one (relu, jumprelu), recorded as the dictionary's nominal L0
    (their codes keep every active latent)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise BadConfig("--dictionary", f"no such file or folder: {path}")
    release = _release(path)
    if release:
        return _stacked(path, [load_dictionary(p, k=k) for p in release])
    fmt = detect_format(path)
    try:
        sae = {"saelens": _saelens, "sparsify": _sparsify, "dictionary_learning": _dictionary_learning,
               "gemmascope": _gemmascope, "openai": _openai}[fmt](path, k)
    except (KeyError, ValueError, RuntimeError) as e:
        raise BadConfig("--dictionary", f"{path}: unreadable as {fmt}: {type(e).__name__}: {e}") from None
    sae.meta.setdefault("loaded_from", {"format": fmt, "path": str(path)})
    return sae.eval()


def _release(path: Path) -> list[Path]:
    """The dictionaries a folder holds one per subfolder, when it is no dictionary itself."""
    if not path.is_dir():
        return []
    try:
        detect_format(path)
        return []
    except BadConfig:
        pass
    inner = []
    for sub in sorted(p for p in path.iterdir() if p.is_dir()):
        try:
            detect_format(sub)
            inner.append(sub)
        except BadConfig:
            continue
    return inner if len(inner) > 1 else []


def _stacked(path: Path, saes: list[SAE]) -> SAE:
    """Several dictionaries of one hook point as one stack, narrowest first."""
    layers = sorted({str(s.meta.get("hook_layer")) for s in saes})
    if len(layers) > 1:
        raise BadConfig("--dictionary", f"{path} holds dictionaries of several hook points (layers {', '.join(layers)}): "
                                        "pass one of its folders (several layers in one atlas are not built yet)")
    saes = sorted(saes, key=lambda s: s.d_sae)
    if len({s.d_sae for s in saes}) < len(saes):
        raise BadConfig("--dictionary", f"{path} holds two dictionaries of one width ({[s.d_sae for s in saes]}): "
                                        "an atlas tells its dictionaries apart by width; pass a folder with one of each")
    try:
        stack = SAE.stack(saes)
    except ValueError as e:
        raise BadConfig("--dictionary", f"{path}: its dictionaries cannot be held as one: {e}") from None
    first = saes[0].meta
    stack.meta.update({key: first[key] for key in ("hook_name", "hook_layer") if key in first})
    stack.meta["loaded_from"] = {"format": f"{len(saes)} x {first['loaded_from']['format']}", "path": str(path)}
    return stack.eval()


def _build(architecture: str, k: int, W_enc, b_enc, W_dec, b_dec, *, threshold=None, subtract_b_dec: bool = True,
           layer_norm_input: bool = False, meta: dict | None = None) -> SAE:
    """An SAE from tensors in our orientation (``W_enc [D, F]``, ``W_dec [F, D]``)."""
    W_enc, W_dec = torch.as_tensor(W_enc).float(), torch.as_tensor(W_dec).float()
    b_enc, b_dec = torch.as_tensor(b_enc).float(), torch.as_tensor(b_dec).float()
    d_in, d_sae = W_enc.shape
    if W_dec.shape != (d_sae, d_in) or b_enc.shape != (d_sae,) or b_dec.shape != (d_in,):
        raise ValueError(f"inconsistent shapes: W_enc {tuple(W_enc.shape)}, W_dec {tuple(W_dec.shape)}, "
                         f"b_enc {tuple(b_enc.shape)}, b_dec {tuple(b_dec.shape)}")
    if not subtract_b_dec:
        b_enc = b_enc + b_dec @ W_enc
    sae = SAE(d_in, d_sae, min(k, d_sae), architecture=architecture, layer_norm_input=layer_norm_input, meta=meta)
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_dec.copy_(b_dec)
        if threshold is not None:
            sae.threshold.copy_(torch.as_tensor(threshold).float().expand(d_sae))
    return sae


def _saelens(path: Path, k: int) -> SAE:
    cfg: dict[str, Any] = json.loads((path / CFG_FILE).read_text())
    if "featureatlas_architecture" in (cfg.get("metadata") or {}):
        return SAE.load(path)
    w = load_file(path / WEIGHTS_FILE)
    # SAELens >= 6 names the architecture; older configs only name the activation function.
    arch = cfg.get("architecture") or {"relu": "standard", "topk": "topk"}.get(cfg.get("activation_fn_str", "relu"))
    readable = {a.saelens: a.name for a in ARCHITECTURES.values() if a.reads_saelens}
    ours = readable.get(arch)
    if ours is None:
        raise ValueError(f"architecture {arch!r} is not supported ({', '.join(readable)} are)")
    norm = cfg.get("normalize_activations") or "none"
    if norm not in ("none", "layer_norm"):
        raise ValueError(f"normalize_activations={norm!r} is not supported (none, layer_norm are)")
    k_sae = int(cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k") or k)
    meta = {key: cfg[key] for key in ("model_name", "hook_name", "hook_layer") if key in cfg}
    meta.update(_layer_from_hook(cfg.get("hook_name", "")))
    return _build(ours, k_sae, w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], threshold=w.get("threshold"),
                  subtract_b_dec=cfg.get("apply_b_dec_to_input", True), layer_norm_input=norm == "layer_norm", meta=meta)


def _sparsify(path: Path, k: int) -> SAE:
    cfg = json.loads((path / "cfg.json").read_text())
    w = load_file(path / "sae.safetensors")
    if "W_skip" in w or cfg.get("transcode"):
        raise ValueError("transcoders and skip connections are not supported")
    if cfg.get("activation", "topk") != "topk":
        raise ValueError(f"activation {cfg['activation']!r} is not supported (topk is)")
    meta = {"hook_name": path.name, **_layer_from_hook(path.name)}
    return _build("topk", int(cfg["k"]), w["encoder.weight"].T, w["encoder.bias"], w["W_dec"], w["b_dec"], meta=meta)


def _dictionary_learning(path: Path, k: int) -> SAE:
    trainer = json.loads((path / "config.json").read_text()).get("trainer", {})
    kind = trainer.get("dict_class")
    w = torch.load(path / "ae.pt", map_location="cpu", weights_only=True)
    meta = {"hook_layer": trainer["layer"]} if isinstance(trainer.get("layer"), int) else {}
    if kind == "AutoEncoder":
        return _build("relu", k, w["encoder.weight"].T, w["encoder.bias"], w["decoder.weight"].T, w["bias"], meta=meta)
    if kind in ("AutoEncoderTopK", "BatchTopKSAE"):
        k_sae = int(w["k"]) if "k" in w else int(trainer["k"])
        arch, threshold = ("topk", None) if kind == "AutoEncoderTopK" else ("batchtopk", w["threshold"])
        return _build(arch, k_sae, w["encoder.weight"].T, w["encoder.bias"], w["decoder.weight"].T, w["b_dec"],
                      threshold=threshold, meta=meta)
    raise ValueError(f"dict_class {kind!r} is not supported (AutoEncoder, AutoEncoderTopK, BatchTopKSAE are)")


def _gemmascope(path: Path, k: int) -> SAE:
    p = np.load(path if path.is_file() else path / "params.npz")
    # Gemma Scope encodes x @ W_enc + b_enc, without subtracting b_dec.
    return _build("jumprelu", k, p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"], threshold=p["threshold"],
                  subtract_b_dec=False)


def _openai(path: Path, k: int) -> SAE:
    w = torch.load(path, map_location="cpu", weights_only=True)
    activation = w.get("activation", "ReLU")
    if activation not in ("TopK", "ReLU"):
        raise ValueError(f"activation {activation!r} is not supported (TopK, ReLU are)")
    topk = activation == "TopK"
    k_sae = int(w["activation_state_dict"]["k"]) if topk else k
    # Their TopK checkpoints read layer-normed inputs (their loader turns normalisation on with TopK).
    return _build("topk" if topk else "relu", k_sae, w["encoder.weight"].T, w["latent_bias"], w["decoder.weight"].T,
                  w["pre_bias"], layer_norm_input=topk)


def _layer_from_hook(hook: str) -> dict[str, int]:
    """The block index in hook names like ``blocks.12.hook_resid_post`` or ``layers.12``."""
    parts = hook.split(".")
    for a, b in zip(parts, parts[1:]):
        if a in ("blocks", "layers") and b.isdigit():
            return {"hook_layer": int(b)}
    return {}
