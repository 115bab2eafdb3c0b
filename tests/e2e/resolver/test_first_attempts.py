"""First attempts of cache misses (Upstreams.begin) against a real UDP socket on loopback: those
begun in one turn of the event loop leave together at its end, from the socket picked for the turn
(none used past its share of queries), each with a random ID, and are answered (forged replies
ignored); one settled before its turn to leave (the pool closed) never leaves; those the kernel
refuses go back to their exchange. With sendto/recvfrom, and with sendmmsg/recvmmsg (dns.udp_io =
"batched": udp_batch.UpstreamBatches)."""

from __future__ import annotations

import asyncio
import gc
import select
import socket
import struct
import weakref
from collections import Counter
from collections.abc import Iterator

import dns.message
import pytest

from dnsgate.config import parse_upstream
from dnsgate.dns.udp_batch import UpstreamBatches, available
from dnsgate.dns.upstreams import QUERIES_PER_SOCKET, SWEEP_EVERY, After, DatagramBatches, Upstreams
from dnsgate.wire import Query, parse_query

ANSWER = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x01\x2c\x00\x04\xc0\x00\x02\x07"  # A 192.0.2.7, TTL 300


@pytest.fixture(params=["sendto", "sendmmsg"] if available() else ["sendto"])
def batches(request: pytest.FixtureRequest) -> DatagramBatches | None:
    return UpstreamBatches() if request.param == "sendmmsg" else None


@pytest.fixture
def server() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    yield sock
    sock.close()


def query(name: str) -> Query:
    q = parse_query(dns.message.make_query(name, "A").to_wire())
    assert isinstance(q, Query)
    return q


def waiting(sock: socket.socket) -> list[tuple[bytes, tuple[str, int]]]:
    """The datagrams waiting in `sock` now (none is waited for)."""
    got = []
    while select.select([sock], [], [], 0)[0]:
        got.append(sock.recvfrom(4096))
    return got


def answer(data: bytes) -> bytes:
    qend = data.index(0, 12) + 5
    return data[:2] + b"\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00" + data[12:qend] + ANSWER


async def test_first_attempts_of_one_turn_leave_together_and_are_answered(
        server: socket.socket, batches: DatagramBatches | None) -> None:
    upstreams = Upstreams([parse_upstream(f"127.0.0.1:{server.getsockname()[1]}")], timeout=2.0,
                          attempt_timeout=1.0, udp_size=1232, batches=batches)
    results: dict[str, bytes | None] = {}
    all_done = asyncio.Event()

    def done(name: str, reply: bytes | None, after: After | None) -> None:
        results[name] = reply
        if len(results) == len(names):
            all_done.set()

    names = [f"n{i}.example.test" for i in range(2 * QUERIES_PER_SOCKET + 5)]
    try:
        for name in names:
            assert upstreams.begin(query(name), done, name) is not None
        assert waiting(server) == []  # nothing has left within the turn that began them
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        sent = waiting(server)
        assert sorted(dns.message.from_wire(d).question[0].name.to_text() for d, _ in sent) == sorted(
            n + "." for n in names)
        assert len({struct.unpack_from(">H", d)[0] for d, _ in sent}) >= len(names) - 3  # random IDs
        # from one socket of the pool at a time, none used for more than its share of queries
        ports = Counter(port for _, (_, port) in sent)
        assert len(ports) >= 3 and max(ports.values()) <= QUERIES_PER_SOCKET
        for data, source in sent:
            server.sendto(answer(data)[:2] + b"\x00" + answer(data)[3:], source)  # QR clear: no reply, ignored
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as spoofer:  # right ID and question, wrong port
                spoofer.bind(("127.0.0.1", 0))
                spoofer.sendto(answer(data)[:-1] + b"\x66", source)
            server.sendto(answer(data), source)
        await asyncio.wait_for(all_done.wait(), 2)
        assert sorted(results) == sorted(names)
        for name, reply in results.items():
            assert reply is not None and dns.message.from_wire(reply).question[0].name.to_text() == name + "."
            assert reply.endswith(b"\xc0\x00\x02\x07")  # the server's answer, never the spoofer's
        assert upstreams.ignored == 2 * len(names)
    finally:
        await upstreams.close()


async def test_an_attempt_settled_before_it_leaves_is_not_sent(server: socket.socket,
                                                                batches: DatagramBatches | None) -> None:
    upstreams = Upstreams([parse_upstream(f"127.0.0.1:{server.getsockname()[1]}")], timeout=2.0,
                          attempt_timeout=1.0, udp_size=1232, batches=batches)
    results: list[tuple[bytes | None, After | None]] = []
    assert upstreams.begin(query("gone.example.test"), lambda _c, r, a: results.append((r, a)), None) is not None
    await upstreams.close()  # within the same turn: the attempt is over before its send
    assert results == [(None, None)]  # handed back once (its exchange answers SERVFAIL: closed)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert waiting(server) == []
    assert results == [(None, None)]


async def test_queries_the_kernel_refuses_go_back_to_their_exchange(batches: DatagramBatches | None) -> None:
    """The broadcast address without SO_BROADCAST: every send fails (EACCES) before anything leaves."""
    upstreams = Upstreams([parse_upstream("255.255.255.255:53")], timeout=2.0, attempt_timeout=1.0,
                          udp_size=1232, batches=batches)
    results: list[tuple[str, bytes | None, After | None]] = []
    try:
        for i in range(5):
            assert upstreams.begin(query(f"r{i}.example.test"), lambda c, r, a: results.append((c, r, a)),
                                   f"r{i}") is not None
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert sorted(results) == [(f"r{i}", None, None) for i in range(5)]  # each once, at once
        assert not any(sock.pending for sock in upstreams.live_sockets)
    finally:
        await upstreams.close()


async def test_answered_attempts_let_go_of_their_queries_long_before_their_timeout(
        server: socket.socket, batches: DatagramBatches | None) -> None:
    """An answered first attempt drops its query's context at once, and leaves the sweep's queue at
    the next sweep rather than when its timeout would have come: at thousands of misses a second a
    timeout's worth of them (and of their queries) held in memory is the process's high-water mark."""
    upstreams = Upstreams([parse_upstream(f"127.0.0.1:{server.getsockname()[1]}")], timeout=2.0,
                          attempt_timeout=1.0, udp_size=1232, batches=batches)

    class Context:
        pass

    contexts = [Context() for _ in range(40)]
    alive = [weakref.ref(c) for c in contexts]
    answered: list[bytes | None] = []
    all_done = asyncio.Event()

    def done(_context: object, reply: bytes | None, _after: After | None) -> None:
        answered.append(reply)
        if len(answered) == len(alive):
            all_done.set()

    try:
        for i, context in enumerate(contexts):
            assert upstreams.begin(query(f"held{i}.example.test"), done, context) is not None
        del contexts, context
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        for data, source in waiting(server):
            server.sendto(answer(data), source)
        await asyncio.wait_for(all_done.wait(), 2)
        assert all(reply is not None for reply in answered)
        gc.collect()
        assert [ref for ref in alive if ref() is not None] == []
        await asyncio.sleep(4 * SWEEP_EVERY)  # well within the attempts' 1 s timeout
        assert len(upstreams._attempts) == 0
    finally:
        await upstreams.close()
