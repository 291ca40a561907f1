"""Shared fixtures: a tiny random Llama (built here, never downloaded), a small user corpus, and a
tiny atlas built from both through the real pipeline."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("LANCE_LOG", "error")
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")  # as featureatlas.ingest.runtime.configure sets it

TOPICS = {
    "bridges": "The Golden Gate Bridge is a suspension bridge in San Francisco. Bridges span rivers and bays; "
    "the bridge deck hangs from steel cables between two towers.",
    "code": "def add(a, b):\n    return a + b\n\nfor item in items:\n    print(item)\n\nclass Point:\n    x: int = 0\n",
    "plays": "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings "
    "and arrows of outrageous fortune. Enter HAMLET. Exit OPHELIA.",
    "french": "Le pont est un ouvrage d'art qui permet de franchir un obstacle. La ville de Paris compte "
    "trente-sept ponts sur la Seine.",
}


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """A folder of .txt and .jsonl documents with four distinct topics."""
    root = tmp_path_factory.mktemp("corpus")
    with (root / "docs.jsonl").open("w") as f:
        for i in range(60):
            topic = list(TOPICS)[i % len(TOPICS)]
            text = " ".join([TOPICS[topic]] * (1 + i % 3))
            f.write(json.dumps({"id": f"d{i}", "title": f"{topic} {i}", "text": text}) + "\n")
    (root / "note.txt").write_text(TOPICS["bridges"] * 5)
    return root


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 4-layer random Llama with a byte-level BPE tokenizer trained on the test topics."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(list(TOPICS.values()) * 10, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=fast.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def tiny_config(atlas: Path, model: Path, corpus: Path, **changes):
    from featureatlas.ingest.config import AtlasConfig

    values = dict(
        atlas=str(atlas), model=str(model), corpus=[str(corpus)], corpus_weights=[1.0], tokens=6000,
        context_len=32, eval_fraction=0.2, d_sae=64, k=4, train_tokens=20_000, train_batch=256,
        dead_tokens=5_000, ce_eval_contexts=4, shard_tokens=2048, top_examples=5, quantile_examples=1,
        histogram_bins=8, context_embedding_examples=2, model_cache=str(atlas.parent / "model-cache"),
        intervention_features=8, intervention_tokens=8, label_shard_features=32, label_topic_nouns=300,
    )
    values.update(changes)
    cfg = AtlasConfig.build(values)
    cfg.validate()
    return cfg


@pytest.fixture(scope="session")
def tiny_atlas(tmp_path_factory, tiny_model_dir, corpus_dir) -> Path:
    from featureatlas.ingest.pipeline import run_ingest

    root = tmp_path_factory.mktemp("atlas") / "atlas"
    run_ingest(tiny_config(root, tiny_model_dir, corpus_dir))
    return root


@pytest.fixture(scope="module")
def client(tiny_atlas):
    """The HTTP app over the tiny atlas, one per test module."""
    from featureatlas.api.app import create_app
    from featureatlas.store.atlas import Atlas
    from litestar.testing import TestClient

    with TestClient(create_app(Atlas(tiny_atlas))) as c:
        yield c


@pytest.fixture(scope="module")
def live(client) -> int:
    """A feature of the tiny atlas that fired (the densest)."""
    return client.get("/api/features", params={"limit": 1}).json()["features"][0]["feature_id"]


class _Rows:
    def __init__(self, rows: list[tuple]):
        self.rows = rows

    def fetchone(self) -> tuple | None:
        return self.rows[0] if self.rows else None

    def fetchall(self) -> list[tuple]:
        return self.rows


class SQL:
    """A test's DuckDB reads of an atlas, through ``Atlas.query`` like every other read."""

    def __init__(self, atlas):
        self.atlas = atlas

    def execute(self, sql: str, params=None) -> _Rows:
        return _Rows(self.atlas.query(sql, params).rows)
