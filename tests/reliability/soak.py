"""A bounded soak: dnsgate (a real process) under mixed DNS load, with consent churn through the API
and an upstream that fails now and then. Prints the figures; fails on unexplained loss (a query
with no reply at all), RSS growth beyond 10 % after warm-up, or any ERROR line in dnsgate's log.

    .venv/bin/python -m tests.reliability.soak [--seconds 600] [--concurrency 64]

The load: cached names, names never seen (each goes upstream), gated names from clients with and
without consent, ANY, TCP, and malformed packets. Ten clients (127.0.0.x) grant and withdraw
their own consent through PUT/DELETE /v1/consent every few seconds, within the API's per-client
rate limit. The upstream drops 3 % of queries (dnsgate retries) and goes silent for 2 s every
20 s (SERVFAIL within the deadline: an explained failure).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
import struct
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from tests.conftest import zone_for_tests
from tests.reliability.faults import _Client, _query, rss_kb, settle
from tests.reliability.process import Served, serve, udp_io
from tests.support.stub_upstream import StubUpstream

CHURNERS = [f"127.0.0.{20 + i}" for i in range(10)]


@dataclass
class Figures:
    seconds: float = 0.0
    queries: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    lost_kinds: Counter[str] = field(default_factory=Counter)
    consent_changes: int = 0
    consent_errors: int = 0
    outages: int = 0
    rss_kb: list[int] = field(default_factory=list)  # sampled every few seconds
    error_lines: list[str] = field(default_factory=list)
    tasks: tuple[int, int] = (0, 0)

    @property
    def lost(self) -> int:
        return self.outcomes["no reply"]

    @property
    def rss_growth(self) -> float:
        """Growth from the sample after warm-up (a tenth of the run) to the last one."""
        if len(self.rss_kb) < 3:
            return 0.0
        base = self.rss_kb[max(1, len(self.rss_kb) // 10)]
        return (self.rss_kb[-1] - base) / base


def _kind(rng: random.Random) -> str:
    return rng.choices(["cached", "fresh", "gated", "gated-consenting", "any", "tcp", "malformed"],
                       [40, 25, 10, 10, 3, 7, 5])[0]


async def _tcp_query(port: int, data: bytes, source: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        writer.write(struct.pack(">H", len(data)) + data)
        length = struct.unpack(">H", await reader.readexactly(2))[0]
        return await reader.readexactly(length)
    finally:
        writer.close()


async def load(served: Served, until: float, concurrency: int, f: Figures, seed: int) -> None:
    loop = asyncio.get_running_loop()
    sockets = {}
    for source in ["127.0.0.1", *CHURNERS]:
        transport, client = await loop.create_datagram_endpoint(_Client, local_addr=(source, 0))
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sockets[source] = (transport, client)
    counter = [0]

    async def worker(w: int) -> None:
        rng = random.Random(seed * 1000 + w)
        while time.monotonic() < until:
            counter[0] += 1
            i = counter[0]
            kind = _kind(rng)
            source = rng.choice(CHURNERS) if kind in ("gated-consenting", "tcp") else "127.0.0.1"
            name = {"cached": "host.example.test", "gated": "trackcmp.net", "gated-consenting": "x.trackcmp.net",
                    "any": "other.example.test", "tcp": "other.example.test"}.get(kind, f"u{i}.soak.example.test")
            qid = i & 0xFFFF
            data = _query(qid, name)
            if kind == "any":
                data = data[:-4] + b"\x00\xff\x00\x01"
            if kind == "malformed":
                data = data[:12] + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 30)))
            f.queries += 1
            try:
                if kind == "tcp":  # from several addresses, as from a LAN (32 connections per client at most)
                    reply = await asyncio.wait_for(_tcp_query(served.dns_port, data, source), 5)
                else:
                    transport, client = sockets[source]
                    while qid in client.waiting:
                        qid = (qid + 1) & 0xFFFF
                        data = struct.pack(">H", qid) + data[2:]
                    future: asyncio.Future[bytes] = loop.create_future()
                    client.waiting[qid] = future
                    transport.sendto(data, ("127.0.0.1", served.dns_port))
                    try:
                        reply = await asyncio.wait_for(future, 5)
                    finally:
                        client.waiting.pop(qid, None)
            except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
                f.outcomes["no reply"] += 1
                f.lost_kinds[f"{kind}: {type(exc).__name__}"] += 1
                continue
            rcode = reply[3] & 0xF
            f.outcomes[{0: "noerror", 1: "formerr", 2: "servfail", 3: "nxdomain"}.get(rcode, f"rcode{rcode}")] += 1

    try:
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    finally:
        for transport, _ in sockets.values():
            transport.close()


async def churn(served: Served, until: float, f: Figures, seed: int) -> None:
    rng = random.Random(seed)

    async def one(address: str) -> None:
        connector = aiohttp.TCPConnector(local_addr=(address, 0))
        async with aiohttp.ClientSession(connector=connector) as session:
            granted = False
            while time.monotonic() < until:
                await asyncio.sleep(rng.uniform(2.2, 4.0))  # about 20 changes a minute: within the API's limit
                url = served.api + "/v1/consent"
                request = session.delete(url) if granted else session.put(url, json={"categories": ["marketing"]})
                async with request as r:
                    await r.read()
                    if r.status == 200:
                        f.consent_changes += 1
                        granted = not granted
                    else:
                        f.consent_errors += 1

    await asyncio.gather(*(one(a) for a in CHURNERS))


async def flaky_upstream(stub: StubUpstream, until: float, f: Figures, seed: int) -> None:
    rng = random.Random(seed)
    stub.rewrite = lambda _q, reply: None if rng.random() < 0.03 else reply  # 3 % dropped
    while time.monotonic() + 22 < until:
        await asyncio.sleep(20)
        stub.silent = True  # an outage: SERVFAIL after the deadline, no stale data
        f.outages += 1
        await asyncio.sleep(2)
        stub.silent = False


async def sample_rss(served: Served, until: float, f: Figures) -> None:
    while time.monotonic() < until:
        f.rss_kb.append(tree_rss_kb(served.process.pid))
        await asyncio.sleep(max(0.5, min(5.0, (until - time.monotonic()) / 20)))


async def run(seconds: float, concurrency: int, data_dir: Path, seed: int = 1, workers: int = 1) -> Figures:
    stub = zone_for_tests(StubUpstream(default_a="192.0.2.99"))
    await stub.start()
    config = data_dir.parent / "soak.toml"
    # A cache small enough to reach its bound during warm-up: expired entries of names never asked
    # again stay until evicted, so a larger cache only shows up as growth until it is full.
    config.write_text("[upstream]\ntimeout = 1.5\nattempt_timeout = 0.5\n[cache]\nmax_entries = 5000\n"
                      f"[dns]\nworkers = {workers}\n")
    served = await serve(stub.address, data_dir, config=config)
    f = Figures()
    started = time.monotonic()
    until = started + seconds
    try:
        before = await settle(served)
        await asyncio.gather(load(served, until, concurrency, f, seed), churn(served, until, f, seed),
                             flaky_upstream(stub, until, f, seed), sample_rss(served, until, f))
        after = await settle(served)
        f.rss_kb.append(tree_rss_kb(served.process.pid))
        f.tasks = (before["tasks"], after["tasks"])
    finally:
        log = await served.stop()
        await stub.stop()
    f.seconds = time.monotonic() - started
    f.error_lines = [line for line in log if " ERROR " in line or "Traceback" in line or "CRITICAL" in line]
    return f


def tree_rss_kb(pid: int) -> int:
    """RSS of dnsgate and its worker processes (dns.workers), if any."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += rss_kb(p)
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue  # it exited meanwhile
    return total


def report(f: Figures) -> str:
    rss = f.rss_kb
    return (f"soak {f.seconds:.0f} s: queries tried {f.queries} ({f.queries / max(f.seconds, 1):.0f}/s): "
            + ", ".join(f"{k} {v}" for k, v in sorted(f.outcomes.items()))
            + f"; unexplained loss {f.lost}; consent changes {f.consent_changes} (refused {f.consent_errors}); "
            f"upstream outages {f.outages}; RSS {rss[0] / 1024:.1f} -> {rss[max(1, len(rss) // 10)] / 1024:.1f} "
            f"(after warm-up) -> {rss[len(rss) // 2] / 1024:.1f} (half-way) -> {rss[-1] / 1024:.1f} MB "
            f"({100 * f.rss_growth:+.1f} %); tasks before/after "
            f"{f.tasks[0]}/{f.tasks[1]}; error lines in the log {len(f.error_lines)}")


def problems(f: Figures) -> list[str]:
    found = []
    if f.lost:
        found.append(f"{f.lost} queries got no reply: {dict(f.lost_kinds)}")
    if f.rss_growth > 0.10:
        found.append(f"RSS grew {100 * f.rss_growth:.1f} % after warm-up")
    if f.error_lines:
        found.append(f"error lines in the log, e.g. {f.error_lines[0]}")
    if f.consent_errors:
        found.append(f"{f.consent_errors} consent changes were refused")
    if f.tasks[1] > f.tasks[0]:
        found.append(f"tasks grew from {f.tasks[0]} to {f.tasks[1]}")
    return found


async def main_async(args: argparse.Namespace) -> int:
    print(f"dns.udp_io: {udp_io()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        f = await run(args.seconds, args.concurrency, Path(tmp) / "data", args.seed, args.workers)
    print(report(f))
    print("RSS samples (MB):", " ".join(f"{kb / 1024:.1f}" for kb in f.rss_kb))
    for p in problems(f):
        print("  problem:", p)
    return 1 if problems(f) else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1, help="dns.workers (RSS is then the processes' sum)")
    raise SystemExit(asyncio.run(main_async(parser.parse_args())))


if __name__ == "__main__":
    main()
