import pytest
from featureatlas.ingest.config import AtlasConfig, ConfigError, load_config


def test_profiles_meet_their_promises():
    quick = load_config("quick")
    assert quick.tokens >= 100_000 and quick.d_sae >= 4096 and quick.k == 32
    standard = load_config("standard")
    assert standard.tokens >= 2_000_000 and standard.d_sae >= 16_384


def test_toml_then_flags_override_the_profile(tmp_path):
    toml = tmp_path / "atlas.toml"
    toml.write_text('d_sae = 1024\nk = 16\ncorpus = ["python"]\ncorpus_weights = [1.0]\n')
    cfg = load_config("standard", toml, {"k": 8, "layer": None})
    assert (cfg.d_sae, cfg.k, cfg.corpus) == (1024, 8, ["python"])
    assert cfg.tokens == load_config("standard").tokens  # untouched profile value survives


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
    ],
)
def test_bad_values_name_their_flag(changes, flag):
    with pytest.raises(ConfigError) as err:
        load_config("quick", None, changes)
    assert err.value.flag == flag


def test_unknown_toml_key_is_refused(tmp_path):
    toml = tmp_path / "bad.toml"
    toml.write_text("dsae = 3\n")
    with pytest.raises(ConfigError, match="dsae"):
        load_config("quick", toml)


def test_default_lr_scales_with_dictionary_size():
    assert AtlasConfig(d_sae=16384).lr_value == pytest.approx(2e-4)
    assert AtlasConfig(d_sae=4096).lr_value == pytest.approx(4e-4)
