import pytest
from featureatlas.ingest.config import TrainConfig, load_config
from featureatlas.store.errors import BadConfig


def test_profiles_meet_their_promises():
    quick = load_config("quick")
    assert quick.corpus.tokens >= 100_000 and quick.train.d_sae >= 4096 and quick.train.k == 32
    standard = load_config("standard")
    assert standard.corpus.tokens >= 2_000_000 and standard.train.d_sae >= 16_384


def test_toml_then_flags_override_the_profile(tmp_path):
    toml = tmp_path / "atlas.toml"
    toml.write_text('d_sae = 1024\nk = 16\ncorpus = ["python"]\ncorpus_weights = [1.0]\n')
    cfg = load_config("standard", toml, {"k": 8, "layer": None})
    assert (cfg.train.d_sae, cfg.train.k, cfg.corpus.corpus) == (1024, 8, ["python"])
    assert cfg.corpus.tokens == load_config("standard").corpus.tokens  # untouched profile value survives


@pytest.mark.parametrize("where", ["toml", "flags"])
def test_sources_named_without_weights_get_equal_shares(tmp_path, where):
    toml = tmp_path / "atlas.toml"
    toml.write_text('corpus = ["python", "shakespeare"]\n' if where == "toml" else "")
    cfg = load_config("quick", toml, {"corpus": ["python", "shakespeare"]} if where == "flags" else {})
    assert (cfg.corpus.corpus, cfg.corpus.corpus_weights) == (["python", "shakespeare"], [1.0, 1.0])


@pytest.mark.parametrize(
    "changes, flag",
    [
        ({"d_sae": 0}, "--d-sae"),
        ({"k": 5000}, "--k"),
        ({"k": 0}, "--k"),
        ({"layer": -1}, "--layer"),
        ({"device": "tpu"}, "--device"),
        ({"corpus_weights": [1.0]}, "--corpus-weights"),
        ({"eval_fraction": 1.5}, "--eval-fraction"),
        ({"widths": [4096, 1024]}, "--widths"),  # not rising
        ({"widths": [4096]}, "--widths"),  # one width is --d-sae
        ({"widths": [16, 4096]}, "--widths"),  # narrower than k
        ({"widths": [1024, 4096], "architecture": "matryoshka"}, "--widths"),
        ({"widths": [1024, 4096], "dictionary": "some/sae"}, "--widths"),
        ({"widths": [1024, 4096], "d_sae": 2048}, "--d-sae"),
    ],
)
def test_bad_values_name_their_flag(changes, flag):
    with pytest.raises(BadConfig) as err:
        load_config("quick", None, changes)
    assert err.value.where == flag


def test_unknown_toml_key_is_refused(tmp_path):
    toml = tmp_path / "bad.toml"
    toml.write_text("dsae = 3\n")
    with pytest.raises(BadConfig, match="dsae"):
        load_config("quick", toml)


def test_default_lr_scales_with_dictionary_size():
    assert TrainConfig(d_sae=16384).lr_value == pytest.approx(2e-4)
    assert TrainConfig(d_sae=4096).lr_value == pytest.approx(4e-4)
    assert TrainConfig(d_sae=16384).lr_for(1024) == pytest.approx(8e-4)  # each width of --widths its own


def test_widths_name_the_dictionaries_and_the_widest_is_d_sae():
    cfg = load_config("quick", None, {"widths": [1024, 4096, 16384]})
    assert cfg.train.d_sae == 16384 and cfg.train.dictionary_widths == [1024, 4096, 16384]
    assert load_config("quick").train.dictionary_widths == [4096]
    assert load_config("standard", None, {"widths": [4096, 8192]}).train.d_sae == 8192  # over the profile's 16,384


def test_toml_tables_and_flat_keys_are_the_same_settings(tmp_path):
    toml = tmp_path / "atlas.toml"
    toml.write_text('k = 16\n[train]\nd_sae = 1024\n[labels]\nlabel_pool_windows = 500\n')
    cfg = load_config("quick", toml)
    assert (cfg.train.d_sae, cfg.train.k, cfg.labels.label_pool_windows) == (1024, 16, 500)
    toml.write_text('[train]\ncontext_len = 64\n')  # a real setting, in the wrong table
    with pytest.raises(BadConfig, match="train.context_len"):
        load_config("quick", toml)


@pytest.mark.parametrize("line, where", [
    ('d_sae = "4096"', "train.d_sae"),
    ("[corpus]\ncorpus_weights = [1, \"x\"]", "corpus.corpus_weights[1]"),
    ("k = 2.5", "train.k"),
    ("eval_fraction = true", "corpus.eval_fraction"),
])
def test_a_wrong_toml_type_exits_2_naming_the_key(tmp_path, capsys, line, where):
    from featureatlas.api.cli import main

    toml = tmp_path / "bad.toml"
    toml.write_text(line + "\n")
    assert main(["ingest", "--config", str(toml), "--atlas", str(tmp_path / "atlas")]) == 2
    assert where in capsys.readouterr().err
    assert not (tmp_path / "atlas").exists()


def test_stage_keys_follow_their_own_settings_only(tmp_path):
    """A stage's key is derived from its config groups and upstream keys: a labels setting changes
    the labels key and nothing upstream; a training setting changes train and everything after it;
    a setting declared key=False (a batch size for throughput) changes nothing."""
    from featureatlas.ingest.pipeline import STAGES
    from featureatlas.ingest.stages import Stages

    class Ctx:  # the non-setting inputs each stage declares
        def __init__(self, cfg):
            self.cfg, self.corpus_hash, self.layer, self.loaded = cfg, "h", 2, None
            self.model = type("M", (), {"dtype": "torch.float32", "device": __import__("torch").device("cpu")})()
            self.train_dtype = "torch.float32"

    def keys(**changes):
        cfg = load_config("quick", None, changes)
        stages, ctx, out = Stages(tmp_path, cfg), Ctx(cfg), {}
        for stage in STAGES:
            out[stage.name] = stages.keys[stage.name] = stages.key(stage, ctx)
        return out

    base = keys()
    changed = lambda **c: {n for n, k in keys(**c).items() if k != base[n]}  # noqa: E731
    # The map is laid out by what features do, from the labels stage's context embeddings: it follows
    # the labels; so does the intervention score, which judges them.
    assert changed(label_pool_windows=500) == {"labels", "intervention", "map"}
    assert changed(llm_max_calls=5) == {"labels", "intervention", "map"}  # the budget changes which labels an LLM wrote
    assert changed(d_sae=1024) == {"train", "evaluate", "encode", "families", "labels", "intervention", "map"}
    assert changed(top_examples=3) == {"encode", "families", "labels", "intervention", "map"}
    assert changed(map_neighbors=30) == {"map"}
    assert changed(intervention_value=3.0) == {"intervention"}  # its own stage: the labels stay
    assert changed(embedder="/models/other") == {"windows", "labels", "intervention", "map"}
    assert changed(harvest_batch=4, llm_workers=9, threads=1) == set()
