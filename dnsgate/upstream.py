"""Asking the upstream resolvers: a fresh random ID per query, only matching replies accepted.

One overall deadline per client query; each attempt at one server gets `attempt_timeout` of it;
servers are tried in order and again from the top while time remains. A truncated UDP reply is
fetched again over TCP from the same server. A reply is accepted only from the server asked, with
the ID we chose, QR set and the question we sent; anything else is ignored (spoofing, strays).
SERVFAIL, REFUSED, FORMERR and NOTIMP move on to the next server. When every attempt fails the
caller answers SERVFAIL, never NXDOMAIN.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, cast

from .config import HostPort
from .histogram import UPSTREAM_BUCKETS, Histogram
from .wire import CD, FORMERR, HEADER, NOTIMP, QR, RD, REFUSED, SERVFAIL, TC, Query, opt_record

log = logging.getLogger(__name__)

SOCKETS_PER_FAMILY: Final = 8
RETRY_RCODES: Final = frozenset({SERVFAIL, REFUSED, FORMERR, NOTIMP})


class UpstreamError(Exception):
    """No upstream gave a usable answer before the deadline."""


@dataclass(frozen=True, slots=True)
class UpstreamStats:
    queries: int
    errors: int
    ignored: int


class ServerStats:
    """Per upstream server: attempts, failed attempts, and the latency of every reply received."""

    __slots__ = ("errors", "latency", "queries")

    def __init__(self) -> None:
        self.queries = 0
        self.errors = 0  # timeouts, socket errors, unusable replies, and SERVFAIL/REFUSED/... answers
        self.latency = Histogram(UPSTREAM_BUCKETS)


class _RandomIds:
    """Query IDs from the OS CSPRNG, read in blocks so each ID costs no system call."""

    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0

    def next(self) -> int:
        if self._pos >= len(self._buf):
            self._buf, self._pos = os.urandom(4096), 0
        value = (self._buf[self._pos] << 8) | self._buf[self._pos + 1]
        self._pos += 2
        return value


class _UdpSocket(asyncio.DatagramProtocol):
    """One upstream UDP socket; replies are matched to pending queries by ID, source and question."""

    def __init__(self, owner: Upstreams) -> None:
        self.owner = owner
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: dict[int, tuple[asyncio.Future[bytes], tuple[str, int], bytes]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # uvloop's class is not a subclass

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if len(data) < 12:
            self.owner.ignored += 1
            return
        slot = self.pending.get((data[0] << 8) | data[1])
        if slot is None:
            self.owner.ignored += 1
            return
        future, server, question = slot
        if (addr[0], addr[1]) != server or not _is_reply_to(data, question):
            self.owner.ignored += 1  # wrong source or question: keep waiting for the real one
            return
        if not future.done():
            future.set_result(data)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and the like: we cannot tell which query it belongs to on an
        # unconnected socket; the attempt simply times out.
        log.debug("upstream socket error: %s", exc)


def _is_reply_to(data: bytes, question: bytes) -> bool:
    flags, qdcount = struct.unpack_from(">HH", data, 2)
    if not flags & QR or qdcount != 1:
        return False
    got = data[12 : 12 + len(question)]
    return len(got) == len(question) and got.lower() == question


class Upstreams:
    def __init__(self, servers: Sequence[HostPort], *, timeout: float, attempt_timeout: float,
                 udp_size: int) -> None:
        if not servers:
            raise ValueError("no upstream servers")
        self.servers = tuple(servers)
        self.timeout = timeout
        self.attempt_timeout = attempt_timeout
        self.udp_size = udp_size
        self._ids = _RandomIds()
        self._pick = random.SystemRandom()
        self._sockets: dict[int, list[_UdpSocket]] = {}
        self._opening: dict[int, asyncio.Lock] = {}
        self.queries = 0
        self.errors = 0
        self.ignored = 0
        self.per_server = {server: ServerStats() for server in self.servers}

    def stats(self) -> UpstreamStats:
        return UpstreamStats(self.queries, self.errors, self.ignored)

    async def exchange(self, query: Query) -> bytes:
        """The first good reply to `query` from any upstream, or UpstreamError."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        question = query.question.lower()
        do = query.edns is not None and query.edns.do
        flags = RD | (query.flags & CD)
        last_problem = "no attempt made"
        while True:
            for server in self.servers:
                remaining = deadline - loop.time()
                if remaining <= 0.001:
                    self.errors += 1
                    raise UpstreamError(f"{query.text}: every upstream failed; last: {last_problem}")
                self.queries += 1
                stats = self.per_server[server]
                stats.queries += 1
                started = loop.time()
                try:
                    reply = await self._attempt(server, question, flags, do, min(remaining, self.attempt_timeout))
                except (TimeoutError, OSError, asyncio.IncompleteReadError, _BadReply) as exc:
                    stats.errors += 1
                    last_problem = f"{server}: {type(exc).__name__} {exc}".strip()
                    continue
                stats.latency.observe(loop.time() - started)
                rcode = reply[3] & 0xF
                if rcode in RETRY_RCODES:
                    stats.errors += 1
                    last_problem = f"{server}: rcode {rcode}"
                    continue
                return reply

    async def _attempt(self, server: HostPort, question: bytes, flags: int, do: bool, timeout: float) -> bytes:
        loop = asyncio.get_running_loop()
        started = loop.time()
        reply = await self._udp(server, question, flags, do, timeout)
        if reply[2] & (TC >> 8):
            reply = await self._tcp(server, question, flags, do, timeout - (loop.time() - started))
        return reply

    def _message(self, qid: int, question: bytes, flags: int, do: bool) -> bytes:
        return HEADER.pack(qid, flags, 1, 0, 0, 1) + question + opt_record(self.udp_size, do)

    async def _udp(self, server: HostPort, question: bytes, flags: int, do: bool, timeout: float) -> bytes:
        family = socket.AF_INET6 if ":" in server.host else socket.AF_INET
        sock = self._pick.choice(await self._pool(family))
        qid = self._ids.next()
        while qid in sock.pending:
            qid = self._ids.next()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes] = loop.create_future()
        sock.pending[qid] = (future, (server.host, server.port), question)
        timer = loop.call_later(timeout, _expire, future)
        try:
            assert sock.transport is not None
            sock.transport.sendto(self._message(qid, question, flags, do), (server.host, server.port))
            return await future
        finally:
            timer.cancel()
            del sock.pending[qid]

    async def _pool(self, family: int) -> list[_UdpSocket]:
        pool = self._sockets.get(family)
        if pool is not None:
            return pool
        lock = self._opening.setdefault(family, asyncio.Lock())
        async with lock:
            if family not in self._sockets:
                loop = asyncio.get_running_loop()
                host = "::" if family == socket.AF_INET6 else "0.0.0.0"
                opened = []
                for _ in range(SOCKETS_PER_FAMILY):
                    # port 0: the kernel picks a random ephemeral port for each socket
                    _, proto = await loop.create_datagram_endpoint(
                        lambda: _UdpSocket(self), local_addr=(host, 0), family=family)
                    opened.append(proto)
                self._sockets[family] = opened
        return self._sockets[family]

    async def _tcp(self, server: HostPort, question: bytes, flags: int, do: bool, timeout: float) -> bytes:
        if timeout <= 0:
            raise TimeoutError("no time left for TCP")
        qid = self._ids.next()
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(server.host, server.port)
            try:
                message = self._message(qid, question, flags, do)
                writer.write(struct.pack(">H", len(message)) + message)
                await writer.drain()
                while True:
                    length = struct.unpack(">H", await reader.readexactly(2))[0]
                    reply = await reader.readexactly(length)
                    if len(reply) >= 12 and (reply[0] << 8 | reply[1]) == qid and _is_reply_to(reply, question):
                        return reply
                    self.ignored += 1
            finally:
                writer.close()

    async def close(self) -> None:
        for pool in self._sockets.values():
            for sock in pool:
                if sock.transport is not None:
                    sock.transport.close()
        self._sockets.clear()


class _BadReply(Exception):
    pass


def _expire(future: asyncio.Future[bytes]) -> None:
    if not future.done():
        future.set_exception(TimeoutError("no reply"))
