"""UDP and TCP listeners: bytes in, the pipeline's answer out; forwards run as tracked tasks.

TCP follows RFC 7766: 2-byte length framing, several queries per connection answered as each
completes (pipelining, out of order), and an idle timeout while no query is outstanding.
Neither listener lets an exception escape: an internal error answers SERVFAIL.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Coroutine
from functools import partial
from typing import Any, cast

from .config import HostPort
from .consent import normalize_client
from .pipeline import Forward, Pipeline
from .resolver import Resolver
from .wire import SERVFAIL, U16, Rejection, rejection_reply

log = logging.getLogger(__name__)

INTERNAL_ERROR = Rejection(SERVFAIL, "internal error")


class TaskSet:
    """Background tasks we own: kept referenced, awaited or cancelled at shutdown."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def __len__(self) -> int:
        return len(self._tasks)

    async def drain(self, timeout: float) -> int:
        """Wait up to `timeout` for running tasks, then cancel the rest; returns how many were cancelled."""
        if not self._tasks:
            return 0
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        return len(pending)


def _client_of(host: str, v6: bool) -> str:
    # IPv4 sockets give canonical dotted quads; IPv6 ones may give ::ffff:a.b.c.d or a %zone.
    return normalize_client(host) if v6 and ("." in host or "%" in host) else host


class UdpListener(asyncio.DatagramProtocol):
    def __init__(self, pipeline: Pipeline, resolver: Resolver, tasks: TaskSet, v6: bool) -> None:
        self.pipeline = pipeline
        self.answer = pipeline.answer  # bound once: this runs for every datagram
        self.resolver = resolver
        self.tasks = tasks
        self.v6 = v6
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # uvloop's class is not a subclass
        self.sendto = self.transport.sendto

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            result = self.answer(data, _client_of(addr[0], True) if self.v6 else addr[0], False)
        except Exception:
            log.exception("internal error answering a UDP query from %s", addr[0])
            result = rejection_reply(data, INTERNAL_ERROR)
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


class TcpConnection(asyncio.Protocol):
    def __init__(self, pipeline: Pipeline, resolver: Resolver, tasks: TaskSet, idle_timeout: float,
                 connections: set[TcpConnection]) -> None:
        self.pipeline = pipeline
        self.connections = connections
        self.resolver = resolver
        self.tasks = tasks
        self.idle_timeout = idle_timeout
        self.transport: asyncio.Transport | None = None
        self.client = ""
        self.buffer = bytearray()
        self.outstanding = 0
        self.idle_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.connections.add(self)
        peer = transport.get_extra_info("peername")
        self.client = normalize_client(peer[0]) if peer else "unknown"
        self._arm_idle_timer()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= 2:
            length = U16.unpack_from(self.buffer)[0]
            if len(self.buffer) < 2 + length:
                break
            message = bytes(self.buffer[2 : 2 + length])
            del self.buffer[: 2 + length]
            self._handle(message)
        self._arm_idle_timer()

    def _handle(self, message: bytes) -> None:
        try:
            result = self.pipeline.answer(message, self.client, True)
        except Exception:
            log.exception("internal error answering a TCP query from %s", self.client)
            result = rejection_reply(message, INTERNAL_ERROR)
        if result is None:
            return
        if result.__class__ is bytes:
            self._send(result)
            return
        assert isinstance(result, Forward)
        self.outstanding += 1
        self.tasks.spawn(self._forward(result))

    async def _forward(self, fwd: Forward) -> None:
        try:
            self._send(await self.resolver.forward(fwd))
        finally:
            self.outstanding -= 1
            self._arm_idle_timer()

    def _send(self, reply: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(U16.pack(len(reply)) + reply)

    def _arm_idle_timer(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        if self.transport is not None and not self.transport.is_closing():
            self.idle_timer = asyncio.get_running_loop().call_later(self.idle_timeout, self._idle)

    def _idle(self) -> None:
        if self.outstanding:
            self._arm_idle_timer()  # an answer is still coming: idle means no query outstanding
        elif self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        self.transport = None
        self.connections.discard(self)


class DnsListeners:
    """The UDP endpoints and TCP servers for every configured address."""

    def __init__(self, pipeline: Pipeline, resolver: Resolver, tasks: TaskSet, tcp_idle_timeout: float) -> None:
        self.pipeline = pipeline
        self.resolver = resolver
        self.tasks = tasks
        self.tcp_idle_timeout = tcp_idle_timeout
        self._udp: list[asyncio.DatagramTransport] = []
        self._tcp: list[asyncio.Server] = []
        self._connections: set[TcpConnection] = set()
        self.bound: list[HostPort] = []

    async def start(self, address: HostPort) -> HostPort:
        """Listen on UDP and TCP at `address`; with port 0, both get the same free port."""
        loop = asyncio.get_running_loop()
        v6 = ":" in address.host
        family = socket.AF_INET6 if v6 else socket.AF_INET
        for _attempt in range(20 if address.port == 0 else 1):
            transport, _ = await loop.create_datagram_endpoint(
                lambda: UdpListener(self.pipeline, self.resolver, self.tasks, v6),
                local_addr=(address.host, address.port), family=family)
            port = transport.get_extra_info("sockname")[1]
            try:
                server = await loop.create_server(
                    lambda: TcpConnection(self.pipeline, self.resolver, self.tasks, self.tcp_idle_timeout,
                                          self._connections),
                    address.host, port, family=family, reuse_address=True)
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

    async def close(self) -> None:
        for transport in self._udp:
            transport.close()
        for server in self._tcp:
            server.close()
        for connection in list(self._connections):
            if connection.transport is not None:
                connection.transport.close()
        for server in self._tcp:
            await server.wait_closed()
        self._udp.clear()
        self._tcp.clear()
