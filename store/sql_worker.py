"""User SQL in worker processes with hard limits.

DuckDB checks for interrupts between chunks of work and counts only its buffer-managed memory, so
inside the server one scalar-heavy statement (``md5(repeat('ab', 400000000))``) overruns any time
limit and strings built that way escape any memory limit. A separate process can be bounded by the
operating system instead: its address space is capped (``RLIMIT_AS``: an allocation past it fails,
and DuckDB turns that into an out-of-memory error), and a statement past its time limit is ended by
killing the process. The server's own memory never sees the statement, and a worker that passed a
limit is replaced by a fresh one.

This module is what a worker process imports, so it stays light: DuckDB, and no torch or LanceDB.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import duckdb

log = logging.getLogger(__name__)
WORKERS = 2
# A worker's whole address space: DuckDB's base reservation (~0.8 GB) plus what one statement may use.
ADDRESS_SPACE_BYTES = 3 * 2**30
# DuckDB's own limit for its buffer-managed memory (joins, sorts, aggregates), under the cap above
# so that those fail with DuckDB's clearer message first.
DUCKDB_MEMORY = "1GB"
DUCKDB_THREADS = 2  # each thread reserves address space; a big machine's 64 would eat the cap
MAX_RESULT_BYTES = 8 * 2**20  # as JSON: an answer the server holds in memory and sends
START_TIMEOUT_S = 30
# How long a statement waits for a free worker before the server says it is busy (a 503): a few
# statements' worth, so that a burst queues and only a sustained overload is refused.
QUEUE_WAIT_S = 10.0
# What a statement can do wrong as written (a missing column, a bad cast, reading a file, too
# much memory): a refusal. Anything else (a damaged file, an internal error) is ours.
_USER_ERRORS = (duckdb.ProgrammingError, duckdb.DataError, duckdb.NotSupportedError, duckdb.OutOfMemoryException,
                duckdb.PermissionException, duckdb.IntegrityError, duckdb.InvalidInputException,
                duckdb.ConversionException, MemoryError)


class LimitExceeded(Exception):
    """The statement passed a limit (``limit``: "time", "memory" or "result size"); its worker was replaced."""

    def __init__(self, limit: str, message: str):
        super().__init__(message)
        self.limit = limit


class StatementFailed(Exception):
    """The statement failed as written (``user``) or the engine failed (not ``user``: ours, a 500)."""

    def __init__(self, message: str, *, user: bool):
        super().__init__(message)
        self.user = user


class WorkersBusy(Exception):
    """No worker came free within ``QUEUE_WAIT_S`` (or the pool was closed: its atlas was replaced)."""


@dataclass
class Rows:
    columns: list[str]
    rows: list[list[Any]]  # JSON-safe values
    truncated: bool  # more rows than the row limit: the rest were not read
    elapsed_ms: float

    def to_dict(self) -> dict[str, Any]:
        return {"columns": self.columns, "rows": self.rows, "truncated": self.truncated, "elapsed_ms": self.elapsed_ms}


class SQLWorkers:
    """A small pool of worker processes, each with one read-only connection to ``database``."""

    def __init__(self, database: Path, *, workers: int = WORKERS, address_space: int = ADDRESS_SPACE_BYTES):
        self.database = Path(database)
        self.address_space = address_space
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._lock = threading.Lock()  # orders close() against workers coming back to the pool
        self._closed = False
        starting = [_Worker(self.database, self.address_space) for _ in range(workers)]
        try:
            for worker in starting:  # started together, waited for in turn
                self._give_back(worker.ready())
        except BaseException:
            for worker in starting:
                worker.kill()
            raise

    def run(self, sql: str, params: list[Any] | dict[str, Any] | None, *, time_limit_ms: int, max_rows: int) -> Rows:
        """One statement on an idle worker, waiting at most ``QUEUE_WAIT_S`` for one to be free."""
        if self._closed:
            raise WorkersBusy("this atlas was replaced by a newer one; ask again")
        try:
            worker = self._idle.get(timeout=QUEUE_WAIT_S)
        except queue.Empty:
            raise WorkersBusy(f"every SQL worker stayed busy for {QUEUE_WAIT_S:g} s") from None
        healthy = False
        try:
            result = worker.run(sql, params, time_limit_ms=time_limit_ms, max_rows=max_rows)
            healthy = True
            return result
        except StatementFailed as e:
            healthy = e.user  # after an engine failure DuckDB may refuse everything: a fresh worker
            raise
        except LimitExceeded as e:
            healthy = e.limit == "result size"  # refused before anything was sent: the worker is fine
            raise
        finally:
            if healthy:
                self._give_back(worker)
            else:
                # Killed, or dead of its own accord: a fresh worker takes its place, started in
                # the background so that this caller hears about its limit at once.
                worker.kill()
                threading.Thread(target=self._replace, name="sql-worker-start", daemon=True).start()

    def _give_back(self, worker: _Worker) -> None:
        with self._lock:
            if not self._closed:
                self._idle.put(worker)
                return
        worker.kill()

    def _replace(self) -> None:
        """Start a worker, trying again (1 s, 2 s, ... up to a minute apart) until one starts: a pool
        that lost its workers for good would refuse every statement until a restart."""
        delay = 1.0
        while not self._closed:
            try:
                self._give_back(_Worker(self.database, self.address_space).ready())
                return
            except Exception:
                log.exception("could not start a replacement SQL worker; trying again in %.0f s", delay)
                time.sleep(delay)
                delay = min(delay * 2, 60.0)

    def close(self) -> None:
        """Stop every idle worker now; a busy one stops when its statement ends."""
        with self._lock:
            self._closed = True
        while True:
            try:
                self._idle.get_nowait().kill()
            except queue.Empty:
                return


class _Worker:
    """One process (``python -m featureatlas.store.sql_worker``: it imports DuckDB and nothing of
    the server's) and the parent's end of a socket pair to it."""

    def __init__(self, database: Path, address_space: int):
        ours, theirs = socket.socketpair()
        self.database = database
        with theirs:
            self.process = subprocess.Popen(
                [sys.executable, "-m", __name__, str(theirs.fileno()), str(database), str(address_space)],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        self._conn = Connection(ours.detach())

    def ready(self) -> _Worker:
        """This worker, once its database is open."""
        try:
            if not self._conn.poll(START_TIMEOUT_S):
                raise RuntimeError(f"an SQL worker did not start within {START_TIMEOUT_S} s")
            status, detail = self._conn.recv()
        except (EOFError, OSError):
            status, detail = "failed", f"it exited with {self.process.poll()}"
        except BaseException:
            self.kill()
            raise
        if status != "ready":
            self.kill()
            raise RuntimeError(f"an SQL worker could not open {self.database}: {detail}")
        return self

    def run(self, sql: str, params: Any, *, time_limit_ms: int, max_rows: int) -> Rows:
        t0 = time.perf_counter()
        try:
            self._conn.send((sql, params, max_rows))
            ready = self._conn.poll(time_limit_ms / 1000)
            reply = self._conn.recv() if ready else None
        except (EOFError, OSError):  # the worker died: its address space ran out outside DuckDB's checks
            raise LimitExceeded("memory", "the query was stopped: it passed the memory limit") from None
        if reply is None:
            raise LimitExceeded("time", f"the query was stopped: it ran longer than the {time_limit_ms} ms limit")
        status, detail = reply
        if status == "ok":
            columns, rows, truncated = detail
            return Rows(columns, rows, truncated, round((time.perf_counter() - t0) * 1000, 2))
        if status == "memory":
            raise LimitExceeded("memory", f"the query was stopped: {detail}")
        if status == "size":
            raise LimitExceeded("result size", detail)
        raise StatementFailed(detail, user=status == "refused")

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(5)
        self._conn.close()


def _serve(conn: Connection, database: str, address_space: int) -> None:
    """A worker's life: cap the address space, open the database, answer statements until the pipe closes."""
    import resource

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server's Ctrl-C is the server's to handle
    resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    try:
        con = duckdb.connect(database, read_only=True, config=locked_config(DUCKDB_MEMORY, threads=DUCKDB_THREADS))
    except Exception as e:
        conn.send(("failed", first_line(e)))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            sql, params, max_rows = conn.recv()
        except EOFError:
            return
        conn.send(_answer(con, sql, params, max_rows))


def locked_config(memory_limit: str, *, threads: int | None = None) -> dict[str, Any]:
    """A read-only connection's settings: no files, network or extensions, and no way to change
    them afterwards; the engine, not string checks, keeps SQL safe."""
    config: dict[str, Any] = {"enable_external_access": False, "lock_configuration": True, "memory_limit": memory_limit}
    if threads is not None:
        config["threads"] = threads
    return config


def _answer(con: duckdb.DuckDBPyConnection, sql: str, params: Any, max_rows: int) -> tuple[str, Any]:
    cur = con.cursor()
    try:
        cur.execute(sql, params) if params else cur.execute(sql)
        columns = [d[0] for d in cur.description or []]
        fetched = cur.fetchmany(max_rows + 1)
        rows = [[json_safe(v) for v in r] for r in fetched[:max_rows]]
        size = len(json.dumps(rows))
        if size > MAX_RESULT_BYTES:
            return "size", (f"the result is {size / 2**20:.0f} MiB; the limit is {MAX_RESULT_BYTES // 2**20} MiB "
                            "(select fewer rows or shorter values)")
        return "ok", (columns, rows, len(fetched) > max_rows)
    except (duckdb.OutOfMemoryException, MemoryError) as e:
        return "memory", first_line(e)
    except _USER_ERRORS as e:
        return "refused", first_line(e)
    except Exception as e:
        return "failed", f"{type(e).__name__}: {first_line(e)}"
    finally:
        cur.close()


def first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def json_safe(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, decimal.Decimal):
        return float(v)
    if isinstance(v, (dt.date, dt.datetime, dt.time, dt.timedelta, uuid.UUID)):
        return str(v)
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v).hex()
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    if isinstance(v, dict):
        return {str(k): json_safe(x) for k, x in v.items()}
    return str(v)


if __name__ == "__main__":
    _serve(Connection(int(sys.argv[1])), sys.argv[2], int(sys.argv[3]))
