"""TCP limits over real sockets: per-client and total connections, slow-loris, queries per
connection (and how a connection ends at that cap, over TCP and TLS), queries waiting upstream per
connection. Every wait is bounded."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import dns.message
import pytest

from tests.conftest import Gate, make_config, running_gate
from tests.support.encrypted import SERVER_NAME, encrypted_config, make_certs
from tests.support.slow_client import Conn, close_all, drip
from tests.support.stub_upstream import StubUpstream


@pytest.fixture
async def limited(upstream: StubUpstream, data_dir: Path, request: pytest.FixtureRequest) -> AsyncIterator[Gate]:
    cfg = make_config(upstream, data_dir)
    cfg = replace(cfg, dns=replace(cfg.dns, **request.param))
    async with running_gate(cfg) as g:
        yield g


async def connect(g: Gate, source: str) -> Conn:
    return await asyncio.open_connection("127.0.0.1", g.dns_port, local_addr=(source, 0))


def framed(name: str, qid: int = 0) -> bytes:
    q = dns.message.make_query(name, "A", id=qid or None)
    data = q.to_wire()
    return struct.pack(">H", len(data)) + data


async def ask(conn: Conn, name: str = "host.example.test") -> dns.message.Message:
    reader, writer = conn
    writer.write(framed(name))
    await writer.drain()
    return await read_reply(reader)


async def read_reply(reader: asyncio.StreamReader) -> dns.message.Message:
    async with asyncio.timeout(3):
        length = struct.unpack(">H", await reader.readexactly(2))[0]
        return dns.message.from_wire(await reader.readexactly(length))


async def closed_by_server(reader: asyncio.StreamReader, within: float = 3.0) -> bool:
    try:
        async with asyncio.timeout(within):
            return await reader.read(1) == b""
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("limited", [{"tcp_max_connections_per_client": 2}], indirect=True)
async def test_connections_per_client(limited: Gate) -> None:
    a, b = await connect(limited, "127.0.0.1"), await connect(limited, "127.0.0.1")
    assert (await ask(a)).answer and (await ask(b)).answer
    c = await connect(limited, "127.0.0.1")
    assert await closed_by_server(c[0])
    other = await connect(limited, "127.0.0.2")  # another client is not affected
    assert (await ask(other)).answer
    close_all(a, b, c, other)


@pytest.mark.parametrize("limited", [{"tcp_max_connections": 4, "tcp_max_connections_per_client": 4,
                                      "tcp_query_timeout": 30.0, "tcp_idle_timeout": 30.0}], indirect=True)
async def test_idle_and_slow_connections_cannot_lock_a_new_client_out(limited: Gate) -> None:
    loris = [await connect(limited, "127.0.0.5") for _ in range(4)]
    for _, writer in loris:
        writer.write(b"\x00\x30\x12")  # a query's first bytes, and then nothing
    await asyncio.gather(*(w.drain() for _, w in loris))
    fresh = await connect(limited, "127.0.0.6")
    reply = await ask(fresh)  # the table was full: the connection idle longest made room
    assert reply.answer
    assert await closed_by_server(loris[0][0])
    close_all(fresh, *loris)


@pytest.mark.parametrize("limited", [{"tcp_query_timeout": 0.3, "tcp_idle_timeout": 30.0}], indirect=True)
async def test_slow_loris_is_closed_after_the_query_timeout(limited: Gate) -> None:
    reader, writer = conn = await connect(limited, "127.0.0.1")
    assert (await ask(conn)).answer  # a complete query first: no timer left running
    loop = asyncio.get_running_loop()
    started = loop.time()
    await drip(conn, framed("host.example.test")[:10], 0.05)  # slower than the timeout allows in total
    assert await closed_by_server(reader, within=2.0)
    assert loop.time() - started < 2.0
    writer.close()


CAP = 3


@pytest.fixture(params=["tcp", "tls"])
async def capped(upstream: StubUpstream, data_dir: Path, tmp_path: Path, request: pytest.FixtureRequest
                 ) -> AsyncIterator[Callable[[], Awaitable[Conn]]]:
    """Connections to a dnsgate whose TCP and DNS-over-TLS connections take CAP queries each."""
    if request.param == "tcp":
        cfg = make_config(upstream, data_dir)
        async with running_gate(replace(cfg, dns=replace(cfg.dns, tcp_max_queries_per_connection=CAP))) as g:
            yield lambda: connect(g, "127.0.0.1")
        return
    certs = make_certs(tmp_path / "tls")
    async with running_gate(encrypted_config(upstream, data_dir, certs, tcp_max_queries_per_connection=CAP)) as g:
        port = g.running.tls[0].port
        yield lambda: asyncio.open_connection("127.0.0.1", port, ssl=certs.client_context(),
                                              server_hostname=SERVER_NAME)


async def replies_to_the_end(reader: asyncio.StreamReader) -> list[dns.message.Message]:
    """Every reply until the server ends the connection; a reset (ConnectionResetError) fails."""
    replies = []
    async with asyncio.timeout(5):
        while length := await reader.read(2):
            if len(length) == 1:
                length += await reader.readexactly(1)
            replies.append(dns.message.from_wire(await reader.readexactly(struct.unpack(">H", length)[0])))
    return replies


async def test_at_the_query_cap_every_query_read_is_answered_and_the_connection_ends_cleanly(
        capped: Callable[[], Awaitable[Conn]], upstream: StubUpstream) -> None:
    """Five queries arrive in one read past a cap of 3 (pipelined, their answers still upstream),
    then three more while those wait: every query the server read is answered, and the end is a
    clean one (FIN, or close_notify and FIN) even though queries the server never read are still
    coming in, not a reset (which would leave the client unsure what was answered)."""
    upstream.delay = 0.2
    names = [f"n{i}.example.test" for i in range(8)]
    for i, name in enumerate(names):
        upstream.add(name, f"{name}. 300 IN A 192.0.2.{100 + i}")
    reader, writer = await capped()
    writer.write(b"".join(framed(n, i + 1) for i, n in enumerate(names[:5])))
    await writer.drain()
    await asyncio.sleep(0.05)  # read by now; their answers come 0.2 s later
    writer.write(b"".join(framed(n, i + 6) for i, n in enumerate(names[5:])))
    await writer.drain()
    replies = await replies_to_the_end(reader)
    ids = [r.id for r in replies]
    assert {1, 2, 3, 4, 5} <= set(ids) <= set(range(1, 9)) and len(ids) == len(set(ids))
    for r in replies:
        assert [rr.to_text() for rr in r.answer[0]] == [f"192.0.2.{100 + r.id - 1}"]
    writer.close()


async def test_a_client_that_closes_its_side_still_gets_every_answer(gate: Gate, upstream: StubUpstream) -> None:
    """A client that sends its queries and then shuts its side down (as a one-shot client may) is
    answered in full before the server closes, even when the answers come from upstream later."""
    upstream.delay = 0.2
    names = [f"eof{i}.example.test" for i in range(3)]
    for i, name in enumerate(names):
        upstream.add(name, f"{name}. 300 IN A 192.0.2.{50 + i}")
    reader, writer = await connect(gate, "127.0.0.1")
    writer.write(b"".join(framed(n, i + 1) for i, n in enumerate(names)))
    writer.write_eof()
    replies = await replies_to_the_end(reader)
    assert sorted(r.id for r in replies) == [1, 2, 3]
    writer.close()


@pytest.mark.parametrize("limited", [{"tcp_max_pipelined": 2}], indirect=True)
async def test_queries_waiting_upstream_per_connection(limited: Gate, upstream: StubUpstream) -> None:
    upstream.delay = 0.1
    names = [f"n{i}.example.test" for i in range(6)]
    for name in names:
        upstream.add(name, f"{name}. 300 IN A 192.0.2.{len(upstream.zone)}")
    reader, writer = await connect(limited, "127.0.0.1")
    writer.write(b"".join(framed(n, i + 1) for i, n in enumerate(names)))
    await writer.drain()
    replies: list[Any] = [await read_reply(reader) for _ in names]
    assert sorted(r.id for r in replies) == [1, 2, 3, 4, 5, 6] and all(r.answer for r in replies)
    assert upstream.max_in_flight <= 2
    writer.close()


@pytest.mark.parametrize("limited", [{"tcp_query_timeout": 0.5, "tcp_max_pipelined": 1000}], indirect=True)
async def test_a_client_that_never_reads_its_replies_is_closed(limited: Gate, upstream: StubUpstream) -> None:
    upstream.add("big.example.test", "big.example.test. 300 IN TXT " + " ".join(['"' + "x" * 250 + '"'] * 4))
    assert (await limited.query("big.example.test", "TXT", tcp=True)).answer  # cached from now on
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", limited.dns_port))
    reader, writer = await asyncio.open_connection(sock=sock)
    q = dns.message.make_query("big.example.test", "TXT").to_wire()
    burst = (struct.pack(">H", len(q)) + q) * 500
    try:
        for _ in range(20):  # ~10 000 replies of 1 KB, never read
            writer.write(burst)
            await asyncio.wait_for(writer.drain(), 5)
    except (ConnectionError, TimeoutError):
        pass  # closed (or stopped reading) while we were still sending: what we want to see
    async with asyncio.timeout(5):
        while True:
            _, text = await limited.http("GET", "/metrics")
            if 'dnsgate_tcp_closed_early_total{reason="slow"} 1.0' in text:
                break
            await asyncio.sleep(0.1)
    try:  # what was sent before the close is still in our buffer; then the end
        async with asyncio.timeout(5):
            while await reader.read(65536):
                pass
    except ConnectionResetError:
        pass
    writer.close()
