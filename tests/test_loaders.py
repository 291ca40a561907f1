"""Each format is written here as its own library writes it, and must encode exactly as that
format's definition says (written out below for each)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from featureatlas.api.cli import main
from featureatlas.ingest.loaders import load_dictionary
from featureatlas.store.atlas import Atlas
from featureatlas.store.errors import BadConfig
from safetensors.torch import save_file

from .conftest import SQL

D, F = 16, 48
gen = torch.Generator().manual_seed(0)


def _rand(*shape):
    return torch.randn(*shape, generator=gen)


X = _rand(200, D) * 3 + 1


def _same(got: torch.Tensor, want: torch.Tensor):
    # Folding b_dec into b_enc reorders float32 sums: equal to rounding (values here are ~10).
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _topk_relu(pre: torch.Tensor, k: int) -> torch.Tensor:
    v, i = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, i, v.relu())


@pytest.mark.parametrize("arch", ["standard", "topk-pre6", "jumprelu"])
def test_saelens(tmp_path, arch):
    w = {"W_enc": _rand(D, F), "b_enc": _rand(F), "W_dec": _rand(F, D), "b_dec": _rand(D)}
    cfg = {"d_in": D, "d_sae": F, "hook_name": "blocks.3.hook_resid_post", "apply_b_dec_to_input": arch != "standard"}
    if arch == "standard":
        cfg["architecture"] = "standard"
    elif arch == "topk-pre6":  # SAELens < 6: no architecture, the activation function names it
        cfg.update(activation_fn_str="topk", activation_fn_kwargs={"k": 5})
    else:
        cfg["architecture"] = "jumprelu"
        w["threshold"] = _rand(F).abs()
    save_file(w, tmp_path / "sae_weights.safetensors")
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    sae = load_dictionary(tmp_path, k=8)
    pre = (X - w["b_dec"] * cfg["apply_b_dec_to_input"]) @ w["W_enc"] + w["b_enc"]
    want = {"standard": pre.relu(), "topk-pre6": _topk_relu(pre, 5), "jumprelu": pre.relu() * (pre > w.get("threshold", 0))}[arch]
    with torch.no_grad():
        _same(sae.activations(X), want)
        _same(sae.reconstruct(X), want @ w["W_dec"] + w["b_dec"])
    assert sae.meta["hook_layer"] == 3


def test_sparsify(tmp_path):
    folder = tmp_path / "layers.5"
    folder.mkdir()
    w = {"encoder.weight": _rand(F, D), "encoder.bias": _rand(F), "W_dec": _rand(F, D), "b_dec": _rand(D)}
    save_file(w, folder / "sae.safetensors")
    (folder / "cfg.json").write_text(json.dumps({"k": 6, "num_latents": F, "expansion_factor": 3, "normalize_decoder": True}))
    with pytest.raises(BadConfig, match="layers.5"):  # the checkpoint root holds one folder per hook point
        load_dictionary(tmp_path, k=8)
    sae = load_dictionary(folder, k=8)
    # sparsify: top-k of relu(encoder(x - b_dec))
    want = _topk_relu(((X - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"]).relu(), 6)
    with torch.no_grad():
        _same(sae.activations(X), want)
    assert (sae.architecture, sae.k, sae.meta["hook_layer"]) == ("topk", 6, 5)


@pytest.mark.parametrize("kind", ["AutoEncoder", "AutoEncoderTopK", "BatchTopKSAE"])
def test_dictionary_learning(tmp_path, kind):
    if kind == "AutoEncoder":
        w = {"encoder.weight": _rand(F, D), "encoder.bias": _rand(F), "decoder.weight": _rand(D, F), "bias": _rand(D)}
        want = ((X - w["bias"]) @ w["encoder.weight"].T + w["encoder.bias"]).relu()
    else:
        w = {"encoder.weight": _rand(F, D), "encoder.bias": _rand(F), "decoder.weight": _rand(D, F), "b_dec": _rand(D),
             "k": torch.tensor(4)}
        post = ((X - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"]).relu()
        if kind == "AutoEncoderTopK":
            want = _topk_relu(post, 4)
        else:
            w["threshold"] = torch.tensor(0.7)
            want = post * (post > 0.7)
    torch.save(w, tmp_path / "ae.pt")
    (tmp_path / "config.json").write_text(json.dumps({"trainer": {"dict_class": kind, "layer": 2, "k": 4}}))
    sae = load_dictionary(tmp_path, k=8)
    with torch.no_grad():
        _same(sae.activations(X), want)
    assert sae.meta["hook_layer"] == 2


def test_gemma_scope(tmp_path):
    p = {"W_enc": _rand(D, F).numpy(), "b_enc": _rand(F).numpy(), "W_dec": _rand(F, D).numpy(), "b_dec": _rand(D).numpy(),
         "threshold": _rand(F).abs().numpy()}
    np.savez(tmp_path / "params.npz", **p)
    sae = load_dictionary(tmp_path, k=8)
    # Gemma Scope: no b_dec subtraction before the encoder.
    pre = X @ torch.from_numpy(p["W_enc"]) + torch.from_numpy(p["b_enc"])
    want = pre.relu() * (pre > torch.from_numpy(p["threshold"]))
    with torch.no_grad():
        _same(sae.activations(X), want)
        _same(sae.reconstruct(X), want @ torch.from_numpy(p["W_dec"]) + torch.from_numpy(p["b_dec"]))


def test_openai_topk_with_layer_normed_input(tmp_path):
    w = {"encoder.weight": _rand(F, D), "latent_bias": _rand(F), "decoder.weight": _rand(D, F), "pre_bias": _rand(D),
         "stats_last_nonzero": torch.zeros(F, dtype=torch.long), "activation": "TopK", "activation_state_dict": {"k": 7}}
    torch.save(w, tmp_path / "ae.pt")
    sae = load_dictionary(tmp_path / "ae.pt", k=8)
    mu = X.mean(-1, keepdim=True)
    std = (X - mu).std(-1, keepdim=True)
    xn = (X - mu) / (std + 1e-5)
    want = _topk_relu((xn - w["pre_bias"]) @ w["encoder.weight"].T + w["latent_bias"], 7)
    with torch.no_grad():
        _same(sae.activations(X), want)
        _same(sae.reconstruct(X), (want @ w["decoder.weight"].T + w["pre_bias"]) * (std + 1e-5) + mu)
    again = tmp_path / "ours"
    sae.save(again)  # our SAELens-layout copy keeps the input normalisation
    assert json.loads((again / "cfg.json").read_text())["normalize_activations"] == "layer_norm"
    with torch.no_grad():
        _same(load_dictionary(again, k=8).activations(X), want)


def test_unknown_or_broken_files_are_config_errors(tmp_path):
    with pytest.raises(BadConfig, match="no such"):
        load_dictionary(tmp_path / "missing", k=8)
    with pytest.raises(BadConfig, match="known format"):
        load_dictionary(tmp_path, k=8)
    (tmp_path / "config.json").write_text(json.dumps({"trainer": {"dict_class": "GatedAutoEncoder"}}))
    torch.save({}, tmp_path / "ae.pt")
    with pytest.raises(BadConfig, match="GatedAutoEncoder"):
        load_dictionary(tmp_path, k=8)


def _gemma_files(folder, d_in, d_sae=32, seed=0):
    g = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "params.npz", W_enc=g.normal(size=(d_in, d_sae)).astype(np.float32) / 4,
             b_enc=np.zeros(d_sae, np.float32), W_dec=g.normal(size=(d_sae, d_in)).astype(np.float32) / 4,
             b_dec=np.zeros(d_in, np.float32), threshold=np.full(d_sae, 0.1, np.float32))
    return folder


def test_ingest_with_a_loaded_dictionary(tmp_path, tiny_model_dir, corpus_dir, capsys):
    base = ["ingest", "--model", str(tiny_model_dir), "--corpus", str(corpus_dir), "--tokens", "3000",
            "--eval-fraction", "0.3", "--k", "4"]
    wrong = _gemma_files(tmp_path / "wrong", d_in=16)
    assert main(base + ["--atlas", str(tmp_path / "a"), "--dictionary", str(wrong)]) == 2
    assert "--dictionary" in capsys.readouterr().err and not (tmp_path / "a").exists()
    right = _gemma_files(tmp_path / "right", d_in=64)
    assert main(base + ["--atlas", str(tmp_path / "b"), "--dictionary", str(right)]) == 0
    atlas = Atlas(tmp_path / "b")
    d = atlas.manifest["dictionary"]
    assert d["architecture"] == "jumprelu" and d["source"]["format"] == "gemmascope" and d["d_sae"] == 32
    assert "steps" not in atlas.manifest["stages"]["train"]["summary"]  # nothing was trained
    assert atlas.features.count_rows() == 32
    (row,) = SQL(atlas).execute("select source, training, d_sae from dictionaries").fetchall()
    assert row == ("loaded (gemmascope)", None, 32)  # a loaded dictionary was not trained here


def test_a_folder_of_widths_at_one_hook_loads_as_a_stack(tmp_path):
    """A release with a dictionary per width (one per subfolder) is one stack, narrowest first,
    each dictionary encoding as it does alone; several hook points or a repeated width are refused."""
    from featureatlas.ingest.sae import SAE

    alone = {}
    for width, k in ((48, 6), (16, 3)):
        sae = SAE.initialized(D, width, k, seed=width, meta={"hook_name": "blocks.3.hook_resid_post", "hook_layer": 3})
        sae.save(tmp_path / "release" / f"width_{width}")
        alone[width] = load_dictionary(tmp_path / "release" / f"width_{width}", k=8)
    stack = load_dictionary(tmp_path / "release", k=8)
    assert stack.parts == ((0, 16), (16, 48)) and stack.meta["hook_layer"] == 3
    with torch.no_grad():
        _same(stack.activations(X)[:, :16], alone[16].activations(X))
        _same(stack.activations(X)[:, 16:], alone[48].activations(X))
    assert int((stack.activations(X)[:, :16] > 0).sum(1).max()) <= 3  # each its own k
    other = SAE.initialized(D, 32, 4, seed=1, meta={"hook_name": "blocks.5.hook_resid_post", "hook_layer": 5})
    other.save(tmp_path / "release" / "layer_5")
    with pytest.raises(BadConfig, match="several hook points"):
        load_dictionary(tmp_path / "release", k=8)
    (tmp_path / "release" / "layer_5" / "cfg.json").unlink()
    alone[16].save(tmp_path / "release" / "again_16")
    with pytest.raises(BadConfig, match="one width"):
        load_dictionary(tmp_path / "release", k=8)
