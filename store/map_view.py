"""The map view of an atlas: every feature's stored 2-D position (ingest/feature_map.py), its
density and label, a label cluster to colour it by, and named regions to read the map by.

Clusters are k-means over the label embeddings *as they are now*, computed when the map is first
asked for: a re-label (``featureatlas label``) can never leave stale clusters behind, and the whole
document (read, k-means fitted on a 20k sample, JSON) takes ~1.5 s at 100k features here.

Regions are k-means over the 2-D positions, each named by what its features share: the source most
of them fire in most, and the words of their labels most particular to it ("French: ville/guerre").
Like the clusters they follow the labels as they are now; they add ~0.4 s at 4,096 features (0.2 s
of it the sources query over 7.9M activations).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

import numpy as np

from .atlas import Atlas, QueryInterrupted
from .errors import NotFound
from .schema import vector_matrix

log = logging.getLogger(__name__)

MAX_CLUSTERS = 12  # more colours than this are hard to tell apart on a map
# Region names drawn on the map: about ten at 4,096 features (sqrt(n / 40)), never more than twelve,
# so they can be read without covering the points.
MAX_REGIONS = 12
REGION_WORDS = 3
# A region is named after a source when at least this share of its features fire in it most.
REGION_SOURCE_SHARE = 0.5
# The built-in corpora (ingest/corpus.py) by language; any other source by its file or folder name.
SOURCE_NAMES = {"wiki-en": "English", "wiki-fr": "French", "wiki-es": "Spanish", "python": "Python",
                "shakespeare": "Shakespeare"}
# Label words that say nothing about a region: English glue and the label templates' own words.
STOPWORDS = frozenset("about after and are before but for from its like not such that the this token tokens "
                      "context text code word words with in plays articles prepositions pieces capitalised "
                      "keywords digits punctuation line breaks indentation spaces pronouns conjunctions auxiliary "
                      "verbs number months python shakespeare english french spanish".split())
WORD = re.compile(r"[^\W\d]\w{2,}")  # a letter (or _) then two more word characters: no numbers
# Rows per read. Every label embedding is held while clustering (1.5 KB a row: 150 MB at 100k
# features, 1.5 GB at 1M, where a sampled two-pass read would be the next step).
READ_BATCH = 65_536
KMEANS_SAMPLE = 20_000
KMEANS_ITERATIONS = 20
# Points in the map's first level of detail (``map_levels``): drawn in well under a second.
LOD_FIRST = 65_536


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


def feature_sources(atlas: Atlas, ids: np.ndarray) -> list[str | None]:
    """For each feature of ``ids``, the source holding most of its activation mass (None: it never
    fired, or the query ran out of time on a large atlas: the regions are then named by words)."""
    try:
        rows = atlas.query("select feature_id, arg_max(source, mass) from (select feature_id, source, sum(value) as mass "
                           "from activations join documents using (doc_id) group by all) group by feature_id").rows
    except QueryInterrupted:
        log.warning("map: feature sources took too long; regions are named by their labels alone")
        return [None] * len(ids)
    main = dict(rows)
    return [main.get(int(f)) for f in ids]


def kmeans_2d(xy: np.ndarray, k: int, *, seed: int = 0, iterations: int = 30) -> np.ndarray:
    """Each point's cluster of a k-means (k-means++ seeding) over 2-D points ``xy``."""
    rng = np.random.default_rng(seed)
    k = min(k, len(xy))
    centres = xy[[rng.integers(len(xy))]]
    for _ in range(1, k):
        distance = ((xy[:, None] - centres[None]) ** 2).sum(-1).min(1)
        p = distance / distance.sum() if distance.sum() > 0 else None
        centres = np.vstack([centres, xy[rng.choice(len(xy), p=p)]])
    for _ in range(iterations):
        assign = ((xy[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
        for j in range(k):
            if (assign == j).any():  # an emptied cluster keeps its centre
                centres[j] = xy[assign == j].mean(0)
    return ((xy[:, None] - centres[None]) ** 2).sum(-1).argmin(1)


def label_words(label: str | None) -> dict[str, str]:
    """The words of a label, lower-cased, each with the spelling it has there."""
    return {w.lower(): w for w in WORD.findall(label or "") if w.lower() not in STOPWORDS}


def distinctive_words(members: list[dict[str, str]], frequency: Counter, n: int, *, skip: str = "") -> list[str]:
    """Up to ``REGION_WORDS`` words of the members' labels that are frequent among them and rare
    elsewhere: each word scored by its share of members times the log of how much more often it
    occurs there than among all ``n`` labels (``frequency``: labels per word); a word in fewer than 3
    member labels is chance."""
    here = Counter(w for words in members for w in words)
    spelling = {w: s for words in members for w, s in words.items()}
    scored = []
    for w, count in here.items():
        share = count / len(members)
        if count >= 3 and w != skip.lower() and share > frequency[w] / n:
            scored.append((share * math.log(share * n / frequency[w]), w))
    return [spelling[w] for _, w in sorted(scored, key=lambda t: (-t[0], t[1]))[:REGION_WORDS]]


def region_source(sources: list[str | None]) -> str:
    """The display name of the source most of a region's features fire in most, when it is at least
    ``REGION_SOURCE_SHARE`` of them; else ""."""
    main, count = Counter(sources).most_common(1)[0] if sources else (None, 0)
    if main is None or count < REGION_SOURCE_SHARE * len(sources):
        return ""
    return SOURCE_NAMES.get(main, PurePath(main).name or main)


def map_regions(xy: np.ndarray, labels: list[str | None], sources: list[str | None], *, seed: int = 0) -> list[dict[str, Any]]:
    """Named regions of the map, largest first: ``name`` ("Source: word/word/word", either part
    alone when the other is missing), ``x``, ``y`` (the member nearest the region's centre, so the
    name sits on points, not in a gap between them) and ``size``. A region with neither a main
    source nor a distinctive word is left unnamed."""
    n = len(xy)
    if n == 0:
        return []
    words = [label_words(label) for label in labels]
    frequency = Counter(w for ws in words for w in ws)
    assign = kmeans_2d(xy, max(1, min(MAX_REGIONS, round(math.sqrt(n / 40)))), seed=seed)
    regions = []
    for j in np.unique(assign):
        members = np.flatnonzero(assign == j)
        source = region_source([sources[i] for i in members])
        top = distinctive_words([words[i] for i in members], frequency, n, skip=source)
        name = ": ".join(part for part in (source, "/".join(top)) if part)
        if name:
            at = members[((xy[members] - xy[members].mean(0)) ** 2).sum(1).argmin()]
            regions.append({"name": name, "x": round(float(xy[at, 0]), 4), "y": round(float(xy[at, 1]), 4),
                            "size": int(len(members))})
    return sorted(regions, key=lambda r: -r["size"])


def _read(atlas: Atlas, columns: list[str]) -> dict[str, list]:
    """Arrow chunks of ``columns`` of the features table, read in batches."""
    table = atlas.features
    if "map_x" not in table.schema.names:
        raise NoMap("this atlas has no feature map: it was published before maps existed; run its "
                    "`featureatlas ingest` again (finished stages are reused, only the map is computed)")
    parts: dict[str, list] = {c: [] for c in columns}
    for batch in table.search().select(columns).limit(table.count_rows()).to_batches(READ_BATCH):
        for c in columns:
            parts[c].append(batch[c])
    return parts


def _label_clusters(emb: np.ndarray, labels: list[str], seed: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Each feature's label cluster (-1: unlabelled) and the clusters (id, name = the member label
    nearest the centroid, size)."""
    n = len(emb)
    k = max(1, min(MAX_CLUSTERS, round(np.sqrt(n / 8))))
    centroids = label_clusters(emb, k=k, seed=seed)
    similarity = emb @ centroids.T if len(centroids) else np.zeros((n, 0), np.float32)
    cluster = np.where(_labelled(emb), similarity.argmax(1) if len(centroids) else -1, -1)
    clusters = []
    for j in range(len(centroids)):
        members = np.flatnonzero(cluster == j)
        if len(members):
            clusters.append({"id": j, "name": labels[members[similarity[members, j].argmax()]], "size": int(len(members))})
    return cluster, clusters


@dataclass
class MapData:
    """Everything the map shows, in feature-id order."""

    feature_id: np.ndarray  # int64
    xy: np.ndarray  # [n, 2] float64
    density: np.ndarray  # float64
    label: list[str]
    cluster: np.ndarray  # label cluster, -1: unlabelled
    clusters: list[dict[str, Any]]  # id, name, size
    regions: list[dict[str, Any]]  # ``map_regions``
    layout: str  # what placed the points: ``function`` or ``decoder`` (ingest/feature_map.py; older atlases: decoder)


def map_data(atlas: Atlas, *, seed: int = 0) -> MapData:
    parts = _read(atlas, ["feature_id", "map_x", "map_y", "density", "label", "label_embedding"])
    # In feature-id order: a re-label rewrites rows, and LanceDB need not keep them in place.
    order = np.argsort(np.concatenate([a.to_numpy() for a in parts["feature_id"]]), kind="stable")
    emb = np.concatenate([vector_matrix(a) for a in parts["label_embedding"]])[order]
    labels = [s for a in parts["label"] for s in a.to_pylist()]
    labels = [labels[i] for i in order]
    cluster, clusters = _label_clusters(emb, labels, seed)
    column = lambda c: np.concatenate([a.to_numpy() for a in parts[c]])[order].astype(np.float64)  # noqa: E731
    xy = np.stack([column("map_x"), column("map_y")], 1)
    ids = column("feature_id").astype(np.int64)
    return MapData(ids, xy, column("density"), labels, cluster, clusters,
                   map_regions(xy, labels, feature_sources(atlas, ids), seed=seed),
                   atlas.manifest.get("config", {}).get("map", {}).get("map_layout", "decoder"))


def map_json(data: MapData) -> bytes:
    """The whole map as one JSON document of parallel arrays (``/api/map``: compact enough for 100k
    points; the browser reads ``map_levels``): ``feature_id``, ``x``, ``y``, ``density``,
    ``label``, ``cluster``, ``clusters``, ``regions`` and ``layout`` (see ``MapData``)."""
    doc: dict[str, Any] = {
        "n": len(data.feature_id),
        "feature_id": data.feature_id.tolist(),
        # float64 before rounding: a rounded float32 prints as 0.12340000271797180 in JSON.
        "x": np.round(data.xy[:, 0], 4).tolist(),
        "y": np.round(data.xy[:, 1], 4).tolist(),
        "density": np.round(data.density, 7).tolist(),
        "label": data.label,
        "cluster": data.cluster.tolist(),
        "clusters": data.clusters,
        "regions": data.regions,
        "layout": data.layout,
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def map_levels(data: MapData, *, seed: int = 0) -> tuple[dict[str, Any], list[bytes]]:
    """The map for the browser at any size: a small JSON head (``n``, ``clusters``, ``regions``,
    ``layout``, ``levels``: the points in each level, ``columns``: the name and type of each array)
    and the points as binary levels of detail. Points go in a seeded random order, cut into
    ``LOD_FIRST`` points and then four times as many per level, so every level is a uniform sample
    of the map: the browser draws the first at once and adds the rest as they arrive. A level is
    its columns' little-endian arrays one after another (20 bytes a point; labels stay out, the
    tooltip asks for a feature's own). At a million features: 20 MB in three levels (65,536, 262,144
    and the other 720,896 points), against ~55 MB
    of JSON to parse before anything shows."""
    n = len(data.feature_id)
    order = np.random.default_rng(seed).permutation(n)
    cuts = [0]
    while cuts[-1] < n:
        cuts.append(min(n, cuts[-1] + LOD_FIRST * 4 ** (len(cuts) - 1)))
    columns = {"feature_id": data.feature_id.astype("<i4"), "x": data.xy[:, 0].astype("<f4"),
               "y": data.xy[:, 1].astype("<f4"), "density": data.density.astype("<f4"), "cluster": data.cluster.astype("<i4")}
    levels = [b"".join(c[order[a:b]].tobytes() for c in columns.values()) for a, b in zip(cuts, cuts[1:])]
    head = {"n": n, "clusters": data.clusters, "regions": data.regions, "layout": data.layout,
            "levels": [b - a for a, b in zip(cuts, cuts[1:])],
            "columns": [[name, "int32" if c.dtype.kind == "i" else "float32"] for name, c in columns.items()]}
    return head, levels
