"""Upstream faults, black box: dnsgate (a real process) forwards to a stub upstream that is dead,
slow, answers garbage, forges replies (wrong ID, wrong address), truncates, or resets TCP. Every
client query must get the correct answer or SERVFAIL within the deadline, never a forged answer;
afterwards dnsgate's task count is back to its baseline and its memory (RSS) has not grown.

    .venv/bin/python -m tests.reliability.faults [--queries 100000] [--window 2000]

`--queries` is per fault mode; every query asks a name never asked before (so each one goes
upstream), and the stub's answers have TTL 0 (so nothing accumulates in the cache).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import socket
import struct
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests.reliability.process import Served, serve, udp_io
from tests.support.stub_upstream import BOGUS_ADDRESS, StubUpstream

GOOD = "192.0.2.77"
TIMEOUT, ATTEMPT = 1.0, 0.4  # upstream.timeout and attempt_timeout given to dnsgate
SLACK = 1.0  # a reply may come this much after the deadline: queued in socket buffers during bursts


def garbage(_query: bytes, _reply: bytes) -> bytes:
    return os.urandom(random.randrange(0, 80))


def garbage_with_our_id(query: bytes, reply: bytes) -> bytes:
    """Right ID, QR set, the question; then records that run off the end (bad RDATA lengths)."""
    return reply[:12] + reply[12:-8] + os.urandom(8) if len(reply) > 20 else reply


def compression_loop(query: bytes, reply: bytes) -> bytes:
    """The answer's owner is a pointer to itself."""
    qend = 12 + (len(query) - 12 - 11)  # the stub's query carries our OPT (11 bytes)
    at = qend
    body = struct.pack(">H", 0xC000 | at) + struct.pack(">HHIH", 1, 1, 60, 4) + bytes([192, 0, 2, 1])
    return reply[:6] + b"\x00\x01\x00\x00\x00\x00" + reply[12:qend] + body


def oversize(query: bytes, reply: bytes) -> bytes:
    """An RDATA length far past the end of the message."""
    qend = 12 + (len(query) - 12 - 11)
    body = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 60000) + bytes(4)
    return reply[:6] + b"\x00\x01\x00\x00\x00\x00" + reply[12:qend] + body


@dataclass(frozen=True)
class Mode:
    name: str
    expect: str  # "either": correct answers (most of them) or SERVFAIL; "servfail": only SERVFAIL
    setup: Callable[[StubUpstream], None]


def _set(**values: Any) -> Callable[[StubUpstream], None]:
    def apply(stub: StubUpstream) -> None:
        for k, v in values.items():
            setattr(stub, k, v)
    return apply


MODES = (
    Mode("healthy", "either", _set()),
    Mode("dead (never answers)", "servfail", _set(silent=True)),
    Mode("slow (within the deadline)", "either", _set(delay=0.15)),
    Mode("slow (past the deadline)", "servfail", _set(delay=TIMEOUT + 0.3)),
    Mode("garbage bytes", "servfail", _set(rewrite=garbage)),
    # (when the damage happens to leave the records intact, the answer is correct)
    Mode("garbage records, our ID", "mostly servfail", _set(rewrite=garbage_with_our_id)),
    Mode("compression loop", "servfail", _set(rewrite=compression_loop)),
    Mode("RDATA past the end", "servfail", _set(rewrite=oversize)),
    Mode("forged: wrong ID only", "servfail", _set(wrong_id_first=True, forge_only=True)),
    Mode("forged: wrong address first", "either", _set(spoof_first=True)),
    Mode("forged: wrong question first", "either", _set(wrong_question_first=True)),
    Mode("truncating UDP (TCP fine)", "either", _set(truncate_udp=True)),
    Mode("truncating UDP, resetting TCP", "servfail", _set(truncate_udp=True, reset_tcp=True)),
)
CLEAN = StubUpstream()


@dataclass
class ModeResult:
    mode: str
    sent: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    slowest: float = 0.0
    latencies: list[float] = field(default_factory=list)
    dropped: Counter[str] = field(default_factory=Counter)  # by the kernel, on whose socket (see `drops`)
    late: int = 0  # replies that came after the client had given up on them (counted as "no reply")

    def quantile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0
    wrong: list[str] = field(default_factory=list)


class _Client(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.waiting: dict[int, asyncio.Future[bytes]] = {}
        self.late = 0  # replies to queries given up on ("no reply"): they came, after the client's wait

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if len(data) >= 2:
            future = self.waiting.pop((data[0] << 8) | data[1], None)
            if future is not None and not future.done():
                future.set_result(data)
            elif future is None:
                self.late += 1


def _query(qid: int, name: str) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + b"\x00\x00\x01\x00\x01"


def _classify(reply: bytes) -> tuple[str, str | None]:
    rcode = reply[3] & 0xF
    if reply[2] & 0x02:
        return "truncated", None
    if rcode == 2:
        return "servfail", None
    if rcode != 0:
        return f"rcode {rcode}", None
    an = struct.unpack_from(">H", reply, 6)[0]
    # type A, class IN, any TTL, RDLENGTH 4, then the address
    found = {".".join(str(b) for b in reply[i + 10 : i + 14]) for i in range(12, len(reply) - 13)
             if reply[i : i + 4] == b"\x00\x01\x00\x01" and reply[i + 8 : i + 10] == b"\x00\x04"} if an else set()
    if BOGUS_ADDRESS in found:
        return "forged", BOGUS_ADDRESS
    return ("answer", None) if GOOD in found else ("empty", None)


async def blast(port: int, mode: str, n: int, window: int, tag: str, pid: int | None = None,
                stub_port: int = 0) -> ModeResult:
    loop = asyncio.get_running_loop()
    transport, client = await loop.create_datagram_endpoint(_Client, local_addr=("127.0.0.1", 0))
    sock = transport.get_extra_info("socket")
    roles = {"client": sock.getsockname()[1], "upstream stub": stub_port}
    before = drops(pid, roles) if pid is not None else Counter()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)  # a burst of replies must not overflow it
    result = ModeResult(mode)
    gate = asyncio.Semaphore(min(window, 60_000))
    qid = 0

    async def one(i: int) -> None:
        nonlocal qid
        async with gate:
            qid = (qid + 1) & 0xFFFF
            while qid in client.waiting:
                qid = (qid + 1) & 0xFFFF
            my = qid
            future: asyncio.Future[bytes] = loop.create_future()
            client.waiting[my] = future
            started = loop.time()
            transport.sendto(_query(my, f"q{i}.{tag}.example.test"), ("127.0.0.1", port))
            result.sent += 1
            try:
                reply = await asyncio.wait_for(future, TIMEOUT + SLACK + 2)
            except TimeoutError:
                client.waiting.pop(my, None)
                result.outcomes["no reply"] += 1
                return
            took = loop.time() - started
            result.slowest = max(result.slowest, took)
            result.latencies.append(took)
            outcome, bad = _classify(reply)
            result.outcomes[outcome] += 1
            if bad:
                result.wrong.append(bad)

    try:
        await asyncio.gather(*(one(i) for i in range(n)))
        if pid is not None:
            result.dropped = drops(pid, roles) - before
        if result.outcomes["no reply"]:  # (a late reply may still be on its way)
            await asyncio.sleep(TIMEOUT + SLACK)
        result.late = client.late
    finally:
        transport.close()
    return result


def udp_sockets() -> dict[str, tuple[int, int]]:
    """Every UDP socket of this host by inode: (local port, datagrams the kernel dropped on it because
    its receive buffer was full), as /proc/net/udp and udp6 say."""
    found: dict[str, tuple[int, int]] = {}
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                f = line.split()
                found[f[9]] = (int(f[1].rsplit(":", 1)[1], 16), int(f[12]))
    return found


def drops(pid: int, ports: Mapping[str, int]) -> Counter[str]:
    """Datagrams dropped so far on dnsgate's UDP sockets (its listener and upstream sockets) and on
    the sockets at `ports` (role -> port): a query or reply lost there is a "no reply", not dnsgate's."""
    sockets = udp_sockets()
    counts: Counter[str] = Counter()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                link = os.readlink(fd)
                if link.startswith("socket:[") and link[8:-1] in sockets:
                    counts["dnsgate"] += sockets[link[8:-1]][1]
    for role, port in ports.items():
        counts[role] += sum(d for p, d in sockets.values() if p == port)
    return counts


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def health(served: Served) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(served.api + "/healthz") as r:
        body: dict[str, Any] = await r.json()
        return body


async def settle(served: Served, timeout: float = 10.0) -> dict[str, Any]:
    """Wait (bounded) until no query is in flight."""
    deadline = time.monotonic() + timeout
    while True:
        h = await health(served)
        if h["in_flight"] == 0 or time.monotonic() > deadline:
            return h
        await asyncio.sleep(0.1)


@dataclass
class Figures:
    results: list[ModeResult]
    tasks_before: int
    tasks_after: int
    rss_kb: list[int]  # after the warm-up round, after round 1, after round 2
    problems: list[str]

    @property
    def queries(self) -> int:
        return sum(r.sent for r in self.results)


def check(r: ModeResult, expect: str) -> list[str]:
    problems = []
    allowed = {"servfail"} if expect == "servfail" else {"answer", "servfail"}
    unexpected = {k: v for k, v in r.outcomes.items() if k not in allowed}
    if unexpected:
        dropped = f" (datagrams dropped by the kernel: {dict(r.dropped)})" if r.dropped else ""
        dropped += f" ({r.late} replies came after the client's wait)" if r.late else ""
        problems.append(f"{r.mode}: expected {expect}, got {dict(r.outcomes)}{dropped}")
    if expect == "either" and r.outcomes["answer"] < r.sent // 2:  # SERVFAIL only when the stub falls behind
        problems.append(f"{r.mode}: too few answers: {dict(r.outcomes)}")
    if r.wrong:
        problems.append(f"{r.mode}: {len(r.wrong)} forged answers reached the client")
    # Measured by the client: socket queues count too. On a saturated machine (a long run with a
    # wide window) a few replies wait there; 99.9 % of them must still beat the deadline.
    late = r.quantile(0.999) if len(r.latencies) >= 10_000 else r.slowest
    if late > TIMEOUT + SLACK:
        problems.append(f"{r.mode}: replies took up to {late:.2f} s (deadline {TIMEOUT} s)")
    return problems


async def run(per_mode: int, window: int, data_dir: Path, modes: tuple[Mode, ...] = MODES) -> Figures:
    stub = StubUpstream(default_a=GOOD)
    await stub.start()
    config = data_dir.parent / "faults.toml"
    config.write_text(f"[upstream]\ntimeout = {TIMEOUT}\nattempt_timeout = {ATTEMPT}\n[querylog]\nmode = \"off\"\n")
    served = await serve(stub.address, data_dir, config=config)
    problems: list[str] = []
    results: list[ModeResult] = []
    rss: list[int] = []
    try:
        before: dict[str, Any] = {}
        for round_ in range(3):  # round 0 warms up (every mode, a tenth of the queries); 1 and 2 count
            for m, mode in enumerate(modes):
                for f in ("silent", "delay", "truncate_udp", "wrong_id_first", "spoof_first", "wrong_question_first",
                          "forge_only", "reset_tcp"):
                    setattr(stub, f, getattr(CLEAN, f))
                stub.rewrite = None
                mode.setup(stub)
                n = per_mode // 20 if round_ == 0 else per_mode // 2
                r = await blast(served.dns_port, mode.name, n, window, f"r{round_}m{m}", served.process.pid, stub.port)
                stub.queries.clear()
                stub.received.clear()
                stub.sources.clear()
                await settle(served)
                if round_:
                    problems += check(r, mode.expect)
                    results.append(r)
            if round_ == 0:
                before = await settle(served)
            rss.append(rss_kb(served.process.pid))
        after = await settle(served)
        # A leak grows with the work done: the second half of the queries must not add to the first's.
        growth = (rss[-1] - rss[1]) / rss[1]
        if growth > 0.10:
            problems.append(f"RSS grew {100 * growth:.1f} % over the second half of the queries")
        errors = [line for line in served.log if "ERROR" in line or "Traceback" in line]
        if errors:
            problems.append(f"{len(errors)} error lines in dnsgate's log, e.g. {errors[0]}")
    finally:
        await served.stop()
        await stub.stop()
    return Figures(results, before["tasks"], after["tasks"], rss, problems)


def report(f: Figures) -> str:
    merged: dict[str, Counter[str]] = {}
    for r in f.results:
        merged.setdefault(r.mode, Counter()).update(r.outcomes)
    lines = [f"{mode:32s} {sum(c.values()):7d} queries: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
             for mode, c in merged.items()]
    slowest = max(r.slowest for r in f.results)
    every = ModeResult("all", latencies=[t for r in f.results for t in r.latencies])
    dropped: Counter[str] = sum((r.dropped for r in f.results), Counter())
    lines.append("datagrams the kernel dropped (receive buffer full): "
                 + (", ".join(f"{k} {v}" for k, v in sorted(dropped.items())) or "none")
                 + f"; replies that came after the client's wait: {sum(r.late for r in f.results)}")
    lines.append(f"faults injected: {f.queries} queries over {len(merged)} upstream behaviours; reply time p50 "
                 f"{every.quantile(0.5):.2f} s, p99 {every.quantile(0.99):.2f} s, p99.9 {every.quantile(0.999):.2f} s, "
                 f"max {slowest:.2f} s (deadline {TIMEOUT} s); tasks before/after {f.tasks_before}/{f.tasks_after}; "
                 f"RSS after warm-up / half / all of them {' / '.join(f'{kb / 1024:.1f}' for kb in f.rss_kb)} MB "
                 f"(second half {100 * (f.rss_kb[-1] - f.rss_kb[1]) / f.rss_kb[1]:+.1f} %)")
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> int:
    print(f"dns.udp_io: {udp_io()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        f = await run(args.queries, args.window, Path(tmp) / "data")
    print(report(f))
    for p in f.problems:
        print("  problem:", p)
    return 1 if f.problems else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=100_000, help="queries per fault mode")
    parser.add_argument("--window", type=int, default=1000, help="queries outstanding at once")
    raise SystemExit(asyncio.run(main_async(parser.parse_args())))


if __name__ == "__main__":
    main()
