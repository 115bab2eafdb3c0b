"""End to end over loopback: a real dnsgate, a stub upstream, dnspython clients from 127.0.0.x."""

from __future__ import annotations

import asyncio
import socket
import struct
from dataclasses import replace
from pathlib import Path

import dns.asyncquery
import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.rcode
import pytest

from dnsgate.config import DnsConfig, GateConfig, UpstreamConfig
from tests.conftest import Gate, make_config, running_gate
from tests.support.stub_upstream import StubUpstream

pytestmark = pytest.mark.usefixtures("udp_io")  # every test runs on both UDP paths (dns.udp_io)

GRANT = {"categories": ["marketing"]}


def ede_text(reply: dns.message.Message) -> str:
    (ede,) = [o for o in reply.options if isinstance(o, dns.edns.EDEOption)]
    assert ede.code == dns.edns.EDECode.BLOCKED
    return ede.text or ""


async def test_plain_name_is_forwarded_then_cached(gate: Gate, upstream: StubUpstream) -> None:
    for _ in range(3):
        reply = await gate.query("host.example.test")
        assert reply.rcode() == dns.rcode.NOERROR
        assert [rr.to_text() for rr in reply.answer[0]] == ["192.0.2.10"]
    assert upstream.count("host.example.test") == 1


@pytest.mark.parametrize("tcp", [False, True])
async def test_consent_cycle_for_one_client(gate: Gate, upstream: StubUpstream, tcp: bool) -> None:
    """Blocked without consent; allowed right after a PUT; blocked again right after a DELETE."""
    me = "127.0.0.2"
    blocked = await gate.query("trackcmp.net", source=me, tcp=tcp, use_edns=0)
    assert blocked.rcode() == dns.rcode.NXDOMAIN
    assert blocked.authority[0].ttl == 5 and blocked.authority[0][0].minimum == 5
    assert "ActiveCampaign" in ede_text(blocked) and "marketing" in ede_text(blocked)
    assert upstream.count("trackcmp.net") == 0  # the tracker's name never left the network

    status, body = await gate.http("PUT", "/v1/consent", source=me, json=GRANT)
    assert status == 200 and body["vendors"][0]["allowed"] is True
    allowed = await gate.query("trackcmp.net", source=me, tcp=tcp)
    assert allowed.rcode() == dns.rcode.NOERROR
    assert [rr.to_text() for rr in allowed.answer[0]] == ["198.51.100.1"]
    assert allowed.answer[0].ttl <= 10  # capped, so a withdrawal reaches client caches fast

    other = await gate.query("trackcmp.net", source="127.0.0.3", tcp=tcp)
    assert other.rcode() == dns.rcode.NXDOMAIN  # the cached answer does not leak to another client

    status, _ = await gate.http("DELETE", "/v1/consent", source=me)
    assert status == 200
    again = await gate.query("trackcmp.net", source=me, tcp=tcp)
    assert again.rcode() == dns.rcode.NXDOMAIN


@pytest.mark.parametrize("name", ["trackcmp.net", "X.TRACKCMP.NET", "prism.app-us1.com", "acct.api-us1.com"])
@pytest.mark.parametrize("rdtype", ["A", "AAAA", "HTTPS", "TXT"])
async def test_every_gated_name_and_type_is_sinkholed(gate: Gate, upstream: StubUpstream, name: str,
                                                      rdtype: str) -> None:
    reply = await gate.query(name, rdtype)
    assert reply.rcode() == dns.rcode.NXDOMAIN
    assert reply.question[0].name.to_text() == name + "."
    assert not upstream.queries


@pytest.mark.parametrize("name", ["nottrackcmp.net", "api-us1.com"])
async def test_lookalikes_and_the_rest_api_apex_are_forwarded(gate: Gate, upstream: StubUpstream, name: str) -> None:
    reply = await gate.query(name)
    assert reply.rcode() == dns.rcode.NOERROR and reply.answer
    assert upstream.count(name) == 1


async def test_a_disabled_domain_is_forwarded(upstream: StubUpstream, data_dir: Path) -> None:


    cfg = make_config(upstream, data_dir, gate=replace(GateConfig(), disabled_domains=("*.api-us1.com",)))
    async with running_gate(cfg) as g:
        assert (await g.query("acct.api-us1.com")).rcode() == dns.rcode.NOERROR
        assert (await g.query("trackcmp.net")).rcode() == dns.rcode.NXDOMAIN


async def test_admin_grant_for_a_kiosk(gate: Gate) -> None:
    kiosk = "127.0.0.9"
    status, _ = await gate.http("PUT", f"/v1/clients/{kiosk}/consent", json=GRANT, admin=True)
    assert status == 200
    assert (await gate.query("trackcmp.net", source=kiosk)).rcode() == dns.rcode.NOERROR
    status, _ = await gate.http("DELETE", f"/v1/clients/{kiosk}/consent", admin=True)
    assert status == 200
    assert (await gate.query("trackcmp.net", source=kiosk)).rcode() == dns.rcode.NXDOMAIN


async def test_servfail_when_upstream_is_dead(upstream: StubUpstream, data_dir: Path) -> None:

    upstream.silent = True
    async with running_gate(make_config(upstream, data_dir)) as g:
        loop = asyncio.get_running_loop()
        started = loop.time()
        reply = await g.query("host.example.test", timeout=5)
        elapsed = loop.time() - started
        assert reply.rcode() == dns.rcode.SERVFAIL  # never NXDOMAIN: the name may well exist
        assert 1.0 <= elapsed < 2.5  # the 1.5 s overall deadline, not more
        assert upstream.count("host.example.test") >= 2  # retried within the deadline


async def test_fail_over_to_the_next_upstream(upstream: StubUpstream, data_dir: Path) -> None:


    dead = await StubUpstream(silent=True).start()
    try:
        cfg = make_config(upstream, data_dir,
                          upstream=UpstreamConfig(servers=(dead.address, upstream.address), timeout=2.0,
                                                  attempt_timeout=0.3))
        async with running_gate(cfg) as g:
            reply = await g.query("host.example.test")
            assert reply.rcode() == dns.rcode.NOERROR
            assert dead.count("host.example.test") == 1 and upstream.count("host.example.test") == 1
    finally:
        await dead.stop()


async def test_truncated_upstream_reply_is_fetched_over_tcp(gate: Gate, upstream: StubUpstream) -> None:
    upstream.truncate_udp = True
    reply = await gate.query("host.example.test")
    assert reply.rcode() == dns.rcode.NOERROR and reply.answer
    assert [t for _, _, t in upstream.queries] == ["udp", "tcp"]


async def test_reply_with_a_wrong_id_is_ignored(gate: Gate, upstream: StubUpstream) -> None:
    upstream.wrong_id_first = True
    reply = await gate.query("host.example.test")
    assert reply.rcode() == dns.rcode.NOERROR and reply.answer


async def test_upstream_ids_are_random(gate: Gate, upstream: StubUpstream) -> None:
    ids: list[int] = []
    original = upstream.answer

    def spy(data: bytes, transport: str) -> bytes | None:
        ids.append(struct.unpack_from(">H", data)[0])
        return original(data, transport)

    upstream.answer = spy  # type: ignore[method-assign]
    for i in range(20):
        await gate.query(f"n{i}.example.test")
    assert len(set(ids)) >= 19


def _udp_exchange(port: int, packet: bytes, timeout: float = 1.0) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(packet, ("127.0.0.1", port))
        try:
            return s.recv(65535)
        except TimeoutError:
            return None


async def test_garbage_gets_formerr_and_the_server_stays_up(gate: Gate) -> None:
    loop = asyncio.get_running_loop()
    reply = await loop.run_in_executor(None, _udp_exchange, gate.dns_port, b"\x12\x34\x01\x00\x00\x01" + b"\xff" * 30)
    assert reply is not None and len(reply) == 12 and reply[:2] == b"\x12\x34" and reply[3] & 0xF == 1
    assert await loop.run_in_executor(None, _udp_exchange, gate.dns_port, b"\x01\x02\x03", 0.3) is None
    assert (await gate.query("host.example.test")).rcode() == dns.rcode.NOERROR


async def test_tcp_several_queries_on_one_connection(gate: Gate) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.dns_port)
    names = ["host.example.test", "trackcmp.net", "other.example.test"]
    for i, name in enumerate(names):
        q = dns.message.make_query(name, "A")
        q.id = 100 + i
        wire = q.to_wire()
        writer.write(struct.pack(">H", len(wire)) + wire)  # pipelined: all sent before any answer
    await writer.drain()
    replies = {}
    for _ in names:
        length = struct.unpack(">H", await reader.readexactly(2))[0]
        r = dns.message.from_wire(await reader.readexactly(length))
        replies[r.id] = r
    assert replies[100].rcode() == dns.rcode.NOERROR
    assert replies[101].rcode() == dns.rcode.NXDOMAIN
    assert replies[102].rcode() == dns.rcode.NOERROR
    writer.close()


async def test_tcp_idle_connection_is_closed(upstream: StubUpstream, data_dir: Path) -> None:


    cfg = make_config(upstream, data_dir, dns=replace(DnsConfig(listen=("127.0.0.1:0",)),
                                                                   tcp_idle_timeout=0.3))
    async with running_gate(cfg) as g:
        reader, writer = await asyncio.open_connection("127.0.0.1", g.dns_port)
        assert await asyncio.wait_for(reader.read(), timeout=2) == b""  # closed by dnsgate
        writer.close()


async def test_grant_survives_a_restart(upstream: StubUpstream, data_dir: Path) -> None:

    cfg = make_config(upstream, data_dir)
    async with running_gate(cfg) as g:
        assert (await g.http("PUT", "/v1/consent", source="127.0.0.4", json=GRANT))[0] == 200
    async with running_gate(cfg) as g:
        assert (await g.query("trackcmp.net", source="127.0.0.4")).rcode() == dns.rcode.NOERROR
        assert (await g.query("trackcmp.net", source="127.0.0.5")).rcode() == dns.rcode.NXDOMAIN


async def test_ipv6_listener(upstream: StubUpstream, data_dir: Path) -> None:


    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("::1 is not configured on this machine")
    cfg = make_config(upstream, data_dir, dns=replace(DnsConfig(), listen=("[::1]:0",)))
    async with running_gate(cfg) as g:
        q = dns.message.make_query("trackcmp.net", "A")
        r = await dns.asyncquery.udp(q, "::1", port=g.dns_port, timeout=2)
        assert r.rcode() == dns.rcode.NXDOMAIN
        r = await dns.asyncquery.tcp(dns.message.make_query("host.example.test", "A"), "::1", port=g.dns_port,
                                     timeout=2)
        assert r.rcode() == dns.rcode.NOERROR
