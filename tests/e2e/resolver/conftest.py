"""Helpers for the resolver tests: raw exchanges over loopback, and the cache-miss/cache-hit paths.

Most resolver behaviours must hold on both paths, so `path` parametrizes a test over "miss" (the
upstream is asked) and "hit" (an identical query filled the cache first; the upstream is not asked
again), and `on_path` checks that the answer really took that path.
"""

from __future__ import annotations

import asyncio
import shutil
import struct
from collections.abc import Callable

import dns.message
import pytest

from tests.conftest import Gate
from tests.support.stub_upstream import StubUpstream


def system_tool(name: str) -> str | None:
    """The path of an installed program, also where root's tools live if PATH lacks them."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")


@pytest.fixture(params=["miss", "hit"])
def path(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def udp_raw(port: int, data: bytes, *, source: str = "127.0.0.1", host: str = "127.0.0.1",
                  timeout: float = 2.0) -> bytes | None:
    """Send one datagram and return the first reply, or None if none came within `timeout`."""
    loop = asyncio.get_running_loop()
    got: asyncio.Future[bytes] = loop.create_future()

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, reply: bytes, addr: object) -> None:
            if not got.done():
                got.set_result(reply)

    transport, _ = await loop.create_datagram_endpoint(Client, local_addr=(source, 0), remote_addr=(host, port))
    try:
        transport.sendto(data)
        try:
            return await asyncio.wait_for(got, timeout)
        except TimeoutError:
            return None
    finally:
        transport.close()


async def tcp_raw(port: int, data: bytes, *, timeout: float = 3.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(struct.pack(">H", len(data)) + data)
        await writer.drain()
        async with asyncio.timeout(timeout):
            length = struct.unpack(">H", await reader.readexactly(2))[0]
            return await reader.readexactly(length)
    finally:
        writer.close()


async def ask(gate: Gate, data: bytes, *, tcp: bool = False, source: str = "127.0.0.1") -> bytes:
    reply = await tcp_raw(gate.dns_port, data) if tcp else await udp_raw(gate.dns_port, data, source=source)
    assert reply is not None, "no reply"
    return reply


async def on_path(gate: Gate, upstream: StubUpstream, path: str, make: Callable[[], bytes], *,
                  tcp: bool = False) -> dns.message.Message:
    """The reply to `make()`, answered from the cache ("hit") or from upstream ("miss")."""
    if path == "hit":
        await ask(gate, make(), tcp=tcp)
    before = len(upstream.queries)
    reply = await ask(gate, make(), tcp=tcp)
    if path == "hit":
        assert len(upstream.queries) == before, "expected a cache hit, but upstream was asked"
    else:
        assert len(upstream.queries) > before, "expected a cache miss, but upstream was not asked"
    return dns.message.from_wire(reply)


def query_wire(name: str, rdtype: str = "A", *, flags_set: int = 0, flags_clear: int = 0, **kwargs: object) -> bytes:
    """A query in wire format with header flag bits set or cleared (RD is set by default)."""
    q = dns.message.make_query(name, rdtype, **kwargs)  # type: ignore[arg-type]
    wire = bytearray(q.to_wire())
    flags = (struct.unpack_from(">H", wire, 2)[0] | flags_set) & ~flags_clear
    struct.pack_into(">H", wire, 2, flags)
    return bytes(wire)
