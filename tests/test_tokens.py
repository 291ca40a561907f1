import numpy as np
from featureatlas.ingest.model import load_model
from featureatlas.ingest.tokens import TokenizedCorpus, tokenize_corpus

from .conftest import tiny_config


def test_contexts_start_with_bos_and_map_back_to_documents(tmp_path, tiny_model_dir, corpus_dir):
    cfg = tiny_config(tmp_path / "atlas", tiny_model_dir, corpus_dir)
    model = load_model(cfg.model.model, cache_dir=cfg.model.model_cache)
    corpus = tokenize_corpus(cfg.corpus, model.tokenizer, model.bos_id)
    lengths = np.diff(corpus.ctx_offset)
    assert lengths.max() <= cfg.corpus.context_len and lengths.min() >= 2
    assert (corpus.ids[corpus.ctx_offset[:-1]] == model.bos_id).all()
    assert cfg.corpus.tokens - cfg.corpus.context_len <= corpus.n_tokens <= cfg.corpus.tokens + cfg.corpus.context_len
    # Every context is a contiguous slice of its document's own tokenization.
    for c in range(0, corpus.n_contexts, 7):
        doc = corpus.documents[corpus.ctx_doc[c]]
        doc_ids = model.tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        start = corpus.ctx_start[c]
        body = corpus.context_ids(c)[1:]
        assert list(body) == doc_ids[start : start + len(body)]
    # The split follows documents: no document is in both.
    docs_eval = {corpus.ctx_doc[c] for c in np.flatnonzero(corpus.ctx_eval)}
    docs_train = {corpus.ctx_doc[c] for c in np.flatnonzero(~corpus.ctx_eval)}
    assert docs_eval and docs_train and not docs_eval & docs_train
    # Round trip through the cache.
    corpus.save(tmp_path / "c")
    again = TokenizedCorpus.load(tmp_path / "c")
    assert (again.ids == corpus.ids).all() and again.documents == corpus.documents
    pos = corpus.token_position()
    assert (pos[corpus.ctx_offset[:-1]] == 0).all() and pos.max() == cfg.corpus.context_len - 1
