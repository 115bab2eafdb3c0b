"""Instructions per query on the hot paths, counted by valgrind's callgrind (load-independent).

    .venv/bin/python -m tests.bench.instructions [--calls 20000] [--cases answer,batch,querylog]

On a shared machine wall-clock timings move by tens of percent from one minute to the next; the
user-space instructions a piece of code executes do not. This runs itself under callgrind once,
with a dump of the counters before every measured section (`--dump-before=sched_yield`: each
section starts with `os.sched_yield()`), and prints the instructions of each section divided by
the queries it handled:

- answer/*: `Pipeline.answer` in a loop (tests/bench/answer_cost.py's pipeline, query log sinks
  attached as in gated-only mode): a cache hit, a sinkhole for a name the cache never held (the
  bench's blocked workload), one for a cached name, a gated name allowed by consent.
- batch/*: the batched UDP endpoint's per-batch handler (dns/udp_batch.py) on a loopback socket:
  a client sends 64 queries with one sendmmsg, the handler takes them with one recvmmsg, answers
  each and sends the replies with one sendmmsg, the client drains them with one recvmmsg (the
  client's two calls are counted too). Blocked: 1 000 gated names, nobody consented; allowed:
  896 cached names; mix: 9 allowed to 1 blocked.
- querylog/*: what each gated-only entry costs the query log after `answer` appended it: `take`
  on the event loop, and the writer thread's row building and SQLite insert (9 000 distinct
  names, as the bench's blocked workload).

System calls' kernel time is not counted (callgrind sees user space only). Compare two checkouts
by running this in each worktree (or with PYTHONPATH pointing at the other's sources).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import ctypes.util
import gc
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import dns.message

from dnsgate.config import QueryLogConfig
from dnsgate.dns import udp_batch
from dnsgate.dns.forwarding import Resolver
from dnsgate.dns.tally import SINKHOLED
from dnsgate.observe.events import EventHub
from dnsgate.observe.querylog import QueryLog
from dnsgate.observe.querylog_db import QueryLogDb
from tests.bench.answer_cost import build, fill
from tests.support import consent_fixtures

BATCH = udp_batch.BATCH
CASES = ("answer", "batch", "querylog")
# A section: (label, queries it handles, the callable that runs it)
Section = tuple[str, int, Callable[[], None]]


def gated_names(n: int, seed: int = 20261207) -> list[str]:
    """Gated names as the bench's blocked workload asks them: subdomains of the built-in catalog's vendors."""
    rnd = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    suffixes = ("trackcmp.net", "app-us1.com", "api-us1.com")
    return [f"{''.join(rnd.choice(letters) for _ in range(rnd.randint(6, 12)))}.{suffixes[i % 3]}" for i in range(n)]


def wires(names: list[str], rdtypes: tuple[str, ...] = ("A", "AAAA")) -> list[bytes]:
    return [dns.message.make_query(name, rdtypes[i % len(rdtypes)]).to_wire() for i, name in enumerate(names)]


def answer_sections(calls: int) -> list[Section]:
    p = build()
    sink: list[object] = []
    p.log_gated = sink.append
    p.consent.put(consent_fixtures.choice("127.0.0.2", expires_at=4e9))  # granted marketing
    fill(p, "host.example.test", "192.0.2.10")
    fill(p, "trackcmp.net", "198.51.100.1", client="127.0.0.2")
    mono, wall = time.monotonic(), time.time()
    p.mono, p.wall = (lambda: mono), (lambda: wall)
    cases = {
        "cached": (dns.message.make_query("host.example.test", "A").to_wire(), "127.0.0.1"),
        "blocked": (dns.message.make_query("x.trackcmp.net", "A").to_wire(), "127.0.0.1"),
        "blocked-cached": (dns.message.make_query("trackcmp.net", "A").to_wire(), "127.0.0.1"),
        "gated-allowed": (dns.message.make_query("trackcmp.net", "A").to_wire(), "127.0.0.2"),
    }
    sections: list[Section] = []
    for label, (wire, client) in cases.items():
        def run(wire: bytes = wire, client: str = client) -> None:
            answer = p.answer
            for _ in range(calls):
                answer(wire, client, 0)
            sink.clear()

        for _ in range(3):  # once on the general path, then from memory
            assert isinstance(p.answer(wire, client, 0), bytes)
        sections.append((f"answer/{label}", calls, run))
    return sections


class _Client:
    """A loopback client that sends BATCH queries with one sendmmsg and drains replies with one recvmmsg."""

    def __init__(self, server: tuple[str, int]) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)  # its own: the same whatever udp_batch does
        self.recvmmsg, self.sendmmsg = libc.recvmmsg, libc.sendmmsg
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.setblocking(False)
        self.fd = self.sock.fileno()
        dest = socket.inet_aton(server[0])
        self.sockaddr = ctypes.create_string_buffer(
            socket.AF_INET.to_bytes(2, sys.byteorder) + server[1].to_bytes(2, "big") + dest + bytes(8), 16)
        self.kept: list[Any] = []  # ctypes objects the headers point into
        self.replies = [ctypes.create_string_buffer(1232) for _ in range(BATCH)]
        self.rmsgs = self._headers(self.replies, None)
        self.smsgs: Any = None

    def _headers(self, buffers: list[Any], name: Any) -> Any:
        iovs = (udp_batch._Iovec * BATCH)()
        msgs = (udp_batch._Mmsghdr * BATCH)()
        for i, buf in enumerate(buffers):
            iovs[i].iov_base, iovs[i].iov_len = ctypes.addressof(buf), ctypes.sizeof(buf)
            msgs[i].msg_hdr.msg_iov = ctypes.addressof(iovs[i])
            msgs[i].msg_hdr.msg_iovlen = 1
            if name is not None:
                msgs[i].msg_hdr.msg_name = ctypes.addressof(name)
                msgs[i].msg_hdr.msg_namelen = 16
        self.kept.append(iovs)
        return msgs

    def load(self, queries: list[bytes]) -> None:
        """The batch every `send` sends (BATCH queries)."""
        buffers = [ctypes.create_string_buffer(q, len(q)) for q in queries]
        self.kept.append(buffers)
        self.smsgs = self._headers(buffers, self.sockaddr)

    def send(self) -> None:
        sent = self.sendmmsg(self.fd, ctypes.byref(self.smsgs), BATCH, 0)
        assert sent == BATCH, sent

    def drain(self) -> int:
        return int(self.recvmmsg(self.fd, ctypes.byref(self.rmsgs), BATCH, 0, None))


async def batch_sections(calls: int) -> list[Section]:
    batches = max(1, calls // BATCH)
    p = build()
    sink: list[object] = []
    p.log_gated = sink.append
    allowed = [f"host{i}.example.test" for i in range(896)]  # (the cache holds 1 000)
    for i, name in enumerate(allowed):
        fill(p, name, f"198.18.{i // 256}.{i % 256}")
    # the clocks stand still from here: what a query costs, not when a cached answer's TTLs tick
    mono, wall = time.monotonic(), time.time()
    p.mono, p.wall = (lambda: mono), (lambda: wall)
    blocked = wires(gated_names(1000))
    cached = wires(allowed, ("A",))
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    endpoint = udp_batch.BatchedUdp(server, p, cast(Resolver, None))
    endpoint._pause_reading()  # the handler is called here, not by the event loop
    client = _Client(server.getsockname())
    rnd = random.Random(7)
    workloads = {
        "blocked": blocked,
        "allowed": cached,
        "mix": [rnd.choice(blocked) if i % 10 == 0 else rnd.choice(cached) for i in range(1000)],
    }
    sections: list[Section] = []
    for label, queries in workloads.items():
        groups = [queries[i : i + BATCH] for i in range(0, len(queries) - BATCH + 1, BATCH)]

        def run(groups: list[list[bytes]] = groups, loaded: list[Any] = []) -> None:  # noqa: B006
            handle, send, drain = endpoint._readable, client.send, client.drain
            for b in range(batches):
                client.smsgs = loaded[b % len(loaded)]
                send()
                handle()
                if drain() != BATCH:
                    raise AssertionError("a reply is missing")
                if b % 16 == 15:
                    sink.clear()  # as the query log's take
            sink.clear()

        loaded: list[Any] = []
        for group in groups:
            client.load(group)
            loaded.append(client.smsgs)
        run.__defaults__ = (groups, loaded)
        # a first pass (unmeasured) through every query: gated names matched, sinkhole answers kept
        for smsgs in loaded:
            client.smsgs = smsgs
            client.send()
            endpoint._readable()
            client.drain()
        sink.clear()
        sections.append((f"batch/{label}", batches * BATCH, run))
    return sections


async def querylog_sections(calls: int) -> list[Section]:
    data = Path(tempfile.mkdtemp(prefix="instructions-"))
    ql = QueryLog(QueryLogConfig(queue_size=10**9), QueryLogDb(data / "querylog.sqlite3"), EventHub(), key=b"k",
                  sinkhole_rcode=3)
    questions = [w[12:] for w in wires(gated_names(9000))]
    vendor = ("activecampaign", "marketing")
    now = time.monotonic()
    entries = [(now + i * 1e-5, "127.0.0.1", questions[i % len(questions)], 0, SINKHOLED, -1, vendor, None, 0.0)
               for i in range(calls)]
    # warm the writer's memos as a running log has
    ql.pending.extend(entries)
    ql.take()
    batches, ql._queue = ql._queue, []
    ql._write(batches, time.time(), False)
    ql.queued = 0

    def take() -> None:
        ql.pending.extend(entries)
        ql.take()

    def write() -> None:
        batches, ql._queue = ql._queue, []
        ql._write(batches, time.time(), False)
        ql.queued = 0

    return [("querylog/take", calls, take), ("querylog/write", calls, write)]


async def inner(cases: list[str], calls: int) -> None:
    sections: list[Section] = []
    if "answer" in cases:
        sections += answer_sections(calls)
    if "batch" in cases:
        sections += await batch_sections(calls)
    if "querylog" in cases:
        sections += await querylog_sections(calls)
    gc.freeze()  # as `dnsgate serve` does once it is ready (gc_policy.frozen_startup)
    labels = []
    for label, queries, run in sections:
        os.sched_yield()  # callgrind dumps here: what follows is this section alone
        run()
        labels.append(f"{label} {queries}")
    os.sched_yield()
    print("\n".join(labels))


def outer(cases: list[str], calls: int) -> None:
    with tempfile.TemporaryDirectory(prefix="callgrind-") as tmp:
        out = Path(tmp) / "callgrind.out"
        proc = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-before=sched_yield",
             "--dump-instr=no", sys.executable, "-m", "tests.bench.instructions", "--inner", "--calls", str(calls),
             "--cases", ",".join(cases)], capture_output=True, text=True, check=False)
        if proc.returncode:
            raise SystemExit(proc.stderr[-2000:])
        sections = [line.split() for line in proc.stdout.splitlines() if line.strip()]
        parts = sorted(Path(tmp).glob("callgrind.out.*"), key=lambda f: int(f.name.rsplit(".", 1)[1]))
        totals = [_total(f) for f in parts]
        # part 1 ends at the first section's start; part k + 1 is section k
        for (label, queries), total in zip(sections, totals[1:], strict=False):
            print(f"{label:24s} {total / int(queries):9.0f} instructions/query")


def _total(path: Path) -> int:
    text = path.read_text(errors="replace")
    found = re.search(r"^(?:summary|totals):\s*(\d+)", text, re.MULTILINE)
    return int(found.group(1)) if found else 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=20_000, help="queries per section")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    if args.inner:
        asyncio.run(inner(cases, args.calls))
    else:
        outer(cases, args.calls)


if __name__ == "__main__":
    main()
