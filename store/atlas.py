"""The one way to open an atlas: its manifest, the two databases at the versions the manifest
names, and the one query path every internal DuckDB read goes through (``Atlas.query``: time and
row limited, so no route can run unbounded). User SQL runs in worker processes instead
(``Atlas.sql_workers``, ``store.sql``)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import duckdb

from . import manifest as M
from .errors import BadParameter, DamagedAtlas, NotFound
from .schema import ANN_MIN_ROWS, vector_matrix
from .sql_worker import SQLWorkers, locked_config

QUERY_MEMORY_LIMIT = "2GB"
# Internal queries (feature pages, neighbours, browsing) get this long; user SQL has its own,
# shorter limit (``store.sql``). A query past it is interrupted, never left running.
INTERNAL_TIME_LIMIT_MS = 10_000
# Columns a feature list may be sorted by (they are interpolated into SQL, so this list is the guard).
SORTABLE = ("density", "max_activation", "mean_activation", "label_score", "n_active", "feature_id")
_SCALAR = ["feature_id", "label", "description", "density", "max_activation"]
HELD_EXAMPLES = 250_000  # at most this many examples (~95 MB at the quick atlas's 64 tokens) are held in memory


class AtlasNotFound(NotFound):
    def __init__(self, message: str):
        super().__init__("--atlas", message)


class QueryInterrupted(Exception):
    """A query ran past its time limit. Not necessarily the user's fault (an internal query on a
    huge atlas): user SQL turns it into a refusal, the API into a 503."""


@dataclass
class QueryResult:
    columns: list[str]
    rows: list[tuple]
    elapsed_ms: float

    def dicts(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, r)) for r in self.rows]


class Atlas:
    """A published atlas folder. Opening never writes; a folder without a manifest is no atlas."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        manifest = M.read(self.root)
        if manifest is None:
            raise AtlasNotFound(f"{self.root} is not a finished atlas (no {M.MANIFEST}); run `featureatlas ingest` first")
        self.manifest: dict[str, Any] = manifest
        # Where the published parts are: the folder the manifest names, read once, so that every
        # read of this object comes from the same publish however the atlas changes meanwhile.
        self.base = self.root / M.folder(manifest)
        self._check_parts()
        self._vectors: dict[tuple[str, int | None], Any] = {}
        self._vectors_lock = threading.Lock()
        self._workers_lock = threading.Lock()
        self._sql_workers: SQLWorkers | None = None
        self._workers_closed = False
        # A small atlas's readable feature rows and examples, once a server holds them (``hold_pages``).
        self._held_features: Any = None
        self._held_examples: Any = None

    def _check_parts(self) -> None:
        """Every part the manifest names is there (a deleted or half-copied atlas says so at once,
        naming the file, rather than failing on some later query)."""
        parts = [self.duckdb_path, self.dictionary_dir / M.DICTIONARY_CFG, self.dictionary_dir / M.DICTIONARY_WEIGHTS,
                 *(self.base / M.LANCE / f"{t}.lance" for t in ("features", "examples"))]
        for path in parts:
            if not path.exists():
                raise DamagedAtlas(path, f"is missing; re-run `featureatlas ingest --atlas {self.root}` to publish "
                                         "the atlas again (finished stages are reused)")

    @property
    def dictionary_dir(self) -> Path:
        return self.base / M.DICTIONARY

    @property
    def d_sae(self) -> int:
        return int(self.manifest["dictionary"]["d_sae"])

    @cached_property
    def _lance(self):
        import lancedb

        return lancedb.connect(str(self.base / M.LANCE))

    def has_table(self, name: str) -> bool:
        """Whether the LanceDB side holds ``name`` (atlases published by older versions lack some)."""
        return name in self._lance.list_tables().tables

    def _table(self, name: str):
        table = self._lance.open_table(name)
        version = M.lance_version(self.manifest, name)
        if version is not None:
            table.checkout(version)  # a re-label in progress writes newer versions; readers stay here
        return table

    @cached_property
    def features(self):
        """The LanceDB features table (vectors and full text): for ``store.search``."""
        return self._table("features")

    @cached_property
    def examples(self):
        return self._table("examples")

    @cached_property
    def windows(self):
        """Every corpus window with its embedding (``store.schema.WINDOWS``): for corpus search."""
        return self._table("windows")

    @cached_property
    def _con(self):
        """A read-only connection that cannot reach files, the network or extensions, and whose
        configuration cannot be changed afterwards: the engine, not string checks, keeps SQL safe."""
        try:
            # memory_limit: one query must not take the server's memory with it.
            return duckdb.connect(str(self.duckdb_path), read_only=True, config=locked_config(QUERY_MEMORY_LIMIT))
        except duckdb.Error as e:
            raise DamagedAtlas(self.duckdb_path, f"cannot be opened ({str(e).splitlines()[0]}); re-run `featureatlas "
                                                 f"ingest --atlas {self.root}` to publish the atlas again") from None

    @property
    def duckdb_path(self) -> Path:
        return self.base / M.duckdb_file(self.manifest)

    @property
    def sql_workers(self) -> SQLWorkers:
        """The worker processes that run user SQL (``store.sql``), started on first use (once,
        however many requests ask at the same time)."""
        with self._workers_lock:
            if self._workers_closed:  # a request that began on an atlas the server has since replaced
                raise QueryInterrupted("the atlas was republished while this query waited; ask again")
            if self._sql_workers is None:
                self._sql_workers = SQLWorkers(self.duckdb_path)
            return self._sql_workers

    def close(self) -> None:
        """Stop the SQL workers, if any started. The databases close with the object."""
        with self._workers_lock:
            self._workers_closed = True
            if self._sql_workers is not None:
                self._sql_workers.close()
                self._sql_workers = None

    def open_all(self) -> None:
        """Open both databases and every table now (a server's first request would pay ~1-4 s), and
        load every LanceDB index into LanceDB's cache: left to the queries, the first few hundred
        at a million features each loaded the index partitions they touched (neighbours p99 76 ms
        over the first 200 against 24 ms after, max 148 ms); loading them all took 2.6 s."""
        for table in (self.features, self.examples, self.windows):
            table.count_rows()
            for index in table.list_indices():
                table.prewarm_index(index.name)
        self.query("select count(*) from features")

    def hold_pages(self) -> None:
        """Hold what a feature page reads in memory, where the atlas is small (exact vector search,
        at most ``HELD_EXAMPLES`` examples) and its tables are in id order: two LanceDB reads a page
        were ~10 ms idle, and their tail under load (CPU shared with search and SQL) missed 100 ms.
        44 MB at 4,096 features, read in ~2 s. A server calls this when it warms up; a one-off
        command reads per call."""
        if self.d_sae >= ANN_MIN_ROWS or self.examples.count_rows() > HELD_EXAMPLES or self._example_starts is None:
            return
        features = self.features.search().select(["feature_id", *self._readable_columns]).limit(self.d_sae).to_arrow()
        examples = self.examples.search().limit(self.examples.count_rows()).to_arrow()
        if features["feature_id"].to_pylist() != list(range(self.d_sae)):
            return  # written in another order: rows are found by id per call
        self._held_features, self._held_examples = features, examples

    def query(self, sql: str, params: list[Any] | dict[str, Any] | None = None, *,
              time_limit_ms: int = INTERNAL_TIME_LIMIT_MS) -> QueryResult:
        """Every internal DuckDB read of the atlas goes through here, on its own cursor: a timer
        interrupts it after ``time_limit_ms`` (``QueryInterrupted``)."""
        cur = self._con.cursor()
        timer = threading.Timer(time_limit_ms / 1000, cur.interrupt)
        t0 = time.perf_counter()
        timer.start()
        try:
            cur.execute(sql, params) if params else cur.execute(sql)
            columns = [d[0] for d in cur.description or []]
            rows = cur.fetchall()
        except duckdb.InterruptException:
            raise QueryInterrupted(f"the query ran longer than the {time_limit_ms} ms limit") from None
        finally:
            timer.cancel()
            cur.close()
        return QueryResult(columns, rows, round((time.perf_counter() - t0) * 1000, 2))

    def batch_connection(self) -> duckdb.DuckDBPyConnection:
        """A new connection on the same read-only database, for batch work that registers its own
        views and runs for minutes (re-labelling), never for a request. One process cannot open a
        file twice with different configurations, so batch work shares this one."""
        return self._con.cursor()

    @cached_property
    def duckdb_tables(self) -> frozenset[str]:
        """The tables of the analytics database (atlases of older versions lack the newer ones)."""
        return frozenset(r[0] for r in self.query("select table_name from information_schema.tables").rows)

    def statements(self, sql: str) -> list[str]:
        """The statement types ``sql`` parses into (user SQL is checked with this before it runs)."""
        cur = self._con.cursor()
        try:
            return [s.type.name for s in cur.extract_statements(sql)]
        finally:
            cur.close()

    def list_features(self, *, sort: str = "density", descending: bool = True, limit: int = 50, offset: int = 0) -> list[dict]:
        """A page of features (scalar columns only), from DuckDB's copy of the feature table."""
        if sort not in SORTABLE:
            raise BadParameter("sort", f"must be one of {', '.join(SORTABLE)}, got {sort!r}")
        order = "desc" if descending else "asc"
        return self.query(f"select * from features order by {sort} {order} nulls last, feature_id limit ? offset ?",
                          [limit, offset]).dicts()

    def summaries(self, ids: list[int]) -> dict[int, dict[str, Any]]:
        """Label, description, density and maximum activation of each of ``ids``."""
        if not ids:
            return {}
        held = self._held_summaries
        if held is not None:
            return {int(i): dict(held[int(i)]) for i in ids if int(i) in held}  # copies: callers may change them
        rows = self.query(f"select {', '.join(_SCALAR)} from features where feature_id in (select unnest($ids))",
                          {"ids": [int(i) for i in ids]}).dicts()
        return {r.pop("feature_id"): r for r in rows}

    @cached_property
    def _held_summaries(self) -> dict[int, dict[str, Any]] | None:
        """Every feature's summary, read once, on atlases small enough for exact vector search (whose
        matrices are held in memory too): a search asks for summaries twice, and DuckDB's ~4 ms a read
        was a sixth of a single-signal search on the quick atlas. None on bigger atlases (asked per call)."""
        if self.d_sae >= ANN_MIN_ROWS:
            return None
        rows = self.query(f"select {', '.join(_SCALAR)} from features").dicts()
        return {r.pop("feature_id"): r for r in rows}

    def _rows_by_id(self, ids: list[int], columns: list[str]):
        """``feature_id`` and ``columns`` of the LanceDB rows of ``ids``. Features are published in
        id order, so an id is its row offset: a direct take, in the order asked, is about twice as
        fast as an indexed filter. LanceDB answers a take in offset order, so the offsets are asked
        sorted and the rows put back in the order asked (asked unsorted, every search's take fell
        through to the filter: ~9 ms instead of ~5 at 100k features). The id check keeps a table
        written in another order correct: it is then filtered, and its rows come once each in table order."""
        cols = ["feature_id", *columns]
        if all(0 <= i < self.d_sae for i in ids):
            offsets = sorted(set(ids))
            table = self.features.take_offsets(offsets).select(cols).to_arrow()
            if table["feature_id"].to_pylist() == offsets:
                at = {f: i for i, f in enumerate(offsets)}
                return table.take([at[i] for i in ids])
        return self.features.search().where(f"feature_id in ({', '.join(map(str, ids))})").select(cols) \
            .limit(len(ids)).to_arrow()

    def feature_row(self, feature_id: int, columns: list[str]) -> dict | None:
        """``columns`` of one feature's LanceDB row (``_rows_by_id``; from memory where it is held)."""
        held = self._held_features
        if held is not None and set(columns) <= set(held.column_names):
            if not 0 <= int(feature_id) < self.d_sae:
                return None
            return held.slice(int(feature_id), 1).select(["feature_id", *columns]).to_pylist()[0]
        rows = self._rows_by_id([int(feature_id)], columns).to_pylist()
        return rows[0] if rows else None

    @cached_property
    def n_windows(self) -> int:
        """Windows of the corpus (``store.schema.WINDOW`` tokens each): corpus search's population."""
        return int(self.query("select count(*) from windows").rows[0][0])

    @cached_property
    def n_documents(self) -> int:
        return int(self.query("select count(*) from documents").rows[0][0])

    def vectors(self, column: str, *, sample: int | None = None):
        """[n, dim] float32 rows of one vector column (decoder, label_embedding,
        context_embedding), read once and kept: every feature in id order, or with ``sample`` a
        fixed random ``sample`` of them on bigger atlases (a query's null distribution in search).
        Exact search on atlases too small to have a vector index reads them whole."""
        import numpy as np

        key = (column, sample if sample is not None and sample < self.d_sae else None)
        with self._vectors_lock:
            if key not in self._vectors:
                if key[1] is None:
                    table = self.features.search().select(["feature_id", column]).limit(self.d_sae).to_arrow()
                else:
                    rows = np.sort(np.random.default_rng(0).choice(self.d_sae, key[1], replace=False))
                    table = self.features.take_offsets(rows.tolist()).select(["feature_id", column]).to_arrow()
                matrix = vector_matrix(table[column])
                out = matrix
                if key[1] is None:
                    out = np.empty_like(matrix)
                    out[table["feature_id"].to_numpy()] = matrix
                self._vectors[key] = out
            return self._vectors[key]

    def vectors_of(self, ids: list[int], column: str):
        """[len(ids), dim] float32 rows of one vector column for a few features (from memory when
        exact search holds the whole column there already)."""
        import numpy as np

        if not ids:
            return np.zeros((0, 0), np.float32)
        held = self._vectors.get((column, None))
        if held is not None:
            return held[[int(i) for i in ids]]
        table = self._rows_by_id([int(i) for i in ids], [column])
        matrix = vector_matrix(table[column])
        at = {int(f): i for i, f in enumerate(table["feature_id"].to_pylist())}
        return matrix[[at[int(i)] for i in ids]]

    @cached_property
    def _readable_columns(self) -> list[str]:
        """A feature row without its decoder and embeddings (they are for search, not reading)."""
        return [c for c in self.features.schema.names if c not in ("feature_id", "decoder") and not c.endswith("_embedding")]

    def feature(self, feature_id: int) -> dict | None:
        """One feature row without its decoder and embeddings."""
        return self.feature_row(feature_id, self._readable_columns)

    @cached_property
    def _example_starts(self):
        """Row offset of each feature's first example ([d_sae + 1]), read once: the encode stage
        writes examples by feature, its top examples first and strongest first, so a feature's
        examples are one run of rows and a direct take (~3 ms) instead of an indexed filter (~9 ms).
        None for a table written in another order (then filtered)."""
        import numpy as np

        ids = self.examples.search().select(["feature_id"]).limit(self.examples.count_rows()).to_arrow()
        ids = ids["feature_id"].to_numpy()
        if len(ids) > 1 and (np.diff(ids) < 0).any():
            return None
        return np.searchsorted(ids, np.arange(self.d_sae + 1))

    def feature_examples(self, feature_id: int) -> list[dict]:
        """Every example of one feature: top examples strongest first, then the quantile ones."""
        starts = self._example_starts
        if starts is not None:
            lo, hi = int(starts[feature_id]), int(starts[feature_id + 1])
            if self._held_examples is not None:
                rows = self._held_examples.slice(lo, hi - lo).to_pylist()
            else:
                rows = self.examples.take_offsets(list(range(lo, hi))).to_list() if hi > lo else []
        else:
            rows = self.examples.search().where(f"feature_id = {int(feature_id)}").limit(10_000).to_list()
        rows.sort(key=lambda r: (r["kind"] != "top", -r["max_activation"]))
        return rows

    def top_examples(self, ids: list[int]) -> dict[int, dict]:
        """The strongest top example of each of ``ids`` (tokens and activations)."""
        if not ids:
            return {}
        columns = ["feature_id", "kind", "tokens", "activations", "max_activation"]
        starts = self._example_starts
        if starts is not None:  # a feature's first example is its strongest top one, if it has any
            first = sorted({int(starts[f]) for f in ids if starts[f + 1] > starts[f]})
            if self._held_examples is not None:
                rows = self._held_examples.take(first).select(columns).to_pylist() if first else []
            else:
                rows = self.examples.take_offsets(first).select(columns).to_list() if first else []
            return {r["feature_id"]: r for r in rows if r["kind"] == "top"}
        where = f"kind = 'top' and feature_id in ({', '.join(str(int(i)) for i in ids)})"
        rows = self.examples.search().where(where).select(columns).limit(len(ids) * 100).to_list()
        best: dict[int, dict] = {}
        for r in rows:
            if r["feature_id"] not in best or r["max_activation"] > best[r["feature_id"]]["max_activation"]:
                best[r["feature_id"]] = r
        return best


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
        token = labels.get("token_score_mean")
        lines.append(f"labels: {labels['explainer']}, mean {labels['scorers'][0]} score {labels['label_score_mean']:.3f}"
                     + (f", token correlation {token:.3f}" if token is not None else "")
                     + f" on held-out windows ({labels['scored']:,} of {labels['labelled']:,} features scored)")
    return "\n".join(lines)
