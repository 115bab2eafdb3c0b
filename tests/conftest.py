"""Shared fixtures: a stub upstream and a real dnsgate (in-process, port 0, loopback only)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import aiohttp
import dns.asyncquery
import dns.message
import dns.rdatatype
import pytest

from dnsgate.app.primary import Running, run
from dnsgate.config import ApiConfig, Config, DnsConfig, StorageConfig, UpstreamConfig
from dnsgate.dns.udp_batch import available as batched_available
from tests.support.redis_server import REDIS_SERVER, RedisServer
from tests.support.stub_upstream import StubUpstream

TOKEN = "test-admin-token"
# The UDP paths (dns.udp_io) a module's tests run on when it asks for the `udp_io` fixture; the
# batched one needs recvmmsg/sendmmsg (Linux).
UDP_PATHS: list[Literal["batched", "asyncio"]] = ["batched", "asyncio"] if batched_available() else ["asyncio"]
_udp_io: list[Literal["batched", "asyncio"]] = []  # the path of the running test, while `udp_io` is active


def zone_for_tests(stub: StubUpstream) -> StubUpstream:
    stub.add("host.example.test", "host.example.test. 300 IN A 192.0.2.10",
             "host.example.test. 300 IN AAAA 2001:db8::10")
    stub.add("other.example.test", "other.example.test. 60 IN A 192.0.2.11")
    stub.add("trackcmp.net", "trackcmp.net. 300 IN A 198.51.100.1")
    stub.add("x.trackcmp.net", "x.trackcmp.net. 300 IN A 198.51.100.2")
    stub.add("prism.app-us1.com", "prism.app-us1.com. 300 IN A 198.51.100.3")
    stub.add("acct.api-us1.com", "acct.api-us1.com. 300 IN A 198.51.100.4")
    stub.add("api-us1.com", "api-us1.com. 300 IN A 198.51.100.5")
    stub.add("nottrackcmp.net", "nottrackcmp.net. 300 IN A 192.0.2.20")
    return stub


@pytest.fixture
async def upstream() -> AsyncIterator[StubUpstream]:
    stub = await zone_for_tests(StubUpstream()).start()
    yield stub
    await stub.stop()


def make_config(stub: StubUpstream, data_dir: Path, **sections: Any) -> Config:
    cfg = Config(
        dns=DnsConfig(listen=("127.0.0.1:0",)),
        api=ApiConfig(listen="127.0.0.1:0", admin_token=TOKEN),
        upstream=UpstreamConfig(servers=(stub.address,), timeout=1.5, attempt_timeout=0.5),
        storage=StorageConfig(data_dir=str(data_dir)),
    )
    return replace(cfg, **sections) if sections else cfg


def ipv6_loopback() -> bool:
    """Whether ::1 can be bound here (tests over IPv6 are skipped where it cannot)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@dataclass
class Gate:
    running: Running
    cfg: Config

    @property
    def dns_port(self) -> int:
        return self.running.dns[0].port

    @property
    def api_url(self) -> str:
        return f"http://{self.running.api}"

    async def query(self, name: str, rdtype: str = "A", *, source: str = "127.0.0.1", tcp: bool = False,
                    use_edns: int | bool = False, want_dnssec: bool = False, options: list[Any] | None = None,
                    timeout: float = 3.0, server: str | None = None) -> dns.message.Message:
        q = dns.message.make_query(name, dns.rdatatype.from_text(rdtype), use_edns=0 if options else use_edns,
                                   want_dnssec=want_dnssec, options=options)
        host = server or self.running.dns[0].host  # (`server`: an address of a wildcard listener)
        if tcp:
            return await dns.asyncquery.tcp(q, host, port=self.dns_port, source=source, timeout=timeout)
        return await dns.asyncquery.udp(q, host, port=self.dns_port, source=source, timeout=timeout)

    async def http(self, method: str, path: str, *, source: str = "127.0.0.1", json: Any = None,
                   headers: dict[str, str] | None = None, data: bytes | None = None,
                   admin: bool = False) -> tuple[int, Any]:
        headers = dict(headers or {})
        if admin:
            headers["Authorization"] = f"Bearer {TOKEN}"
        connector = aiohttp.TCPConnector(local_addr=(source, 0))
        async with aiohttp.ClientSession(connector=connector) as session, session.request(
            method, self.api_url + path, json=json, data=data, headers=headers
        ) as response:
            body = await response.json() if response.content_type == "application/json" else await response.text()
            return response.status, body


@pytest.fixture(params=UDP_PATHS)
def udp_io(request: pytest.FixtureRequest) -> Iterator[str]:
    """Runs a test once per UDP path: every dnsgate it starts (in-process, and the workers these
    start) serves UDP that way. A module opts in with `pytestmark = pytest.mark.usefixtures("udp_io")`."""
    _udp_io.append(request.param)
    try:
        yield str(request.param)
    finally:
        _udp_io.pop()


def on_udp_path(cfg: Config) -> Config:
    """`cfg` with the UDP path of the running test, if it runs on one (see `udp_io`)."""
    return replace(cfg, dns=replace(cfg.dns, udp_io=_udp_io[-1])) if _udp_io else cfg


@contextlib.asynccontextmanager
async def running_gate(cfg: Config, reread: Callable[[], Config] | None = None, **hooks: Any) -> AsyncIterator[Gate]:
    """dnsgate in-process; `hooks` go to app.run (a fake `wall` clock, a fake `neighbours` table)."""
    cfg = on_udp_path(cfg)
    if reread is not None:
        first_reread = reread
        reread = lambda: on_udp_path(first_reread())  # noqa: E731
    stop = asyncio.Event()
    ready: asyncio.Future[Running] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(run(cfg, stop, ready.set_result, reread, **hooks))
    waiters: list[asyncio.Future[Any]] = [task, ready]
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # raises the startup error
    try:
        yield Gate(ready.result(), cfg)
    finally:
        stop.set()
        await task


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
async def gate(upstream: StubUpstream, data_dir: Path) -> AsyncIterator[Gate]:
    async with running_gate(make_config(upstream, data_dir)) as g:
        yield g


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server of this test's own (loopback, free port), stopped by PID afterwards."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (Debian package redis-server; .ci/run installs it)")
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "redis"])
def consent_store(request: pytest.FixtureRequest) -> str:
    """`storage.store` for tests that must hold for both stores: "sqlite", or a fresh Redis's URL."""
    if request.param == "sqlite":
        return "sqlite"
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url


def with_store(cfg: Config, store: str) -> Config:
    return replace(cfg, storage=replace(cfg.storage, store=store))
