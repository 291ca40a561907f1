"""User SQL's hard limits (store.sql_worker): statements that DuckDB's own checks let overrun are
stopped by the worker process's limits, the caller is told which one, and neither the atlas nor
the server's memory is touched."""

from __future__ import annotations

import os
import re
import time

import pytest
from featureatlas.store.atlas import Atlas
from featureatlas.store.errors import QueryRefused
from featureatlas.store.sql import execute_sql

from .test_api import _tree_hash


def _rss_mib() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.fixture(scope="module")
def atlas(tiny_atlas):
    atlas = Atlas(tiny_atlas)
    yield atlas
    atlas.close()


@pytest.mark.parametrize(
    "sql, limit",
    [
        ("SELECT md5(repeat('ab', 400000000))", "time"),
        ("SELECT count(md5(repeat('x', 100000000) || i::varchar)) FROM range(40) t(i)", "time|memory"),
        ("SELECT string_agg(repeat('y', 100000000), ',') FROM range(40)", "time|memory"),
        ("with recursive r(n) as (select 1 union all select n + 1 from r) select count(*) from r", "time|memory"),
        ("select count(*) from range(1e11::bigint)", "time"),
        ("select * from range(1e11)", None),  # refused as written: range takes integers
    ],
)
def test_statements_past_a_limit_are_refused_within_5_s(atlas, tiny_atlas, sql, limit):
    before, rss = _tree_hash(tiny_atlas), _rss_mib()
    t0 = time.perf_counter()
    with pytest.raises(QueryRefused) as e:
        execute_sql(atlas, sql)
    assert time.perf_counter() - t0 < 5
    if limit:
        assert re.search(rf"\[({limit}) limit\]", str(e.value)), e.value
    assert _tree_hash(tiny_atlas) == before
    assert _rss_mib() - rss < 100  # the statement's memory was the worker's, never the server's
    # A replacement worker answers the next statement.
    assert execute_sql(atlas, "select count(*) from features").rows == [[64]]


def test_a_result_too_big_to_send_is_refused_and_the_worker_kept(atlas):
    with pytest.raises(QueryRefused, match="result size limit"):
        execute_sql(atlas, "select repeat('z', 100000) from range(1000)")
    assert execute_sql(atlas, "select 1 as one").to_dict()["rows"] == [[1]]


def test_values_come_back_json_safe_and_params_bind(atlas):
    r = execute_sql(atlas, "select $d::date as d, 1.5::decimal(4,2) as x, '\\x01'::blob as b, [1, 2] as l, $n as n",
                    {"d": "2024-01-02", "n": 7})
    assert r.columns == ["d", "x", "b", "l", "n"]
    assert r.rows == [["2024-01-02", 1.5, "01", [1, 2], 7]]
