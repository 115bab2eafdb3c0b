"""UDP on both paths (dns.udp_io): wildcard listeners answer from the address asked, bursts larger
than a batch are answered whole, the fuzz corpus over real sockets, and (batched) replies the
socket cannot take at once are sent later, never dropped (batched, and the asyncio path's own
socket on a wildcard address)."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import socket
import struct
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from dnsgate.config import DnsConfig
from dnsgate.dns import udp_batch
from tests.conftest import ipv6_loopback, make_config, running_gate
from tests.e2e.resolver.conftest import udp_raw
from tests.fuzz import checks
from tests.support.stub_upstream import StubUpstream

pytestmark = pytest.mark.usefixtures("udp_io")  # every test runs on both UDP paths (dns.udp_io)

FUZZ = Path(__file__).parents[1] / "fuzz"


def exchange(port: int, host: str, wire: bytes, family: socket.AddressFamily) -> tuple[bytes, Any]:
    """One query from a plain socket (no connect, so any source is received): the reply and where it came from."""
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(3)
        sock.sendto(wire, (host, port))
        return sock.recvfrom(65535)


@pytest.mark.parametrize("name", ["trackcmp.net", "host.example.test"], ids=["sinkholed", "forwarded"])
async def test_a_wildcard_ipv4_listener_answers_from_the_address_asked(upstream: StubUpstream, data_dir: Path,
                                                                       name: str) -> None:
    """Linux routes all of 127/8 to lo: a query to 127.0.0.2 must be answered from 127.0.0.2, not from
    the interface's primary address; dnspython raises UnexpectedSource otherwise."""
    cfg = make_config(upstream, data_dir, dns=DnsConfig(listen=("0.0.0.0:0",)))
    async with running_gate(cfg) as g:
        for target in ("127.0.0.2", "127.0.0.1", "127.0.0.2"):  # miss (or sinkhole), then hits
            q = dns.message.make_query(name, "A")
            reply = await dns.asyncquery.udp(q, target, port=g.dns_port, timeout=3)
            assert reply.rcode() == (dns.rcode.NXDOMAIN if name == "trackcmp.net" else dns.rcode.NOERROR)
            wire, source = await asyncio.to_thread(exchange, g.dns_port, target, q.to_wire(), socket.AF_INET)
            assert source == (target, g.dns_port)
            assert dns.message.from_wire(wire).id == q.id


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
@pytest.mark.parametrize("name", ["trackcmp.net", "other.example.test"], ids=["sinkholed", "forwarded"])
async def test_a_wildcard_ipv6_listener_answers_from_the_address_asked(upstream: StubUpstream, data_dir: Path,
                                                                       name: str) -> None:
    """[::] takes IPv6 and IPv4-mapped clients: each reply leaves from the address its query was sent to."""
    cfg = make_config(upstream, data_dir, dns=DnsConfig(listen=("[::]:0",)))
    async with running_gate(cfg) as g:
        for target, family in (("::1", socket.AF_INET6), ("127.0.0.2", socket.AF_INET), ("::1", socket.AF_INET6)):
            q = dns.message.make_query(name, "AAAA")
            reply = await dns.asyncquery.udp(q, target, port=g.dns_port, timeout=3)
            assert reply.id == q.id
            wire, source = await asyncio.to_thread(exchange, g.dns_port, target, q.to_wire(), family)
            assert source[:2] == (target, g.dns_port)
            assert dns.message.from_wire(wire).id == q.id


def burst(port: int, queries: list[bytes]) -> dict[int, bytes]:
    """Every query sent before any reply is read (the server finds them waiting, batches fill)."""
    replies: dict[int, bytes] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.settimeout(5)
        for wire in queries:
            sock.sendto(wire, ("127.0.0.1", port))
        while len(replies) < len(queries):
            try:
                wire, _ = sock.recvfrom(65535)
            except TimeoutError:
                break
            qid = struct.unpack_from(">H", wire)[0]
            assert qid not in replies, f"two replies to query {qid}"
            replies[qid] = wire
    return replies


NAMES = ["host.example.test", "trackcmp.net", "other.example.test", "x.trackcmp.net", "nope.example.test"]


def alternating(n: int) -> list[bytes]:
    """n queries, IDs 0..n-1, a cached name and a sinkholed one in turn."""
    queries = []
    for i in range(n):
        q = dns.message.make_query(NAMES[i % 2], "A")
        q.id = i
        queries.append(q.to_wire())
    return queries


async def test_a_burst_larger_than_a_batch_is_answered_whole(upstream: StubUpstream, data_dir: Path) -> None:
    """300 queries at once (several batches; sinkholed, cached and forwarded ones interleaved), each
    answered once, with its own question's answer."""
    async with running_gate(make_config(upstream, data_dir)) as g:
        queries = []
        for i in range(300):
            q = dns.message.make_query(NAMES[i % len(NAMES)], "A", use_edns=0 if i % 3 else False)
            q.id = i
            queries.append(q.to_wire())
        replies = await asyncio.to_thread(burst, g.dns_port, queries)
        assert sorted(replies) == list(range(300))
        expected: dict[str, int] = {}
        for qid, wire in replies.items():
            reply = dns.message.from_wire(wire)
            assert reply.question[0].name.to_text() == NAMES[qid % len(NAMES)] + "."
            assert (reply.edns >= 0) == bool(qid % 3)
            assert expected.setdefault(NAMES[qid % len(NAMES)], reply.rcode()) == reply.rcode()
        assert expected["trackcmp.net"] == dns.rcode.NXDOMAIN
        assert expected["host.example.test"] == dns.rcode.NOERROR


def _saved() -> list[Path]:
    return sorted(p for d in ("corpus", "crashes") for p in (FUZZ / d).glob("*") if p.is_file())


async def test_the_fuzz_corpus_over_real_sockets(upstream: StubUpstream, data_dir: Path) -> None:
    """The fuzzer's corpus and crash reproducers sent as datagrams, all at once from as many sockets:
    those the pipeline answers get a well-formed reply to their own query, the others none, and the
    listener answers afterwards."""
    pipeline = checks.pipeline()
    packets = [data for data in (path.read_bytes() for path in _saved()) if 0 < len(data) <= 65507]
    answers = [pipeline.answer(data, "127.0.0.1", False) is not None for data in packets]
    async with running_gate(make_config(upstream, data_dir)) as g:
        replies = await asyncio.gather(*(udp_raw(g.dns_port, data, timeout=1.5) for data in packets))
        for data, reply, answered in zip(packets, replies, answers, strict=True):
            assert (reply is not None) == answered, data.hex()
            if reply is not None:
                checks.check_reply(reply, data, False)
        assert (await g.query("host.example.test")).rcode() == dns.rcode.NOERROR


@pytest.fixture
def stingy_sendmmsg(udp_io: str) -> Iterator[list[int]]:
    """The socket takes one reply per sendmmsg, and every other call none (EAGAIN): a full send buffer.
    Yields the counts sendmmsg was asked to send."""
    if udp_io != "batched":
        pytest.skip("sendmmsg is the batched path's")
    assert udp_batch._CALLS is not None
    recvmmsg, sendmmsg = udp_batch._CALLS
    asked: list[int] = []

    def stingy(fd: int, headers: int, count: int, flags: int) -> int:
        asked.append(count)
        if len(asked) % 2 == 0:
            ctypes.set_errno(errno.EAGAIN)
            return -1
        return int(sendmmsg(fd, headers, min(count, 1), flags))

    udp_batch._CALLS = (recvmmsg, stingy)
    try:
        yield asked
    finally:
        udp_batch._CALLS = (recvmmsg, sendmmsg)


async def test_replies_the_socket_cannot_take_are_sent_later_in_order(upstream: StubUpstream, data_dir: Path,
                                                                      stingy_sendmmsg: list[int]) -> None:
    async with running_gate(make_config(upstream, data_dir)) as g:
        assert (await g.query("host.example.test")).rcode() == dns.rcode.NOERROR  # cached
        replies = await asyncio.to_thread(burst, g.dns_port, alternating(150))
        assert sorted(replies) == list(range(150))
        assert max(stingy_sendmmsg) > 1, "never more than one reply to send at once: no batch was tested"
        assert (await g.query("other.example.test")).rcode() == dns.rcode.NOERROR  # reading resumed


@pytest.fixture
def stingy_sendmsg(udp_io: str, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every other sendmsg finds the socket full (EAGAIN); the list counts the calls."""
    if udp_io != "asyncio":
        pytest.skip("one sendmsg a reply is the asyncio path's on a wildcard address")
    calls: list[int] = []
    sendmsg = socket.socket.sendmsg

    def stingy(self: socket.socket, buffers: Any, *args: Any) -> int:
        calls.append(1)
        if len(calls) % 2 == 0:
            raise BlockingIOError(errno.EAGAIN, "the send buffer is full")
        return sendmsg(self, buffers, *args)

    monkeypatch.setattr(socket.socket, "sendmsg", stingy)
    return calls


async def test_replies_a_wildcard_socket_cannot_take_are_sent_later(upstream: StubUpstream, data_dir: Path,
                                                                    stingy_sendmsg: list[int]) -> None:
    """The asyncio path on a wildcard address (recvmsg/sendmsg for the source address): a reply the
    socket refuses waits with those after it, reading paused, and is sent when it is writable."""
    async with running_gate(make_config(upstream, data_dir, dns=DnsConfig(listen=("0.0.0.0:0",)))) as g:
        assert (await g.query("host.example.test", server="127.0.0.1")).rcode() == dns.rcode.NOERROR  # cached
        replies = await asyncio.to_thread(burst, g.dns_port, alternating(150))
        assert sorted(replies) == list(range(150))
        assert len(stingy_sendmsg) >= 300, "the refused replies were not sent again"
        reply = await g.query("other.example.test", server="127.0.0.1")
        assert reply.rcode() == dns.rcode.NOERROR  # reading resumed


async def test_workers_serve_the_same_path(upstream: StubUpstream, data_dir: Path, udp_io: str) -> None:
    """dns.workers > 1: the primary and its worker processes each serve their socket of the group;
    queries from many source ports reach both, and every one is answered."""
    cfg = make_config(upstream, data_dir)
    cfg = replace(cfg, dns=replace(cfg.dns, workers=2))
    async with running_gate(cfg) as g:
        for _ in range(40):
            assert (await g.query("trackcmp.net")).rcode() == dns.rcode.NXDOMAIN
        q = dns.message.make_query("id.server", dns.rdatatype.TXT, "CH")
        seen = set()
        for _ in range(40):
            reply = await dns.asyncquery.udp(q, "127.0.0.1", port=g.dns_port, timeout=3)
            seen.add(reply.answer[0].to_text())
        assert len(seen) == 2, f"every query went to one process: {seen}"
        assert g.cfg.dns.udp_io == udp_io


@pytest.mark.skipif(not udp_batch.available(), reason="recvmmsg/sendmmsg: Linux only")
def test_the_batched_calls_keep_the_gil() -> None:
    """recvmmsg and sendmmsg run on non-blocking sockets only, so they keep the GIL (ctypes.PyDLL):
    a thread waiting for it (the consent store's) is not handed it in the middle of every batch."""
    assert udp_batch._CALLS is not None
    for call in udp_batch._CALLS:
        assert call._flags_ & ctypes._FUNCFLAG_PYTHONAPI  # type: ignore[attr-defined]
