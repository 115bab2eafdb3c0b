"""Asking the upstream resolvers: which server, over which transport, and only genuine replies.

Which server: the servers of the most specific conditional-forwarding domain covering the name,
else the default ones. `failover` tries them in the order given; `fastest` by smoothed round-trip
time, asking another server first on PROBE_RATE of queries so that a faster or recovered one is
noticed. A server that times out or fails at the transport backs off (BACKOFF_BASE doubling up to
BACKOFF_MAX): meanwhile it is asked only after the healthy ones, and afterwards in its place again.

How: every upstream query has a fresh random ID (the OS CSPRNG, read in blocks) and leaves from one
of a small pool of UDP sockets, each bound to a port the kernel picks at random and replaced after
QUERIES_PER_SOCKET queries, so source ports keep changing without paying for a socket per query
(measured in tests/bench/upstream_ports.py; see docs/resolver.md). The first attempts of cache
misses begun in one turn of the event loop share the socket picked for that turn (`begin`): each
query's port is still one the kernel picked at random, unknown off path. A reply is accepted only from the
address asked, with our ID, QR set and our question; anything else is counted and ignored while we
keep waiting for the real one (anti-spoofing). A truncated UDP reply is asked again over TCP.
tcp:// and tls:// servers get one persistent connection each, shared by pipelined queries
(RFC 7766); TLS checks the certificate against the configured name. https:// servers (DNS over
HTTPS, RFC 8484) get one HTTP/2 connection each (h2), every query a POST on its own stream of it;
a server named by host name is asked at the addresses upstream.bootstrap gives, each a server.

When: one overall deadline per client query; each attempt at one server gets `attempt_timeout` of
it; servers that time out are tried again from the top while time remains. SERVFAIL, REFUSED,
FORMERR and NOTIMP, or a refused connection, move on to the next server and take that server out of
this query. When every attempt fails the caller answers SERVFAIL (or stale), never NXDOMAIN.

Out of file descriptors (or socket buffers), a socket that cannot be opened is our shortage, not
the server's failure: the pool keeps serving from the sockets it has (retiring each as usual, so
ports still change), and a query that finds none raises LocalShortage at once instead of waiting
for a deadline; the shortage is reported to the process's `Shortage` (descriptors.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import struct
import sys
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

from dnsgate.config import UpstreamAddress
from dnsgate.descriptors import Shortage, is_shortage, reason
from dnsgate.histogram import UPSTREAM_BUCKETS, Histogram
from dnsgate.wire import (
    AD,
    CD,
    FORMERR,
    HEADER,
    NOTIMP,
    QR,
    RD,
    REFUSED,
    SERVFAIL,
    TC,
    Query,
    label_offsets,
    name_to_wire,
    opt_record,
)

log = logging.getLogger(__name__)

# A socket (so a random port) per query costs ~55 µs of CPU per exchange against ~23 µs for a fixed
# pool; replacing each socket after 32 queries costs ~24 µs (tests/bench/upstream_ports.py).
SOCKETS_PER_FAMILY: Final = 8
QUERIES_PER_SOCKET: Final = 32
RETRY_RCODES: Final = frozenset({SERVFAIL, REFUSED, FORMERR, NOTIMP})
PROBE_RATE: Final = 0.05
BACKOFF_BASE: Final = 1.0
BACKOFF_MAX: Final = 60.0
STREAM_IDLE: Final = 10.0  # seconds before an unused upstream TCP/TLS connection is closed
MEMO_LIMIT: Final = 65_536
SWEEP_EVERY: Final = 0.05  # seconds between sweeps of first UDP attempts: how late one may be declared timed out

Strategy = Literal["failover", "fastest"]


class UpstreamError(Exception):
    """No upstream gave a usable answer before the deadline."""


class LocalShortage(UpstreamError):
    """No socket could be opened to ask an upstream: this process is out of file descriptors (or
    the kernel of socket buffers). Nothing was sent; no server is to blame."""


class BadReply(Exception):
    pass


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


class RandomBytes:
    """Bytes from the OS CSPRNG, read in blocks so that an ID or a choice costs no system call."""

    __slots__ = ("_buf", "_pos")

    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0

    def u16(self) -> int:
        if self._pos + 2 > len(self._buf):
            self._buf, self._pos = os.urandom(4096), 0
        value = (self._buf[self._pos] << 8) | self._buf[self._pos + 1]
        self._pos += 2
        return value

    def below(self, n: int) -> int:
        """A number in [0, n) for small n (the bias of u16 % n is negligible here)."""
        return self.u16() % n


def is_reply_to(data: bytes, question: bytes) -> bool:
    flags, qdcount = struct.unpack_from(">HH", data, 2)
    if not flags & QR or qdcount != 1:
        return False
    end = 12 + len(question)
    return data[end - 4 : end] == question[-4:] and data[12 : end - 4].lower() == question[:-4]


class DatagramBatches(Protocol):
    """recvmmsg/sendmmsg for the upstream sockets (dns/udp_batch.py's UpstreamBatches, given where
    the upstreams are built when dns.udp_io is "batched")."""

    def receive(self, fd: int, v6: bool, handle: Callable[[bytes, bytes], None]) -> None: ...

    def send(self, fd: int, batch: list[tuple[bytes, bytes]]) -> tuple[int, int]: ...


SEND_BATCH: Final = 64  # queries DatagramBatches.send takes at once


def sockaddr_of(host: str, port: int) -> tuple[bytes, bytes]:
    """An upstream's sockaddr (to send to it with sendmmsg), and the part of the sockaddr of its
    replies that DatagramBatches.receive hands on as their source: port and address (for IPv6 also
    the flow label, which the kernel reports as 0, and the scope). Empty for a host that is no IP
    address (only UDP servers need one: they are always given by address)."""
    try:
        if ":" in host:
            found = socket.getaddrinfo(host, port, socket.AF_INET6, socket.SOCK_DGRAM, 0, socket.AI_NUMERICHOST)[0][4]
            scope = int(found[-1]) if len(found) == 4 else 0
            sockaddr = (socket.AF_INET6.to_bytes(2, sys.byteorder) + port.to_bytes(2, "big") + bytes(4)
                        + socket.inet_pton(socket.AF_INET6, host.partition("%")[0]) + scope.to_bytes(4, sys.byteorder))
            return sockaddr, sockaddr[2:28]
        sockaddr = (socket.AF_INET.to_bytes(2, sys.byteorder) + port.to_bytes(2, "big") + socket.inet_aton(host)
                    + bytes(8))
    except (OSError, ValueError, OverflowError):
        return b"", b""
    return sockaddr, sockaddr[2:8]


# --------------------------------------------------------------------------------------------
# Servers and their health


class Server:
    """One upstream and what we have learned about it."""

    __slots__ = ("address", "down_until", "failures", "family", "peer", "sockaddr", "source", "srtt", "stats",
                 "stream")

    def __init__(self, address: UpstreamAddress, stats: ServerStats | None = None) -> None:
        self.address = address
        self.family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        self.peer = (address.host, address.port)  # where UDP queries go and replies must come from
        self.sockaddr, self.source = sockaddr_of(address.host, address.port)  # the same, as the kernel writes them
        self.stats = stats if stats is not None else ServerStats()  # shared by a server listed twice
        self.srtt: float | None = None  # smoothed round-trip time (s); None until measured
        self.failures = 0  # consecutive
        self.down_until = 0.0
        self.stream: KeptConnection | None = None

    def succeeded(self, rtt: float) -> None:
        self.srtt = rtt if self.srtt is None else 0.7 * self.srtt + 0.3 * rtt  # as BIND and unbound do
        self.failures = 0
        self.down_until = 0.0

    def failed(self, now: float, penalty: float, reason: str) -> None:
        self.failures += 1
        # The exponent is capped: 2 ** 1024 is no float (OverflowError after 1025 failures in a row).
        backoff = min(BACKOFF_BASE * 2 ** min(self.failures - 1, 16), BACKOFF_MAX)
        if self.down_until <= now:
            log.warning("upstream %s failed (%s); asking it only as a last resort for %.0f s",
                        self.address, reason, backoff)
        self.down_until = now + backoff
        self.srtt = max(self.srtt or 0.0, penalty)

    def describe(self, now: float) -> dict[str, Any]:
        return {"server": str(self.address), "healthy": self.down_until <= now,
                "srtt_ms": None if self.srtt is None else round(self.srtt * 1000, 2),
                "queries": self.stats.queries, "errors": self.stats.errors}


class ServerGroup:
    """The servers for one part of the name space, and the strategy that orders them."""

    __slots__ = ("calm_from", "random", "servers", "strategy")

    def __init__(self, servers: Sequence[Server], strategy: Strategy, random: RandomBytes) -> None:
        if not servers:
            raise ValueError("no upstream servers")
        self.servers = tuple(servers)
        self.strategy = strategy
        self.random = random
        self.calm_from = 0.0  # no server is backing off from this time on (see `failed`)

    def failed(self, server: Server, now: float, penalty: float, reason: str) -> None:
        server.failed(now, penalty, reason)
        self.calm_from = max(self.calm_from, server.down_until)

    def order(self, now: float) -> Sequence[Server]:
        """Healthy servers by the strategy, then backing-off ones, soonest back first."""
        if now >= self.calm_from and self.strategy == "failover":
            return self.servers  # the common case costs no list
        up = [s for s in self.servers if s.down_until <= now]
        down = sorted((s for s in self.servers if s.down_until > now), key=lambda s: s.down_until)
        if self.strategy == "fastest" and len(up) > 1:
            up.sort(key=lambda s: -1.0 if s.srtt is None else s.srtt)  # unmeasured first: measure them
            if self.random.below(10_000) < PROBE_RATE * 10_000:
                up.insert(0, up.pop(1 + self.random.below(len(up) - 1)))
        return up + down


# --------------------------------------------------------------------------------------------
# Transports


class _UdpSocket:
    """One upstream UDP socket on a random port; replies are matched by ID, source and question."""

    __slots__ = ("fd", "owner", "pending", "retired", "sock", "uses_left", "v6")

    def __init__(self, owner: Upstreams, family: int, uses: int) -> None:
        self.owner = owner
        self.v6 = family == socket.AF_INET6
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self.sock.setblocking(False)
            self.sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))  # the kernel picks a random port
            self.fd = self.sock.fileno()
            asyncio.get_running_loop().add_reader(self.fd, self._readable)
        except BaseException:
            self.sock.close()
            raise
        self.pending: dict[int, _Waiter] = {}
        self.uses_left = uses
        self.retired = False

    def _readable(self) -> None:
        batches = self.owner.batches
        if batches is not None:  # every reply waiting, REPLIES per system call
            batches.receive(self.fd, self.v6, self._received_from)
            return
        while True:
            try:
                data, addr = self.sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # an ICMP error queued for this socket: the attempt times out
                log.debug("upstream socket error: %s", exc)
                return
            self._received(data, addr)

    def _received(self, data: bytes, addr: Any) -> None:
        waiter = self.pending.get((data[0] << 8) | data[1]) if len(data) >= 12 else None
        if waiter is None:
            self.owner.ignored += 1
            return
        if (addr[0], addr[1]) != waiter.peer or not is_reply_to(data, waiter.question):
            self.owner.ignored += 1  # wrong source or question: keep waiting for the real one
            return
        waiter.deliver(data)

    def _received_from(self, data: bytes, source: bytes) -> None:
        """`_received`, the source as DatagramBatches.receive gives it (no text address built)."""
        waiter = self.pending.get((data[0] << 8) | data[1]) if len(data) >= 12 else None
        if waiter is None:
            self.owner.ignored += 1
            return
        if source != waiter.source or not is_reply_to(data, waiter.question):
            self.owner.ignored += 1  # wrong source or question: keep waiting for the real one
            return
        waiter.deliver(data)

    def release(self, qid: int) -> None:
        del self.pending[qid]
        if self.retired and not self.pending:
            self.close()

    def close(self) -> None:
        if self.fd >= 0:
            asyncio.get_running_loop().remove_reader(self.fd)
            self.sock.close()
            self.fd = -1
            self.owner.live_sockets.discard(self)


class _Waiter:
    """What a UDP socket knows of a query it sent: where the reply must come from, the question it
    must carry, and whom to give it to."""

    __slots__ = ("peer", "question", "source")

    peer: tuple[str, int]
    source: bytes  # the peer as DatagramBatches.receive gives a reply's source
    question: bytes

    def deliver(self, data: bytes) -> None:
        raise NotImplementedError

    def abandon(self) -> None:
        """The socket closes (shutdown): no reply will come."""


class _FutureWaiter(_Waiter):
    """A waiter for the coroutine path (`Upstreams.exchange`)."""

    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[bytes], server: Server, question: bytes) -> None:
        self.future = future
        self.peer = server.peer
        self.source = server.source
        self.question = question

    def deliver(self, data: bytes) -> None:
        if not self.future.done():
            self.future.set_result(data)

    def abandon(self) -> None:
        if not self.future.done():
            self.future.set_exception(UpstreamError("shutting down"))


# What the first attempt leaves for the rest of the query: a server to leave out (it answered
# SERVFAIL, REFUSED, ...) or to ask again over TCP (its reply was truncated).
After = tuple["Server", Literal["error", "truncated"]]
# Called once with the reply (None if this attempt did not produce a usable one) and the After.
AttemptDone = Callable[[Any, "bytes | None", "After | None"], None]


class UdpAttempt(_Waiter):
    """The first attempt of a cache miss, at its first server over UDP, driven by callbacks.

    Most misses end here, so this path creates no task, coroutine or future: the reply (or the
    timer) calls `done` straight from the event loop. Anything else (a timeout, TC, an error
    RCODE) is handed back through `done`, and the caller continues with `Upstreams.exchange`.
    """

    __slots__ = ("context", "done", "expires", "group", "owner", "qid", "server", "settled", "sock", "started")

    def __init__(self, owner: Upstreams, group: ServerGroup, server: Server, sock: _UdpSocket, qid: int,
                 question: bytes, done: AttemptDone, context: Any, started: float) -> None:
        self.owner = owner
        self.group = group
        self.server = server
        self.sock = sock
        self.qid = qid
        self.peer = server.peer
        self.source = server.source
        self.question = question
        self.done = done
        self.context = context
        self.started = started
        self.expires = started + min(owner.attempt_timeout, owner.timeout)
        self.settled = False

    def deliver(self, data: bytes) -> None:
        self.settled = True
        done, context = self.done, self.context
        del self.done, self.context  # the sweep's queue keeps a settled attempt a while: not its query
        sock = self.sock
        del sock.pending[self.qid]  # (sock.release, inlined: this runs for every miss)
        if sock.retired and not sock.pending:
            sock.close()
        server = self.server
        loop = self.owner._loop
        assert loop is not None  # (set by `begin`)
        elapsed = loop.time() - self.started
        server.stats.latency.observe(elapsed)
        server.succeeded(elapsed)
        if data[2] & (TC >> 8):
            done(context, None, (server, "truncated"))
        elif data[3] & 0xF in RETRY_RCODES:
            server.stats.errors += 1
            done(context, None, (server, "error"))
        else:
            done(context, data, None)

    def unsent(self) -> None:
        """The kernel refused the query (no buffers, no route): nothing left, the exchange goes on."""
        self.settled = True
        done, context = self.done, self.context
        del self.done, self.context
        self.sock.release(self.qid)
        done(context, None, None)

    def expire(self) -> None:
        self.settled = True
        done, context = self.done, self.context
        del self.done, self.context
        self.sock.release(self.qid)
        server = self.server
        if not self.owner.closed:  # at shutdown, silence says nothing about the server
            server.stats.errors += 1
            self.group.failed(server, self.owner.loop.time(), self.owner.attempt_timeout,
                              f"{server.address}: timeout")
        done(context, None, None)


class _UdpPool:
    """`size` sockets; one picked at random per query, and replaced after `uses` queries."""

    __slots__ = ("family", "owner", "size", "slots", "uses")

    def __init__(self, owner: Upstreams, family: int, size: int, uses: int) -> None:
        self.owner = owner
        self.family = family
        self.size = size
        self.uses = uses
        self.slots: list[_UdpSocket] = []

    def take(self, prefer: _UdpSocket | None = None) -> _UdpSocket:
        """A socket for one query: `prefer` while it has uses left and the pool is full (the first
        attempts of one turn of the event loop leave from one socket, with one sendmmsg, and their
        replies come back to it together), else one at random. Short of descriptors, the pool
        serves from the sockets it has, one fewer as each is used up (none serves more than `uses`
        queries), and tries again to fill its slots with every query; LocalShortage once it has none."""
        slots = self.slots
        if prefer is not None and not prefer.retired and len(slots) == self.size:
            sock = prefer
        elif len(slots) < self.size:
            try:
                sock = self._open()
            except LocalShortage:
                if not slots:
                    raise
                sock = slots[self.owner.random.below(len(slots))]
            else:
                slots.append(sock)
        else:
            sock = slots[self.owner.random.u16() % self.size]  # (RandomBytes.below, inlined)
        sock.uses_left -= 1
        if sock.uses_left <= 0:  # retire it once its queries are answered; a new port takes its place
            sock.retired = True
            index = slots.index(sock)
            try:
                slots[index] = self._open()
            except LocalShortage:
                slots[index] = slots[-1]  # the slot stays empty until a socket can be opened again
                slots.pop()
        return sock

    def _open(self) -> _UdpSocket:
        try:
            sock = _UdpSocket(self.owner, self.family, self.uses)
        except OSError as exc:
            if not is_shortage(exc):
                raise
            raise self.owner.shortage_of(exc, "opening an upstream socket") from exc
        self.owner.live_sockets.add(sock)
        self.owner.sockets_opened += 1
        return sock


class KeptConnection:
    """What a kept connection to a server shares, over TCP, TLS or HTTP/2: the writer, the task that
    reads the replies, the idle timer; closing ends all three."""

    async def query(self, message: bytes, qid: int, question: bytes) -> bytes:
        """Send `message` and wait for its reply; the caller bounds the time."""
        raise NotImplementedError

    def __init__(self, owner: Upstreams, address: UpstreamAddress, tls: ssl.SSLContext | None) -> None:
        self.owner = owner
        self.address = address
        self.tls = tls
        self.writer: asyncio.StreamWriter | None = None
        self.reader_task: asyncio.Task[None] | None = None
        self.lock = asyncio.Lock()
        self.idle: asyncio.TimerHandle | None = None

    def close(self) -> None:
        if self.idle is not None:
            self.idle.cancel()
            self.idle = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    async def aclose(self) -> None:
        self.close()
        if self.reader_task is not None:
            self.reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.reader_task


class _Stream(KeptConnection):
    """One persistent TCP or TLS connection to a server, shared by pipelined queries (RFC 7766)."""

    def __init__(self, owner: Upstreams, address: UpstreamAddress, tls: ssl.SSLContext | None) -> None:
        super().__init__(owner, address, tls)
        self.pending: dict[int, tuple[asyncio.Future[bytes], bytes]] = {}

    async def query(self, message: bytes, qid: int, question: bytes) -> bytes:
        """Send `message` (whose ID is `qid`) and wait for its reply; the caller bounds the time."""
        for attempt in range(2):
            reused = self.writer is not None and not self.writer.is_closing()
            writer = await self._connection()
            while qid in self.pending:
                qid = self.owner.random.u16()
                message = struct.pack(">H", qid) + message[2:]
            future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
            self.pending[qid] = (future, question)
            if self.idle is not None:
                self.idle.cancel()
                self.idle = None
            try:
                writer.write(struct.pack(">H", len(message)) + message)
                await writer.drain()
                return await future
            except (ConnectionError, asyncio.IncompleteReadError):
                if not reused or attempt:
                    raise
                # the server had closed the idle connection: once more on a new one
            finally:
                self.pending.pop(qid, None)
                if not self.pending and self.writer is not None:
                    self.idle = asyncio.get_running_loop().call_later(STREAM_IDLE, self.close)
        raise ConnectionError("unreachable")  # pragma: no cover

    async def _connection(self) -> asyncio.StreamWriter:
        async with self.lock:
            if self.writer is None or self.writer.is_closing():
                a = self.address
                reader, self.writer = await asyncio.open_connection(
                    a.host, a.port, ssl=self.tls, server_hostname=(a.tls_name or a.host) if self.tls else None)
                self.reader_task = asyncio.get_running_loop().create_task(self._read(reader, self.writer))
            return self.writer

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        problem: Exception = ConnectionError("connection closed by the upstream")
        try:
            while True:
                length = struct.unpack(">H", await reader.readexactly(2))[0]
                data = await reader.readexactly(length)
                slot = self.pending.get((data[0] << 8) | data[1]) if len(data) >= 12 else None
                if slot is None or not is_reply_to(data, slot[1]):
                    self.owner.ignored += 1
                    continue
                if not slot[0].done():
                    slot[0].set_result(data)
        except (asyncio.IncompleteReadError, OSError) as exc:
            problem = ConnectionError(f"connection lost: {exc}")
        finally:
            if self.writer is writer:
                self.writer = None
            writer.close()
            for future, _ in self.pending.values():
                if not future.done():
                    future.set_exception(problem)


class DohClient(Protocol):
    """The DNS-over-HTTPS connection to one https:// server (doh_upstream.DohStream), given by the
    composition root only where such a server is configured: HTTP/2 (h2, hpack, hyperframe, ~1.3 MiB)
    is imported by no other process."""

    def __call__(self, owner: Upstreams, address: UpstreamAddress, tls: ssl.SSLContext) -> KeptConnection: ...


# --------------------------------------------------------------------------------------------


class Upstreams:
    def __init__(self, servers: Sequence[UpstreamAddress], *, timeout: float, attempt_timeout: float,
                 udp_size: int, strategy: Strategy = "failover",
                 domains: Sequence[tuple[str, Sequence[UpstreamAddress]]] = (), ask_ad: bool = False,
                 tls_ca_file: str = "", sockets_per_family: int = SOCKETS_PER_FAMILY,
                 queries_per_socket: int = QUERIES_PER_SOCKET, shortage: Shortage | None = None,
                 batches: DatagramBatches | None = None, doh: DohClient | None = None) -> None:
        self.timeout = timeout
        self.attempt_timeout = attempt_timeout
        self.udp_size = udp_size
        self._opt = (opt_record(udp_size, False), opt_record(udp_size, True))  # the OPT of our queries
        self.ask_ad = ask_ad  # set AD in upstream queries so a validating upstream reports (RFC 6840 §5.7)
        self.random = RandomBytes()
        # Counts and latency per address (observe/metrics.py, observe/dashboard.py), shared where an address serves
        # the default group and a forwarding domain alike.
        self.per_server: dict[UpstreamAddress, ServerStats] = {}

        def server(address: UpstreamAddress) -> Server:
            return Server(address, self.per_server.setdefault(address, ServerStats()))

        self.default = ServerGroup([server(a) for a in servers], strategy, self.random)
        self._routes = {name_to_wire(domain): ServerGroup([server(a) for a in group], strategy, self.random)
                        for domain, group in domains}
        self._route_memo: dict[bytes, ServerGroup] = {}
        self._tls: ssl.SSLContext | None = None
        self._doh: ssl.SSLContext | None = None
        transports = {s.address.transport for g in self.groups for s in g.servers}
        if "tls" in transports:
            self._tls = ssl.create_default_context(cafile=tls_ca_file or None)
            self._tls.minimum_version = ssl.TLSVersion.TLSv1_2
        self._doh_stream = doh
        if "https" in transports:
            if doh is None:
                raise TypeError("https:// upstreams need the DNS-over-HTTPS client (doh)")
            self._doh = ssl.create_default_context(cafile=tls_ca_file or None)
            self._doh.minimum_version = ssl.TLSVersion.TLSv1_2
            self._doh.set_alpn_protocols(["h2"])
        self._pools: dict[int, _UdpPool] = {}
        self.sockets_per_family = sockets_per_family
        self.queries_per_socket = queries_per_socket
        self.live_sockets: set[_UdpSocket] = set()
        self.sockets_opened = 0
        self.closed = False
        self._attempts: deque[UdpAttempt] = deque()
        # First attempts begun in this turn of the event loop, sent together at its end (`_send_begun`)
        self._outbox: list[tuple[UdpAttempt, bytes]] = []
        self._turn: dict[int, _UdpSocket] = {}  # per family, the socket they leave from (_UdpPool.take)
        # recvmmsg/sendmmsg for the UDP sockets (dns.udp_io = "batched"); None: recvfrom and sendto
        self.batches = batches
        self._sweeper: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.queries = 0
        self.errors = 0
        self.ignored = 0
        # The process's record of running out of descriptors (descriptors.py): told of every socket
        # we could not open, it logs the episode once and shows it in /healthz and /metrics.
        self.shortage = shortage if shortage is not None else Shortage()

    def shortage_of(self, exc: OSError, doing: str) -> LocalShortage:
        """Record that `doing` failed for lack of a descriptor; the error to answer with."""
        self.shortage.hit(exc, doing)
        return LocalShortage(f"{reason(exc)} {doing}")

    @property
    def servers(self) -> tuple[UpstreamAddress, ...]:
        return tuple(s.address for s in self.default.servers)

    @property
    def groups(self) -> tuple[ServerGroup, ...]:
        return (self.default, *self._routes.values())

    def stats(self) -> UpstreamStats:
        return UpstreamStats(self.queries, self.errors, self.ignored)

    def describe(self, now: float) -> list[dict[str, Any]]:
        return [s.describe(now) for g in self.groups for s in g.servers]

    def route(self, name: bytes) -> ServerGroup:
        """The group for a lower-case wire name: its most specific forwarding domain, else the default."""
        group = self._route_memo.get(name)
        if group is None:
            group = self.default
            for i in label_offsets(name):
                found = self._routes.get(name[i:])
                if found is not None:
                    group = found
                    break
            if len(self._route_memo) >= MEMO_LIMIT:
                self._route_memo.clear()
            self._route_memo[name] = group
        return group

    def begin(self, query: Query, done: AttemptDone, context: Any) -> float | None:
        """Send the first attempt of `query` over UDP and return the query's deadline (loop time);
        `done(context, reply, after)` is called once, from the event loop. Returns None (and
        sends nothing) when the first server is not a UDP one: use `exchange`. Raises LocalShortage
        (nothing sent, `done` never called) when no socket can be had.

        The query leaves at the end of this turn of the event loop, with every other first attempt
        begun in it, one send after the other (one sendmmsg per socket with `batches`): the
        upstream is woken once for them (a wake-up on the other core, a VM exit for its interrupt,
        cost more than the send itself when each query left between the Python work of the next).
        They leave from one socket of the pool, picked at random for the turn and used while it
        has uses left, so their replies come back together too (one recvmmsg). A send the kernel
        refuses calls `done` with no reply: the exchange tries again (and records the failure)."""
        if self.closed:
            return None
        loop = self._loop
        if loop is None:
            loop = self.loop
        now = loop.time()
        group = self.route(query.name) if self._routes else self.default
        server = group.order(now)[0]
        if server.address.transport != "udp":
            return None
        pool = self._pools.get(server.family)  # (_socket_and_id, inlined: this runs for every miss)
        if pool is None:
            pool = self._pools[server.family] = _UdpPool(self, server.family, self.sockets_per_family,
                                                         self.queries_per_socket)
        sock = self._turn[server.family] = pool.take(self._turn.get(server.family))
        pending = sock.pending
        random = self.random
        qid = random.u16()
        while qid in pending:
            qid = random.u16()
        question = query.key[:-1]  # the name in lower case, type and class (class ANY is asked as IN)
        attempt = UdpAttempt(self, group, server, sock, qid, question, done, context, now)
        pending[qid] = attempt
        self.queries += 1
        server.stats.queries += 1
        do = query.edns is not None and query.edns.do
        flags = RD | (query.flags & CD) | (AD if self.ask_ad else 0)
        outbox = self._outbox
        if not outbox:
            loop.call_soon(self._send_begun)
        outbox.append((attempt, HEADER.pack(qid, flags, 1, 0, 0, 1) + question + self._opt[do]))
        # Timeouts by a sweep over attempts in send order, not a timer each (one costs ~1 µs in uvloop).
        self._attempts.append(attempt)
        if self._sweeper is None:
            self._sweeper = loop.call_at(now + SWEEP_EVERY, self._sweep)
        return now + self.timeout

    def _send_begun(self) -> None:
        """Send the first attempts begun in the last turn of the loop (see `begin`). One whose
        query was settled meanwhile (the pool closed) is not sent; one the kernel refuses is
        handed back to its exchange; whatever a caller raises, the others still leave."""
        outbox, self._outbox = self._outbox, []
        self._turn.clear()
        batches = self.batches
        if batches is not None and len(outbox) > 1:
            self._send_batches(batches, outbox)
            return
        for attempt, message in outbox:
            if attempt.settled:
                continue
            try:
                attempt.sock.sock.sendto(message, attempt.peer)
            except OSError:
                _unsent(attempt)

    def _send_batches(self, batches: DatagramBatches, outbox: list[tuple[UdpAttempt, bytes]]) -> None:
        """`_send_begun` with one sendmmsg per socket (the queries of a turn are spread over the pool's)."""
        by_socket: dict[_UdpSocket, list[tuple[UdpAttempt, bytes]]] = {}
        for item in outbox:
            attempt = item[0]
            if attempt.settled:
                continue
            mine = by_socket.get(attempt.sock)
            if mine is None:
                by_socket[attempt.sock] = [item]
            else:
                mine.append(item)
        for sock, items in by_socket.items():
            while items:
                chunk = items[:SEND_BATCH]
                try:
                    sent, err = batches.send(sock.fd, [(message, a.server.sockaddr) for a, message in chunk])
                except Exception:  # (a query too large for a slot: never one of ours)
                    log.exception("sending upstream queries")
                    sent, err = 0, 0
                if not sent:  # the kernel refused the first: it goes back to its exchange
                    log.debug("upstream send error: %s", os.strerror(err) if err else "not sent")
                    _unsent(chunk[0][0])
                    sent = 1
                items = items[sent:]

    def _sweep(self) -> None:
        """Expire first attempts whose time is up (all share one timeout, so the deque is in
        expiry order) and drop the settled ones before them; again in SWEEP_EVERY while any wait,
        not at the first one's timeout: the attempts answered meanwhile would wait in the deque
        until then, and a timeout's worth of them at thousands of misses a second is what sets
        the process's memory high-water mark (freed, it stays with the allocator). Whatever
        one attempt's caller raises, the others still expire and the sweep is scheduled again:
        without it no first attempt would ever time out."""
        now = self.loop.time()
        attempts = self._attempts
        try:
            while attempts and (attempts[0].settled or attempts[0].expires <= now):
                attempt = attempts.popleft()
                if not attempt.settled:
                    try:
                        attempt.expire()
                    except Exception:
                        log.exception("expiring the first attempt of a query")
        finally:
            self._sweeper = (self.loop.call_at(now + SWEEP_EVERY, self._sweep)
                             if attempts and not self.closed else None)

    async def exchange(self, query: Query, deadline: float | None = None, after: After | None = None) -> bytes:
        """The first good reply to `query` from its upstreams, or UpstreamError. `deadline` and
        `after` continue a query whose first attempt (`begin`) did not succeed."""
        if self.closed:
            raise UpstreamError(f"{query.text}: shutting down")
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + self.timeout
        group = self.route(query.name) if self._routes else self.default
        question = query.key[:-1]  # the name in lower case, type and class (class ANY is asked as IN)
        do = query.edns is not None and query.edns.do
        flags = RD | (query.flags & CD) | (AD if self.ask_ad else 0)
        last_problem = "no attempt made" if after is None else f"{after[0].address}: {after[1]}"
        # answered with an error or refused the connection: not again for this query
        done: set[Server] = {after[0]} if after is not None and after[1] == "error" else set()
        tcp_first = after[0] if after is not None and after[1] == "truncated" else None
        while True:
            for server in group.order(loop.time()):
                if server in done:
                    continue
                if self.closed:  # closed while this query waited: its sockets are gone
                    raise UpstreamError(f"{query.text}: shutting down")
                started = loop.time()
                remaining = deadline - started
                if remaining <= 0.001:
                    self.errors += 1
                    raise UpstreamError(f"{query.text}: every upstream failed; last: {last_problem}")
                self.queries += 1
                server.stats.queries += 1
                try:
                    budget = min(remaining, self.attempt_timeout)
                    if server is tcp_first:  # its UDP reply was truncated: straight to TCP
                        tcp_first = None
                        reply = await self._stream(server, question, flags, do, budget)
                    else:
                        reply = await self._attempt(server, question, flags, do, budget)
                except (TimeoutError, OSError, asyncio.IncompleteReadError, BadReply) as exc:
                    if isinstance(exc, OSError) and is_shortage(exc):  # ours, not the server's
                        raise self.shortage_of(exc, f"asking {server.address}") from exc
                    server.stats.errors += 1
                    last_problem = f"{server.address}: {type(exc).__name__} {exc}".strip()
                    group.failed(server, loop.time(), self.attempt_timeout, last_problem)
                    if not isinstance(exc, TimeoutError):
                        done.add(server)  # a refused or broken connection: it will not get better in time
                    continue
                elapsed = loop.time() - started
                server.stats.latency.observe(elapsed)
                server.succeeded(elapsed)
                rcode = reply[3] & 0xF
                if rcode in RETRY_RCODES:
                    server.stats.errors += 1
                    last_problem = f"{server.address}: rcode {rcode}"
                    done.add(server)  # asking again would only hammer it
                    continue
                return reply
            if len(done) == len(group.servers):
                self.errors += 1
                raise UpstreamError(f"{query.text}: every upstream failed; last: {last_problem}")

    async def _attempt(self, server: Server, question: bytes, flags: int, do: bool, timeout: float) -> bytes:
        if server.address.transport != "udp":
            return await self._stream(server, question, flags, do, timeout)
        loop = asyncio.get_running_loop()
        started = loop.time()
        reply = await self._udp(server, question, flags, do, timeout)
        if reply[2] & (TC >> 8):
            reply = await self._stream(server, question, flags, do, timeout - (loop.time() - started))
        return reply

    def _socket_and_id(self, family: int) -> tuple[_UdpSocket, int]:
        """A socket of the family's pool and a random query ID not outstanding on it."""
        pool = self._pools.get(family)
        if pool is None:
            pool = self._pools[family] = _UdpPool(self, family, self.sockets_per_family, self.queries_per_socket)
        sock = pool.take()
        qid = self.random.u16()
        while qid in sock.pending:
            qid = self.random.u16()
        return sock, qid

    def _message(self, qid: int, question: bytes, flags: int, do: bool) -> bytes:
        return HEADER.pack(qid, flags, 1, 0, 0, 1) + question + self._opt[do]

    async def _udp(self, server: Server, question: bytes, flags: int, do: bool, timeout: float) -> bytes:
        sock, qid = self._socket_and_id(server.family)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes] = loop.create_future()
        sock.pending[qid] = _FutureWaiter(future, server, question)
        timer = loop.call_later(timeout, _expire, future)
        try:
            sock.sock.sendto(self._message(qid, question, flags, do), server.peer)
            return await future
        finally:
            timer.cancel()
            sock.release(qid)

    async def _stream(self, server: Server, question: bytes, flags: int, do: bool, timeout: float) -> bytes:
        if timeout <= 0:
            raise TimeoutError("no time left for TCP")
        if server.stream is None:
            if server.address.transport == "https":
                assert self._doh is not None
                assert self._doh_stream is not None
                server.stream = self._doh_stream(self, server.address, self._doh)
            else:
                server.stream = _Stream(self, server.address, self._tls if server.address.transport == "tls" else None)
        qid = self.random.u16()
        async with asyncio.timeout(timeout):
            return await server.stream.query(self._message(qid, question, flags, do), qid, question)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    async def close(self) -> None:
        self.closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        while self._attempts:  # their clients get SERVFAIL from the exchange, which is closed now
            attempt = self._attempts.popleft()
            if not attempt.settled:
                attempt.expire()
        for sock in list(self.live_sockets):
            for waiter in list(sock.pending.values()):  # queries of `exchange` waiting on it end now
                waiter.abandon()
            sock.close()
        self._pools.clear()
        for group in self.groups:
            for server in group.servers:
                if server.stream is not None:
                    await server.stream.aclose()


def _unsent(attempt: UdpAttempt) -> None:
    try:
        attempt.unsent()
    except Exception:
        log.exception("handing back a query the kernel would not send")


def _expire(future: asyncio.Future[bytes]) -> None:
    if not future.done():
        future.set_exception(TimeoutError("no reply"))
