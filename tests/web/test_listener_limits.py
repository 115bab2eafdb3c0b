"""The API held to limits over real sockets, as DNS over TCP is (tests/dns/test_tcp_limits.py):
connections per client and in total (the idlest makes room), idle connections, slow headers and
slow bodies closed within their deadlines. Every wait is bounded."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import Gate, make_config, running_gate
from tests.support.slow_client import Conn, close_all, drip
from tests.support.stub_upstream import StubUpstream

SLACK = 1.5  # timers, a loaded machine (each slow client below keeps sending for longer than 0.5 s + SLACK)
GRANT = {"categories": ["marketing"]}


@pytest.fixture
async def limited(upstream: StubUpstream, data_dir: Path, request: pytest.FixtureRequest) -> AsyncIterator[Gate]:
    cfg = make_config(upstream, data_dir)
    cfg = replace(cfg, api=replace(cfg.api, **request.param))
    async with running_gate(cfg) as g:
        yield g


async def connect(g: Gate, source: str = "127.0.0.1") -> Conn:
    return await asyncio.open_connection(g.running.api.host, g.running.api.port, local_addr=(source, 0))


async def closed_within(reader: asyncio.StreamReader, within: float) -> float | None:
    """Seconds until the server closed the connection (reading whatever it sent first), or None."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        async with asyncio.timeout(within):
            while await reader.read(4096):
                pass
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return loop.time() - started


async def get(conn: Conn, path: str = "/healthz") -> tuple[int, bytes]:
    """One keep-alive GET on an open connection: (status, body)."""
    reader, writer = conn
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    await writer.drain()
    async with asyncio.timeout(3):
        status = int((await reader.readline()).split()[1])
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return status, await reader.readexactly(length)


async def metrics(g: Gate) -> str:
    _, text = await g.http("GET", "/metrics")
    return str(text)


@pytest.mark.parametrize("limited", [{"idle_timeout": 0.5}], indirect=True)
async def test_a_connection_that_sends_nothing_is_closed_after_the_idle_timeout(limited: Gate) -> None:
    reader, writer = await connect(limited)
    took = await closed_within(reader, 0.5 + SLACK)
    assert took is not None and took >= 0.4
    keep = await connect(limited)  # and one that made a request: idle from its reply on
    assert (await get(keep))[0] == 200
    took = await closed_within(keep[0], 0.5 + SLACK)
    assert took is not None and took >= 0.4
    close_all((reader, writer), keep)


@pytest.mark.parametrize("limited", [{"header_timeout": 0.5, "idle_timeout": 30.0}], indirect=True)
async def test_slow_loris_headers_are_closed_after_the_header_timeout(limited: Gate) -> None:
    reader, writer = await connect(limited)
    assert (await get((reader, writer)))[0] == 200  # a whole request first: the deadline is per request
    loop = asyncio.get_running_loop()
    started = loop.time()
    await drip((reader, writer), b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 40, 0.05)
    assert await closed_within(reader, 3.0) is not None
    assert loop.time() - started < 0.5 + SLACK
    assert 'dnsgate_api_closed_early_total{reason="slow_headers"} 1.0' in await metrics(limited)
    writer.close()


@pytest.mark.parametrize("limited", [{"body_timeout": 0.5, "idle_timeout": 30.0}], indirect=True)
async def test_a_slow_body_is_closed_after_the_body_timeout(limited: Gate) -> None:
    reader, writer = await connect(limited)
    body = json.dumps(GRANT).encode()
    writer.write(b"PUT /v1/consent HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body[:5])
    loop = asyncio.get_running_loop()
    started = loop.time()
    await drip((reader, writer), body[5:], 0.1)
    assert await closed_within(reader, 3.0) is not None
    assert loop.time() - started < 0.5 + SLACK
    assert 'dnsgate_api_closed_early_total{reason="slow_body"} 1.0' in await metrics(limited)
    _, own = await limited.http("GET", "/v1/consent")
    assert own["choice"] is None  # nothing was changed by the half-sent request
    status, _ = await limited.http("PUT", "/v1/consent", json=GRANT)
    assert status == 200  # a body sent in time still works
    writer.close()


@pytest.mark.parametrize("limited", [{"max_connections_per_client": 2}], indirect=True)
async def test_connections_per_client(limited: Gate) -> None:
    a, b = await connect(limited), await connect(limited)
    assert (await get(a))[0] == 200 and (await get(b))[0] == 200
    c = await connect(limited)
    assert await closed_within(c[0], 3.0) is not None
    other = await connect(limited, "127.0.0.2")  # another client is not affected
    assert (await get(other))[0] == 200
    status, text = await get(other, "/metrics")
    assert status == 200 and b'dnsgate_api_closed_early_total{reason="per_client_limit"} 1.0' in text
    close_all(a, b, c, other)


@pytest.mark.parametrize("limited", [{"max_connections": 4, "max_connections_per_client": 4,
                                      "header_timeout": 30.0, "idle_timeout": 30.0}], indirect=True)
async def test_idle_and_slow_connections_cannot_lock_a_new_client_out(limited: Gate) -> None:
    loris = [await connect(limited, "127.0.0.5") for _ in range(4)]
    for _, writer in loris:
        writer.write(b"GET /healthz HTTP/1.1\r\nHo")  # a request's first bytes, and then nothing
    await asyncio.gather(*(w.drain() for _, w in loris))
    await asyncio.sleep(0.1)
    fresh = await connect(limited, "127.0.0.6")
    assert (await get(fresh))[0] == 200  # the table was full: the connection idle longest made room
    assert await closed_within(loris[0][0], 3.0) is not None
    close_all(fresh, *loris)


@pytest.mark.parametrize("limited", [{"max_connections": 3, "max_connections_per_client": 3,
                                      "body_timeout": 30.0}], indirect=True)
async def test_when_every_connection_is_busy_a_new_one_is_refused(limited: Gate) -> None:
    busy = [await connect(limited, "127.0.0.7") for _ in range(3)]
    for _, writer in busy:  # each in a request, its body still coming: busy, not idle
        writer.write(b"PUT /v1/consent HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{")
    await asyncio.sleep(0.2)
    refused = await connect(limited, "127.0.0.8")
    assert await closed_within(refused[0], 3.0) is not None
    for reader, _ in busy:
        assert not reader.at_eof()
    close_all(refused, *busy)
    await asyncio.sleep(0.1)
    text = await metrics(limited)
    assert 'dnsgate_api_closed_early_total{reason="total_limit"} 1.0' in text
    assert "dnsgate_api_connections 1.0" in text  # the scrape's own


@pytest.mark.parametrize("limited", [{"max_connections": 2, "max_connections_per_client": 2,
                                      "admin_listen": "127.0.0.1:0"}], indirect=True)
async def test_the_admin_listener_counts_in_the_same_table(limited: Gate) -> None:
    assert limited.running.admin is not None
    api = await connect(limited)
    admin = await asyncio.open_connection(limited.running.admin.host, limited.running.admin.port)
    assert (await get(api))[0] == 200 and (await get(admin))[0] == 200
    third = await connect(limited)  # the per-client cap counts both listeners' connections
    assert await closed_within(third[0], 3.0) is not None
    close_all(api, admin, third)
