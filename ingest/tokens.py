"""From documents to fixed-length model contexts: the deterministic mix and the token budget.

A context is ``[BOS] + up to context_len - 1 tokens`` of one document, so every activation maps back
to ``(doc_id, position)`` without packing bookkeeping. Contexts are stored flat (no padding), with
offsets, so the harvest and encode stages never carry pad tokens around.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from featureatlas.store.errors import BadConfig
from tqdm import tqdm

from .config import CorpusConfig
from .corpus import Document, read_source

# A document is tokenized from a prefix of its text at most this many characters per needed token:
# a 13 MB stdlib module need not be tokenized whole to take its first few contexts.
_CHARS_PER_TOKEN_BOUND = 12


@dataclass
class TokenizedCorpus:
    documents: list[Document]
    ctx_doc: np.ndarray  # [n_ctx] int32, index into documents
    ctx_start: np.ndarray  # [n_ctx] int32, document position of the context's first non-BOS token
    ctx_offset: np.ndarray  # [n_ctx + 1] int64, into ``ids``
    ctx_eval: np.ndarray  # [n_ctx] bool, held-out split
    ids: np.ndarray  # [n_tokens] int32, BOS included at each context's start

    @property
    def n_contexts(self) -> int:
        return len(self.ctx_doc)

    @property
    def n_tokens(self) -> int:
        return len(self.ids)

    def context_ids(self, c: int) -> np.ndarray:
        return self.ids[self.ctx_offset[c] : self.ctx_offset[c + 1]]

    def token_context(self) -> np.ndarray:
        """[n_tokens] context index of each token."""
        return np.repeat(np.arange(self.n_contexts, dtype=np.int32), np.diff(self.ctx_offset))

    def token_position(self) -> np.ndarray:
        """[n_tokens] position within the context (0 is BOS)."""
        ctx = self.token_context()
        return (np.arange(self.n_tokens) - self.ctx_offset[ctx]).astype(np.int32)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(
            folder / "contexts.npz",
            ctx_doc=self.ctx_doc,
            ctx_start=self.ctx_start,
            ctx_offset=self.ctx_offset,
            ctx_eval=self.ctx_eval,
            ids=self.ids,
        )
        with (folder / "documents.jsonl").open("w", encoding="utf-8") as f:
            for d in self.documents:
                f.write(json.dumps({"doc_id": d.doc_id, "source": d.source, "title": d.title, "text": d.text}) + "\n")

    @classmethod
    def load(cls, folder: Path) -> "TokenizedCorpus":
        arrays = np.load(folder / "contexts.npz")
        with (folder / "documents.jsonl").open(encoding="utf-8") as f:
            docs = [Document(**json.loads(line)) for line in f]
        return cls(documents=docs, **{k: arrays[k] for k in arrays.files})


def tokenize_corpus(cfg: CorpusConfig, tokenizer, bos_id: int) -> TokenizedCorpus:
    """Fill each source's share of ``cfg.tokens`` with contexts from its documents, in hash order."""
    total_w = sum(cfg.corpus_weights)
    per_ctx = cfg.context_len - 1
    documents: list[Document] = []
    ctx_doc: list[int] = []
    ctx_start: list[int] = []
    ctx_eval: list[bool] = []
    pieces: list[np.ndarray] = []
    bar = tqdm(total=cfg.tokens, desc="tokenize", unit="tok", unit_scale=True)
    for spec, weight in zip(cfg.corpus, cfg.corpus_weights):
        budget = int(cfg.tokens * weight / total_w)
        used = 0
        for doc in read_source(spec):
            if used >= budget:
                break
            want = min(cfg.max_contexts_per_doc * per_ctx, (budget - used) + per_ctx)
            text = doc.text[: want * _CHARS_PER_TOKEN_BOUND]
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(text) < len(doc.text) and ids:
                ids = ids[:-1]  # the cut may have split the last token
            ids = ids[:want]
            if not ids:
                continue
            d = len(documents)
            documents.append(doc)
            for start in range(0, len(ids), per_ctx):
                if used >= budget:
                    break
                chunk = ids[start : start + per_ctx]
                if start > 0 and len(chunk) < 8:
                    break  # a stub tail is almost all position-0-like noise
                pieces.append(np.asarray([bos_id, *chunk], dtype=np.int32))
                ctx_doc.append(d)
                ctx_start.append(start)
                ctx_eval.append(doc.is_eval(cfg.eval_fraction))
                used += len(chunk) + 1
                bar.update(len(chunk) + 1)
    bar.close()
    if not pieces:
        raise BadConfig("--corpus", "the corpus yielded no tokens")
    lengths = np.array([len(p) for p in pieces], dtype=np.int64)
    corpus = TokenizedCorpus(
        documents=documents,
        ctx_doc=np.asarray(ctx_doc, dtype=np.int32),
        ctx_start=np.asarray(ctx_start, dtype=np.int32),
        ctx_offset=np.concatenate([[0], np.cumsum(lengths)]),
        ctx_eval=np.asarray(ctx_eval, dtype=bool),
        ids=np.concatenate(pieces),
    )
    if corpus.ctx_eval.all() or not corpus.ctx_eval.any():
        left = "training" if corpus.ctx_eval.all() else "evaluation"
        raise BadConfig("--eval-fraction", f"documents are held out whole, and the split of {len(documents)} documents "
                                           f"left no {left} contexts: change --eval-fraction or give more documents")
    return corpus
