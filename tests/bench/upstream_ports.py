"""What a fresh source port costs: upstream exchanges per second and CPU per exchange, by how many
queries each upstream UDP socket serves before it is replaced (1 = a new socket, so a new random
port, for every query).

    .venv/bin/python tests/bench/upstream_ports.py [--queries 40000] [--concurrency 100]

The upstream is a minimal echo server in another process (it turns each query into a reply by
setting QR), pinned to another CPU when there are two, so the numbers are dnsgate's side only:
`Upstreams.exchange` under uvloop, ID choice, socket choice, sending, matching the reply.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import socket
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

import dns.message

from dnsgate.config import UpstreamAddress
from dnsgate.dns.upstreams import SOCKETS_PER_FAMILY, Upstreams
from dnsgate.wire import Query, parse_query


def echo_server(ready: Connection) -> None:
    if hasattr(os, "sched_setaffinity") and os.cpu_count() and os.cpu_count() > 1:  # type: ignore[operator]
        os.sched_setaffinity(0, {1})
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    ready.send(sock.getsockname()[1])
    while True:
        data, addr = sock.recvfrom(4096)
        sock.sendto(data[:2] + bytes([data[2] | 0x80]) + data[3:], addr)


async def run(port: int, per_socket: int, total: int, concurrency: int) -> tuple[float, float, int]:
    upstreams = Upstreams([UpstreamAddress("127.0.0.1", port)], timeout=2.0, attempt_timeout=1.0, udp_size=1232,
                          queries_per_socket=per_socket)
    queries: list[Query] = []
    for i in range(1000):
        q = parse_query(dns.message.make_query(f"n{i}.example.test", "A").to_wire())
        assert isinstance(q, Query)
        queries.append(q)
    left = total

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await upstreams.exchange(queries[left % 1000])

    await asyncio.gather(*(worker() for _ in range(concurrency)))  # warm-up round
    left = total
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    opened = upstreams.sockets_opened
    await upstreams.close()
    return total / wall, cpu / total * 1e6, opened


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queries", type=int, default=40_000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--per-socket", type=int, nargs="*", default=[1, 4, 16, 64, 1_000_000])
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {0})
    parent, child = multiprocessing.Pipe()
    server = multiprocessing.Process(target=echo_server, args=(child,), daemon=True)
    server.start()
    port = parent.recv()
    import uvloop

    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    print(f"{args.queries} exchanges, {args.concurrency} concurrent, pool of {SOCKETS_PER_FAMILY} sockets")
    print("queries per socket | exchanges/s | CPU µs per exchange | sockets opened")
    try:
        for per_socket in args.per_socket:
            with asyncio.Runner(loop_factory=factory) as runner:
                rate, cpu_us, opened = runner.run(run(port, per_socket, args.queries, args.concurrency))
            label = "never replaced" if per_socket >= 1_000_000 else str(per_socket)
            print(f"{label:>18} | {rate:11.0f} | {cpu_us:19.1f} | {opened}")
    finally:
        server.terminate()  # by its own handle: the one process this script started
        server.join()


if __name__ == "__main__":
    main()
