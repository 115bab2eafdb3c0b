"""Durability under kill -9: clients stream grants and withdrawals through the API while dnsgate (a
real process) is killed at random moments; after each restart every acknowledged change is in
force and recorded, and nothing unacknowledged half-exists.

    .venv/bin/python -m tests.reliability.durability [--restarts 50] [--workers 4] [--seed N]

Each worker owns a few client addresses (127.0.0.x, so the restarted dnsgate can be asked over DNS
as that client) and changes them one request at a time, remembering the last acknowledged state of
each and the request in flight when the kill came (which may or may not have been applied). After
the kill, the SQLite file is checked directly: integrity, every choice backed by its event, exactly
one event per acknowledged change (plus at most the in-flight one), and each client's choice in force
equal to its last acknowledged change (or the in-flight one). Then dnsgate is restarted and each
client's DNS answer for a gated name must follow the same state.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sqlite3
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import dns.asyncquery
import dns.message
import dns.rcode

from tests.conftest import zone_for_tests
from tests.reliability.process import Served, serve, udp_io
from tests.support.stub_upstream import StubUpstream

TOKEN = "reliability"


@dataclass
class Client:
    address: str
    acked: bool | None = None  # last acknowledged state: True granted, False withdrawn, None never changed
    changes: int = 0  # acknowledged changes (each one event)
    in_flight: bool | None = None  # the change sent when the kill came, if any


@dataclass
class Figures:
    restarts: int = 0
    acknowledged: int = 0
    unacknowledged: int = 0  # in flight at a kill
    applied_in_flight: int = 0  # ... of which dnsgate had made durable (never acknowledged)
    lost: int = 0
    half: int = 0
    problems: list[str] = field(default_factory=list)


async def worker(session: aiohttp.ClientSession, api: str, clients: list[Client], rng: random.Random,
                 stop: asyncio.Event) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    while not stop.is_set():
        c = rng.choice(clients)
        grant = not c.acked if rng.random() < 0.8 else bool(rng.getrandbits(1))
        c.in_flight = grant
        url = f"{api}/v1/clients/{c.address}/consent"
        try:
            if grant:
                request = session.put(url, json={"categories": ["marketing"]}, headers=headers)
            else:
                request = session.delete(url, headers=headers)
            async with request as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"unexpected {response.status} for {c.address}")
        except (TimeoutError, aiohttp.ClientError):
            return  # the server died under us: the change stays "in flight"
        c.acked, c.changes, c.in_flight = grant, c.changes + 1, None


def check_store(path: Path, clients: list[Client], f: Figures) -> None:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        if db.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
            f.problems.append("integrity_check failed")
        orphans = db.execute("SELECT COUNT(*) FROM choices WHERE id NOT IN (SELECT id FROM events)").fetchone()[0]
        if orphans:
            f.half += orphans
            f.problems.append(f"{orphans} choices without their event")
        for c in clients:
            events = db.execute("SELECT COUNT(*) FROM events WHERE client = ?", [c.address]).fetchone()[0]
            row = db.execute("SELECT categories FROM choices WHERE address = ?", [c.address]).fetchone()
            granted = None if row is None else bool(json.loads(row[0]).get("marketing"))
            applied = c.in_flight is not None and events == c.changes + 1
            if events not in (c.changes, c.changes + (c.in_flight is not None)):
                f.lost += max(0, c.changes - events)
                f.problems.append(f"{c.address}: {events} events, {c.changes} acknowledged")
            expected = c.in_flight if applied else c.acked
            if granted != expected:
                f.lost += 1
                f.problems.append(f"{c.address}: store says {granted}, expected {expected}")
            if c.in_flight is not None:
                f.unacknowledged += 1
                if applied:  # durable but never acknowledged: the client's retry would repeat it
                    f.applied_in_flight += 1
                    c.acked, c.changes = c.in_flight, c.changes + 1
                c.in_flight = None
    finally:
        db.close()


async def check_dns(served: Served, clients: list[Client], f: Figures) -> None:
    for c in clients:
        q = dns.message.make_query("trackcmp.net", "A")
        reply = await dns.asyncquery.udp(q, "127.0.0.1", port=served.dns_port, source=c.address, timeout=3)
        resolved = reply.rcode() == dns.rcode.NOERROR and bool(reply.answer)
        if resolved != bool(c.acked):
            f.lost += 1
            f.problems.append(f"{c.address}: DNS {'resolves' if resolved else 'blocks'} after restart, "
                              f"acknowledged {'grant' if c.acked else 'withdrawal'}")


async def run(restarts: int, workers: int, seed: int, data_dir: Path, upstream: StubUpstream,
              max_delay: float = 0.6) -> Figures:
    rng = random.Random(seed)
    groups = [[Client(f"127.0.0.{10 + w * 5 + i}") for i in range(5)] for w in range(workers)]
    everyone = [c for g in groups for c in g]
    f = Figures()
    config = data_dir.parent / "durability.toml"
    config.write_text("[api]\nconsent_changes_per_minute = 0\n[dns]\nrate_limit = 0\n")
    served = await serve(upstream.address, data_dir, token=TOKEN, config=config)
    try:
        for _ in range(restarts):
            stop = asyncio.Event()
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
                tasks = [asyncio.create_task(worker(session, served.api, g, random.Random(rng.random()), stop))
                         for g in groups]
                await asyncio.sleep(rng.uniform(0.05, max_delay))
                await served.kill9()  # at a random moment, requests in flight
                stop.set()
                await asyncio.gather(*tasks)
            f.acknowledged = sum(c.changes for c in everyone)
            check_store(data_dir / "consent.sqlite3", everyone, f)
            served = await serve(upstream.address, data_dir, token=TOKEN, config=config)
            f.restarts += 1
            await check_dns(served, everyone, f)
        f.acknowledged = sum(c.changes for c in everyone) - f.applied_in_flight
    finally:
        await served.stop()
    return f


def report(f: Figures) -> str:
    return (f"restarts survived: {f.restarts}; changes acknowledged: {f.acknowledged}; in flight at a kill: "
            f"{f.unacknowledged} (made durable before the kill: {f.applied_in_flight}, the rest absent); "
            f"half-written: {f.half}; changes lost: {f.lost}")


async def main_async(args: argparse.Namespace) -> int:
    print(f"dns.udp_io: {udp_io()}", flush=True)
    upstream = await zone_for_tests(StubUpstream()).start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            f = await run(args.restarts, args.workers, args.seed, Path(tmp) / "data", upstream)
    finally:
        await upstream.stop()
    print(report(f))
    for problem in f.problems[:20]:
        print("  problem:", problem)
    return 1 if f.problems or f.lost or f.half else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--restarts", type=int, default=50)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=random.randrange(1 << 30))
    args = parser.parse_args()
    print(f"seed {args.seed}")
    raise SystemExit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
