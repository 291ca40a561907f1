"""The real model on a small slice of the real corpus, end to end (about a minute)."""

import pytest
from featureatlas.ingest.config import load_config
from featureatlas.ingest.pipeline import run_ingest
from featureatlas.store.atlas import Atlas

from .conftest import SQL

pytestmark = pytest.mark.slow


def test_real_model_and_corpus_end_to_end(tmp_path):
    cfg = load_config(
        "quick",
        overrides={
            "atlas": str(tmp_path / "atlas"), "tokens": 12_000, "eval_fraction": 0.15, "d_sae": 512,
            "train_tokens": 150_000, "train_batch": 512, "dead_tokens": 50_000, "ce_eval_contexts": 4,
            "top_examples": 5, "context_embedding_examples": 2, "intervention_features": 4,
        },
    )
    manifest = run_ingest(cfg)
    assert manifest["model"]["n_layers"] == 30 and manifest["hook"]["layer"] == 15
    assert manifest["model"]["d_model"] == 576
    assert set(manifest["corpus"]["contexts_by_source"]) == {"wiki-en", "wiki-fr", "wiki-es", "shakespeare", "python"}
    m = manifest["metrics"]
    assert m["l0"] <= 32
    assert m["variance_explained"] > 0.3  # a tiny budget; the quick profile reaches far more
    assert m["ce_clean"] < m["ce_sae"] < m["ce_zero"]
    # The BOS stream is recorded, and it is far larger than a normal token's: why it stays out.
    assert manifest["tokens"]["bos_mean_norm"] > 10 * manifest["tokens"]["token_mean_norm"]
    atlas = Atlas(cfg.run.atlas)
    con = SQL(atlas)
    assert con.execute("select count(distinct source) from documents").fetchone()[0] == 5
    python_features = con.execute(
        """select count(distinct a.feature_id) from activations a join documents d using (doc_id)
           where d.source = 'python'"""
    ).fetchone()[0]
    assert python_features > 0
    # Labels were written from some documents and scored on others.
    labels = manifest["labels"]
    assert labels["explainer"] == "contrastive" and labels["scored"] > 0 and 0 < labels["label_score_mean"] < 1
    assert con.execute("select count(*) from label_candidates where chosen").fetchone()[0] == labels["labelled"] - con.execute(
        "select count(*) from features where label_source = 'none'").fetchone()[0]
    # Steering the real model with a sample of features scores their labels by what it writes.
    steered = manifest["stages"]["intervention"]["summary"]
    assert steered["scored"] == 4 and 0 <= steered["mean"] <= 1
