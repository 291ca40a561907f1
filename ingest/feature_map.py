"""The feature map: every feature as a point in 2-D, laid out by what it does (the default,
``map_layout=function``) or by its decoder direction (``map_layout=decoder``).

Computed once at ingest and stored with the features, so a browser can draw 100k points without the
server doing any work. Both layouts are UMAP over cosine similarity; they differ in the vectors.

Why not the decoder alone: 4,096 nearly orthogonal decoder directions give one round cloud. On the
quick atlas (4,096 features; 1,312 of them draw >= 60% of their activation mass from one of wiki-fr,
wiki-es, python, shakespeare, wiki-en), the share of such a feature's 10 nearest map neighbours that
share its source ("10-NN purity"; two seeds; a shuffled layout gives 0.15) and the mean cosine of
the firing-window embeddings of map neighbours (shuffled: 0.16) were, all through this module:

    layout of                                        purity      window cosine
    decoder directions                               0.35        0.21
    firing-window (context) embeddings               0.43-0.44   0.55
    document co-activation                           0.86        0.32
    co-activation .75 + context .15 + decoder .10    0.83-0.84   0.41   <- function

The mix gives up a little purity for neighbours whose windows read alike, and its decoder share
gives a feature that never fired a place (its other parts are zero). ``scripts/map_check.py`` checks
a published atlas's map against a shuffled and a decoder layout.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

log = logging.getLogger(__name__)

# Bump when the layout changes, so cached maps are recomputed.
MAP_VERSION = 4  # 4: laid out under one BLAS thread (the same map on every machine)
# UMAP's neighbour graph needs a few more points than neighbours; smaller dictionaries (tests, toy
# runs) are laid out by their two principal directions instead.
MIN_UMAP_POINTS = 16
# The function layout's parts as shares of the cosine: each part is a unit block scaled by the square
# root of its share, so the cosine of two mixed vectors is the shares' weighted mean of the parts'
# cosines. Chosen on the quick atlas (see above); in the prototype (.8, .2, 0) measured 0.81 purity
# and 0.44 window cosine, (.8, .1, .1) 0.83 and 0.38.
SHARES = {"coactivation": 0.75, "context": 0.15, "decoder": 0.10}
# Dimensions kept of the co-activation matrix and of the mix. The purity hardly depends on the first
# (16: 0.86, 32: 0.84, 128: 0.82, in a prototype); 64 of the mix keep the neighbour search cheap and
# measured 0.83 against 0.82 unreduced.
COACTIVATION_DIMS = 32
MIX_DIMS = 64
# Up to this many features the neighbours are found exactly here (quadratic: 0.5 s at 4,096 features
# and 64 dimensions, so ~30 s here); beyond, UMAP's own NN-descent, whose numba compilation alone took
# ~70 s on the 2-core quick profile, pays for itself.
EXACT_NEIGHBORS_MAX = 30_000
# Components of the neighbour graph smaller than this share of the features are moved next to the
# largest one (``gather_components``).
SMALL_COMPONENT = 0.02
# Rows of the similarity matrix held at once by the neighbour search (float32: 128 MB).
KNN_BLOCK_CELLS = 1 << 25
# Features UMAP lays out itself; past this many, the rest are placed among them. UMAP of 50k
# (NN-descent) takes minutes on two cores, and placing a million more about as long.
LANDMARKS = 50_000
# A placed feature sits at the softmax-weighted mean (cosine / temperature) of its nearest landmarks.
PLACE_NEIGHBORS = 8
PLACE_TEMPERATURE = 0.05


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; rows of zeros stay zeros."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _reduce(x: np.ndarray | sp.spmatrix, dims: int, seed: int) -> np.ndarray:
    """The first ``dims`` SVD coordinates of ``x`` (dense or sparse) as unit rows; ``x`` itself,
    densified, when it has no more columns than that."""
    if min(x.shape) <= dims:
        return _unit(x.toarray() if sp.issparse(x) else x)
    from sklearn.utils.extmath import randomized_svd  # scikit-learn comes with umap-learn

    u, s, _ = randomized_svd(x, dims, random_state=seed)
    return _unit(u * s)


def coactivation(feature_id: np.ndarray, doc_id: np.ndarray, value: np.ndarray, n_features: int, *,
                 seed: int = 0) -> np.ndarray:
    """[n_features, <= COACTIVATION_DIMS] unit rows: each feature's activation mass per document,
    square-rooted (one dense document should not outweigh many: sqrt measured 0.84 purity, raw mass
    0.66, log1p 0.78; weighting documents by idf changed nothing), reduced by SVD. A feature that
    never fired has a row of zeros."""
    docs, column = np.unique(doc_id, return_inverse=True)
    mass = sp.csr_matrix((np.asarray(value, np.float64), (feature_id, column)), shape=(n_features, max(len(docs), 1)))
    mass.sum_duplicates()
    mass.data = np.sqrt(mass.data)
    return _reduce(mass, COACTIVATION_DIMS, seed)


def function_vectors(coact: np.ndarray, context: np.ndarray, decoder: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """[n, <= MIX_DIMS] unit rows to lay out by what features do: co-activation ``coact``, the
    embedding of their top firing windows ``context`` and their unit ``decoder`` rows, mixed by
    ``SHARES`` and reduced by SVD."""
    parts = {"coactivation": coact, "context": context, "decoder": decoder}
    mix = np.hstack([np.sqrt(share) * _unit(parts[name]) for name, share in SHARES.items()])
    return _reduce(mix, MIX_DIMS, seed)


def cosine_neighbors(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``k`` nearest rows of ``x`` by cosine, each row itself first, as UMAP takes them:
    ([n, k] indices, [n, k] cosine distances)."""
    x = _unit(x)
    n = len(x)
    block = max(1, KNN_BLOCK_CELLS // max(n, 1))
    index = np.empty((n, k), np.int64)
    distance = np.empty((n, k), np.float32)
    for start in range(0, n, block):
        sim = x[start:start + block] @ x.T
        rows = np.arange(len(sim))
        sim[rows, start + rows] = np.inf  # itself first, even among duplicates
        part = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sim, part, 1), axis=1, kind="stable")
        index[start:start + block] = np.take_along_axis(part, order, 1)
        distance[start:start + block] = np.maximum(1 - np.take_along_axis(sim, index[start:start + block], 1), 0)
    return index, distance


def gather_components(xy: np.ndarray, graph: sp.spmatrix) -> np.ndarray:
    """``xy`` with each small connected component of the neighbour ``graph`` (under ``SMALL_COMPONENT``
    of the points) that lies far from the largest one moved, rigidly and in its own direction, to a
    tenth of the largest's radius from it. UMAP places components without regard to each other (the
    distances between them mean nothing), and a small one far out shrinks the rest of the map to a
    corner of the view: on the quick atlas, 32 features that only neighbour each other sat 9 units
    below a main map 13 tall, which then filled 60% of the view's height. Large components (distinct
    groups in a toy dictionary) keep their places: pulled in along similar directions they would
    land on each other."""
    count, component = connected_components(graph, directed=False)
    sizes = np.bincount(component)
    largest = component == sizes.argmax()
    centre = xy[largest].mean(0)
    radius = np.linalg.norm(xy[largest] - centre, axis=1).max()
    for c in np.flatnonzero(sizes < SMALL_COMPONENT * len(xy)):
        members = component == c
        own = xy[members].mean(0)
        reach = radius * 1.1 + np.linalg.norm(xy[members] - own, axis=1).max()
        distance = float(np.linalg.norm(own - centre))
        if distance > reach:
            xy[members] -= (own - centre) * (1 - reach / distance)
    return xy


def feature_map(vectors: np.ndarray, *, neighbors: int = 15, seed: int = 0) -> np.ndarray:
    """[n_features, 2] float32 coordinates for feature ``vectors`` [n_features, dim] (decoder rows or
    ``function_vectors``), laid out by cosine, scaled into [-1, 1] on the wider axis (the browser
    fits the view to the points either way). Past ``LANDMARKS`` features, UMAP lays out a seeded
    sample of them and every other feature is placed among its nearest sampled ones
    (``place_by_landmarks``): UMAP over a million points would take hours here, and its layout
    of a large uniform sample already holds every region the rest could fall in."""
    x = _unit(vectors)
    if len(x) > LANDMARKS:
        marks = np.sort(np.random.default_rng(seed).choice(len(x), LANDMARKS, replace=False))
        log.info("map: %d landmark features laid out, %d placed among them", LANDMARKS, len(x) - LANDMARKS)
        marks_xy = _layout(x[marks], neighbors, seed)
        xy = place_by_landmarks(x, x[marks], marks_xy)
        xy[marks] = marks_xy  # a landmark stays where UMAP put it, not pulled toward its neighbours
    else:
        xy = _layout(x, neighbors, seed)
    xy = np.asarray(xy, dtype=np.float32)
    xy -= (xy.max(0) + xy.min(0)) / 2
    span = float(np.abs(xy).max())
    return xy / span if span > 0 else xy


def place_by_landmarks(x: np.ndarray, marks: np.ndarray, marks_xy: np.ndarray) -> np.ndarray:
    """[len(x), 2] each unit row of ``x`` at the mean position of its ``PLACE_NEIGHBORS`` most
    similar ``marks`` (unit rows laid out at ``marks_xy``), weighted by a softmax of their cosine
    so the nearest dominate; a row equal to a landmark lands on it. Blocks of rows bound the memory
    (``KNN_BLOCK_CELLS``); the cost is linear in the number of rows."""
    k = min(PLACE_NEIGHBORS, len(marks))
    block = max(1, KNN_BLOCK_CELLS // max(len(marks), 1))
    out = np.empty((len(x), 2), np.float32)
    for start in range(0, len(x), block):
        sim = x[start:start + block] @ marks.T
        near = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        s = np.take_along_axis(sim, near, 1)
        w = np.exp((s - s.max(1, keepdims=True)) / PLACE_TEMPERATURE)
        out[start:start + block] = (w[..., None] * marks_xy[near]).sum(1) / w.sum(1, keepdims=True)
    return out


def _layout(x: np.ndarray, neighbors: int, seed: int) -> np.ndarray:
    """UMAP of unit rows ``x`` by cosine (their principal plane when there are too few for UMAP)."""
    if len(x) < MIN_UMAP_POINTS:
        centred = x - x.mean(0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        xy = np.pad(centred @ vt[:2].T, ((0, 0), (0, 2 - min(2, len(vt)))))
    else:
        import umap  # numba compiles on first use (~20 s): imported only when a map is made

        k = min(neighbors, len(x) - 1)
        log.info("map: UMAP of %d features (cosine, %d neighbours)", len(x), k)
        knn = (*cosine_neighbors(x, k), None) if len(x) <= EXACT_NEIGHBORS_MAX else (None, None, None)
        with warnings.catch_warnings():
            # "n_jobs overridden by random_state": a seeded layout runs on one thread, on purpose;
            # "no NNDescent search index": nothing is ever added to a stored map.
            warnings.simplefilter("ignore", UserWarning)
            # PCA init: the spectral one (UMAP's default) flung 17 weakly tied features of the quick
            # atlas half a map width clear of the rest; the purity is the same (0.84).
            reducer = umap.UMAP(n_neighbors=k, metric="cosine", init="pca", random_state=seed, n_jobs=1,
                                precomputed_knn=knn)
            xy = gather_components(reducer.fit_transform(x), reducer.graph_)
    return np.asarray(xy, dtype=np.float32)
