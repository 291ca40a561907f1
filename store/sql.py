"""Read-only SQL over an atlas's analytics database, the way Datasette does it.

The engine is the guard: the connection is read-only, cannot reach files, the network or
extensions, and its configuration is locked (``Atlas.duckdb``). On top of that, the text must parse
to exactly one SELECT-like statement, a timer interrupts queries that run too long, and results
stop at a row limit with ``truncated`` set.
"""

from __future__ import annotations

import datetime as dt
import decimal
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import duckdb

from .atlas import Atlas

SQL_TIME_LIMIT_MS = 2000
MAX_RETURNED_ROWS = 1000
MAX_SQL_CHARS = 20_000
# Statement types that only read.
_READ_ONLY = {"SELECT", "EXPLAIN"}


class SQLError(ValueError):
    """A query that is refused or fails; the message is safe to show the user."""


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
        raise SQLError("empty query")
    if len(sql) > MAX_SQL_CHARS:
        raise SQLError(f"query longer than {MAX_SQL_CHARS} characters")
    cur = atlas.duckdb_cursor()
    try:
        statements = cur.extract_statements(sql)
    except duckdb.Error as e:
        raise SQLError(f"syntax error: {_first_line(e)}") from None
    if len(statements) != 1:
        raise SQLError(f"exactly one statement is allowed, got {len(statements)}")
    kind = statements[0].type.name
    if kind not in _READ_ONLY:
        raise SQLError(f"only read-only queries (SELECT) are allowed, got {kind}")
    timer = threading.Timer(time_limit_ms / 1000, cur.interrupt)
    t0 = time.perf_counter()
    timer.start()
    try:
        cur.execute(sql, params) if params else cur.execute(sql)
        columns = [d[0] for d in cur.description or []]
        rows = cur.fetchmany(max_rows + 1)
    except duckdb.InterruptException:
        raise SQLError(f"query interrupted: it ran longer than the {time_limit_ms} ms limit") from None
    except duckdb.Error as e:
        raise SQLError(_first_line(e)) from None
    finally:
        timer.cancel()
        cur.close()
    elapsed = (time.perf_counter() - t0) * 1000
    truncated = len(rows) > max_rows
    return SQLResult(columns, [[_json_safe(v) for v in r] for r in rows[:max_rows]], truncated, round(elapsed, 2))


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
