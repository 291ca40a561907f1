"""The one way to open an atlas: paths, manifest, and read-only handles on both databases."""

from __future__ import annotations

import json
import os
import tempfile
from functools import cached_property
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
DICTIONARY = "dictionary"
LANCE = "lance"
DUCKDB = "analytics.duckdb"
CACHE = "cache"
# The published parts, swapped in together by ``store.publish``; the manifest goes last.
PUBLISHED = (DICTIONARY, LANCE, DUCKDB)


QUERY_MEMORY_LIMIT = "2GB"
# Columns a feature list may be sorted by (they are interpolated into SQL, so this list is the guard).
SORTABLE = ("density", "max_activation", "mean_activation", "label_score", "n_active", "feature_id")


class AtlasNotFound(FileNotFoundError):
    pass


def write_json_atomic(path: Path, data: Any) -> None:
    """Write to a temporary name in the same folder, then rename: readers see old or new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the manifest from other readers
    os.replace(tmp, path)


class Atlas:
    """A published atlas folder. Opening never writes; a folder without a manifest is no atlas."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not (self.root / MANIFEST).is_file():
            raise AtlasNotFound(f"{self.root} is not a finished atlas (no {MANIFEST}); run `featureatlas ingest` first")
        self.manifest: dict[str, Any] = json.loads((self.root / MANIFEST).read_text())

    @property
    def dictionary_dir(self) -> Path:
        return self.root / DICTIONARY

    @property
    def d_sae(self) -> int:
        return int(self.manifest["dictionary"]["d_sae"])

    @cached_property
    def lance(self):
        import lancedb

        return lancedb.connect(str(self.root / LANCE))

    @cached_property
    def features(self):
        return self.lance.open_table("features")

    @cached_property
    def examples(self):
        return self.lance.open_table("examples")

    @cached_property
    def _con(self):
        return self.duckdb()

    def duckdb_cursor(self):
        """A cursor on the shared read-only connection: one per request or thread."""
        return self._con.cursor()

    def list_features(self, *, sort: str = "density", descending: bool = True, limit: int = 50, offset: int = 0) -> list[dict]:
        """A page of features (scalar columns only), from DuckDB's copy of the feature table."""
        if sort not in SORTABLE:
            raise ValueError(f"sort must be one of {', '.join(SORTABLE)}")
        order = "desc" if descending else "asc"
        rows = self.duckdb_cursor().execute(
            f"select * from features order by {sort} {order} nulls last, feature_id limit ? offset ?", [limit, offset]
        )
        names = [d[0] for d in rows.description]
        return [dict(zip(names, r)) for r in rows.fetchall()]

    def feature_row(self, feature_id: int, columns: list[str]) -> dict | None:
        """``columns`` of one feature's LanceDB row. Features are published in id order, so the id
        is the row offset: a direct take is about twice as fast as an indexed filter at 100k rows;
        the id check keeps a table written in another order correct."""
        fid = int(feature_id)
        if 0 <= fid < self.d_sae:
            rows = self.features.take_offsets([fid]).select(["feature_id", *columns]).to_list()
            if rows and rows[0]["feature_id"] == fid:
                return rows[0]
        rows = self.features.search().where(f"feature_id = {fid}").select(["feature_id", *columns]).limit(1).to_list()
        return rows[0] if rows else None

    @cached_property
    def decoders(self):
        """[d_sae, d_in] float32 unit decoder directions in feature-id order, read once (for exact
        neighbour search on atlases too small to have a vector index)."""
        import numpy as np

        table = self.features.search().select(["feature_id", "decoder"]).limit(self.d_sae).to_arrow()
        rows = table["decoder"].combine_chunks()
        matrix = rows.flatten().to_numpy().reshape(len(rows), -1)
        out = np.empty_like(matrix)
        out[table["feature_id"].to_numpy()] = matrix
        return out

    def feature(self, feature_id: int) -> dict | None:
        """One feature row without its decoder and embeddings (they are for search, not reading)."""
        columns = [c for c in self.features.schema.names if c not in ("feature_id", "decoder") and not c.endswith("_embedding")]
        return self.feature_row(feature_id, columns)

    def feature_examples(self, feature_id: int) -> list[dict]:
        rows = self.examples.search().where(f"feature_id = {int(feature_id)}").limit(10_000).to_list()
        rows.sort(key=lambda r: (r["kind"] != "top", -r["max_activation"]))
        return rows

    def duckdb(self):
        """A new read-only connection that cannot reach files, the network or extensions, and whose
        configuration cannot be changed afterwards: the engine, not string checks, keeps SQL safe."""
        import duckdb

        return duckdb.connect(
            str(self.root / DUCKDB),
            read_only=True,
            # memory_limit: one query must not take the server's memory with it.
            config={"enable_external_access": False, "lock_configuration": True, "memory_limit": QUERY_MEMORY_LIMIT},
        )


def summarize(manifest: dict[str, Any]) -> str:
    """The few lines a person reads first: what was mapped and how well."""
    m = manifest.get("metrics", {})
    lines = [
        f"atlas: {manifest['model']['name']} layer {manifest['hook']['layer']} "
        f"({manifest['hook']['name']}), {manifest['dictionary']['architecture']} d_sae={manifest['dictionary']['d_sae']} "
        f"k={manifest['dictionary']['k']}",
        f"tokens: {manifest['tokens']['harvested']:,} harvested, {manifest['tokens']['train']:,} train, "
        f"{manifest['tokens']['eval']:,} held out",
        "held-out metrics: " + ", ".join(
            f"{k}={m[k]:.4g}"
            for k in ("l0", "variance_explained", "variance_explained_without_outliers", "dead_fraction",
                      "loss_recovered", "ce_clean", "ce_sae", "ce_zero")
            if k in m
        ),
    ]
    labels = manifest.get("labels")
    if labels and labels.get("label_score_mean") is not None:
        lines.append(f"labels: {labels['explainer']}, mean {labels['scorers'][0]} score {labels['label_score_mean']:.3f} on "
                     f"held-out windows ({labels['scored']:,} of {labels['labelled']:,} features scored)")
    return "\n".join(lines)
