"""The API's listening sockets, held to limits as DNS over TCP is: open connections in total and per
client (when full, the connection idle longest makes room), an idle timeout, a deadline to send the
request line and headers once begun and another to send the body. Without them, idle and slow
clients could take every file descriptor the process has, and DNS would have none left.

aiohttp has no connection cap of its own. `ApiListeners` accepts the connections itself and hands
each one, once admitted, to aiohttp's protocol (the runner's `web.Server` makes one per
connection) through `ApiConnection`, which closes it when its headers are too slow. The idle
timeout is aiohttp's keep-alive timeout (the runner's `keepalive_timeout`), which also closes a
connection that never sends a request. The body deadline is the `deadlines` middleware's: it reads
the body (at most api.max_body_bytes) before the handler runs, so handlers find it read.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from dnsgate.addresses import normalize_client
from dnsgate.connections import ConnectionTable

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ApiLimits:
    """What one API client may hold (config [api])."""

    max_connections: int = 128
    max_per_client: int = 16
    idle_timeout: float = 30.0  # no request: before the first, between requests (aiohttp's keep-alive)
    header_timeout: float = 10.0  # from a request's first byte to the end of its headers
    body_timeout: float = 10.0  # from the end of the headers to the end of the body


class ApiConnection(asyncio.Protocol):
    """One connection: admitted against the table, then aiohttp's protocol (`inner`) does the HTTP."""

    def __init__(self, listeners: ApiListeners, inner: asyncio.Protocol) -> None:
        self.listeners = listeners
        self.inner = inner
        self.transport: asyncio.Transport | None = None
        self.client = ""
        self.last_active = 0.0
        self.admitted = False
        self.requests = 0  # being answered (a keep-alive connection may pipeline)
        # When the headers now due began to arrive (None: none due). The timer that checks them is
        # left armed across requests and re-armed when it fires early, as aiohttp's keep-alive timer
        # is: a request then costs no timer of its own.
        self.headers_since: float | None = None
        self.header_timer: asyncio.TimerHandle | None = None
        self.loop = asyncio.get_running_loop()

    @property
    def busy(self) -> bool:
        return self.requests > 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.client = normalize_client(peer[0]) if peer else "unknown"
        self.last_active = self.loop.time()
        if not self.listeners.table.admit(self):
            self.transport.abort()
            return
        self.admitted = True
        self.listeners.by_protocol[self.inner] = self
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self.admitted:
            return
        if not self.requests and self.headers_since is None:  # a new request begins: its headers are due
            self.headers_since = self.loop.time()
            if self.header_timer is None:
                self.header_timer = self.loop.call_at(self.headers_since + self.listeners.limits.header_timeout,
                                                      self._check_headers)
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.admitted else None

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None
        self.transport = None
        self.listeners.table.discard(self)
        if self.admitted:
            self.listeners.by_protocol.pop(self.inner, None)
            self.inner.connection_lost(exc)

    def request_started(self) -> None:
        """Its headers are in: the handler runs (the `deadlines` middleware says so)."""
        self.headers_since = None
        self.requests += 1
        self.last_active = self.loop.time()

    def request_done(self) -> None:
        self.requests -= 1
        self.last_active = self.loop.time()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _check_headers(self) -> None:
        self.header_timer = None
        if self.headers_since is None:  # no headers due now
            return
        due = self.headers_since + self.listeners.limits.header_timeout
        if self.loop.time() < due:  # armed for an earlier request's: wait for this one's deadline
            self.header_timer = self.loop.call_at(due, self._check_headers)
            return
        self._too_slow("slow_headers")

    def _too_slow(self, why: str) -> None:
        self.listeners.table.closed[why] += 1
        log.debug("closing API connection from %s: %s", self.client, why)
        self.abort()


class ApiListeners:
    """The API and admin listeners: one table of connections, one set of limits."""

    def __init__(self, limits: ApiLimits) -> None:
        self.limits = limits
        self.table: ConnectionTable[ApiConnection] = ConnectionTable(limits.max_connections, limits.max_per_client)
        self.by_protocol: dict[object, ApiConnection] = {}  # aiohttp's protocol -> its connection
        self._servers: list[asyncio.AbstractServer] = []

    async def start(self, protocol: Callable[[], asyncio.Protocol], sock: socket.socket) -> None:
        """Serve `protocol` (aiohttp's `web.Server`) on the listening socket `sock`."""
        server = await asyncio.get_running_loop().create_server(lambda: ApiConnection(self, protocol()), sock=sock)
        self._servers.append(server)

    def close(self) -> None:
        """Stop listening; the runner's cleanup then closes the open connections."""
        for server in self._servers:
            server.close()
        self._servers.clear()

    def middleware(self) -> Middleware:
        """Marks a connection busy while its request is answered, and holds the body to its deadline."""
        by_protocol = self.by_protocol
        limits = self.limits
        closed = self.table.closed

        @web.middleware
        async def deadlines(request: web.Request, handler: Handler) -> web.StreamResponse:
            conn = by_protocol.get(request.protocol)
            if conn is None:  # not through these listeners
                return await handler(request)
            conn.request_started()
            try:
                if request.body_exists and request.content.is_eof():  # all here: reading it cannot wait
                    await request.read()
                elif request.body_exists:
                    try:
                        async with asyncio.timeout(limits.body_timeout):
                            await request.read()  # kept by the request: handlers read it from memory
                    except TimeoutError:
                        closed["slow_body"] += 1
                        log.debug("closing API connection from %s: body not sent in time", conn.client)
                        conn.abort()
                        raise web.HTTPRequestTimeout() from None
                return await handler(request)
            finally:
                conn.request_done()

        return deadlines

    def counts(self) -> tuple[int, dict[str, int]]:
        """(open connections, why connections were refused or closed early)."""
        return len(self.table), dict(self.table.closed)
