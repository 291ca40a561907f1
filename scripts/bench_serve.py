"""Where a person waits on ``featureatlas serve``: idle latency of every route and search mode, then
the load test (``bench_load.py``), in one JSON, beside the figures issue 29 started from.

    .venv/bin/python scripts/bench_serve.py --atlas DIR --out bench_serve.json [--baseline-rev REV]

Idle: one client sends ``--requests`` requests of each kind, one at a time, on a warm server. Every
search asks a query it has not asked before (the concepts of ``search_eval.py``): a repeated query is
answered from the server's answer cache, which is measured on its own line (``search_cached``).
With ``--baseline-rev``, a server of that git revision (a worktree of it, on the same atlas and
machine) is measured the same way first: the baseline of the same run. ``--load-seconds 0`` skips
the load test (three minutes and a half with its defaults).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import bench_load
from bench_search import serving
from featureatlas.store.search import FUSED, SEARCH_MODES
from search_eval import CONCEPTS

REPO = Path(__file__).resolve().parent.parent
# What the issue measured on a bare clone (2-core AMD EPYC), p50 ms idle, and what it asks for.
ISSUE_BEFORE = {"search_all": 310, "search_label": 110, "search_context": 133, "search_corpus": 169, "search_text": 91,
                "search_inference": 150, "feature": 25, "neighbors": 11}
TARGETS = {"search_all": 100, **{f"search_{m}": 30 for m in SEARCH_MODES if m != "inference"}, "feature": 15}
SQL = "select source, count(*) from documents group by 1 order by 2 desc"


def idle(base: str, requests: int) -> dict:
    """p50/p90/p99 ms of each kind of request, one at a time."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    live = bench_load.live_features(host, int(port))
    queries = [c.query for c in CONCEPTS]
    kinds = {
        "feature": lambda i: ("GET", f"/api/features/{live[i * 7 % len(live)]}", None),
        "neighbors": lambda i: ("GET", f"/api/features/{live[i * 7 % len(live)]}/neighbors?k=10", None),
        "list": lambda i: ("GET", f"/api/features?limit=50&offset={i * 50}", None),
        "sql": lambda i: ("POST", "/api/sql", {"sql": SQL}),
        **{f"search_{m}": (lambda m: lambda i: ("GET", f"/api/search?mode={m}&q={quote(queries[i % len(queries)])}", None))(m)
           for m in (FUSED, *SEARCH_MODES)},
        "search_cached": lambda i: ("GET", f"/api/search?q={quote(queries[0])}", None),
        "search_text_query": lambda i: ("GET", f"/api/search?q={quote(bench_load.TEXTS[i % len(bench_load.TEXTS)] + f' ({i})')}",
                                        None),
    }
    out = {}
    for name, make in kinds.items():
        ms, statuses = [], set()
        for i in range(requests + 2):
            method, path, body = make(i)
            t0 = time.perf_counter()
            status, _ = bench_load.request(conn, method, path, body)
            if i >= 2:  # the first two warm this route's code paths
                ms.append((time.perf_counter() - t0) * 1000)
                statuses.add(status)
        out[name] = {"p50_ms": round(bench_load.percentile(ms, 50), 1), "p90_ms": round(bench_load.percentile(ms, 90), 1),
                     "p99_ms": round(bench_load.percentile(ms, 99), 1), "status": sorted(statuses)}
    conn.close()
    return out


@contextmanager
def revision(rev: str):
    """A checkout of ``rev`` importable as ``featureatlas`` (a PYTHONPATH for its server)."""
    with tempfile.TemporaryDirectory() as tmp:
        tree, path = Path(tmp) / "tree", Path(tmp) / "path"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), rev], check=True,
                       capture_output=True)
        try:
            path.mkdir()
            (path / "featureatlas").symlink_to(tree)
            yield str(path)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)


def measure(atlas: Path, requests: int, pythonpath: str | None = None) -> dict:
    env = {"PYTHONPATH": pythonpath} if pythonpath else {}
    with serving(atlas, extra_env=env) as (base, _):
        return idle(base, requests)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--atlas", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("bench_serve.json"))
    p.add_argument("--requests", type=int, default=40, help="of each kind, idle")
    p.add_argument("--baseline-rev", help="a git revision to measure idle first, on the same atlas (e.g. HEAD~3)")
    p.add_argument("--load-seconds", type=float, default=180, help="the load test's measured phase (0: none)")
    args = p.parse_args()
    result: dict = {"atlas": str(args.atlas), "cpus": os.cpu_count(), "load_average_before": os.getloadavg(),
                    "issue_before_p50_ms": ISSUE_BEFORE, "targets_p50_ms": TARGETS}
    if args.baseline_rev:
        with revision(args.baseline_rev) as path:
            result["baseline"] = {"rev": args.baseline_rev, "idle": measure(args.atlas, args.requests, path)}
    result["idle"] = measure(args.atlas, args.requests)
    result["idle_targets_met"] = {k: result["idle"][k]["p50_ms"] <= v for k, v in TARGETS.items()}
    if args.load_seconds > 0:
        load_args = bench_load.parse([f"--atlas={args.atlas}", f"--out={args.out}.load",
                                      f"--seconds={args.load_seconds}"])
        result["load"] = bench_load.run(load_args)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    print(f"{'request':<20} {'p50':>8} {'p90':>8} {'p99':>8} {'baseline p50':>13} {'target':>7}")
    for name, s in result["idle"].items():
        base = result.get("baseline", {}).get("idle", {}).get(name, {}).get("p50_ms", "")
        print(f"{name:<20} {s['p50_ms']:>8} {s['p90_ms']:>8} {s['p99_ms']:>8} {base:>13} {TARGETS.get(name, ''):>7}")
    if "load" in result:
        bench_load.report(result["load"])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
