"""What a cache miss costs in Python, end to end but without the kernel: datagram in, upstream query
out, upstream reply in, answer out.

    .venv/bin/python -m tests.bench.miss_cost [--rounds 7] [--n 20000]

The real UdpListener, Pipeline, Resolver and Upstreams run on a real event loop; only the sockets
are replaced: the upstream "socket" answers every query at once (an A record for the name asked),
and the client transport just counts replies. So the figure is the Python work of one miss, the
part a change to the miss path can move (the four system calls of a real miss come on top: see
tests/bench/run.py --workloads miss). Best of several rounds, unique names throughout.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import dns.message

from dnsgate.config import parse_upstream
from dnsgate.dns.forwarding import Resolver
from dnsgate.dns.listeners import UdpListener
from dnsgate.dns.upstreams import Upstreams, _UdpSocket
from dnsgate.tasks import TaskSet
from tests.bench.answer_cost import build

ANSWER = b"\xc0\x0c\x00\x01\x00\x01\x00\x01\x51\x80\x00\x04\xc6\x12\xff\x01"  # A 198.18.255.1, TTL 86400


class LoopbackSocket:
    """Stands in for an upstream UDP socket: every query is answered at once, from the server asked."""

    def __init__(self, owner: _UdpSocket) -> None:
        self.owner = owner

    def sendto(self, message: bytes, peer: tuple[str, int]) -> int:
        qend = message.find(0, 12) + 5
        reply = message[:2] + b"\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00" + message[12:qend] + ANSWER
        self.owner._received(reply, peer)
        return len(message)

    def close(self) -> None:
        pass

    def fileno(self) -> int:
        return -1


class CountingTransport:
    def __init__(self) -> None:
        self.replies = 0
        self.target = 0
        self.all_answered = asyncio.Event()

    def sendto(self, data: bytes, addr: Any) -> None:
        self.replies += 1
        if self.replies >= self.target:
            self.all_answered.set()

    def is_closing(self) -> bool:
        return False


def patch_sockets() -> None:
    """Upstream sockets that never touch the kernel."""
    def init(self: _UdpSocket, owner: Upstreams, family: int, uses: int) -> None:
        self.owner = owner
        self.v6 = False
        self.sock = LoopbackSocket(self)  # type: ignore[assignment]
        self.fd = -1
        self.pending = {}
        self.uses_left = uses
        self.retired = False

    _UdpSocket.__init__ = init  # type: ignore[method-assign]


async def run(n: int, rounds: int) -> list[float]:
    patch_sockets()
    pipeline = build()
    upstreams = Upstreams([parse_upstream("127.0.0.1:53")], timeout=3.0, attempt_timeout=1.0, udp_size=1232)
    tasks = TaskSet()
    resolver = Resolver(pipeline, upstreams, tasks.spawn)
    listener = UdpListener(pipeline, resolver, tasks, False)
    transport = CountingTransport()
    listener.connection_made(transport)  # type: ignore[arg-type]
    results = []
    serial = 0
    template = dns.message.make_query("u0000000.abcdef.miss.test", "A").to_wire()
    at = template.index(b"u0000000") + 1
    for _ in range(rounds):
        queries = []
        for _ in range(n):
            serial += 1
            queries.append(b"%s%07d%s" % (template[:at], serial, template[at + 7 :]))
        pipeline.cache.clear()
        transport.target = transport.replies + n
        transport.all_answered.clear()
        started = time.perf_counter_ns()
        for q in queries:
            listener.datagram_received(q, ("127.0.0.1", 40000))
        await transport.all_answered.wait()  # answers that wait for a task come a little later
        results.append((time.perf_counter_ns() - started) / n)
    await upstreams.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    try:
        import uvloop
        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover
        runner = asyncio.Runner()
    with runner:
        ns = runner.run(run(args.n, args.rounds))
    print(f"miss {min(ns) / 1000:6.2f} us/query  (rounds: {', '.join(f'{x / 1000:.2f}' for x in ns)})")


if __name__ == "__main__":
    main()
