"""Upstreams over DNS over HTTPS and DNS over TLS by name: a dnsgate forwards to another dnsgate's
DoH (and DoT) endpoint on loopback, found through upstream.bootstrap (never a plain-DNS lookup),
over one reused HTTP/2 connection, with the same fail-over, deadline and metrics as other upstreams."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import dns.rcode
import pytest

from dnsgate.config import ConfigError, UpstreamAddress, UpstreamConfig, parse_config, parse_upstreams
from tests.conftest import Gate, make_config, running_gate
from tests.e2e.test_dot import metric
from tests.support.encrypted import SERVER_NAME, Certs, encrypted_config, make_certs
from tests.support.stub_upstream import StubUpstream


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return make_certs(tmp_path / "tls")


@pytest.fixture
async def resolver(upstream: StubUpstream, tmp_path: Path, certs: Certs) -> AsyncIterator[Gate]:
    """The encrypted upstream: a dnsgate with DoH and DoT in front of the stub."""
    async with running_gate(encrypted_config(upstream, tmp_path / "upstream-data", certs, tls=True,
                                             https=True)) as g:
        yield g


async def test_a_doh_upstream_by_name_over_one_connection(resolver: Gate, upstream: StubUpstream, data_dir: Path,
                                                          certs: Certs) -> None:
    port = resolver.running.https[0].port
    cfg = make_config(upstream, data_dir, upstream=UpstreamConfig(
        servers=(f"https://{SERVER_NAME}:{port}/dns-query",), bootstrap=((SERVER_NAME, ("127.0.0.1",)),),
        tls_ca_file=str(certs.ca_file), timeout=3.0, attempt_timeout=1.5))
    async with running_gate(cfg) as g:
        assert g.running.upstreams == (UpstreamAddress("127.0.0.1", port, "https", SERVER_NAME, "/dns-query"),)
        names = [f"n{i}.example.test" for i in range(20)]
        upstream.default_a = "192.0.2.99"
        replies = await asyncio.gather(*(g.query(n) for n in names))
        assert all(r.rcode() == dns.rcode.NOERROR and r.answer[0][0].to_text() == "192.0.2.99" for r in replies)
        assert (await g.query("host.example.test", "AAAA")).answer[0][0].to_text() == "2001:db8::10"
        # every query went through the DoH resolver (its log says https from the front's address) ...
        assert await metric(resolver, "dnsgate_queries_total", protocol="https", outcome="forwarded", type="A") == 20
        assert await metric(resolver, "dnsgate_queries_total", protocol="udp") == 0
        # ... on one HTTP/2 connection, kept open between queries
        _, health = await resolver.http("GET", "/healthz")
        assert health["tcp_connections"] == 1
        # the front counts them per upstream as for any other
        _, text = await g.http("GET", "/metrics")
        assert f'upstream="https://127.0.0.1:{port}/dns-query#{SERVER_NAME}"' in text
        # the gate is the front's: a gated name never leaves it
        assert (await g.query("trackcmp.net")).rcode() == dns.rcode.NXDOMAIN
        assert await metric(resolver, "dnsgate_queries_total", protocol="https", outcome="sinkholed") == 0


async def test_a_dot_upstream_by_name(resolver: Gate, upstream: StubUpstream, data_dir: Path, certs: Certs) -> None:
    port = resolver.running.tls[0].port
    cfg = make_config(upstream, data_dir, upstream=UpstreamConfig(
        servers=(f"tls://{SERVER_NAME}:{port}",), bootstrap=((SERVER_NAME, ("127.0.0.1",)),),
        tls_ca_file=str(certs.ca_file)))
    async with running_gate(cfg) as g:
        assert (await g.query("host.example.test")).answer[0][0].to_text() == "192.0.2.10"
        assert await metric(resolver, "dnsgate_queries_total", protocol="tls", outcome="forwarded", type="A") == 1


async def test_fail_over_from_a_dead_doh_upstream(resolver: Gate, upstream: StubUpstream, data_dir: Path,
                                                  certs: Certs) -> None:
    """A DoH upstream that refuses connections backs off like any other; the next server answers."""
    cfg = make_config(upstream, data_dir, upstream=UpstreamConfig(
        servers=(f"https://{SERVER_NAME}:9/dns-query", upstream.address), bootstrap=((SERVER_NAME, ("127.0.0.1",)),),
        tls_ca_file=str(certs.ca_file), timeout=2.0, attempt_timeout=0.5))
    async with running_gate(cfg) as g:
        reply = await g.query("host.example.test")
        assert reply.rcode() == dns.rcode.NOERROR
        _, health = await g.http("GET", "/healthz")
        dead, alive = health["upstreams"]
        assert not dead["healthy"] and dead["errors"] == 1 and alive["healthy"]


async def test_a_certificate_for_another_name_is_refused(resolver: Gate, upstream: StubUpstream, data_dir: Path,
                                                         certs: Certs) -> None:
    port = resolver.running.https[0].port
    cfg = make_config(upstream, data_dir, upstream=UpstreamConfig(
        servers=(f"https://other.dnsgate.test:{port}/dns-query",), bootstrap=(("other.dnsgate.test", ("127.0.0.1",)),),
        tls_ca_file=str(certs.ca_file), timeout=1.0, attempt_timeout=0.5))
    async with running_gate(cfg) as g:
        assert (await g.query("host.example.test", timeout=4)).rcode() == dns.rcode.SERVFAIL
        assert upstream.count("host.example.test") == 0


def test_names_need_bootstrap_addresses_and_a_path() -> None:
    assert parse_upstreams("https://dns.quad9.net/dns-query", bootstrap={"dns.quad9.net": ("9.9.9.9", "2620:fe::fe")}) \
        == (UpstreamAddress("9.9.9.9", 443, "https", "dns.quad9.net", "/dns-query"),
            UpstreamAddress("2620:fe::fe", 443, "https", "dns.quad9.net", "/dns-query"))
    assert parse_upstreams("https://9.9.9.9:8443/q#dns.quad9.net") == (
        UpstreamAddress("9.9.9.9", 8443, "https", "dns.quad9.net", "/q"),)
    assert parse_upstreams("tls://Dns.Quad9.Net", bootstrap={"dns.quad9.net": ("9.9.9.9",)}) == (
        UpstreamAddress("9.9.9.9", 853, "tls", "dns.quad9.net"),)
    assert parse_upstreams("https://dns.quad9.net/dns-query", bootstrap=None) == ()  # the syntax only
    with pytest.raises(ConfigError, match=r"dns\.quad9\.net has no address in upstream\.bootstrap"):
        parse_upstreams("https://dns.quad9.net/dns-query", bootstrap={})
    with pytest.raises(ConfigError, match="needs its path"):
        parse_upstreams("https://dns.quad9.net", bootstrap={"dns.quad9.net": ("9.9.9.9",)})
    with pytest.raises(ConfigError, match=r"upstream\.bootstrap: expected a host name"):
        parse_config({"upstream": {"bootstrap": {"9.9.9.9": ["9.9.9.9"]}}})
    with pytest.raises(ConfigError, match="not an IP address"):
        parse_config({"upstream": {"bootstrap": {"dns.quad9.net": ["dns.google"]}}})
    with pytest.raises(ConfigError, match=r"upstream\.servers: dns\.quad9\.net has no address"):
        parse_config({"upstream": {"servers": ["tls://dns.quad9.net"]}})
    cfg = parse_config({"upstream": {"servers": ["https://dns.quad9.net/dns-query"],
                                     "bootstrap": {"dns.quad9.net": ["9.9.9.9"]}}})
    assert cfg.upstream_servers == (UpstreamAddress("9.9.9.9", 443, "https", "dns.quad9.net", "/dns-query"),)


async def test_an_http_error_from_a_doh_upstream_moves_on(resolver: Gate, upstream: StubUpstream, data_dir: Path,
                                                          certs: Certs) -> None:
    """A 404 (a wrong path) is that server failing, not an answer: the next server is asked."""
    port = resolver.running.https[0].port
    cfg = make_config(upstream, data_dir, upstream=UpstreamConfig(
        servers=(f"https://{SERVER_NAME}:{port}/wrong-path", upstream.address),
        bootstrap=((SERVER_NAME, ("127.0.0.1",)),), tls_ca_file=str(certs.ca_file), timeout=2.0,
        attempt_timeout=1.0))
    async with running_gate(cfg) as g:
        assert (await g.query("host.example.test")).answer[0][0].to_text() == "192.0.2.10"
        assert await metric(resolver, "dnsgate_doh_errors_total", status="404") == 1
        _, health = await g.http("GET", "/healthz")
        assert health["upstreams"][0]["errors"] == 1 and health["upstreams"][1]["errors"] == 0
