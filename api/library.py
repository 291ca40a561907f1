"""The atlas as a Python library: ``fa.open(path)`` and the queries of the HTTP API as methods.

Every method calls the code behind the HTTP routes and the CLI (``api.service``, ``store.sql``), with
the same checks and limits, so the three give the same answer to the same question. A result keeps
that answer as the API's JSON (``Result.data``) and adds what a notebook wants: its rows as an Arrow
table (``to_arrow``, with ``to_pandas`` and ``to_polars`` one call away, neither required) and an
HTML display (``api.notebook``).
"""

from __future__ import annotations

import json
import os
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from featureatlas.ingest.steer import Edit
from featureatlas.store.atlas import Atlas
from featureatlas.store.errors import BadParameter
from featureatlas.store.location import readable
from featureatlas.store.schema import DICTIONARIES, EXAMPLES, FEATURES
from featureatlas.store.sql import MAX_RETURNED_ROWS, execute_sql, fetch_all

from . import notebook
from .service import CONTRAST_KEYS, NEIGHBOR_KEYS, AtlasService

if TYPE_CHECKING:
    from featureatlas.ingest.model import SubjectModel
    from featureatlas.ingest.sae import SAE


class Result:
    """One query's answer. ``data`` is exactly the HTTP API's JSON for the same query; ``rows`` its
    list of records (hits, neighbours, features, tokens, SQL rows), which ``len``, iteration and
    ``to_arrow`` see; ``result["key"]`` reads ``data``."""

    def __init__(self, data: dict[str, Any], rows: list[dict[str, Any]] | Callable[[], list[dict[str, Any]]],
                 html: Callable[[], str], *, columns: Sequence[str] = (), arrow: Callable[[], pa.Table] | None = None):
        self.data = data
        self._rows = rows  # a whole SQL result builds its dicts only when asked: its Arrow table is the answer
        self._html = html
        self._columns = columns  # of an empty answer, which has no row to name them
        self._arrow = arrow

    @property
    def rows(self) -> list[dict[str, Any]]:
        if callable(self._rows):
            self._rows = self._rows()
        return self._rows

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def __len__(self) -> int:
        if callable(self._rows) and self._arrow is not None:  # a whole SQL result: counted without its dicts
            return self._arrow().num_rows
        return len(self.rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def to_arrow(self) -> pa.Table:
        """The rows as an Arrow table (nested values stay nested: lists and structs)."""
        if self._arrow is not None:
            return self._arrow()
        if not self.rows:
            return pa.table({c: pa.array([], pa.null()) for c in self._columns})
        return pa.Table.from_pylist(self.rows)

    def to_pandas(self):
        """The rows as a pandas DataFrame (needs pandas)."""
        return self.to_arrow().to_pandas()

    def to_polars(self):
        """The rows as a polars DataFrame (needs polars)."""
        import polars

        return polars.from_arrow(self.to_arrow())

    def _repr_html_(self) -> str:
        return self._html()

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {len(self)} rows; keys {', '.join(self.data)}>"


class OpenAtlas:
    """An atlas opened for reading (``fa.open``). Nothing here writes to it.

    The model loads on first use of ``activations``, ``contrast``, ``steer``, ``model`` or a search
    that includes the inference signal; the dictionary loads alone on first use of ``dictionary``.
    """

    def __init__(self, atlas: Atlas, *, device: str | None = None):
        self._atlas = atlas
        self._service = AtlasService(atlas, probe_device=device)
        # A notebook keeps every displayed atlas alive in its output history: the SQL workers of one
        # opened again stop when it is collected, not with the kernel.
        self._closer = weakref.finalize(self, atlas.close)

    @property
    def path(self) -> Path:
        """The atlas folder, as opened."""
        return self._atlas.root

    @property
    def info(self) -> dict[str, Any]:
        """What was mapped and how well (the HTTP API's ``/api/atlas``)."""
        return self._service.info()

    @property
    def dictionaries(self) -> Result:
        """Every dictionary of the atlas (the HTTP API's ``/api/dictionaries``): one row each with
        its id (``L15-4k``), hook point, architecture, width, k and held-out metrics, the default first."""
        data = self._service.dictionaries()
        return Result(data, data["dictionaries"], lambda: _table(data["dictionaries"], "dictionaries"),
                      columns=DICTIONARIES.names)

    @property
    def d_sae(self) -> int:
        """How many features the dictionary has (ids run 0..d_sae-1)."""
        return self._atlas.d_sae

    def search(self, q: str, k: int = 10, mode: str | None = None, dictionary: str | None = None) -> Result:
        """Features about ``q`` (a concept in plain words), best first; ``mode`` restricts the
        search to one signal of ``store.search.SEARCH_MODES``, ``dictionary`` to one dictionary's
        features (``dictionaries()``). ``result["confident"]`` says whether a hit is clearly about it."""
        data = self._service.search(q, k, mode, dictionary)
        return Result(data, data["hits"], lambda: notebook.search_html(data))

    def neighbors(self, feature_id: int, k: int = 10, by: str = "decoder", dictionary: str | None = None) -> Result:
        """The ``k`` features nearest to one: by decoder direction (cosine) or by co-activation; in
        every dictionary or in one."""
        data = self._service.neighbors(feature_id, k, by, dictionary)
        return Result(data, data["neighbors"], lambda: _table(data["neighbors"], f"neighbours of #{feature_id} by {by}"),
                      columns=NEIGHBOR_KEYS)

    def feature(self, feature: int | str, index: int | None = None) -> Result:
        """One feature: label, description, scores, statistics, histogram and examples; its rows are
        the examples (top ones first, then the quantile ones). ``atlas.feature(812)`` by its id in
        the atlas; ``atlas.feature("L15-16k", 812)`` by its index within one dictionary (the id
        ``first_feature + 812``)."""
        if not isinstance(feature, str) and index is not None:
            raise BadParameter("index", f"an index is within a dictionary: atlas.feature('L15-16k', {index})")
        if isinstance(feature, str):
            if index is None:
                raise BadParameter("index", f"give the feature's index within {feature!r}: atlas.feature({feature!r}, 812)")
            feature = self._service.feature_id(feature, index)
        data = self._service.feature(feature)
        return Result(data, data["top_examples"] + data["quantile_examples"], lambda: notebook.feature_html(data),
                      columns=EXAMPLES.names)

    def features(self, sort: str = "density", descending: bool = True, limit: int = 50, offset: int = 0) -> Result:
        """A page of the feature list, sorted by one of ``store.atlas.SORTABLE``."""
        data = self._service.features(sort, descending, limit, offset)
        return Result(data, data["features"], lambda: _table(data["features"], f"features by {sort}"),
                      columns=FEATURES.sql_names)

    def activations(self, text: str, k: int = 5) -> Result:
        """Each token of ``text`` with its ``k`` strongest features (runs the model); ``relative`` is
        the activation over the feature's maximum in the corpus."""
        data = self._service.activations(text, k)
        rows = [{"position": i, **t} for i, t in enumerate(data["tokens"])]
        return Result(data, rows, lambda: notebook.activations_html(data))

    def contrast(self, positive: Sequence[str], negative: Sequence[str] = (), k: int = 10) -> Result:
        """Features that fire on every ``positive`` prompt and on none of the ``negative`` ones."""
        data = self._service.contrast(positive, negative, k)
        return Result(data, data["hits"], lambda: _table(data["hits"], "contrast"), columns=CONTRAST_KEYS)

    def steer(self, prompt: str, features: Mapping[int, float | tuple[float, str]], *, mode: str = "clamp",
              max_new_tokens: int = 32, temperature: float = 0.0, seed: int = 0, chat: bool = False,
              generated_only: bool = False) -> Result:
        """The prompt continued twice: untouched, and with ``features`` changed. Each value is in
        units of the feature's corpus maximum (``{812: 2}`` clamps 812 at twice it; 0 switches it
        off); ``(value, "add")`` pushes along the decoder direction instead of ``mode``."""
        if not isinstance(features, Mapping):
            raise BadParameter("features", "give a mapping of feature id to value, e.g. {812: 2}")
        edits = [Edit(f, *(v if isinstance(v, tuple) and len(v) == 2 else (v, mode))) for f, v in features.items()]
        data = self._service.steer(prompt, edits, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                   chat=chat, generated_only=generated_only)
        rows = [{"run": run, **data[run]} for run in ("default", "steered")]
        return Result(data, rows, lambda: notebook.steer_html(data))

    def sql(self, query: str, params: list[Any] | dict[str, Any] | None = None, *,
            limit: int | None = MAX_RETURNED_ROWS) -> Result:
        """A read-only SQL statement over the analytics database (``store.schema`` lists its tables).
        ``params`` are JSON values, as over HTTP. Rows iterate as dicts by column name.

        By default under the server's limits: one SELECT, 2 s, ``limit`` rows (1,000; ``truncated``
        says so), 8 MiB; ``to_arrow`` keeps every column, duplicate names included, with types read
        from the values. ``limit=None`` is the whole result, run in this process without the
        server's limits (still one read-only statement): ``to_arrow`` is DuckDB's own Arrow table,
        with its types, and ``data`` holds ``columns``, ``row_count`` and ``elapsed_ms`` (no ``rows``:
        a notebook asking for millions of rows wants them as Arrow, not as JSON lists)."""
        if not self._closer.alive:
            raise ValueError("this atlas was closed; open it again with fa.open")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise BadParameter("limit", f"must be a positive integer or None (the whole result), got {limit!r}")
        try:
            params = None if params is None else json.loads(json.dumps(params, allow_nan=False))
        except (TypeError, ValueError):
            raise BadParameter("params", "must be JSON values (numbers, strings, booleans, None, lists of them)") from None
        if limit is None:
            return _whole(self._atlas, query, params)
        data = execute_sql(self._atlas, query, params, max_rows=limit).to_dict()
        columns, values = data["columns"], data["rows"]
        return Result(data, [dict(zip(columns, r)) for r in values],
                      lambda: notebook.table_html(columns, values, caption=_sql_caption(data)),
                      arrow=lambda: _by_position(columns, values))

    @property
    def dictionary(self) -> SAE:
        """The dictionary as a torch module (``encode``, ``decode``, ``activations``, ``W_enc``,
        ``W_dec``), loaded on first use on the CPU. The model, once loaded, shares this copy: on a
        GPU atlas that moves it to the model's device."""
        return self._service.probe.dictionary()

    @property
    def model(self) -> SubjectModel:
        """The subject model (``.model`` the transformers module, ``.tokenizer``), loaded on first use."""
        return self._service.probe.load()[0]

    def close(self) -> None:
        """Stop the SQL worker processes (they also stop when this object is collected, or with the
        interpreter). The other queries still work; ``sql`` does not."""
        self._closer()

    def __enter__(self) -> OpenAtlas:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<featureatlas atlas {str(self.path)!r}: {self.d_sae:,} features>"

    def _repr_html_(self) -> str:
        return notebook.table_html(["", ""], [[k, v] for k, v in _summary(self.info).items()], caption=str(self.path))


def open(path: str | os.PathLike[str], *, device: str | None = None) -> OpenAtlas:  # noqa: A001 (fa.open reads best)
    """Open the atlas at ``path`` (a folder, a ``file://`` URI, or an ``s3://`` URI, read through a
    local mirror: ``store/location.py``) for reading. ``device`` runs the
    model there for activations, contrast, steering and search by inference (default: the one the
    atlas was built on)."""
    return OpenAtlas(Atlas(readable(path, flag="path")), device=device)


def _whole(atlas: Atlas, query: str, params: list[Any] | dict[str, Any] | None) -> Result:
    """``sql(limit=None)``: the whole result as DuckDB's Arrow table; rows and HTML read from it when asked."""
    t0 = time.perf_counter()
    table = fetch_all(atlas, query, params)
    data = {"columns": table.column_names, "row_count": table.num_rows, "truncated": False,
            "elapsed_ms": round((time.perf_counter() - t0) * 1000, 2)}

    def rows() -> list[dict[str, Any]]:  # by position, so a duplicate name keeps its last column as HTTP does
        return [dict(zip(table.column_names, r)) for r in _tuples(table)]

    def html() -> str:
        shown = [list(r) for r in _tuples(table.slice(0, notebook.MAX_ROWS))]
        first = f", the first {len(shown)} shown" if table.num_rows > len(shown) else ""
        return notebook.table_html(table.column_names, shown,
                                   caption=f"{table.num_rows:,} rows in {data['elapsed_ms']:.0f} ms{first}")

    return Result(data, rows, html, columns=table.column_names, arrow=lambda: table)


def _tuples(table: pa.Table) -> Iterator[tuple]:
    """A table's rows as tuples, column by position (``to_pylist`` would merge duplicate names)."""
    return zip(*(c.to_pylist() for c in table.columns))


def _by_position(columns: list[str], rows: list[list[Any]]) -> pa.Table:
    """Columns built by position, so two of the same name (a self-join) both survive."""
    arrays = [pa.array(list(c)) for c in zip(*rows)] if rows else [pa.array([], pa.null()) for _ in columns]
    return pa.Table.from_arrays(arrays, names=columns)


def _table(rows: list[dict[str, Any]], caption: str) -> str:
    columns = list(rows[0]) if rows else []
    return notebook.table_html(columns, [[r[c] for c in columns] for r in rows], caption=caption)


def _sql_caption(data: dict[str, Any]) -> str:
    more = " (truncated at the row limit)" if data["truncated"] else ""
    return f"{len(data['rows']):,} rows in {data['elapsed_ms']:.0f} ms{more}"


def _summary(info: dict[str, Any]) -> dict[str, Any]:
    """The few facts a person reads first, flattened for a two-column table."""
    model, hook, dictionary = info.get("model") or {}, info.get("hook") or {}, info.get("dictionary") or {}
    metrics = info.get("metrics") or {}
    return {"model": model.get("name"), "layer": hook.get("layer"), "dictionary": dictionary.get("architecture"),
            "features": dictionary.get("d_sae"), "k": dictionary.get("k"),
            "variance explained": metrics.get("variance_explained"), "created": info.get("created_at")}
