"""Upstream quality over loopback: failover and fastest, back-off and recovery, conditional
forwarding, TCP and DNS-over-TLS upstreams (a CA made for the test), random IDs and source ports,
and replies that are forged (wrong ID, wrong source address, other question) discarded."""

from __future__ import annotations

import asyncio
import ssl
import struct
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import dns.message
import dns.rcode
import pytest
import trustme

from dnsgate.app.primary import StartupError
from dnsgate.config import Config, UpstreamAddress, UpstreamConfig, parse_upstream
from dnsgate.dns.upstreams import (
    PROBE_RATE,
    QUERIES_PER_SOCKET,
    SOCKETS_PER_FAMILY,
    RandomBytes,
    Server,
    ServerGroup,
    Upstreams,
)
from dnsgate.wire import Query, parse_query
from tests.conftest import Gate, make_config, running_gate, zone_for_tests
from tests.e2e.resolver.conftest import on_path, query_wire
from tests.support.stub_upstream import BOGUS_ADDRESS, StubUpstream

pytestmark = pytest.mark.usefixtures("udp_io")  # every test runs on both UDP paths (dns.udp_io)


@pytest.fixture
async def second() -> AsyncIterator[StubUpstream]:
    stub = await zone_for_tests(StubUpstream()).start()
    yield stub
    await stub.stop()


def config(data_dir: Path, *servers: str, **upstream: object) -> Config:
    cfg = make_config(StubUpstream(), data_dir)
    return replace(cfg, upstream=replace(UpstreamConfig(servers=servers, timeout=2.0, attempt_timeout=0.3),
                                         **upstream))  # type: ignore[arg-type]


async def test_failover_in_order_backs_off_and_recovers(upstream: StubUpstream, second: StubUpstream,
                                                        data_dir: Path) -> None:
    async with running_gate(config(data_dir, upstream.address, second.address)) as g:
        assert (await g.query("n1.example.test")).rcode() == dns.rcode.NXDOMAIN
        assert upstream.count("n1.example.test") == 1 and second.count("n1.example.test") == 0
        upstream.silent = True
        assert (await g.query("host.example.test")).answer  # first times out, second answers
        assert upstream.count("host.example.test") == 1 and second.count("host.example.test") == 1
        assert (await g.query("other.example.test")).answer
        assert upstream.count("other.example.test") == 0  # backing off: not asked first, not asked at all
        upstream.silent = False
        await asyncio.sleep(1.1)  # the first back-off (1 s) runs out
        assert (await g.query("n2.example.test")).rcode() == dns.rcode.NXDOMAIN
        assert upstream.count("n2.example.test") == 1 and second.count("n2.example.test") == 0  # back in first place
        _, health = await g.http("GET", "/healthz")
        assert [u["server"] for u in health["upstreams"]] == [upstream.address, second.address]


async def test_fastest_prefers_the_quicker_upstream(upstream: StubUpstream, second: StubUpstream,
                                                   data_dir: Path) -> None:
    upstream.delay = 0.1
    async with running_gate(config(data_dir, upstream.address, second.address, strategy="fastest")) as g:
        for i in range(30):
            assert (await g.query(f"n{i}.example.test")).rcode() == dns.rcode.NXDOMAIN
        slow = sum(1 for n, _, _ in upstream.queries if n.startswith("n"))
        assert second.count("n29.example.test") + upstream.count("n29.example.test") == 1
        assert slow <= 10  # measured once, then only probed now and then
        _, health = await g.http("GET", "/healthz")
        srtt = {u["server"]: u["srtt_ms"] for u in health["upstreams"]}
        assert srtt[upstream.address] > srtt[second.address]


class FixedRandom(RandomBytes):
    def __init__(self, values: list[int]) -> None:
        super().__init__()
        self.values = values

    def below(self, n: int) -> int:
        return self.values.pop(0) % n


def test_fastest_order_and_probing() -> None:
    a, b, c = (Server(UpstreamAddress(f"192.0.2.{i}", 53)) for i in (1, 2, 3))
    a.succeeded(0.050)
    b.succeeded(0.010)
    c.succeeded(0.030)
    group = ServerGroup([a, b, c], "fastest", FixedRandom([9999, 9999]))
    assert list(group.order(0.0)) == [b, c, a]
    group.random = FixedRandom([0, 1])  # a probe: the second in line by the draw goes first
    assert list(group.order(0.0)) == [a, b, c]
    draws = RandomBytes()
    group.random = draws
    probes = sum(group.order(0.0)[0] is not b for _ in range(20_000)) / 20_000
    assert PROBE_RATE * 0.6 < probes < PROBE_RATE * 1.4


def test_failover_order_and_backoff_doubling() -> None:
    a, b = Server(UpstreamAddress("192.0.2.1", 53)), Server(UpstreamAddress("192.0.2.2", 53))
    group = ServerGroup([a, b], "failover", RandomBytes())
    assert list(group.order(100.0)) == [a, b]
    group.failed(a, 100.0, 1.0, "timeout")
    assert list(group.order(100.5)) == [b, a]  # still asked, but last
    group.failed(a, 101.0, 1.0, "timeout")
    assert a.down_until == 103.0  # 1 s, then 2 s, ...
    assert list(group.order(102.9)) == [b, a] and list(group.order(103.0)) == [a, b]  # back in its place
    for _ in range(20):
        group.failed(a, 200.0, 1.0, "timeout")
    assert a.down_until == 260.0  # ... capped at 60 s
    a.succeeded(0.01)
    assert list(group.order(200.0)) == [a, b]


async def test_conditional_forwarding(upstream: StubUpstream, second: StubUpstream, data_dir: Path,
                                      path: str) -> None:
    second.add("intranet.corp.example", "intranet.corp.example. 300 IN A 10.0.0.80")
    second.add("7.1.168.192.in-addr.arpa", "7.1.168.192.in-addr.arpa. 300 IN PTR printer.corp.example.")
    cfg = config(data_dir, upstream.address,
                 domains=(("corp.example", (second.address,)), ("168.192.in-addr.arpa", (second.address,))))
    async with running_gate(cfg) as g:
        corp = await on_path(g, second, path, lambda: query_wire("intranet.corp.example"))
        assert [r.to_text() for r in corp.answer[0]] == ["10.0.0.80"]
        ptr = await on_path(g, second, path, lambda: query_wire("7.1.168.192.in-addr.arpa", "PTR"))
        assert [r.to_text() for r in ptr.answer[0]] == ["printer.corp.example."]
        other = await g.query("10.1.16.172.in-addr.arpa", "PTR")  # private, not forwarded: answered locally
        assert other.rcode() == dns.rcode.NXDOMAIN
        assert (await g.query("host.example.test")).answer
        assert {n for n, _, _ in upstream.queries} == {"host.example.test"}  # the public upstream saw nothing private
        assert {n for n, _, _ in second.queries} == {"intranet.corp.example", "7.1.168.192.in-addr.arpa"}


async def test_tcp_upstream_one_pipelined_connection(upstream: StubUpstream, data_dir: Path, path: str) -> None:
    async with running_gate(config(data_dir, f"tcp://{upstream.address}")) as g:
        reply = await on_path(g, upstream, path, lambda: query_wire("host.example.test"))
        assert reply.answer
        replies = await asyncio.gather(*(g.query(f"n{i}.example.test") for i in range(10)))
        assert all(r.rcode() == dns.rcode.NXDOMAIN for r in replies)
        assert {t for _, _, t in upstream.queries} == {"tcp"} and upstream.connections == 1


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def tls_upstream(ca: trustme.CA) -> AsyncIterator[StubUpstream]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("dns.example.test").configure_cert(context)
    stub = await zone_for_tests(StubUpstream(tls=context)).start()
    yield stub
    await stub.stop()


async def test_dns_over_tls_upstream(tls_upstream: StubUpstream, ca: trustme.CA, data_dir: Path, tmp_path: Path,
                                     path: str) -> None:
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server = f"tls://127.0.0.1:{tls_upstream.tls_port}#dns.example.test"
    async with running_gate(config(data_dir, server, tls_ca_file=str(ca_file))) as g:
        reply = await on_path(g, tls_upstream, path, lambda: query_wire("host.example.test"))
        assert [r.to_text() for r in reply.answer[0]] == ["192.0.2.10"]
        assert {t for _, _, t in tls_upstream.queries} == {"tcp"} and tls_upstream.connections == 1


@pytest.mark.parametrize("problem", ["wrong name", "unknown CA"])
async def test_dns_over_tls_certificate_is_checked(tls_upstream: StubUpstream, ca: trustme.CA, data_dir: Path,
                                                   tmp_path: Path, problem: str) -> None:
    ca_file = tmp_path / "ca.pem"
    (trustme.CA() if problem == "unknown CA" else ca).cert_pem.write_to_path(str(ca_file))
    name = "other.example.test" if problem == "wrong name" else "dns.example.test"
    cfg = config(data_dir, f"tls://127.0.0.1:{tls_upstream.tls_port}#{name}", tls_ca_file=str(ca_file))
    async with running_gate(cfg) as g:
        assert (await g.query("host.example.test")).rcode() == dns.rcode.SERVFAIL
        assert not tls_upstream.queries  # not a byte of the query went to an unverified server


async def test_unreadable_ca_file_stops_the_start(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(StartupError, match=r"^upstream\.tls_ca_file: "):
        async with running_gate(config(data_dir, "tls://127.0.0.1:853#dns.example.test",
                                       tls_ca_file=str(tmp_path / "missing.pem"))):
            pass


def test_dot_address_defaults_to_port_853() -> None:
    assert parse_upstream("tls://9.9.9.9#dns.quad9.net") == UpstreamAddress("9.9.9.9", 853, "tls", "dns.quad9.net")


async def test_random_ids_and_rotating_source_ports(gate: Gate, upstream: StubUpstream) -> None:
    total = 2 * SOCKETS_PER_FAMILY * QUERIES_PER_SOCKET
    for i in range(total):
        await gate.query(f"n{i}.example.test")
    ids = [struct.unpack_from(">H", q)[0] for q in upstream.received]
    ports = [port for _, port in upstream.sources]
    assert len(set(ids)) >= total - 10  # 16 random bits each: a handful of collisions at most
    assert len(set(ports)) > SOCKETS_PER_FAMILY  # ports are replaced as they are used
    assert max(Counter(ports).values()) <= QUERIES_PER_SOCKET  # and none serves more than its share


async def test_a_fresh_port_per_query_when_asked(upstream: StubUpstream) -> None:
    upstreams = Upstreams([parse_upstream(upstream.address)], timeout=1.0, attempt_timeout=0.5, udp_size=1232,
                          queries_per_socket=1)
    try:
        for i in range(40):
            q = parse_query(dns.message.make_query(f"n{i}.example.test", "A").to_wire())
            assert isinstance(q, Query)
            await upstreams.exchange(q)
        assert upstreams.sockets_opened >= 40  # a socket of its own for every query
        # The kernel picks each port at random and may pick a closed socket's port again (two of 40
        # picks from ~28 000 ports collide about 3 % of the time): nearly all of them differ.
        assert len({port for _, port in upstream.sources}) >= 35
        assert len(upstreams.live_sockets) <= 8  # retired sockets are closed
    finally:
        await upstreams.close()


@pytest.mark.parametrize("spoof", ["wrong_id_first", "spoof_first", "wrong_question_first"])
async def test_forged_replies_are_discarded(gate: Gate, upstream: StubUpstream, spoof: str, path: str) -> None:
    setattr(upstream, spoof, True)
    reply = await on_path(gate, upstream, path, lambda: query_wire("host.example.test"))
    assert [r.to_text() for r in reply.answer[0]] == ["192.0.2.10"]  # never BOGUS_ADDRESS


@pytest.mark.parametrize("spoof", ["wrong_id_first", "spoof_first", "wrong_question_first"])
async def test_only_forgeries_means_servfail_and_a_clean_cache(gate: Gate, upstream: StubUpstream,
                                                               spoof: str) -> None:
    setattr(upstream, spoof, True)
    upstream.forge_only = True
    reply = await gate.query("host.example.test")
    assert reply.rcode() == dns.rcode.SERVFAIL and BOGUS_ADDRESS not in reply.to_text()
    upstream.forge_only = False
    setattr(upstream, spoof, False)
    assert [r.to_text() for r in (await gate.query("host.example.test")).answer[0]] == ["192.0.2.10"]
