"""What the admin dashboard's aggregates (GET /v1/top) cost on a full query log.

    flock /work/team/bench.lock .venv/bin/python -m tests.bench.dashboard_top [--rows 1000000] [--clients 200]

Fills a real SQLite query log (querylog_db.QueryLogDb, as dnsgate writes it) with `rows` entries
spread evenly over the last 24 hours: `clients` clients, a few thousand names, one in ten gated,
one in three from the cache. Then times each aggregate /v1/top runs over the last 24 hours and the
last hour (best of 3) on a read-only connection as dnsgate does, and a page of the query log's
search. Then the writer's side: the slowest of 100 batch writes (1000 rows each, as the log's writer
thread makes them) alone, and while another thread runs the 24-hour aggregates over and over: the
aggregates run on their own connection and thread, so they must not hold the writes back (WAL).
"""

from __future__ import annotations

import argparse
import functools
import random
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dnsgate.observe.querylog_db import Filters, QueryLogDb

OUTCOMES = ("forwarded", "cached", "cached", "sinkholed")


def fill(db: QueryLogDb, rows: int, clients: int, now: float) -> None:
    rng = random.Random(7)
    names = [f"host{i}.example.test" for i in range(3000)]
    batch: list[tuple[Any, ...]] = []
    for i in range(rows):
        at = now - 86_400 + 86_400 * i / rows
        client = f"192.168.{(i % clients) // 250}.{(i % clients) % 250 + 1}"
        gated = rng.random() < 0.1
        outcome = "sinkholed" if gated and rng.random() < 0.7 else rng.choice(OUTCOMES[:3])
        batch.append((at, client, "trackcmp.net" if gated else rng.choice(names), rng.choice(("A", "AAAA", "HTTPS")),
                      "udp", outcome, 0, "activecampaign" if gated else None, "marketing" if gated else None,
                      None, None, None, 1.0))
        if len(batch) == 50_000:
            db.insert(batch, 0, 0.0)
            batch = []
    db.insert(batch, 0, 0.0)


def best(fn: Callable[[], object], rounds: int = 3) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--clients", type=int, default=200)
    args = parser.parse_args()
    now = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        writer = QueryLogDb(Path(tmp) / "querylog.sqlite3")
        fill(writer, args.rows, args.clients, now)
        print(f"{writer.count()} rows over 24 h, {args.clients} clients")
        db = QueryLogDb(writer.path, read_only=True)
        for label, since in (("24 h", now - 86_400), ("1 h", now - 3600)):
            step = 1800.0 if label == "24 h" else 120.0
            costs = {name: best(functools.partial(fn, since, now, *extra)) for name, fn, extra in (
                ("top_names", db.top_names, (10,)), ("top_gated", db.top_gated, (10,)),
                ("top_clients", db.top_clients, (10,)), ("timeline", db.timeline, (step,)))}
            detail = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in costs.items())
            print(f"window {label}: total {sum(costs.values()) * 1000:.0f} ms ({detail})")
        search = best(lambda: db.entries(Filters(client="192.168.0.7", gated=True), 51))
        glob = best(lambda: db.entries(Filters(name="*host12*"), 51))
        print(f"query log page: a client's gated queries {search * 1000:.1f} ms, a name search {glob * 1000:.1f} ms")
        alone = slowest_write(writer, now)
        stop = threading.Event()

        def aggregates() -> None:
            while not stop.is_set():
                db.top_clients(now - 86_400, now + 86_400, 10)
                db.timeline(now - 86_400, now + 86_400, 1800.0)

        reading = threading.Thread(target=aggregates)
        reading.start()
        try:
            during = slowest_write(writer, now)
        finally:
            stop.set()
            reading.join()
        print(f"slowest batch write of 1000 rows: {alone * 1000:.1f} ms alone, {during * 1000:.1f} ms while the "
              "aggregates run")
        db.close()
        writer.close()


def slowest_write(db: QueryLogDb, now: float) -> float:
    row = (now, "192.168.0.9", "host1.example.test", "A", "udp", "forwarded", 0, None, None, None, None, None, 1.0)
    slowest = 0.0
    for _ in range(100):
        start = time.perf_counter()
        db.insert([row] * 1000, 0, 0.0)
        slowest = max(slowest, time.perf_counter() - start)
        time.sleep(0.01)
    return slowest


if __name__ == "__main__":
    main()
