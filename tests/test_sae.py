import json

import numpy as np
import pytest
import torch
from featureatlas.ingest.evaluate import reconstruction_metrics
from featureatlas.ingest.harvest import ShardedActivations
from featureatlas.ingest.objectives import _encoder_grad, auxk_loss, batchtopk_forward, fvu, topk_forward
from featureatlas.ingest.sae import ARCHITECTURES, SAE
from featureatlas.ingest.train import DictionarySpec, geometric_median, train_sae, train_saes
from safetensors.torch import load_file


def _sae(d_in=16, d_sae=64, k=4, seed=0):
    sae = SAE.initialized(d_in, d_sae, k, seed=seed, meta={"hook_name": "blocks.1.hook_resid_post"})
    with torch.no_grad():
        sae.b_enc.normal_(generator=torch.Generator().manual_seed(seed))
        sae.b_dec.normal_(generator=torch.Generator().manual_seed(seed + 1))
    return sae


def test_saelens_layout_round_trip_gives_identical_encodings(tmp_path):
    sae = _sae()
    sae.save(tmp_path)
    tensors = load_file(tmp_path / "sae_weights.safetensors")
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "W_enc": (16, 64), "b_enc": (64,), "W_dec": (64, 16), "b_dec": (16,)
    }
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["d_in"], cfg["d_sae"], cfg["k"]) == ("topk", 16, 64, 4)
    assert cfg["hook_name"] == "blocks.1.hook_resid_post" and cfg["apply_b_dec_to_input"] is True
    again = SAE.load(tmp_path)
    x = torch.randn(100, 16)
    a, b = sae.encode(x), again.encode(x)
    torch.testing.assert_close(sae.dense(a), again.dense(b), rtol=0, atol=0)


def test_sparse_decoder_matches_dense_definition():
    sae = _sae()
    x = torch.randn(50, 16)
    code = sae.encode(x)
    dense = sae.dense(code)
    assert int((dense > 0).sum(1).max()) <= 4
    torch.testing.assert_close(sae.decode(code), dense @ sae.W_dec + sae.b_dec)
    # SAELens's encode: relu(topk((x - b_dec) W_enc + b_enc)) with zeros elsewhere.
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    vals, idx = pre.topk(4, dim=-1)
    expected = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    torch.testing.assert_close(dense, expected)


def test_sparse_training_gradients_equal_dense_autograd():
    """The TopK training forward (dense pass without autograd, gradients through the selected
    latents only) must give every parameter exactly the gradient plain autograd gives, AuxK included."""
    torch.manual_seed(0)
    sae = SAE.initialized(24, 96, 4, seed=1)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    x = torch.randn(50, 24)
    dead = torch.rand(96) < 0.3

    def grads(fast: bool) -> list[torch.Tensor]:
        sae.zero_grad()
        if fast:
            out, select = topk_forward(sae, x)
        else:
            out, select = sae(x), None
        loss = fvu(x, out.x_hat) + 0.5 * auxk_loss(out.pre_acts, sae.W_dec, (x - out.x_hat).detach(), dead, 8, select)
        loss.backward()
        return [p.grad.clone() for p in (sae.enc_weight, sae.b_enc, sae.W_dec, sae.b_dec)]

    for fast, slow in zip(grads(True), grads(False)):
        torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-6)
    # the dense form used on accelerators gives the same W_enc gradient as the CPU's sparse one
    crow, cols, grad = torch.tensor([0, 3, 3, 7] + [7] * 47), torch.tensor([1, 5, 9, 0, 2, 50, 95]), torch.randn(7)
    sparse, dense = (_encoder_grad(x, crow, cols, grad, 96, sparse=flag) for flag in (True, False))
    torch.testing.assert_close(sparse, dense)


def test_sparse_batchtopk_gradients_equal_dense_autograd():
    """BatchTopK's sparse training forward (a batch-wide top k·n, any number per row) against the
    dense definition: zeros outside the kept pre-activations, decoded with a full matmul."""
    torch.manual_seed(0)
    sae = SAE.initialized(24, 96, 4, architecture="batchtopk", seed=1)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    x = torch.randn(50, 24)

    def grads(fast: bool) -> list[torch.Tensor]:
        sae.zero_grad()
        if fast:
            x_hat = batchtopk_forward(sae, x)[0].x_hat
        else:
            post = sae.pre_activations(x).relu()
            keep = post.flatten().topk(sae.k * len(x)).indices
            acts = torch.zeros_like(post).flatten().scatter(0, keep, post.flatten()[keep]).view_as(post)
            x_hat = acts @ sae.W_dec + sae.b_dec
        fvu(x, x_hat).backward()
        return [p.grad.clone() for p in (sae.enc_weight, sae.b_enc, sae.W_dec, sae.b_dec)]

    for fast, slow in zip(grads(True), grads(False)):
        torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-6)


def test_folding_the_input_scale_changes_units_not_choices():
    sae = _sae()
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(0)) * 30  # fixed: no near-ties to flip
    s = 0.05
    before = sae.encode(x * s)
    recon_scaled = sae.decode(before) / s
    sae.fold_input_scale(s)
    after = sae.encode(x)
    torch.testing.assert_close(sae.dense(after), sae.dense(before) / s)
    torch.testing.assert_close(sae.decode(after), recon_scaled, rtol=1e-5, atol=1e-4)  # values ~30: float32 rounding
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))


def test_parallel_gradient_is_removed():
    sae = _sae()
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    sae.remove_parallel_decoder_grad()
    radial = (sae.W_dec.grad * sae.W_dec).sum(1)
    torch.testing.assert_close(radial, torch.zeros(64), atol=1e-5, rtol=0)


def test_fvu_is_about_the_mean_not_zero():
    x = torch.tensor([[10.0, 1.0], [10.0, 3.0], [10.0, 5.0]])
    x_hat = torch.tensor([[10.0, 2.0], [10.0, 3.0], [10.0, 4.0]])
    # errors: 1 + 0 + 1 = 2; deviations about the mean (10, 3): 4 + 0 + 4 = 8
    assert float(fvu(x, x_hat)) == pytest.approx(0.25)
    sae = _sae(d_in=2, d_sae=4, k=1)
    m = reconstruction_metrics(sae, x.numpy())
    with torch.no_grad():
        expected = 1 - float(((x - sae.reconstruct(x)) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    assert m["variance_explained"] == pytest.approx(expected)


def test_geometric_median_resists_outliers():
    x = torch.cat([torch.zeros(99, 3), torch.full((1, 3), 1000.0)])
    assert float(geometric_median(x).norm()) < 1.0 < float(x.mean(0).norm())


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])  # bf16: CUDA default
@pytest.mark.parametrize("architecture,coef", [("topk", None), ("batchtopk", None), ("relu", 2.0), ("jumprelu", None),
                                               ("matryoshka", None)])
def test_training_recovers_planted_sparse_features(architecture, coef, compute_dtype):
    gen = torch.Generator().manual_seed(0)
    d, n_true = 32, 48
    true = torch.nn.functional.normalize(torch.randn(n_true, d, generator=gen), dim=1)
    idx = torch.randint(0, n_true, (20_000, 3), generator=gen)
    val = torch.rand(20_000, 3, generator=gen) * 2 + 0.5
    x = torch.nn.functional.embedding_bag(idx, true, per_sample_weights=val, mode="sum") * 7 + 2
    result = train_sae(
        x.half().numpy(), architecture=architecture, sparsity_coef=coef, d_sae=96, k=3, tokens=300_000, batch=256,
        lr=3e-3, aux_k=32, aux_coef=1 / 32, dead_tokens=5_000, seed=0, device=torch.device("cpu"),
        compute_dtype=compute_dtype,
    )
    sae = result.sae
    assert all(p.dtype == torch.float32 for p in sae.parameters())
    if architecture != "relu":  # relu's decoder norms are free; its L1 penalty weighs them
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(96), atol=1e-4, rtol=0)
    m = reconstruction_metrics(sae, x[:4000].numpy())
    assert m["variance_explained"] > 0.8 and m["l0"] <= (3 if architecture == "topk" else 5), m
    cos = (true @ sae.unit_decoder().T).max(1).values
    assert float(cos.mean()) > 0.9


def test_each_architecture_round_trips_in_saelens_layout(tmp_path):
    saelens_names = {"topk": "topk", "batchtopk": "jumprelu", "relu": "standard", "jumprelu": "jumprelu",
                     "matryoshka": "jumprelu"}
    assert set(saelens_names) == set(ARCHITECTURES)  # a new architecture is tested here too
    for architecture, saelens in saelens_names.items():
        sae = SAE.initialized(16, 64, 4, architecture=architecture, seed=1)
        with torch.no_grad():
            if hasattr(sae, "threshold"):
                sae.threshold.uniform_(0.0, 0.5)
            sae.b_enc.normal_()
        sae.save(tmp_path / architecture)
        cfg = json.loads((tmp_path / architecture / "cfg.json").read_text())
        tensors = load_file(tmp_path / architecture / "sae_weights.safetensors")
        assert cfg["architecture"] == saelens and ("threshold" in tensors) == (architecture not in ("relu", "topk"))
        again = SAE.load(tmp_path / architecture)
        assert again.architecture == architecture
        x = torch.randn(64, 16)
        torch.testing.assert_close(sae.activations(x), again.activations(x), rtol=0, atol=0)
        # The code keeps every active latent, however many, and nothing below the threshold.
        code, dense = again.encode(x), again.activations(x)
        assert len(code.values) == int((dense > 0).sum()) and bool((code.values > 0).all())
        # Folding an input scale moves thresholds with the biases: same choices, raw units.
        before = again.activations(x * 0.1)
        again.fold_input_scale(0.1)
        torch.testing.assert_close(again.activations(x), before / 0.1, rtol=1e-4, atol=1e-5)


def test_killed_training_resumes_to_the_same_dictionary(tmp_path, monkeypatch):
    from featureatlas.ingest import train as train_mod

    x = torch.randn(3000, 16).half().numpy()
    opts = dict(d_sae=32, k=4, tokens=60 * 100, batch=100, lr=1e-3, aux_k=8, aux_coef=1 / 32, dead_tokens=500,
                seed=3, device=torch.device("cpu"))
    whole = train_sae(x, **opts).sae
    ckpt = tmp_path / "ckpt.pt"
    real = train_mod.fvu
    calls = []

    def dying_fvu(*a):
        calls.append(1)
        if len(calls) > 45:  # the loop's running FVU, once a step: die during step 45, after the step-40 checkpoint
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(train_mod, "fvu", dying_fvu)
    with pytest.raises(KeyboardInterrupt):
        train_sae(x, **opts, checkpoint=ckpt, checkpoint_every=20)
    monkeypatch.undo()
    assert torch.load(ckpt, weights_only=False)["step"] == 40
    resumed = train_sae(x, **opts, checkpoint=ckpt, checkpoint_every=20).sae
    for name, p in whole.named_parameters():
        torch.testing.assert_close(p, dict(resumed.named_parameters())[name], rtol=0, atol=0)
    # A checkpoint from a version whose parameters were laid out differently is not resumed from.
    state = torch.load(ckpt, weights_only=False)
    saved, shapes = state["learners"][0]["sae"], state["specs"][0][1]
    saved["W_enc"] = saved.pop("enc_weight").t()
    shapes["W_enc"] = shapes.pop("enc_weight")[::-1]
    torch.save(state, ckpt)
    fresh = train_sae(x, **opts, checkpoint=ckpt, checkpoint_every=20).sae
    torch.testing.assert_close(fresh.enc_weight, whole.enc_weight, rtol=0, atol=0)


def test_training_streams_from_shards_exactly_as_from_memory(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.standard_normal((3000, 16)).astype(np.float16)
    for i, (a, b) in enumerate([(0, 1000), (1000, 1700), (1700, 3000)]):
        np.save(tmp_path / f"{i}.npy", data[a:b])
    acts = ShardedActivations([np.load(tmp_path / f"{i}.npy", mmap_mode="r") for i in range(3)])
    assert acts.shape == data.shape and len(acts) == 3000
    picks = np.array([5, 1500, 2999, 0, 1000, 999])
    assert np.array_equal(acts[picks], data[picks])
    mask = rng.random(3000) < 0.3
    assert np.array_equal(acts[mask], data[mask])
    assert np.array_equal(acts[990:1710], data[990:1710])
    with pytest.raises(IndexError):
        acts[np.array([3000])]

    options = dict(d_sae=32, k=4, tokens=4000, batch=256, lr=1e-3, aux_k=8, aux_coef=1 / 32, dead_tokens=1000, seed=0,
                   device=torch.device("cpu"))
    streamed = train_sae(acts, rows=np.flatnonzero(mask), **options).sae.state_dict()
    in_memory = train_sae(data[mask], **options).sae.state_dict()
    for name in in_memory:
        torch.testing.assert_close(streamed[name], in_memory[name], rtol=0, atol=0)


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_every_public_method_works_for_every_architecture(architecture):
    """encode -> decode is the reconstruction, dense agrees with the code, forward with both, and a
    row may hold more actives than k (a threshold architecture's L0 is not capped)."""
    sae = SAE.initialized(16, 64, 4, architecture=architecture, seed=2)
    with torch.no_grad():
        sae.b_enc.normal_(generator=torch.Generator().manual_seed(3))
        if hasattr(sae, "threshold"):
            sae.threshold.fill_(0.2)
    x = torch.randn(40, 16) * 3
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    if architecture == "topk":
        vals, idx = pre.topk(4, dim=-1)
        want = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    elif architecture == "relu":
        want = pre.relu()
    else:
        want = pre * (pre > 0.2)
    code = sae.encode(x)
    dense = sae.dense(code)
    torch.testing.assert_close(dense, want)
    torch.testing.assert_close(sae.activations(x), want)
    assert code.n_rows == 40 and bool((code.values > 0).all())
    widths = code.offsets.diff()
    assert int(widths.sum()) == int((want > 0).sum())
    if architecture != "topk":
        assert int(widths.max()) > 4  # wider than k: nothing cut
    x_hat = want @ sae.W_dec + sae.b_dec
    torch.testing.assert_close(sae.decode(code), x_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.reconstruct(x), x_hat, rtol=1e-5, atol=1e-5)
    out = sae(x)
    torch.testing.assert_close(out.x_hat, x_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.dense(out.code), want)
    # padded: each row strongest first, the same entries
    values, indices = code.padded()
    assert values.shape == (40, int(widths.max()))
    assert bool((values[:, :-1] >= values[:, 1:]).all())
    torch.testing.assert_close(torch.zeros_like(pre).scatter_add(-1, indices, values), want)


def test_dictionaries_trained_together_are_the_ones_trained_alone():
    x = torch.randn(3000, 16).half().numpy()
    opts = dict(tokens=30 * 100, batch=100, seed=4, device=torch.device("cpu"))
    specs = [DictionarySpec(24 + 8 * i, 4, 1e-3, name, aux_k=8, dead_tokens=500) for i, name in enumerate(ARCHITECTURES)]
    together = train_saes(x, specs, **opts)
    for spec, result in zip(specs, together):
        alone = train_saes(x, [spec], **opts)[0]
        assert result.sae.d_sae == spec.d_sae and result.final_fvu == alone.final_fvu
        for name, p in alone.sae.state_dict().items():
            torch.testing.assert_close(result.sae.state_dict()[name], p, rtol=0, atol=0)


def test_a_checkpoint_of_other_dictionaries_is_not_resumed(tmp_path):
    x = torch.randn(2000, 16).half().numpy()
    opts = dict(tokens=20 * 100, batch=100, seed=4, device=torch.device("cpu"), checkpoint=tmp_path / "ckpt.pt",
                checkpoint_every=5)
    pair = [DictionarySpec(32, 4, 1e-3, "topk"), DictionarySpec(48, 4, 1e-3, "relu")]
    train_saes(x, pair, **opts)
    wider = [DictionarySpec(32, 4, 1e-3, "topk"), DictionarySpec(64, 4, 1e-3, "relu")]
    fresh = train_saes(x, wider, **{**opts, "checkpoint": None})
    again = train_saes(x, wider, **opts)  # the pair's checkpoint: other shapes, so a fresh start
    torch.testing.assert_close(again[1].sae.W_dec, fresh[1].sae.W_dec, rtol=0, atol=0)
    with pytest.raises(ValueError, match="at least one"):
        train_saes(x, [], **opts)
    with pytest.raises(ValueError, match="architecture must be one of"):
        train_saes(x, [DictionarySpec(32, 4, 1e-3, "gated")], **opts)


def test_matryoshka_prefixes_are_dictionaries_of_their_own(tmp_path):
    gen = torch.Generator().manual_seed(0)
    true = torch.nn.functional.normalize(torch.randn(64, 32, generator=gen), dim=1)
    # Frequent features first: the few latents of the first prefix should hold the common ones.
    idx = torch.multinomial(torch.linspace(2, 0.1, 64), 20_000 * 3, replacement=True, generator=gen).view(-1, 3)
    x = torch.nn.functional.embedding_bag(idx, true, per_sample_weights=torch.rand(20_000, 3, generator=gen) + 0.5,
                                          mode="sum") * 5
    opts = dict(d_sae=128, k=3, tokens=200_000, batch=256, lr=3e-3, aux_k=32, aux_coef=1 / 32, dead_tokens=5_000, seed=0,
                device=torch.device("cpu"))
    nested = train_sae(x.half().numpy(), architecture="matryoshka", meta={"matryoshka_widths": [8, 32, 128]}, **opts).sae
    flat = train_sae(x.half().numpy(), architecture="batchtopk", **opts).sae
    assert nested.prefixes == (8, 32, 128) and flat.prefixes == (128,)
    sample = x[:4000].numpy()
    whole = reconstruction_metrics(nested, sample)["variance_explained"]
    for width in (8, 32):
        part = nested.prefix(width)
        assert part.d_sae == width and part.prefixes == tuple(w for w in (8, 32) if w <= width)
        inner = reconstruction_metrics(part, sample)["variance_explained"]
        plain = reconstruction_metrics(flat.prefix(width), sample)["variance_explained"]
        # Measured 0.25 against 0.22 at 8 latents, 0.74 against 0.72 at 32 (small on planted features).
        assert inner > plain + 0.01 and inner < whole, (width, inner, plain, whole)
    nested.save(tmp_path)
    assert SAE.load(tmp_path).prefixes == (8, 32, 128)
    assert nested.prefix(20).prefixes == (8, 20) and nested.prefix(8).prefixes == (8,)
    for width in (0, 129):
        with pytest.raises(ValueError, match="prefix"):
            nested.prefix(width)
    with pytest.raises(ValueError, match="must rise strictly"):
        SAE(16, 64, 4, architecture="matryoshka", meta={"matryoshka_widths": [32, 8, 64]})
    assert SAE(16, 64, 4, architecture="matryoshka").prefixes == (4, 16, 64)  # the default, kept in the metadata


def test_the_matryoshka_loss_adds_each_inner_prefix_reconstructing_alone():
    sae = SAE.initialized(16, 64, 4, architecture="matryoshka", seed=5, meta={"matryoshka_widths": [8, 24, 64]})
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(6))
    out = sae.arch.objective(sae, x, 0.0, 1.0)
    code = batchtopk_forward(sae, x)[0].code
    dense = sae.dense(code)
    want = fvu(x, out.x_hat) + sum(fvu(x, dense[:, :w] @ sae.W_dec[:w] + sae.b_dec) for w in (8, 24))
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("architecture", ["topk", "jumprelu"])
def test_a_stack_encodes_as_each_of_its_dictionaries_alone(tmp_path, architecture):
    """``SAE.stack``: dictionaries trained apart, side by side; each keeps its own k, b_dec and
    threshold, ``part(i)`` gives it back exactly, and the whole never reconstructs as one."""
    gen = torch.Generator().manual_seed(0)
    alone = [SAE.initialized(16, width, 3, architecture=architecture, seed=seed) for seed, width in ((1, 8), (2, 24))]
    with torch.no_grad():
        for sae in alone:
            for p in (sae.b_dec, sae.b_enc, *([sae.threshold] if architecture == "jumprelu" else [])):
                p.copy_(torch.rand(p.shape, generator=gen) * 0.1)
    stack = SAE.stack(alone)
    assert stack.parts == stack.blocks == ((0, 8), (8, 24)) and stack.d_sae == 32
    x = torch.randn(50, 16, generator=gen)
    with torch.no_grad():
        dense = stack.activations(x)
        for i, (first, width) in enumerate(stack.parts):
            np.testing.assert_allclose(dense[:, first : first + width], alone[i].activations(x), atol=1e-5)
            assert all(torch.equal(t, alone[i].state_dict()[n]) for n, t in stack.part(i).state_dict().items())
    if architecture == "topk":  # each dictionary its own k per token
        assert int((dense[:, :8] > 0).sum(1).max()) <= 3 and int((dense[:, 8:] > 0).sum(1).max()) <= 3
    stack.save(tmp_path)
    assert torch.equal(SAE.load(tmp_path).activations(x), stack.activations(x))
    with pytest.raises(ValueError, match="one dictionary at a time"):
        stack.reconstruct(x)
    with pytest.raises(ValueError, match="two dictionaries"):
        SAE.stack(alone[:1])
    with pytest.raises(ValueError, match="share d_in"):
        SAE.stack([alone[0], SAE.initialized(12, 8, 3, architecture=architecture)])
