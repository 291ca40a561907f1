"""Read-only SQL over an atlas's analytics database, the way Datasette does it.

The engine is the guard: the connection is read-only, cannot reach files, the network or
extensions, and its configuration is locked (``Atlas._con``). On top of that, the text must parse
to exactly one SELECT-like statement, and it runs through ``Atlas.query`` like every internal
query, with a shorter time limit; results stop at a row limit with ``truncated`` set.
"""

from __future__ import annotations

import datetime as dt
import decimal
import uuid
from dataclasses import dataclass
from typing import Any

import duckdb

from .atlas import Atlas, QueryInterrupted
from .errors import QueryRefused

SQL_TIME_LIMIT_MS = 2000
MAX_RETURNED_ROWS = 1000
MAX_SQL_CHARS = 20_000
# Statement types that only read.
_READ_ONLY = {"SELECT", "EXPLAIN"}
# What a query can do wrong as written (a missing column, a bad cast, reading a file, too much
# memory): a refusal. Anything else (a damaged file, an internal error) is ours: a 500.
_USER_ERRORS = (duckdb.ProgrammingError, duckdb.DataError, duckdb.NotSupportedError, duckdb.OutOfMemoryException,
                duckdb.PermissionException, duckdb.IntegrityError)


@dataclass
class SQLResult:
    columns: list[str]
    rows: list[list[Any]]
    truncated: bool
    elapsed_ms: float

    def to_dict(self) -> dict[str, Any]:
        return {"columns": self.columns, "rows": self.rows, "truncated": self.truncated, "elapsed_ms": self.elapsed_ms}


def execute_sql(
    atlas: Atlas,
    sql: str,
    params: list[Any] | dict[str, Any] | None = None,
    *,
    time_limit_ms: int = SQL_TIME_LIMIT_MS,
    max_rows: int = MAX_RETURNED_ROWS,
) -> SQLResult:
    if not sql or not sql.strip():
        raise QueryRefused("empty query")
    if len(sql) > MAX_SQL_CHARS:
        raise QueryRefused(f"query longer than {MAX_SQL_CHARS} characters")
    try:
        kinds = atlas.statements(sql)
    except duckdb.Error as e:
        raise QueryRefused(f"syntax error: {_first_line(e)}") from None
    if len(kinds) != 1:
        raise QueryRefused(f"exactly one statement is allowed, got {len(kinds)}")
    if kinds[0] not in _READ_ONLY:
        raise QueryRefused(f"only read-only queries (SELECT) are allowed, got {kinds[0]}")
    try:
        result = atlas.query(sql, params, time_limit_ms=time_limit_ms, row_limit=max_rows)
    except QueryInterrupted:
        raise QueryRefused(f"query interrupted: it ran longer than the {time_limit_ms} ms limit") from None
    except _USER_ERRORS as e:
        raise QueryRefused(_first_line(e)) from None
    rows = [[_json_safe(v) for v in r] for r in result.rows]
    return SQLResult(result.columns, rows, result.truncated, result.elapsed_ms)


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _json_safe(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, decimal.Decimal):
        return float(v)
    if isinstance(v, (dt.date, dt.datetime, dt.time, dt.timedelta, uuid.UUID)):
        return str(v)
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v).hex()
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    return str(v)
