"""The feature map: every feature as a point in 2-D, from UMAP over its unit decoder direction.

Computed once at ingest and stored with the features, so a browser can draw 100k points without the
server doing any work. Cosine is the metric because decoder directions, not their norms, carry what a
feature writes into the residual stream; nearby points are features that write similar things.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np

log = logging.getLogger(__name__)

# Bump when the layout changes, so cached maps are recomputed.
MAP_VERSION = 1
# UMAP's neighbour graph needs a few more points than neighbours; smaller dictionaries (tests, toy
# runs) are laid out by their two principal directions instead.
MIN_UMAP_POINTS = 16


def feature_map(decoder: np.ndarray, *, neighbors: int = 15, seed: int = 0) -> np.ndarray:
    """[n_features, 2] float32 coordinates for unit decoder rows ``decoder`` [n_features, d_in],
    scaled into [-1, 1] on the wider axis (the browser fits the view to the points either way)."""
    x = np.asarray(decoder, dtype=np.float32)
    if len(x) < MIN_UMAP_POINTS:
        centred = x - x.mean(0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        xy = np.pad(centred @ vt[:2].T, ((0, 0), (0, 2 - min(2, len(vt)))))
    else:
        import umap  # numba compiles on first use (~10 s): imported only when a map is made

        log.info("map: UMAP of %d decoder directions (cosine, %d neighbours)", len(x), neighbors)
        with warnings.catch_warnings():
            # "n_jobs overridden by random_state": a seeded layout runs on one thread, on purpose.
            warnings.simplefilter("ignore", UserWarning)
            reducer = umap.UMAP(n_neighbors=min(neighbors, len(x) - 1), metric="cosine", random_state=seed, n_jobs=1)
            xy = reducer.fit_transform(x)
    xy = np.asarray(xy, dtype=np.float32)
    xy -= (xy.max(0) + xy.min(0)) / 2
    span = float(np.abs(xy).max())
    return xy / span if span > 0 else xy
