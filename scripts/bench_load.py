"""Load test of ``featureatlas serve``: many concurrent clients, a mix of every kind of route, for minutes.

    .venv/bin/python scripts/bench_load.py --atlas DIR --out FILE [--clients 32] [--seconds 180]

It starts the server itself on a free loopback port (``OMP_WAIT_POLICY=PASSIVE``: spinning torch
threads would starve the read-only routes on a small machine), runs ``--clients`` threads with
keep-alive connections, each pausing ``--think-ms`` on average between an answer and its next
request (a person reading; 0 sends back to back, which measures saturation: every latency is then
queueing), for ``--warmup-seconds`` (not counted), then for ``--seconds``, at most
``--max-requests`` requests in all, and stops the server however the run ends. The mix: feature
pages, neighbours, feature lists, search (half of it one of 20 popular queries, which the server's
answer cache holds after their first time, half new two-word queries), cheap SQL (and one SQL query past the time limit every
``--heavy-every`` seconds, expected to be a 400), and ~12% model routes (activations, steer,
contrast), enough to fill the model pool (one worker, eight waiting) so that it must shed load
with 503s. Clients ignore ``Retry-After``: what is measured is whether the server sheds. Between
warm-up and the measured phase, a baseline of ``--baseline-seconds`` runs the same mix without the
model routes: what the model load costs the other routes is their latency against that.

Reported: throughput, per route count, p50/p90/p99/max and status counts, errors by status, and the
server's memory (RSS of its process tree) after start, after warm-up, at the end and at its peak
(sampled every second), with the acceptance checks: no 5xx besides the model routes' 503s, feature
pages' p99 under 100 ms, model routes shedding with 503 without slowing feature pages (p99 at most
1.5x the baseline's), end memory within 20% of post-warm-up. The clients run on the same cores as
the server, and every number moves with other work on the machine: the load average is reported.
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

from bench_search import WORDS, serving

MAX_CLIENTS = 256
MAX_SECONDS = 1800
FEATURE_P99_MS = 100
MEMORY_TOLERANCE = 0.2
# Our reading of "shed load rather than slowing the others": feature pages' p99 with model traffic
# at most this times their p99 without it.
MODEL_SLOWDOWN_LIMIT = 1.5
MODEL_ROUTES = ("activations", "steer", "contrast")
# Weights of the mix, in percent; the model routes make 12. People browse more than they search.
MIX = {"feature": 40, "neighbors": 16, "list": 10, "search": 10, "sql": 12, "activations": 5, "steer": 4, "contrast": 3}
POPULAR = 0.5  # of searches, one of QUERIES
QUERIES = ["cooking recipes", "football", "the weather", "music", "money and banks", "medicine", "cars", "love",
           "war", "computers", "children", "religion", "the ocean", "dates and years", "French language text",
           "Python code", "numbers", "animals", "politics", "Shakespeare plays"]
TEXTS = ["The cat sat on the mat and looked out of the window.", "def add(a, b):\n    return a + b",
         "La ville de Paris est la capitale de la France.", "To be, or not to be, that is the question.",
         "The central bank raised interest rates by half a point.", "El río atraviesa la ciudad de norte a sur."]
SQL = ["select source, count(*) from documents group by 1 order by 2 desc",
       "select floor(log10(density)) as decade, count(*) from features where density > 0 group by 1 order by 1",
       "select feature_id, label, density from features order by max_activation desc limit 20",
       "select d.source, count(*) from tokens t join documents d using (doc_id) group by 1",
       "select count(*), avg(value) from activations where feature_id = 7"]
# Every pair of active features on every token: far past the 2 s limit on any real atlas.
HEAVY_SQL = "select count(*) from activations a join activations b using (doc_id, position) where a.value + b.value > 0"

Record = tuple[str, int, float, float]  # route, status (0: no answer), start (monotonic s), milliseconds


def rss_mib(pid: int) -> float:
    """Resident memory of ``pid`` and every process below it (the SQL may run in worker processes)."""
    parents: dict[int, int] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                parents[int(p.name)] = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    tree, total = {pid}, 0.0
    while grown := {c for c, pp in parents.items() if pp in tree and c not in tree}:
        tree |= grown
    for p in tree:
        try:
            kb = next(line for line in Path(f"/proc/{p}/status").read_text().splitlines() if line.startswith("VmRSS:"))
            total += int(kb.split()[1]) / 1024
        except (OSError, StopIteration):
            pass
    return total


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) that ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def request(conn: http.client.HTTPConnection, method: str, path: str, body: object = None) -> tuple[int, bytes]:
    """(status, body); status 0 when no answer came (the connection is then closed, to be reopened)."""
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, data, {"Content-Type": "application/json"} if data else {})
        r = conn.getresponse()
        payload = r.read()
        if r.will_close:
            conn.close()
        return r.status, payload
    except (OSError, http.client.HTTPException):
        conn.close()
        return 0, b""


class Mix:
    """Draws the next request: (route, method, path, body)."""

    def __init__(self, live: list[int], heavy_every: float, *, model: bool = True):
        self.live, self.heavy_every = live, heavy_every
        self.routes = [r for r in MIX if model or r not in MODEL_ROUTES]
        self.weights = [MIX[r] for r in self.routes]
        self._heavy_at, self._lock = time.monotonic() + heavy_every, threading.Lock()

    def heavy_due(self) -> bool:
        with self._lock:
            if self.heavy_every <= 0 or time.monotonic() < self._heavy_at:
                return False
            self._heavy_at = time.monotonic() + self.heavy_every
            return True

    @staticmethod
    def query(rng: random.Random) -> str:
        """Half the searches repeat a popular query (the server's answer cache holds it after its
        first time), half are new: two of the 80 words of ``bench_search.WORDS`` (6,320 ordered pairs)."""
        return rng.choice(QUERIES) if rng.random() < POPULAR else " ".join(rng.sample(WORDS, 2))

    def draw(self, rng: random.Random) -> tuple[str, str, str, object]:
        fid = rng.choice(self.live)
        route = rng.choices(self.routes, self.weights)[0]
        if route == "sql" and self.heavy_due():
            return "sql_heavy", "POST", "/api/sql", {"sql": HEAVY_SQL}
        return route, *{
            "feature": lambda: ("GET", f"/api/features/{fid}", None),
            "neighbors": lambda: ("GET", f"/api/features/{fid}/neighbors?k=10", None),
            "list": lambda: ("GET", f"/api/features?limit=50&offset={rng.randrange(len(self.live))}", None),
            "search": lambda: ("GET", f"/api/search?q={quote(self.query(rng))}", None),
            "sql": lambda: ("POST", "/api/sql", {"sql": rng.choice(SQL)}),
            "activations": lambda: ("POST", "/api/activations", {"text": rng.choice(TEXTS), "k": 5}),
            "steer": lambda: ("POST", "/api/steer", {"prompt": rng.choice(TEXTS), "max_new_tokens": 8,
                                                     "features": [{"id": fid, "value": 2}]}),
            "contrast": lambda: ("POST", "/api/search/contrast",
                                 {"positive": rng.sample(TEXTS, 2), "negative": [rng.choice(TEXTS)], "k": 10}),
        }[route]()


def drive(host: str, port: int, mix: Mix, clients: int, until: float, budget: int,
          sample: Callable[[], None], think_s: float) -> list[Record]:
    """``clients`` threads sending the mix until ``until`` (monotonic) or ``budget`` requests in all,
    each pausing a random time of mean ``think_s`` after each answer (a person reading it; 0: none,
    which measures saturation, not latency); ``sample()`` runs about once a second meanwhile."""
    records: list[list[Record]] = [[] for _ in range(clients)]
    sent = iter(range(budget))

    def client(i: int) -> None:
        rng, conn = random.Random(i), http.client.HTTPConnection(host, port, timeout=120)
        while time.monotonic() < until and next(sent, None) is not None:
            route, method, path, body = mix.draw(rng)
            t0 = time.monotonic()
            status, _ = request(conn, method, path, body)
            records[i].append((route, status, t0, (time.monotonic() - t0) * 1000))
            if think_s:
                time.sleep(rng.expovariate(1 / think_s))
        conn.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        sample()
        time.sleep(1.0)
    return [r for rs in records for r in rs]


def percentile(ms: list[float], p: float) -> float:
    ms = sorted(ms)
    return ms[min(len(ms) - 1, int(p / 100 * len(ms)))] if ms else float("nan")


def route_stats(records: list[Record], seconds: float) -> dict:
    ms = [r[3] for r in records]
    return {"count": len(ms), "per_s": len(ms) / seconds, **{f"p{p}_ms": percentile(ms, p) for p in (50, 90, 99)},
            "max_ms": max(ms, default=float("nan")), "status": dict(sorted(Counter(str(r[1]) for r in records).items()))}


def checks(routes: dict, records: list[Record], memory: dict, baseline: dict) -> dict:
    shed = sum(r[1] == 503 for r in records if r[0] in MODEL_ROUTES)
    shed_ms = [r[3] for r in records if r[0] in MODEL_ROUTES and r[1] == 503]
    bad = Counter(str(r[1]) for r in records if r[1] >= 500 and not (r[1] == 503 and r[0] in MODEL_ROUTES))
    no_answer = sum(r[1] == 0 for r in records)
    feature_p99 = routes.get("feature", {}).get("p99_ms", float("nan"))
    alone_p99 = baseline.get("feature", {}).get("p99_ms")
    slowdown = feature_p99 / alone_p99 if alone_p99 else None
    return {
        "no_5xx": {"ok": not bad and not no_answer, "unexpected_5xx": dict(bad), "no_answer": no_answer},
        "feature_page_p99_ms": {"ok": feature_p99 < FEATURE_P99_MS, "value": feature_p99, "limit": FEATURE_P99_MS},
        # No 503 at all means the pool never filled: nothing to shed.
        "model_routes_shed": {"ok": not slowdown or slowdown <= MODEL_SLOWDOWN_LIMIT,
                              "verdict": "shed with 503" if shed else "never saturated",
                              "n_503": shed, "p99_ms_of_503": percentile(shed_ms, 99) if shed else None,
                              "feature_p99_ms_without_model_routes": alone_p99, "feature_p99_slowdown": slowdown},
        "memory_end_within_20pct": {"ok": abs(memory["end_over_warmup"] - 1) <= MEMORY_TOLERANCE,
                                    "end_over_warmup": memory["end_over_warmup"]},
    }


def live_features(host: str, port: int) -> list[int]:
    """The 1,000 densest features that ever fire: the ids every feature route picks from."""
    status, body = request(http.client.HTTPConnection(host, port, timeout=60), "GET",
                           "/api/features?sort=density&limit=1000")
    if status != 200:
        raise RuntimeError(f"GET /api/features answered {status}")
    live = [r["feature_id"] for r in json.loads(body)["features"] if (r["density"] or 0) > 0 and (r["max_activation"] or 0) > 0]
    if not live:
        raise RuntimeError("no live features in the atlas")
    return live


def by_route(records: list[Record], seconds: float) -> dict:
    names = sorted({r[0] for r in records}, key=[*MIX, "sql_heavy"].index)
    return {n: route_stats([r for r in records if r[0] == n], seconds) for n in names}


def run(args: argparse.Namespace) -> dict:
    # Other work on the machine moves every number here: say how busy it was.
    log, load_before = Path(f"{args.out}.server.log"), os.getloadavg()
    with serving(Path(args.atlas), host=args.host, log=log) as (base, server):
        port = int(base.rsplit(":", 1)[1])
        memory = {"start": rss_mib(server.pid)}
        live = live_features(args.host, port)
        samples: list[float] = []
        sample = lambda: samples.append(rss_mib(server.pid))  # noqa: E731
        mix, think = Mix(live, args.heavy_every), args.think_ms / 1000
        t0 = time.monotonic()
        warm = drive(args.host, port, mix, args.clients, t0 + args.warmup_seconds, args.max_requests, sample, think)
        memory["after_warmup"] = rss_mib(server.pid)
        budget = args.max_requests - len(warm)
        alone: list[Record] = []
        if args.baseline_seconds:  # the same mix without the model routes
            t = time.monotonic()
            alone = drive(args.host, port, Mix(live, args.heavy_every, model=False), args.clients,
                          t + args.baseline_seconds, budget, sample, think)
            budget -= len(alone)
        t1, cpu0 = time.monotonic(), (cpu_s(server.pid), time.process_time())
        records = drive(args.host, port, mix, args.clients, t1 + args.seconds, budget, sample, think)
        wall = max(t + ms / 1000 for _, _, t, ms in records) - t1 if records else args.seconds
        memory["end"] = rss_mib(server.pid)
        cpu = {"server": cpu_s(server.pid) - cpu0[0], "clients": time.process_time() - cpu0[1]}
        memory["peak"] = max([*samples, *memory.values()])
        memory["end_over_warmup"] = memory["end"] / memory["after_warmup"]
        if server.poll() is not None:
            raise RuntimeError(f"the server exited during the run; its log: {log}")
    routes, baseline = by_route(records, wall), by_route(alone, args.baseline_seconds)
    statuses = Counter(str(r[1]) for r in records)
    return {
        "settings": {**vars(args), "mix_percent": MIX, "live_features": len(live), "server_log": str(log),
                     "OMP_WAIT_POLICY": "PASSIVE", "cpus": os.cpu_count(), "load_average_before": load_before,
                     "load_average_after": os.getloadavg()},
        "cpu_s_measured": cpu,  # server (its main process) and this script's clients, over wall_s
        "wall_s": wall, "warmup_requests": len(warm), "requests": len(records), "throughput_per_s": len(records) / wall,
        "all": route_stats(records, wall), "routes": routes, "baseline_without_model_routes": baseline,
        "errors_by_status": {s: n for s, n in sorted(statuses.items()) if s != "200"},
        "count_5xx": sum(r[1] >= 500 for r in records),
        "memory_mib": memory, "checks": checks(routes, records, memory, baseline),
    }


def report(result: dict) -> None:
    print(f"{'route':<12} {'n':>7} {'req/s':>7} {'p50':>7} {'p90':>7} {'p99':>7} {'max':>8}  status")
    for name, s in [*result["routes"].items(), ("all", result["all"])]:
        print(f"{name:<12} {s['count']:>7} {s['per_s']:>7.1f} {s['p50_ms']:>7.1f} {s['p90_ms']:>7.1f} {s['p99_ms']:>7.1f} "
              f"{s['max_ms']:>8.1f}  {' '.join(f'{k}:{v}' for k, v in s['status'].items())}")
    m = result["memory_mib"]
    print(f"memory MiB: start {m['start']:.0f}, after warm-up {m['after_warmup']:.0f}, end {m['end']:.0f}, "
          f"peak {m['peak']:.0f} (end/warm-up {m['end_over_warmup']:.3f})")
    for name, c in result["checks"].items():
        print(f"{'PASS' if c['ok'] else 'FAIL'} {name}: " + ", ".join(f"{k}={v}" for k, v in c.items() if k != "ok"))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The settings, checked (``bench_serve.py`` runs the load test with them too)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--atlas", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=180)
    p.add_argument("--warmup-seconds", type=float, default=20)
    p.add_argument("--baseline-seconds", type=float, default=30, help="the mix without model routes, after warm-up (0: none)")
    p.add_argument("--max-requests", type=int, default=200_000, help="in all, warm-up included")
    p.add_argument("--think-ms", type=float, default=500, help="mean pause of a client between answer and next request "
                                                              "(exponential; 0: back to back)")
    p.add_argument("--heavy-every", type=float, default=10, help="seconds between SQL queries past the time limit (0: none)")
    p.add_argument("--host", default="127.0.0.1", help="a loopback address; any other is refused")
    args = p.parse_args(argv)
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        p.error(f"--host must be a loopback IP address (127.0.0.1, ::1), got {args.host}")
    if not 1 <= args.clients <= MAX_CLIENTS:
        p.error(f"--clients must be 1..{MAX_CLIENTS}")
    phases = (args.warmup_seconds, args.baseline_seconds)
    if not 0 < args.seconds <= MAX_SECONDS or not all(0 <= s <= MAX_SECONDS for s in phases):
        p.error(f"--seconds, --warmup-seconds and --baseline-seconds must be at most {MAX_SECONDS}")
    return args


def main() -> None:
    args = parse()
    # SIGTERM as an exit, not a silent death, so that the server is stopped too (Ctrl-C already is).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    result = run(args)
    Path(args.out).write_text(json.dumps(result, indent=1))
    report(result)
    print(args.out)


if __name__ == "__main__":
    main()
