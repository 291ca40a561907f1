"""The map view of an atlas: every feature's stored 2-D position (ingest/feature_map.py), its
density and label, and a label cluster to colour it by.

Clusters are k-means over the label embeddings *as they are now*, computed when the map is first
asked for: a re-label (``featureatlas label``) can never leave stale clusters behind, and the whole
document (read, k-means fitted on a 20k sample, JSON) takes ~1.5 s at 100k features here.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from .atlas import Atlas
from .errors import NotFound

MAX_CLUSTERS = 12  # more colours than this are hard to tell apart on a map
# Rows per read. Every label embedding is held while clustering (1.5 KB a row: 150 MB at 100k
# features, 1.5 GB at 1M, where a sampled two-pass read would be the next step).
READ_BATCH = 65_536
KMEANS_SAMPLE = 20_000
KMEANS_ITERATIONS = 20


class NoMap(NotFound):
    def __init__(self, message: str):
        super().__init__("map", message)


def _labelled(embeddings: np.ndarray) -> np.ndarray:
    """Rows with a label embedding (unlabelled features have all zeros)."""
    return np.einsum("ij,ij->i", embeddings, embeddings) > 0


def label_clusters(embeddings: np.ndarray, *, k: int, seed: int = 0) -> np.ndarray:
    """[k, dim] unit centroids of spherical k-means over unit ``embeddings`` (rows of zeros, the
    unlabelled features, are left out), seeded with k-means++ on a sample."""
    live = embeddings[_labelled(embeddings)]
    rng = np.random.default_rng(seed)
    if len(live) > KMEANS_SAMPLE:
        live = live[rng.choice(len(live), KMEANS_SAMPLE, replace=False)]
    k = min(k, len(live))
    if k == 0:
        return np.zeros((0, embeddings.shape[1]), np.float32)
    centroids = [live[rng.integers(len(live))]]
    for _ in range(1, k):
        distance = np.maximum(1 - (live @ np.stack(centroids).T).max(1), 0)
        p = distance / distance.sum() if distance.sum() > 0 else None
        centroids.append(live[rng.choice(len(live), p=p)])
    c = np.stack(centroids).astype(np.float32)
    live = live.astype(np.float32, copy=False)
    for _ in range(KMEANS_ITERATIONS):
        assign = (live @ c.T).argmax(1)
        sums = np.eye(k, dtype=np.float32)[assign].T @ live  # one product, not k boolean copies
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        c = np.where(norms > 0, sums / np.maximum(norms, 1e-8), c)  # an emptied cluster keeps its centre
    return c


def map_json(atlas: Atlas, *, seed: int = 0) -> bytes:
    """The whole map as one JSON document of parallel arrays (compact enough for 100k points):
    ``feature_id``, ``x``, ``y``, ``density``, ``label``, ``cluster`` (-1: unlabelled), and
    ``clusters`` (id, name = the member label nearest the centroid, size)."""
    table = atlas.features
    if "map_x" not in table.schema.names:
        raise NoMap("this atlas has no feature map: it was published before maps existed; run its "
                    "`featureatlas ingest` again (finished stages are reused, only the map is computed)")
    n = table.count_rows()
    columns = ["feature_id", "map_x", "map_y", "density", "label", "label_embedding"]
    parts: dict[str, list] = {c: [] for c in columns}
    for batch in table.search().select(columns).limit(n).to_batches(READ_BATCH):
        for c in columns:
            parts[c].append(batch[c])
    # In feature-id order: a re-label rewrites rows, and LanceDB need not keep them in place.
    order = np.argsort(np.concatenate([a.to_numpy() for a in parts["feature_id"]]), kind="stable")
    emb = np.concatenate([a.flatten().to_numpy().reshape(len(a), -1) for a in parts["label_embedding"]])[order]
    labels = [s for a in parts["label"] for s in a.to_pylist()]
    labels = [labels[i] for i in order]
    k = max(1, min(MAX_CLUSTERS, round(np.sqrt(n / 8))))
    centroids = label_clusters(emb, k=k, seed=seed)
    similarity = emb @ centroids.T if len(centroids) else np.zeros((n, 0), np.float32)
    cluster = np.where(_labelled(emb), similarity.argmax(1) if len(centroids) else -1, -1)
    clusters = []
    for j in range(len(centroids)):
        members = np.flatnonzero(cluster == j)
        if len(members):
            name = labels[members[similarity[members, j].argmax()]]
            clusters.append({"id": j, "name": name, "size": int(len(members))})
    # float64 before rounding: a rounded float32 prints as 0.12340000271797180 in JSON.
    column = lambda c: np.concatenate([a.to_numpy() for a in parts[c]])[order].astype(np.float64)  # noqa: E731
    doc: dict[str, Any] = {
        "n": n,
        "feature_id": column("feature_id").astype(np.int64).tolist(),
        "x": np.round(column("map_x"), 4).tolist(),
        "y": np.round(column("map_y"), 4).tolist(),
        "density": np.round(column("density"), 7).tolist(),
        "label": labels,
        "cluster": cluster.tolist(),
        "clusters": clusters,
    }
    return json.dumps(doc, separators=(",", ":")).encode()
