import pytest
import torch
from featureatlas.ingest.model import load_model
from featureatlas.store.errors import BadConfig


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tmp_path_factory):
    return load_model(str(tiny_model_dir), cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize("layer", [0, 1, 2, 3])
def test_stopped_forward_equals_full_hidden_state(tiny, layer):
    ids = torch.randint(0, tiny.tokenizer.vocab_size, (3, 20))
    ids[:, 0] = tiny.bos_id
    with torch.no_grad():
        full = tiny.model(input_ids=ids, output_hidden_states=True).hidden_states
    got = tiny.residual(ids, layer)
    assert got.shape == (3, 20, tiny.d_model)
    if layer < tiny.n_layers - 1:  # the last entry has the final norm applied
        torch.testing.assert_close(got, full[layer + 1], rtol=0, atol=0)


def test_later_blocks_never_run(tiny):
    calls = []
    handles = [b.register_forward_hook(lambda *_: calls.append(1)) for b in tiny.blocks[2:]]
    head = tiny.model.get_output_embeddings().register_forward_hook(lambda *_: calls.append("head"))
    try:
        tiny.residual(torch.tensor([[tiny.bos_id, 5, 6, 7]]), 1)
    finally:
        for h in [*handles, head]:
            h.remove()
    assert calls == []


def test_identity_splice_keeps_the_clean_loss_and_zero_ablation_hurts(tiny):
    ids = torch.randint(0, tiny.tokenizer.vocab_size, (2, 16))
    clean = tiny.loss_with_replacement(ids, 1)
    same = tiny.loss_with_replacement(ids, 1, lambda h: h)
    zero = tiny.loss_with_replacement(ids, 1, torch.zeros_like)
    torch.testing.assert_close(same, clean)
    assert not torch.isclose(zero, clean)


def test_layer_range_is_checked_before_loading(tiny_model_dir, tmp_path):
    with pytest.raises(BadConfig, match="--layer"):
        load_model(str(tiny_model_dir), cache_dir=tmp_path, layer=4)


def test_unknown_model_path_is_a_config_error(tmp_path):
    with pytest.raises(BadConfig, match="--model"):
        load_model(str(tmp_path / "nope"), cache_dir=tmp_path)


def test_a_model_without_its_tokenizer_is_a_config_error(tiny_model_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((tiny_model_dir / name).read_bytes())
    with pytest.raises(BadConfig, match="--model.*tokenizer"):
        load_model(str(bare), cache_dir=tmp_path)


def test_a_model_outside_the_llama_family_is_a_config_error(tiny_model_dir, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64)).save_pretrained(tmp_path / "gpt2")
    for name in ("tokenizer.json", "tokenizer_config.json"):  # a tokenizer it can read, so the blocks are what fails
        (tmp_path / "gpt2" / name).write_bytes((tiny_model_dir / name).read_bytes())
    with pytest.raises(BadConfig, match="Llama family"):
        load_model(str(tmp_path / "gpt2"), cache_dir=tmp_path)
