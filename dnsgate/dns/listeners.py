"""UDP and TCP listeners: bytes in, the pipeline's answer out; forwards run as tracked tasks.

TCP follows RFC 7766: 2-byte length framing, several queries per connection answered as each
completes (pipelining, out of order), and an idle timeout while no query is outstanding. When
dnsgate ends a connection itself (its query cap), every query it has read is answered first, then it
half-closes: the client sees a clean end and sends what it had not been answered on a new
connection, instead of a reset that could cost it replies already sent. TCP is
where a slow client could hold resources, so `TcpLimits` bounds connections (in total and per
client), the time to send a query or take replies, the queries per connection and those waiting
upstream at once.
DNS over TLS (RFC 7858) is the same connection with TLS in between: admitted against the same
table when the TCP connection opens (before any handshake, so clients that never finish one are
held to the limits too), the handshake bounded by the query timeout, then the same framing and
limits; replies are padded (RFC 8467) when the query was. TLS runs in memory (ssl.MemoryBIO) on
the connection's bytes, so it behaves the same on asyncio's loop and uvloop.
Neither listener lets an exception escape: an internal error answers SERVFAIL.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, cast

from dnsgate.addresses import normalize_client
from dnsgate.config import HostPort
from dnsgate.connections import ConnectionTable, Held
from dnsgate.dns.forwarding import Resolver
from dnsgate.dns.pipeline import Forward, Pipeline
from dnsgate.dns.tally import TCP, TLS
from dnsgate.dns.tls import TlsFailure, TlsFiles, TlsSession
from dnsgate.dns.udp_batch import BatchedUdp, PktinfoUdp, available, is_wildcard, pktinfo_supported
from dnsgate.tasks import TaskSet
from dnsgate.wire import SERVFAIL, U16, Rejection, pad_reply, padding_requested, rejection_reply

log = logging.getLogger(__name__)

INTERNAL_ERROR = Rejection(SERVFAIL, "internal error")


def _client_of(host: str, v6: bool) -> str:
    # IPv4 sockets give canonical dotted quads; IPv6 ones may give ::ffff:a.b.c.d or a %zone.
    return normalize_client(host) if v6 and ("." in host or "%" in host) else host


class UdpListener(asyncio.DatagramProtocol):
    def __init__(self, pipeline: Pipeline, resolver: Resolver, tasks: TaskSet, v6: bool,
                 may_answer: Callable[[], bool] | None = None) -> None:
        self.pipeline = pipeline
        self.answer = pipeline.answer  # bound once: this runs for every datagram
        self.resolver = resolver
        self.tasks = tasks
        self.v6 = v6
        self.may_answer = may_answer  # (see DnsListeners)
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # uvloop's class is not a subclass
        self.sendto = self.transport.sendto

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.may_answer is not None and not self.may_answer():
            return
        try:
            result = self.answer(data, _client_of(addr[0], True) if self.v6 else addr[0], False)
        except Exception:
            log.exception("internal error answering a UDP query from %s", addr[0])
            result = rejection_reply(data, INTERNAL_ERROR, self.pipeline.udp_max)
        if result.__class__ is bytes:
            self.sendto(result, addr)
        elif result is not None:
            assert isinstance(result, Forward)
            self.resolver.start(result, partial(self._reply, addr))

    def _reply(self, addr: Any, reply: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("UDP socket error: %s", exc)


@dataclass(frozen=True, slots=True)
class TcpLimits:
    """What one TCP client may hold (config [dns] tcp_*)."""

    idle_timeout: float = 10.0  # no query outstanding and none arriving: close
    query_timeout: float = 5.0  # to finish sending a query once started, or to take queued replies
    max_connections: int = 512
    max_per_client: int = 32
    max_queries: int = 100_000  # read per connection; then no more are read, and it half-closes once all are answered
    max_pipelined: int = 100  # queries outstanding upstream per connection; beyond, reading pauses


class StreamConnection(Held, Protocol):
    """A DNS connection over TCP, TLS or HTTPS, as the table and the listeners see it."""

    transport: asyncio.Transport | None


class TcpTable(ConnectionTable[StreamConnection]):
    """The open connections: admission against the limits, and who makes room when it is full."""

    def __init__(self, limits: TcpLimits) -> None:
        super().__init__(limits.max_connections, limits.max_per_client)
        self.limits = limits


class StreamConnectionBase:
    """What DNS over TCP, TLS and HTTPS connections share: admission to the table as they open, and
    their end: closed once idle (`idle_timeout` with no query outstanding, RFC 7766 §6.2.3),
    politely (TLS's close_notify says nothing was cut off), or aborted. `slow_timer` is each
    protocol's own (a query or handshake not finished, replies not taken), stopped here with the
    idle one when the connection is lost."""

    transport: asyncio.Transport | None
    secure: TlsSession | None
    table: TcpTable
    limits: TcpLimits
    client: str
    last_active: float
    outstanding: int
    idle_timer: asyncio.TimerHandle | None
    slow_timer: asyncio.TimerHandle | None

    @property
    def busy(self) -> bool:
        return self.outstanding > 0

    def _admitted(self, transport: asyncio.BaseTransport) -> asyncio.Transport | None:
        """The new connection's transport if the table takes it (by its client's address); aborted if not."""
        self.transport = stream = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.client = normalize_client(peer[0]) if peer else "unknown"
        self.last_active = asyncio.get_running_loop().time()
        if self.table.admit(self):
            return stream
        stream.abort()
        return None

    def _arm_idle_timer(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        if self.transport is not None and not self.transport.is_closing():
            self.idle_timer = asyncio.get_running_loop().call_later(self.limits.idle_timeout, self._idle)

    def _idle(self) -> None:
        if self.outstanding:
            self._arm_idle_timer()  # an answer is still coming: idle means no query outstanding
        else:
            self.close()

    def close(self) -> None:
        if self.transport is not None:
            if self.secure is not None:
                self.transport.write(self.secure.close())  # close_notify: nothing was cut off
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _stop_timers(self) -> None:
        for timer in (self.idle_timer, self.slow_timer):
            if timer is not None:
                timer.cancel()
        self.idle_timer = self.slow_timer = None


class TcpConnection(StreamConnectionBase, asyncio.Protocol):
    """One client connection: framed queries in, replies out as each completes (RFC 7766), held to
    the TcpLimits: a query must arrive whole within `query_timeout` of its first byte, replies must
    be taken as fast, and at most `max_pipelined` queries wait upstream at a time. With `tls` it is
    DNS over TLS: the handshake must end within `query_timeout` of the connection."""

    def __init__(self, pipeline: Pipeline, resolver: Resolver, tasks: TaskSet, table: TcpTable,
                 may_answer: Callable[[], bool] | None = None, tls: TlsFiles | None = None) -> None:
        self.pipeline = pipeline
        self.tls = tls
        self.secure: TlsSession | None = None  # TLS over the connection (DNS over TLS)
        self.handshaking = False
        self.protocol = TLS if tls is not None else TCP  # the transport queries are counted and logged under
        self.resolver = resolver
        self.tasks = tasks
        self.table = table
        self.may_answer = may_answer  # (see DnsListeners)
        self.limits = table.limits
        self.transport: asyncio.Transport | None = None
        self.client = ""
        self.buffer = bytearray()
        self.outstanding = 0
        self.queries = 0
        self.last_active = 0.0
        self.reading = True
        self.write_paused = False
        self.client_ended = False  # the client half-closed: what it sent is all there will be
        self.finishing = False  # every query read is answered and our side is closed: discarding
        self.idle_timer: asyncio.TimerHandle | None = None
        self.slow_timer: asyncio.TimerHandle | None = None  # a partial query, or replies not taken

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream = self._admitted(transport)
        if stream is None:
            return
        if self.tls is not None:
            context = self.tls.dot
            if context is None:  # (never: the listener starts once a certificate is loaded)
                stream.abort()
                return
            # the handshake is this protocol's first exchange, bounded like a query that does not
            # arrive whole
            self.secure = TlsSession(context)
            self.handshaking = True
            self.slow_timer = asyncio.get_running_loop().call_later(self.limits.query_timeout, self._too_slow,
                                                                    "TLS handshake not finished in time")
            return
        stream.set_write_buffer_limits(high=64 * 1024)
        self._arm_idle_timer()

    def _tls_received(self, data: bytes) -> None:
        """Decrypt what came in; the handshake first. Anything that is not TLS ends the connection."""
        assert self.secure is not None
        assert self.transport is not None
        try:
            plain = self.secure.receive(data)
        except TlsFailure as exc:
            if self.handshaking:
                self.table.closed["tls_handshake"] += 1
            log.debug("TLS with %s failed: %s", self.client, exc)
            self._flush_tls()
            self.abort()
            return
        if self.handshaking and self.secure.established:
            self.handshaking = False
            if self.slow_timer is not None:
                self.slow_timer.cancel()
                self.slow_timer = None
            self.last_active = asyncio.get_running_loop().time()
            self.transport.set_write_buffer_limits(high=64 * 1024)
            self._arm_idle_timer()
        self._flush_tls()
        if plain:
            self._plain_received(plain)

    def _flush_tls(self) -> None:
        if self.secure is not None and self.transport is not None and not self.transport.is_closing():
            out = self.secure.outgoing()
            if out:
                self.transport.write(out)

    def data_received(self, data: bytes) -> None:
        if self.finishing:
            return  # read only so that the client's close, not ours, ends the connection
        if self.may_answer is not None and not self.may_answer():
            self.abort()
            return
        if self.secure is not None:
            self._tls_received(data)
        else:
            self._plain_received(data)

    def _plain_received(self, data: bytes) -> None:
        self.buffer += data
        self._take_queries()
        self._arm_idle_timer()

    def _take_queries(self) -> None:
        """Answer every complete query in the buffer, as far as the limits allow. Past the query cap
        (or the client's end) nothing more is read, but what was read is answered, then the
        connection ends (`_finish`)."""
        buffer = self.buffer
        while len(buffer) >= 2 and self.outstanding < self.limits.max_pipelined and not self.write_paused:
            length = U16.unpack_from(buffer)[0]
            if len(buffer) < 2 + length:
                break
            message = bytes(buffer[2 : 2 + length])
            del buffer[: 2 + length]
            self.queries += 1
            self.last_active = asyncio.get_running_loop().time()
            self._handle(message)
        if self.transport is None:
            return
        held = self.write_paused or self.outstanding >= self.limits.max_pipelined  # queries may wait in the buffer
        ending = self.client_ended or self.queries >= self.limits.max_queries
        if ending and not held:
            buffer.clear()  # the start of a query that will never be read whole
        if buffer and self.slow_timer is None and not self.write_paused:
            self.slow_timer = asyncio.get_running_loop().call_later(self.limits.query_timeout, self._too_slow,
                                                                    "query not sent in time")
        elif not buffer and self.slow_timer is not None and not self.write_paused:
            self.slow_timer.cancel()
            self.slow_timer = None
        self._set_reading(not held and not ending)
        if ending and not self.outstanding and not self.write_paused:
            self._finish()

    def _finish(self) -> None:
        """Every query read is answered: end the connection without cutting anything off. After the
        client's end, close. At the cap, half-close (TLS's close_notify first) and read on, discarding,
        until the client closes or `query_timeout` passes: closing a socket with unread queries in it
        would reset the connection, and a reset can make the client's system drop replies it has
        not read yet. RFC 7766 has the client retry what was not answered on a new connection."""
        transport = self.transport
        if transport is None or self.finishing:
            return
        if self.client_ended or not transport.can_write_eof():
            self.close()
            return
        self.finishing = True
        if self.secure is not None:
            transport.write(self.secure.close())
        transport.write_eof()
        self._stop_timers()
        self._linger()

    def _linger(self) -> None:
        """Read and drop until the client closes, for at most `query_timeout`."""
        if self.transport is not None:
            self.slow_timer = asyncio.get_running_loop().call_later(self.limits.query_timeout, self.transport.close)
            self._set_reading(True)

    def eof_received(self) -> bool:
        """The client closed its side: answer what it sent (forwards may still be out), then close."""
        if self.finishing or self.transport is None:
            return False
        self.client_ended = True
        self._take_queries()
        return True

    def _handle(self, message: bytes) -> None:
        try:
            result = self.pipeline.answer(message, self.client, self.protocol)
        except Exception:
            log.exception("internal error answering a TCP query from %s", self.client)
            result = rejection_reply(message, INTERNAL_ERROR, self.pipeline.udp_max)
        if result is None:
            return
        pad = self.tls is not None and padding_requested(message)
        if result.__class__ is bytes:
            self._send(pad_reply(result) if pad else result)
            return
        assert isinstance(result, Forward)
        self.outstanding += 1
        self.tasks.spawn(self._forward(result, pad))

    async def _forward(self, fwd: Forward, pad: bool = False) -> None:
        try:
            reply = await self.resolver.forward(fwd)
            self._send(pad_reply(reply) if pad else reply)
        finally:
            self.outstanding -= 1
            if self.transport is not None:
                self._take_queries()  # queries held back by max_pipelined, or close after the cap
                self._arm_idle_timer()

    def _send(self, reply: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            if self.secure is None:
                self.transport.write(U16.pack(len(reply)) + reply)
                return
            try:
                self.transport.write(self.secure.send(U16.pack(len(reply)) + reply))
            except TlsFailure:  # the client closed its side of TLS: nothing more can be sent
                self.abort()

    def _arm_idle_timer(self) -> None:
        if not self.finishing:  # (its own timer ends it)
            super()._arm_idle_timer()

    def close(self) -> None:
        if self.finishing:
            if self.transport is not None:
                self.transport.close()  # close_notify and our end went out already
            return
        super().close()

    def _set_reading(self, on: bool) -> None:
        if self.transport is None or on == self.reading or self.transport.is_closing():
            return
        self.reading = on
        if on:
            self.transport.resume_reading()
        else:
            self.transport.pause_reading()

    def pause_writing(self) -> None:
        # The client is not taking its replies: take no more queries, and give it query_timeout.
        self.write_paused = True
        self._set_reading(False)
        if self.slow_timer is not None:
            self.slow_timer.cancel()
        self.slow_timer = asyncio.get_running_loop().call_later(self.limits.query_timeout, self._too_slow,
                                                                "replies not read in time")

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.slow_timer is not None:
            self.slow_timer.cancel()
            self.slow_timer = None
        if self.finishing:
            self._linger()  # (TLS's close_notify was what filled the buffer)
        elif self.transport is not None:
            self._take_queries()

    def _too_slow(self, why: str) -> None:
        self.slow_timer = None
        self.table.closed["tls_handshake" if self.handshaking else "slow"] += 1
        log.debug("closing TCP connection from %s: %s", self.client, why)
        self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timers()
        self.transport = None
        self.buffer.clear()
        self.table.discard(self)


UDP_RECEIVE_BUFFER = 4 << 20  # the kernel caps it at net.core.rmem_max


def _large_receive_buffer(sock: socket.socket) -> None:
    """A burst of queries (a LAN waking up, a flood) waits in the socket instead of being dropped
    by the kernel while the loop is busy; the default (~200 KB) holds only ~300 datagrams."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECEIVE_BUFFER)
    except (OSError, AttributeError):  # pragma: no cover - a platform without the option
        log.debug("cannot enlarge the UDP receive buffer")


def _bound_socket(host: str, port: int, family: socket.AddressFamily, kind: socket.SocketKind,
                  reuse_port: bool) -> socket.socket:
    """A bound UDP socket (the batched endpoint's) or TCP one (for `create_server`), set up alike: an
    IPv6 one takes IPv4-mapped clients too. asyncio would make an IPv6 TCP listener IPv6-only, while
    the UDP socket on the same address is not: on `[::]` an IPv4 client would get UDP answers but no
    TCP, so a truncated answer could not be retried."""
    sock = socket.socket(family, kind)
    try:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _unheld_port(host: str, port: int, family: socket.AddressFamily) -> int:
    """`port` (0: a free one) once no socket holds it on `host` for UDP or TCP: bound without
    SO_REUSEPORT, which the group of another process of this user would take as a new member (it
    raises EADDRINUSE instead). Closed at once, for the primary's own group to bind."""
    udp = socket.socket(family, socket.SOCK_DGRAM)
    tcp = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_INET6:  # as the listeners: IPv4-mapped clients too
            for sock in (udp, tcp):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        udp.bind((host, port))
        port = udp.getsockname()[1]
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (a connection in TIME_WAIT holds nothing)
        tcp.bind((host, port))
        return port
    finally:
        udp.close()
        tcp.close()


class DnsListeners:
    """The UDP endpoints and TCP servers for every configured address."""

    def __init__(self, pipeline: Pipeline, resolver: Resolver, tasks: TaskSet, tcp: TcpLimits,
                 reuse_port: bool = False, may_answer: Callable[[], bool] | None = None, join: bool = False,
                 udp_io: str = "batched") -> None:
        self.pipeline = pipeline
        self.resolver = resolver
        self.tasks = tasks
        self.tcp = TcpTable(tcp)
        self._udp: list[asyncio.DatagramTransport | BatchedUdp | PktinfoUdp] = []
        self._tcp: list[asyncio.Server] = []
        self.bound: list[HostPort] = []
        self.bound_tls: list[HostPort] = []  # DNS over TLS listeners (the primary's only)
        self.bound_https: list[HostPort] = []  # DNS over HTTPS listeners (the primary's only)
        # dns.workers > 1: the primary and its workers each bind the same addresses (SO_REUSEPORT),
        # and the kernel spreads clients over them by their address and port.
        self.reuse_port = reuse_port
        # A worker joins the primary's sockets; the primary first makes sure nobody else holds the
        # address (SO_REUSEPORT would let another dnsgate's group take it in, splitting its clients).
        self.join = join
        # A worker process's check of its line to the primary, asked before each batch of queries
        # is answered (False: the query is dropped, a TCP connection cut).
        self.may_answer = may_answer
        # UDP with recvmmsg/sendmmsg where the system has them (udp_batch.py), else asyncio's endpoint.
        if udp_io == "batched" and not available():
            log.warning("dns.udp_io = \"batched\" needs recvmmsg/sendmmsg (Linux): using the asyncio endpoint")
            udp_io = "asyncio"
        self.udp_io = udp_io

    async def _open_udp(self, host: str, port: int, family: socket.AddressFamily
                        ) -> tuple[asyncio.DatagramTransport | BatchedUdp | PktinfoUdp, int]:
        """The UDP endpoint on (host, port), and its port. On a wildcard address the asyncio path reads
        and writes through the socket itself too: replies must leave from the address each query was
        sent to, which only control messages say (udp_batch.py)."""
        if self.udp_io == "batched" or (is_wildcard(host) and pktinfo_supported()):
            kind = BatchedUdp if self.udp_io == "batched" else PktinfoUdp
            endpoint = kind(_bound_socket(host, port, family, socket.SOCK_DGRAM, self.reuse_port), self.pipeline,
                            self.resolver, self.may_answer)
            _large_receive_buffer(endpoint.sock)
            return endpoint, endpoint.port
        v6 = family == socket.AF_INET6
        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: UdpListener(self.pipeline, self.resolver, self.tasks, v6, self.may_answer),
            local_addr=(host, port), family=family, reuse_port=self.reuse_port or None)
        _large_receive_buffer(transport.get_extra_info("socket"))
        return transport, transport.get_extra_info("sockname")[1]

    async def start(self, address: HostPort) -> HostPort:
        """Listen on UDP and TCP at `address`; with port 0, both get the same free port."""
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        for _attempt in range(20 if address.port == 0 else 1):
            port = address.port
            if self.reuse_port and not self.join:
                try:
                    port = _unheld_port(address.host, port, family)
                except OSError:
                    if address.port == 0:
                        continue  # the UDP port we got is taken for TCP: try another
                    raise
            try:
                transport, port = await self._open_udp(address.host, port, family)
            except OSError:
                if address.port == 0 and port != 0:
                    continue  # taken since it was found free: try another
                raise
            try:
                server = await loop.create_server(
                    lambda: TcpConnection(self.pipeline, self.resolver, self.tasks, self.tcp, self.may_answer),
                    sock=_bound_socket(address.host, port, family, socket.SOCK_STREAM, self.reuse_port))
            except OSError:
                transport.close()
                if address.port == 0:
                    continue  # the UDP port we got is taken for TCP: try another
                raise
            self._udp.append(transport)
            self._tcp.append(server)
            bound = HostPort(address.host, port)
            self.bound.append(bound)
            return bound
        raise OSError(f"no port free for both UDP and TCP on {address.host}")

    async def start_tls(self, address: HostPort, tls: TlsFiles) -> HostPort:
        """Serve DNS over TLS at `address`; its connections count against the TCP limits."""
        bound = await self.serve_stream(
            address, lambda: TcpConnection(self.pipeline, self.resolver, self.tasks, self.tcp, None, tls))
        self.bound_tls.append(bound)
        return bound

    async def serve_stream(self, address: HostPort, protocol: Callable[[], asyncio.Protocol]) -> HostPort:
        """Accept connections at `address` for `protocol` (DNS over TLS or HTTPS), closed with the rest."""
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        server = await asyncio.get_running_loop().create_server(
            protocol, sock=_bound_socket(address.host, address.port, family, socket.SOCK_STREAM, False))
        self._tcp.append(server)
        return HostPort(address.host, server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        for transport in self._udp:
            transport.close()
        for server in self._tcp:
            server.close()
        for connection in list(self.tcp.open):
            if connection.transport is not None:
                connection.transport.close()
        for server in self._tcp:
            await server.wait_closed()
        self._udp.clear()
        self._tcp.clear()
