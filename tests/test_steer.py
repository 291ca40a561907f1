"""Steering: the interventions' algebra, generation with and without them, and the HTTP route's limits."""

import asyncio
import threading

import pytest
import torch
from featureatlas.api.app import create_app
from featureatlas.api.work_pool import PoolFull, WorkPool
from featureatlas.ingest.model import load_model
from featureatlas.ingest.sae import ARCHITECTURES, SAE
from featureatlas.ingest.steer import Edit, Intervention, check_edits, logits_of, steer, token_texts
from featureatlas.store.atlas import Atlas
from featureatlas.store.errors import BadParameter
from litestar.testing import TestClient

LAYER = 2


@pytest.fixture(scope="module")
def model(tiny_model_dir, tmp_path_factory):
    return load_model(str(tiny_model_dir), cache_dir=tmp_path_factory.mktemp("cache"))


def _sae(architecture: str, d_in: int = 64, *, layer_norm: bool = False) -> SAE:
    sae = SAE.initialized(d_in, 96, 8, architecture=architecture, seed=1)
    sae.layer_norm_input = layer_norm
    with torch.no_grad():
        sae.b_enc.fill_(-0.05)
    return sae


def _prompt(model, text: str = "The bridge deck hangs from steel cables") -> list[int]:
    return [model.bos_id, *model.tokenizer(text, add_special_tokens=False)["input_ids"]]


def _silent(sae: SAE, x: torch.Tensor) -> int:
    """A feature active nowhere in ``x``."""
    active = sae.activations(x).reshape(-1, sae.d_sae).amax(0)
    return int(torch.nonzero(active == 0)[0])


def test_clamp_at_zero_on_a_silent_feature_leaves_the_logits_exactly(model):
    sae = _sae("topk")
    ids = _prompt(model)
    x = model.residual(torch.tensor([ids]), LAYER)[0]
    f = _silent(sae, x[1:])
    plain = logits_of(model, sae, LAYER, ids, [], {})
    assert torch.equal(logits_of(model, sae, LAYER, ids, [Edit(f, 0.0, "clamp")], {f: 3.0}), plain)
    assert torch.equal(logits_of(model, sae, LAYER, ids, [Edit(f, 0.0, "add")], {f: 3.0}), plain)
    assert not torch.equal(logits_of(model, sae, LAYER, ids, [Edit(f, 5.0, "clamp")], {f: 3.0}), plain)


@pytest.mark.parametrize("layer_norm", [False, True])
def test_clamp_changes_only_the_chosen_features_code(layer_norm):
    """What the clamp computes equals Anthropic's recipe: re-decode an edited code, add the error back."""
    sae = _sae("topk", layer_norm=layer_norm)
    x = torch.randn(10, 64) * 3
    edits = [Edit(5, 2.0), Edit(17, -1.0), Edit(40, 0.0)]
    maxima = {5: 1.5, 17: 0.7, 40: 2.0}
    edited, before = Intervention(sae, edits, maxima)(x)
    code = sae.activations(x)
    assert torch.allclose(before, code[:, [5, 17, 40]])
    new = code.clone()
    new[:, [5, 17, 40]] = torch.tensor([3.0, -0.7, 0.0])
    error = x - sae.reconstruct(x)

    def decode(c: torch.Tensor) -> torch.Tensor:
        out = c @ sae.W_dec + sae.b_dec
        return sae._denormalize(out, x)

    assert torch.allclose(edited, decode(new) + error, atol=1e-4)


def test_edits_per_row_are_each_rows_own_edit():
    sae = _sae("topk", layer_norm=True)
    x = torch.randn(2 * 5, 64) * 3  # two rows of five positions
    maxima = {5: 1.5, 17: 0.7}
    edited, before = Intervention(sae, [], maxima, per_row=[Edit(5, 2.0), Edit(17, -1.0, "add")])(x, 5)
    for row, edit in enumerate([Edit(5, 2.0), Edit(17, -1.0, "add")]):
        alone, read = Intervention(sae, [edit], maxima)(x[row * 5:(row + 1) * 5])
        assert torch.allclose(edited[row * 5:(row + 1) * 5], alone, atol=1e-5)
        assert torch.equal(before[row * 5:(row + 1) * 5], read)


def test_many_features_steered_in_one_batch_write_what_each_writes_alone(model):
    sae = _sae("topk")
    prompts = [_prompt(model), _prompt(model, "Steel cables")]
    edits = [Edit(7, 20.0), Edit(11, 20.0)]
    together = steer(model, sae, LAYER, prompts * 2, [], {7: 2.0, 11: 2.0}, max_new_tokens=6, default=False,
                     row_edits=[e for e in edits for _ in prompts])
    for i, e in enumerate(edits):
        alone = steer(model, sae, LAYER, prompts, [e], {7: 2.0, 11: 2.0}, max_new_tokens=6, default=False)
        assert [c.token_ids for c in together.steered[i * 2:(i + 1) * 2]] == [c.token_ids for c in alone.steered]
    with pytest.raises(ValueError, match="one edit per prompt"):
        steer(model, sae, LAYER, prompts, [], {7: 2.0}, row_edits=[edits[0]])


def test_add_pushes_along_the_decoder_by_the_features_scale():
    sae = _sae("relu")
    x = torch.randn(4, 64)
    edited, _ = Intervention(sae, [Edit(3, 2.0, "add")], {3: 0.5})(x)
    assert torch.allclose(edited - x, sae.W_dec[3].expand(4, -1) * 1.0, atol=1e-5)


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_every_architecture_steers(model, architecture):
    sae = _sae(architecture)
    ids = _prompt(model)
    out = steer(model, sae, LAYER, [ids], [Edit(7, 20.0, "clamp")], {7: 2.0}, max_new_tokens=6)
    plain = steer(model, sae, LAYER, [ids], [], {}, max_new_tokens=6, steered=False)
    assert out.default[0].token_ids == plain.default[0].token_ids  # the default row is plain generation
    assert out.steered[0].logprobs != out.default[0].logprobs
    assert len(out.steered[0].activations) == len(out.steered[0].tokens)


def test_generated_only_leaves_the_first_token_alone(model):
    sae = _sae("topk")
    ids = _prompt(model)
    edits, maxima = [Edit(7, 50.0, "add")], {7: 2.0}
    full = steer(model, sae, LAYER, [ids], edits, maxima, max_new_tokens=4)
    late = steer(model, sae, LAYER, [ids], edits, maxima, max_new_tokens=4, generated_only=True)
    assert late.steered[0].logprobs[0] == pytest.approx(late.default[0].logprobs[0], abs=1e-5)
    assert full.steered[0].logprobs[0] != pytest.approx(full.default[0].logprobs[0], abs=1e-5)


def test_sampling_is_seeded_and_shared_between_default_and_steered(model):
    sae = _sae("topk")
    prompts = [_prompt(model), _prompt(model, "Enter HAMLET")]  # two lengths: left padding in play
    a = steer(model, sae, LAYER, prompts, [Edit(7, 0.0)], {7: 2.0}, max_new_tokens=8, temperature=1.0, seed=3)
    b = steer(model, sae, LAYER, prompts, [Edit(7, 0.0)], {7: 2.0}, max_new_tokens=8, temperature=1.0, seed=3)
    assert [r.token_ids for r in a.steered] == [r.token_ids for r in b.steered]
    # feature 7 silent or nearly so: the same noise makes the same choices in both rows
    for d, s in zip(a.default, a.steered):
        assert d.token_ids[:2] == s.token_ids[:2]
    alone = steer(model, sae, LAYER, prompts[1:], [], {}, max_new_tokens=8, steered=False)
    batched = steer(model, sae, LAYER, prompts, [], {}, max_new_tokens=8, steered=False)
    assert alone.default[0].token_ids == batched.default[1].token_ids  # padding changes nothing


def test_token_texts_join_up_to_the_text_without_broken_characters(model):
    ids = model.tokenizer("Le pont 東京 à Paris", add_special_tokens=False)["input_ids"]
    pieces = token_texts(model.tokenizer, ids)
    assert len(pieces) == len(ids) and "".join(pieces) == model.tokenizer.decode(ids)
    assert "\ufffd" not in "".join(pieces) and "\ufffd" in "".join(model.tokenizer.decode([i]) for i in ids)


def test_a_failed_generation_leaves_no_hook_behind(model):
    sae = _sae("topk")
    with pytest.raises((RuntimeError, ValueError)):  # a seed torch refuses
        steer(model, sae, LAYER, [_prompt(model)], [Edit(7, 1.0)], {7: 2.0}, max_new_tokens=2, seed=-(2**70))
    with pytest.raises(KeyError):  # a feature without a maximum: fails inside the intervention
        steer(model, sae, LAYER, [_prompt(model)], [Edit(7, 1.0)], {}, max_new_tokens=2)
    assert not model.blocks[LAYER]._forward_hooks


# -- the HTTP route ---------------------------------------------------------------------------------


def test_steer_route_answers_default_and_steered(client, live):
    r = client.post("/api/steer", json={"prompt": "The bridge", "features": [{"id": live, "value": 3}],
                                        "max_new_tokens": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    for side in ("default", "steered"):
        run = body[side]
        assert len(run["tokens"]) == len(run["logprobs"]) == len(run["activations"]) <= 5
        assert all(len(a) == 1 for a in run["activations"])
    assert body["features"][0]["id"] == live and body["features"][0]["max_activation"] > 0


@pytest.mark.parametrize("change, field", [
    ({"features": [{"id": 10**6, "value": 1}]}, "features[0].id"),
    ({"features": [{"id": "LIVE", "value": 101}]}, "features[0].value"),
    ({"features": [{"id": "LIVE", "value": 1, "mode": "swap"}]}, "features[0].mode"),
    ({"features": [{"id": "LIVE", "value": 1}, {"id": "LIVE", "value": 2}]}, "features[1].id"),
    ({"features": [{"id": "LIVE", "value": 1}] * 17}, "features"),
    ({"features": []}, "features"),
    ({"max_new_tokens": 257}, "max_new_tokens"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"temperature": -1}, "temperature"),
    ({"seed": 2**63}, "seed"),
    ({"seed": -1}, "seed"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "x" * 5000}, "prompt"),
    ({"prompt": "bridge " * 560}, "prompt"),
])
def test_bad_steer_input_is_a_400_naming_the_field(client, live, change, field):
    body = {"prompt": "The bridge", "features": [{"id": live, "value": 1}], "max_new_tokens": 3}
    body.update(change)
    body["features"] = [{**f, "id": live if f["id"] == "LIVE" else f["id"]} for f in body["features"]]
    r = client.post("/api/steer", json=body)
    assert r.status_code == 400, r.text
    assert field in r.json()["error"]


def test_a_feature_that_never_fired_cannot_be_steered():
    """Its corpus maximum is 0, so a value in units of it means nothing: a 400, not a no-op."""
    with pytest.raises(BadParameter, match="never fired") as e:
        check_edits([Edit(3, 1.0)], {3: 0.0}, d_sae=10)
    assert e.value.where == "features[0].id"


def test_search_goes_on_without_inference_while_the_model_is_busy(tiny_atlas):
    from featureatlas.api import service as S

    svc = S.AtlasService(Atlas(tiny_atlas))
    text = "The bridge deck hangs from steel cables."  # text, not a topic: the model reads it
    with svc.probe.busy:  # a steering request holds the model
        hits = svc.search(text, k=20)["hits"]
    assert hits and not any("inference" in h["matched_by"] for h in hits)
    # That answer lacked a signal, so it was not remembered: with the model free, inference is back.
    assert any("inference" in h["matched_by"] for h in svc.search(text, k=20)["hits"])


def test_a_full_model_pool_answers_503_with_retry_after(tiny_atlas, live):
    pool = WorkPool("the model", workers=1, waiting=0)
    release = threading.Event()
    loop = asyncio.new_event_loop()
    occupant = threading.Thread(target=loop.run_until_complete, args=(pool.run(release.wait),), daemon=True)
    occupant.start()
    try:
        with TestClient(create_app(Atlas(tiny_atlas), pool=pool)) as c:
            for _ in range(100):  # until the occupant holds the slot
                r = c.post("/api/steer", json={"prompt": "x", "features": [{"id": live, "value": 1}]})
                if r.status_code == 503:
                    break
            assert r.status_code == 503 and int(r.headers["Retry-After"]) > 0
            assert c.get(f"/api/features/{live}").status_code == 200  # reads never wait on the model
            with pytest.raises(PoolFull):
                asyncio.run(pool.run(print))
    finally:
        release.set()
        occupant.join(5)


def test_a_search_never_waits_behind_model_work(tiny_atlas, live, monkeypatch):
    from featureatlas.api.service import AtlasService

    release, started = threading.Event(), threading.Event()

    def held(*_args, **_kwargs):
        started.set()
        release.wait(60)
        return {"tokens": []}

    monkeypatch.setattr(AtlasService, "activations", held)
    answers: list[int] = []
    with TestClient(create_app(Atlas(tiny_atlas))) as c:
        model = threading.Thread(target=lambda: c.post("/api/activations", json={"text": "x"}), daemon=True)
        model.start()
        try:
            assert started.wait(30)  # the model's worker is taken
            search = threading.Thread(target=lambda: answers.append(
                c.get("/api/search", params={"q": "bridges", "mode": "label"}).status_code), daemon=True)
            search.start()
            search.join(30)
            assert answers == [200]  # answered while the model worked
        finally:
            release.set()
            model.join(30)
