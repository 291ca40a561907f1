"""Read-only SQL over an atlas's analytics database, the way Datasette does it.

The engine is the guard: the connection is read-only, cannot reach files, the network or
extensions, and its configuration is locked (``sql_worker.locked_config``). On top of that, the text
must parse to exactly one SELECT-like statement, and it runs in a worker process with hard time and
memory limits (``store.sql_worker``); results stop at a row limit with ``truncated`` set. A statement
past a limit is a refusal that names the limit; no free worker for as long as a statement may run is
``QueryInterrupted`` (the server is busy: a 503).
"""

from __future__ import annotations

from typing import Any

import duckdb
import pyarrow as pa

from .atlas import Atlas, QueryInterrupted
from .errors import QueryRefused
from .sql_worker import LimitExceeded, Rows, StatementFailed, WorkersBusy, first_line

SQL_TIME_LIMIT_MS = 2000
MAX_RETURNED_ROWS = 1000
MAX_SQL_CHARS = 20_000
# Statement types that only read.
_READ_ONLY = {"SELECT", "EXPLAIN"}


def execute_sql(
    atlas: Atlas,
    sql: str,
    params: list[Any] | dict[str, Any] | None = None,
    *,
    time_limit_ms: int = SQL_TIME_LIMIT_MS,
    max_rows: int = MAX_RETURNED_ROWS,
) -> Rows:
    _check(atlas, sql)
    try:
        return atlas.sql_workers.run(sql, params, time_limit_ms=time_limit_ms, max_rows=max_rows)
    except WorkersBusy as e:
        raise QueryInterrupted(str(e)) from None
    except LimitExceeded as e:
        raise QueryRefused(f"{e} [{e.limit} limit]") from None
    except StatementFailed as e:
        if not e.user:
            raise RuntimeError(f"SQL worker: {e}") from None
        raise QueryRefused(str(e)) from None


def fetch_all(atlas: Atlas, sql: str, params: list[Any] | dict[str, Any] | None = None) -> pa.Table:
    """The whole result of one read-only statement as Arrow, run in this process: for a Python
    caller who owns the atlas (a notebook), not for a server, so no row, size or time limit; a
    notebook interrupts it like any cell. The connection is the atlas's locked read-only one, so
    the engine refuses writes, files and the network as it does for the workers."""
    _check(atlas, sql)
    cur = atlas.batch_connection()
    try:
        return cur.sql(sql, params=params or None).to_arrow_table()
    except duckdb.Error as e:
        raise QueryRefused(first_line(e)) from None
    finally:
        cur.close()


def _check(atlas: Atlas, sql: str) -> None:
    """One statement that only reads, of reasonable length, or ``QueryRefused`` saying which rule it broke."""
    if not sql or not sql.strip():
        raise QueryRefused("empty query")
    if len(sql) > MAX_SQL_CHARS:
        raise QueryRefused(f"query longer than {MAX_SQL_CHARS} characters")
    try:
        kinds = atlas.statements(sql)
    except duckdb.Error as e:
        raise QueryRefused(f"syntax error: {first_line(e)}") from None
    if len(kinds) != 1:
        raise QueryRefused(f"exactly one statement is allowed, got {len(kinds)}")
    if kinds[0] not in _READ_ONLY:
        raise QueryRefused(f"only read-only queries (SELECT) are allowed, got {kinds[0]}")
