import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from featureatlas.ingest import pipeline
from featureatlas.ingest.config import config_of
from featureatlas.ingest.harvest import load_activations
from featureatlas.ingest.labels import kinds, wording
from featureatlas.ingest.sae import SAE
from featureatlas.ingest.tokens import TokenizedCorpus
from featureatlas.store.atlas import Atlas, AtlasNotFound
from featureatlas.store.export import export
from featureatlas.store.neuronpedia import read_neuronpedia

from .conftest import SQL, tiny_config


def test_atlas_tables_are_consistent(tiny_atlas):
    atlas = Atlas(tiny_atlas)
    m = atlas.manifest
    assert m["hook"]["layer"] == 2  # the middle of 4 layers
    assert m["tokens"]["train"] + m["tokens"]["eval"] + m["tokens"]["bos"] == m["tokens"]["harvested"]
    for key in ("l0", "variance_explained", "dead_fraction", "loss_recovered", "ce_clean", "ce_sae", "ce_zero"):
        assert key in m["metrics"]
    assert 0 < m["metrics"]["l0"] <= 4
    feats = atlas.features.to_arrow()
    assert feats.num_rows == 64 and sorted(feats["feature_id"].to_pylist()) == list(range(64))
    dec = np.stack(feats["decoder"].to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(np.linalg.norm(dec, axis=1), 1.0, atol=1e-4)
    con = SQL(atlas)
    n_tokens, n_acts = con.execute("select (select count(*) from tokens), (select count(*) from activations)").fetchone()
    assert n_tokens == m["tokens"]["train"] + m["tokens"]["eval"]
    assert 0 < n_acts <= 4 * n_tokens
    # No token has more than k active features, and every activation points at a real token.
    assert con.execute("select max(c) from (select count(*) c from activations group by doc_id, position)").fetchone()[0] <= 4
    orphans = con.execute(
        "select count(*) from activations a anti join tokens t using (doc_id, position)"
    ).fetchone()[0]
    assert orphans == 0
    # Density in LanceDB agrees with the SQL over activations.
    sql_density = dict(con.execute(
        "select feature_id, count(*) / (select count(*) from tokens) from activations group by feature_id"
    ).fetchall())
    for f, d in zip(feats["feature_id"].to_pylist(), feats["density"].to_pylist()):
        assert d == pytest.approx(sql_density.get(f, 0.0))
    # Every window of the corpus is there once, its text the tokens it covers, and each feature's
    # window count (corpus search's background) agrees with the activations.
    windows = atlas.windows.to_arrow()
    assert windows.num_rows == atlas.n_windows == con.execute(
        "select count(distinct (doc_id, position // 16)) from tokens").fetchone()[0]
    vectors = windows["embedding"].combine_chunks().values.to_numpy().reshape(windows.num_rows, -1)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
    doc, w, text = windows["doc_id"][3].as_py(), windows["window_index"][3].as_py(), windows["text"][3].as_py()
    joined = con.execute("select string_agg(token, '' order by position) from tokens where doc_id = ? and position // 16 = ?",
                         [doc, w]).fetchone()[0]
    assert text == joined.strip()
    sql_windows = dict(con.execute(
        "select feature_id, count(distinct (doc_id, position // 16)) from activations group by feature_id").fetchall())
    assert dict(con.execute("select feature_id, n_windows from features where n_windows > 0").fetchall()) == sql_windows
    # Dead and rare features are counted over the whole corpus, as the features table has them.
    firing = m["firing"]
    assert firing["dead"] == 64 - len(sql_windows)
    assert firing["rare"] == sum(0 < n < firing["rare_below_windows"] for n in sql_windows.values())
    assert firing["dead"] + firing["rare"] + firing["live"] == 64


def test_examples_show_the_features_real_activations(tiny_atlas):
    atlas = Atlas(tiny_atlas)
    sae = SAE.load(atlas.dictionary_dir)
    corpus = TokenizedCorpus.load(tiny_atlas / "cache" / "corpus")
    cfg = config_of(atlas.manifest)
    acts = load_activations(tiny_atlas / "cache" / "harvest", corpus, cfg.harvest.shard_tokens)
    live = atlas.list_features(sort="density", limit=1)[0]["feature_id"]
    examples = atlas.feature_examples(live)
    tops = [e for e in examples if e["kind"] == "top"]
    assert 0 < len(tops) <= cfg.analysis.top_examples
    assert [e["max_activation"] for e in tops] == sorted((e["max_activation"] for e in tops), reverse=True)
    con = SQL(atlas)
    e = tops[0]
    assert max(e["activations"]) == pytest.approx(e["max_activation"], rel=1e-5)
    # Recompute the strongest token's activation from the dictionary and the harvested vector.
    c = next(c for c in range(corpus.n_contexts) if corpus.ctx_doc[c] == e["doc_id"]
             and corpus.ctx_start[c] <= e["max_position"] < corpus.ctx_start[c] + np.diff(corpus.ctx_offset)[c] - 1)
    row = corpus.ctx_offset[c] + 1 + e["max_position"] - corpus.ctx_start[c]
    with torch.no_grad():
        dense = sae.dense(sae.encode(torch.from_numpy(acts[row : row + 1].astype(np.float32))))
    assert float(dense[0, live]) == pytest.approx(e["max_activation"], rel=1e-4)
    token = con.execute(
        "select token from tokens where doc_id = ? and position = ?", [e["doc_id"], e["max_position"]]
    ).fetchone()[0]
    assert e["tokens"][e["max_position"] - e["start"]] == token


def test_labels_and_embeddings_are_present(tiny_atlas):
    feats = Atlas(tiny_atlas).features.to_arrow().to_pylist()
    live = [f for f in feats if f["density"] > 0]
    assert all(f["label"] for f in feats) and all(f["description"] for f in feats)
    # A live feature may fire only in the documents held out from explainers: it gets no label.
    labelled = [f for f in live if f["label_source"] == "contrastive"]
    assert len(labelled) >= len(live) // 2 and all(f["label_source"] in ("contrastive", "none") for f in feats)
    scored = [f for f in labelled if f["label_score"] is not None]
    assert scored and all(0 <= f["label_score"] <= 1 for f in scored)
    for f in labelled:  # short, no word lists, at most 3 quotes; a feature of one kind of token is named by it
        assert wording.words(f["label"]) <= wording.MAX_WORDS and wording.listed_words(f["label"]) < 4
        assert len(re.findall(r'"[^"]*"', f["label"])) <= wording.QUOTED_MAX
        assert f["kind"] is None or kinds.KINDS[f["kind"]].phrase in f["label"]
    assert any(f["kind"] for f in labelled) and all(k["kind"] in kinds.KINDS for f in feats for k in f["kinds"])
    assert all({s["scorer"] for s in f["label_scores"]} >= {"embedding", "token"} for f in scored)
    # A seeded sample of labelled live features is also scored by steering with them (the intervention stage).
    intervened = [f for f in feats if any(s["scorer"] == "intervention" for s in f["label_scores"])]
    sampled = [f for f in labelled if f["max_activation"] > 0]
    assert len(intervened) == min(8, len(sampled)) and all(f in sampled for f in intervened)  # conftest's sample
    assert all(0 <= s["score"] <= 1 for f in intervened for s in f["label_scores"] if s["scorer"] == "intervention")
    for f in labelled[:10]:
        assert np.linalg.norm(f["label_embedding"]) == pytest.approx(1.0, abs=1e-3)
        assert np.linalg.norm(f["context_embedding"]) == pytest.approx(1.0, abs=1e-3)
        assert len(f["logit_positive"]) == 10 and f["logit_positive"][0]["value"] >= f["logit_negative"][0]["value"]
        assert sum(f["histogram"]) == f["n_active"]


def _tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and "cache" not in p.relative_to(root).parts:
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_rerun_reuses_every_stage(tmp_path, tiny_model_dir, corpus_dir):
    cfg = tiny_config(tmp_path / "atlas", tiny_model_dir, corpus_dir)
    first = pipeline.run_ingest(cfg)
    published = (Path(cfg.run.atlas) / "analytics.duckdb").stat().st_mtime_ns
    manifest = pipeline.run_ingest(cfg)
    assert manifest == first  # nothing changed, so nothing was republished
    assert (Path(cfg.run.atlas) / "analytics.duckdb").stat().st_mtime_ns == published
    assert {s["status"] for s in Atlas(cfg.run.atlas).manifest["stages"].values()} == {"done"}
    # A changed dictionary setting retrains, but reuses the corpus and the harvest.
    manifest = pipeline.run_ingest(cfg.replace(k=3))
    status = {name: s["status"] for name, s in manifest["stages"].items()}
    assert status["corpus"] == status["harvest"] == "reused" and status["train"] == "done"
    assert Atlas(cfg.run.atlas).manifest["dictionary"]["k"] == 3


def test_killed_harvest_resumes_from_its_shards(tmp_path, tiny_model_dir, corpus_dir, monkeypatch):
    cfg = tiny_config(tmp_path / "atlas", tiny_model_dir, corpus_dir)
    real = np.save
    saved = []

    def dying_save(path, arr, *a, **kw):
        if Path(path).parent.name == "harvest":  # numpy's own save: other stages' shards pass
            if len(saved) == 1:
                raise KeyboardInterrupt("killed")
            saved.append(path)
        return real(path, arr, *a, **kw)

    monkeypatch.setattr("featureatlas.ingest.harvest.np.save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_ingest(cfg)
    monkeypatch.undo()
    shards = sorted((tmp_path / "atlas" / "cache" / "harvest").glob("acts-*.npy"))
    assert len(shards) == 1
    first = shards[0].stat().st_mtime_ns
    with pytest.raises(AtlasNotFound):
        Atlas(cfg.run.atlas)
    pipeline.run_ingest(cfg)
    assert shards[0].stat().st_mtime_ns == first  # the finished shard was kept, not redone
    assert Atlas(cfg.run.atlas).manifest["stages"]["harvest"]["summary"]["shards"] > 1


def test_crash_while_publishing_keeps_the_previous_atlas(tmp_path, tiny_model_dir, corpus_dir, monkeypatch):
    cfg = tiny_config(tmp_path / "atlas", tiny_model_dir, corpus_dir)
    pipeline.run_ingest(cfg)
    before = _tree_hash(Path(cfg.run.atlas))

    def broken(*_a, **_kw):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pipeline, "write_duckdb", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        pipeline.run_ingest(cfg.replace(k=2))
    assert _tree_hash(Path(cfg.run.atlas)) == before
    assert Atlas(cfg.run.atlas).manifest["dictionary"]["k"] == 4
    assert json.loads((Path(cfg.run.atlas) / "manifest.json").read_text())["dictionary"]["k"] == 4


@pytest.mark.parametrize("architecture", ["relu", "jumprelu", "matryoshka"])
def test_threshold_architectures_build_an_atlas(tmp_path, tiny_model_dir, corpus_dir, architecture):
    cfg = tiny_config(tmp_path / "atlas", tiny_model_dir, corpus_dir, architecture=architecture, sparsity_coef=0.5)
    manifest = pipeline.run_ingest(cfg)
    assert manifest["dictionary"]["architecture"] == architecture
    atlas = Atlas(cfg.run.atlas)
    sae = SAE.load(atlas.dictionary_dir)
    assert sae.architecture == architecture
    # The activations table holds every activation the dictionary produces on every encoded token:
    # recomputed here from the harvested vectors, count and mass agree (nothing cut at k or 2k).
    corpus = TokenizedCorpus.load(Path(cfg.run.atlas) / "cache" / "corpus")
    acts = load_activations(Path(cfg.run.atlas) / "cache" / "harvest", corpus, cfg.harvest.shard_tokens)
    rows = np.flatnonzero(corpus.token_position() != 0)
    with torch.no_grad():
        dense = sae.activations(torch.from_numpy(np.asarray(acts[rows], dtype=np.float32)))
    count, mass, widest = SQL(atlas).execute(
        "select count(*), sum(value), (select max(n) from (select count(*) as n from activations group by doc_id, position))"
        " from activations").fetchone()
    assert count == int((dense > 0).sum()) and mass == pytest.approx(float(dense.sum()), rel=1e-4)
    assert widest == int((dense > 0).sum(1).max())
    dec = np.stack(atlas.features.to_arrow()["decoder"].to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(np.linalg.norm(dec, axis=1), 1.0, atol=1e-4)
    assert manifest["metrics"]["l0"] > 0
    if architecture == "matryoshka":
        _check_families(atlas, sae, manifest, dec)


def test_widths_train_apart_and_stack(tmp_path, tiny_model_dir, corpus_dir):
    """``--widths``: a TopK dictionary per width from one pass, stacked: every feature id belongs to
    one of them, each token gets each dictionary's own top k, and each reconstructs on its own."""
    cfg = tiny_config(tmp_path / "atlas", tiny_model_dir, corpus_dir, widths=[16, 32, 64], d_sae=64)
    manifest = pipeline.run_ingest(cfg)
    atlas = Atlas(cfg.run.atlas)
    sae = SAE.load(atlas.dictionary_dir)
    assert sae.parts == ((0, 16), (16, 32), (48, 64)) and sae.d_sae == 112 and atlas.d_sae == 112
    corpus = TokenizedCorpus.load(Path(cfg.run.atlas) / "cache" / "corpus")
    acts = load_activations(Path(cfg.run.atlas) / "cache" / "harvest", corpus, cfg.harvest.shard_tokens)
    x = torch.from_numpy(np.asarray(acts[np.flatnonzero(corpus.token_position() != 0)], dtype=np.float32))
    with torch.no_grad():
        dense = sae.activations(x)
        for i, (first, width) in enumerate(sae.parts):  # what each dictionary gives alone, offset
            np.testing.assert_allclose(dense[:, first : first + width], sae.part(i).activations(x), atol=1e-4)
    per_token = SQL(atlas).execute("select max(n) from (select count(*) as n from activations group by doc_id, position)")
    assert per_token.fetchone()[0] <= 3 * cfg.train.k
    assert int((dense > 0).sum()) == SQL(atlas).execute("select count(*) from activations").fetchone()[0]
    dec = np.stack(atlas.features.to_arrow()["decoder"].to_numpy(zero_copy_only=False))
    _check_families(atlas, sae, manifest, dec)
    # Search and neighbours in one dictionary answer with its features only; an unknown id is refused.
    from featureatlas.api.service import AtlasService
    from featureatlas.store.errors import NotFound

    service = AtlasService(atlas)
    for d in service.dictionaries()["dictionaries"]:
        ids = range(d["first_feature"], d["first_feature"] + d["d_sae"])
        hits = service.search("the", k=10, dictionary=d["dictionary"])["hits"]
        assert hits and all(h["feature_id"] in ids for h in hits)
        for by in ("decoder", "coactivation"):
            near = service.neighbors(0, k=40, by=by, dictionary=d["dictionary"])["neighbors"]
            assert all(n["feature_id"] in ids and n["feature_id"] != 0 for n in near)
            assert by == "coactivation" or len(near) == min(40, len(ids) - (0 in ids))
    with pytest.raises(NotFound, match="no dictionary"):
        service.search("the", dictionary="L99-1M")
    widest = service.dictionaries()["dictionaries"][0]
    assert service.feature_id(widest["dictionary"], 3) == widest["first_feature"] + 3
    with pytest.raises(NotFound, match="no feature 64"):
        service.feature_id(widest["dictionary"], 64)
    # Exported, each dictionary is one of its own: a SAELens folder, a Neuronpedia source indexed from 0.
    export(atlas, "saelens", tmp_path / "saelens")
    for i, (first, width) in enumerate(sae.parts):
        alone = SAE.load(tmp_path / "saelens" / f"L{manifest['hook']['layer']}-{width}")
        assert alone.d_sae == width and alone.k == cfg.train.k
        np.testing.assert_allclose(alone.activations(x[:50]).detach(), sae.part(i).activations(x[:50]).detach())
    export(atlas, "neuronpedia", tmp_path / "np")
    for first, width in sae.parts:
        source = read_neuronpedia(next((tmp_path / "np").glob(f"*/*-res-{width}")))
        assert [int(n["index"]) for n in source.features] == list(range(width))
        assert source.source["saelensConfig"]["d_sae"] == width
        said = source.explanations[0]
        label = SQL(atlas).execute("select label from features where feature_id = ?", [first + int(said["index"])])
        assert said["description"] == label.fetchone()[0]


def _check_families(atlas: Atlas, sae: SAE, manifest: dict, dec: np.ndarray) -> None:
    """Latents holding several dictionaries (a nested one's prefixes, a stack's widths) are one
    dictionary each, and their features form families across them."""
    from featureatlas.api.service import AtlasService
    from featureatlas.store.dictionaries import MAX_CHILDREN

    service = AtlasService(atlas)
    parts = list(sae.parts)
    widths = [w for _, w in parts]
    assert len(parts) == 3 and manifest["dictionary"]["parts"] == [list(p) for p in parts]
    listed = service.dictionaries()["dictionaries"]
    assert [(d["first_feature"], d["d_sae"]) for d in listed] == [parts[-1], *parts[:-1]] and listed[0]["is_default"]
    for d in listed[1:]:  # each measured on its own, as the dictionary it is
        assert d["variance_explained"] == manifest["metrics"]["parts"][str(d["d_sae"])]["variance_explained"]
        assert d["loss_recovered"] is not None and d["k"] == min(sae.k, d["d_sae"])
        # one clean and one zero-ablated pass serve every dictionary; each has its own spliced pass
        m, full = manifest["metrics"]["parts"][str(d["d_sae"])], manifest["metrics"]
        assert (m["ce_clean"], m["ce_zero"]) == (full["ce_clean"], full["ce_zero"]) and m["ce_sae"] != full["ce_sae"]
        assert m["loss_recovered"] == pytest.approx((m["ce_zero"] - m["ce_sae"]) / (m["ce_zero"] - m["ce_clean"]))
    links = SQL(atlas).execute("select feature_id, parent_id, decoder_cosine, coactivation, dictionary, parent_dictionary "
                               "from families order by feature_id").fetchall()
    inside = lambda f, part: part[0] <= f < part[0] + part[1]  # noqa: E731
    narrowest = lambda f: min((p for p in parts if inside(f, p)), key=lambda p: p[1])  # noqa: E731
    # every latent of a wider dictionary that the one before does not hold, once
    expected = sorted({f for a, b in zip(parts, parts[1:]) for f in range(b[0], b[0] + b[1]) if not inside(f, a)})
    assert [f for f, *_ in links] == expected
    ids = {d["d_sae"]: d["dictionary"] for d in listed}
    for f, parent, cosine, coact, dictionary, parent_dictionary in links:
        wide = narrowest(f)
        narrow = parts[parts.index(wide) - 1]  # the dictionary before the child's
        assert inside(parent, narrow) and (dictionary, parent_dictionary) == (ids[wide[1]], ids[narrowest(parent)[1]])
        best = dec[f] @ dec[narrow[0] : narrow[0] + narrow[1]].T
        assert parent == narrow[0] + int(best.argmax()) and cosine == pytest.approx(float(best.max()), abs=1e-5)
        assert 0.0 <= coact <= 1.0
    fired = {f for (f,) in SQL(atlas).execute("select feature_id from features where n_active > 0").fetchall()}
    child, parent = next((f, p) for f, p, *_ in links if f in fired and narrowest(f) == parts[1])
    page = service.feature(child)
    assert page["family"]["parent"]["feature_id"] == parent and page["family"]["dictionary"] == ids[widths[1]]
    assert page["dictionary"] == ids[widths[1]]
    up = service.feature(parent)["family"]
    assert child in [c["feature_id"] for c in up["children"]] and up["dictionary"] == ids[widths[0]]
    linked = [f for f, p, *_ in links if p == parent]
    assert up["n_children"] == len(set(linked) & fired) and len(up["children"]) == min(up["n_children"], MAX_CHILDREN)
    assert manifest["families"]["links"] == len(links) and len(manifest["families"]["pairs"]) == 2
