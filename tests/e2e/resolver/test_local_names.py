"""Names dnsgate answers itself, over loopback: each answered without asking the upstream (twice:
nothing is cached that could change that), each switchable off, and the table open to one-line
registrations."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from dnsgate.config import LocalConfig, UpstreamConfig
from dnsgate.dns.local_answers import LocalTable, addresses, default_table, local_reply, nxdomain
from dnsgate.wire import Query, name_to_wire, parse_query
from tests.conftest import Gate, make_config, running_gate
from tests.support.stub_upstream import StubUpstream

pytestmark = pytest.mark.usefixtures("udp_io")  # every test runs on both UDP paths (dns.udp_io)

NX, NOERROR = dns.rcode.NXDOMAIN, dns.rcode.NOERROR


@pytest.mark.parametrize(("name", "rdtype", "rcode", "answer"), [
    ("use-application-dns.net", "A", NX, None),
    ("use-application-dns.net", "AAAA", NX, None),
    ("mask.icloud.com", "A", NX, None),
    ("mask-h2.icloud.com", "HTTPS", NX, None),
    ("_dns.resolver.arpa", "SVCB", NOERROR, None),
    ("localhost", "A", NOERROR, "127.0.0.1"),
    ("LocalHost", "AAAA", NOERROR, "::1"),
    ("db.localhost", "A", NOERROR, "127.0.0.1"),
    ("localhost", "MX", NOERROR, None),
    ("something.invalid", "A", NX, None),
    ("duckduckgogg42xjoc72x3sjasowoarfbgcmvfimaftt6twagswzczad.onion", "A", NX, None),
    ("10.in-addr.arpa", "SOA", NOERROR, "10.in-addr.arpa. nobody.invalid. 1 3600 1200 604800 10800"),
    ("1.0.0.10.in-addr.arpa", "PTR", NX, None),
    ("5.1.168.192.in-addr.arpa", "PTR", NX, None),
    ("9.9.20.172.in-addr.arpa", "PTR", NX, None),
    ("1.1.64.100.in-addr.arpa", "PTR", NX, None),
    ("1.0.0.127.in-addr.arpa", "PTR", NOERROR, "localhost."),
    ("1." + "0." * 31 + "ip6.arpa", "PTR", NOERROR, "localhost."),
    ("a.b.c.d.d.f.ip6.arpa", "PTR", NX, None),
    ("1.0.8.e.f.ip6.arpa", "PTR", NX, None),
    ("healthcheck.dnsgate.internal", "A", NOERROR, "127.0.0.1"),
    ("healthcheck.dnsgate.internal", "TXT", NOERROR, '"ok"'),
    ("anything.dnsgate.internal", "A", NX, None),
])
@pytest.mark.parametrize("edns", [False, True], ids=["no-edns", "edns"])
async def test_answered_locally(gate: Gate, upstream: StubUpstream, name: str, rdtype: str, rcode: int,
                                answer: str | None, edns: bool) -> None:
    # the special-use zones every resolver serves itself answer with AA (RFC 6303 §3); policy answers
    # (canaries, DDR, dnsgate's own names) do not claim to be the authority
    authoritative = not name.endswith(("use-application-dns.net", ".icloud.com", "resolver.arpa", "dnsgate.internal"))
    for tcp in (False, True, False):
        reply = await gate.query(name, rdtype, tcp=tcp, use_edns=0 if edns else False)
        assert reply.rcode() == rcode
        assert reply.question[0].name.to_text() == name + "."
        assert reply.flags & dns.flags.RA and reply.edns == (0 if edns else -1)
        assert bool(reply.flags & dns.flags.AA) is authoritative
        if answer is None:
            assert not reply.answer
            (soa,) = reply.authority  # negative answers carry an SOA (RFC 2308)
            assert soa.rdtype == dns.rdatatype.SOA and name.lower().endswith(soa.name.to_text().lower().rstrip("."))
        else:
            assert [r.to_text() for r in reply.answer[0]] == [answer]
    assert not upstream.queries  # none of these ever leaves dnsgate


async def test_health_probe_needs_no_upstream(upstream: StubUpstream, data_dir: Path) -> None:
    upstream.silent = True
    async with running_gate(make_config(upstream, data_dir)) as g:
        assert (await g.query("healthcheck.dnsgate.internal", timeout=1)).answer
        assert not upstream.queries


ALL_OFF = LocalConfig(firefox_canary=False, icloud_private_relay=False, ddr=False, special_use=False,
                      private_reverse=False, healthcheck="")


@pytest.mark.parametrize(("switch", "name", "rdtype"), [
    ("firefox_canary", "use-application-dns.net", "A"),
    ("icloud_private_relay", "mask.icloud.com", "A"),
    ("ddr", "_dns.resolver.arpa", "SVCB"),
    ("special_use", "localhost", "A"),
    ("private_reverse", "1.0.0.10.in-addr.arpa", "PTR"),
    ("healthcheck", "healthcheck.dnsgate.internal", "A"),
])
async def test_each_can_be_switched_off(upstream: StubUpstream, data_dir: Path, switch: str, name: str,
                                        rdtype: str) -> None:
    rdata = {"A": "A 192.0.2.99", "SVCB": "TYPE64 \\# 3 000100", "PTR": "PTR ten.example.test."}[rdtype]
    upstream.add(name, f"{name}. 60 IN {rdata}")
    value_on: bool | str = "healthcheck.dnsgate.internal" if switch == "healthcheck" else True
    on = replace(ALL_OFF, **{switch: value_on})  # type: ignore[arg-type]
    async with running_gate(make_config(upstream, data_dir, local=on)) as g:
        assert not (await g.query(name, rdtype)).answer or switch in ("special_use", "healthcheck")
        assert not upstream.queries
    value_off: bool | str = "" if switch == "healthcheck" else False
    off = replace(LocalConfig(), **{switch: value_off})  # type: ignore[arg-type]
    async with running_gate(make_config(upstream, data_dir, local=off)) as g:
        reply = await g.query(name, rdtype)
        if switch == "healthcheck":  # no probe answer; dnsgate's own zone still never leaves
            assert reply.rcode() == NX and not upstream.queries
            return
        assert reply.rcode() == NOERROR and reply.answer  # now the upstream's answer
        assert upstream.count(name) == 1


async def test_conditional_forwarding_takes_a_private_zone_back(upstream: StubUpstream, data_dir: Path) -> None:
    upstream.add("7.1.168.192.in-addr.arpa", "7.1.168.192.in-addr.arpa. 300 IN PTR printer.corp.example.")
    cfg = make_config(upstream, data_dir, upstream=UpstreamConfig(
        servers=(upstream.address,), domains=(("168.192.in-addr.arpa", (upstream.address,)),), timeout=1.5,
        attempt_timeout=0.5))
    async with running_gate(cfg) as g:
        assert (await g.query("7.1.168.192.in-addr.arpa", "PTR")).answer
        assert (await g.query("7.1.0.10.in-addr.arpa", "PTR")).rcode() == NX  # 10/8 still local
        assert upstream.count("7.1.168.192.in-addr.arpa") == 1 and upstream.count("7.1.0.10.in-addr.arpa") == 0


def _q(name: str, rdtype: str = "A") -> Query:
    q = parse_query(dns.message.make_query(name, rdtype).to_wire())
    assert isinstance(q, Query)
    return q


def test_registering_a_name_is_one_line() -> None:
    table = default_table(LocalConfig())
    assert table.match(name_to_wire("consent.dnsgate.internal")) is not None  # NXDOMAIN so far
    table.add(addresses("consent.dnsgate.internal", "192.0.2.1", "2001:db8::1"))  # as the primary adds the portal's
    for rdtype, text in (("A", "192.0.2.1"), ("AAAA", "2001:db8::1")):
        q = _q("Consent.dnsgate.internal", rdtype)
        zone = table.match(q.name)
        assert zone is not None
        reply = dns.message.from_wire(local_reply(zone, q, 1232))
        assert [r.to_text() for r in reply.answer[0]] == [text]
    below = table.match(name_to_wire("x.consent.dnsgate.internal"))
    assert below is not None and below.apex == name_to_wire("dnsgate.internal")  # the zone's NXDOMAIN


def test_most_specific_wins_and_exemptions_forward() -> None:
    table = LocalTable([nxdomain("example.test", "test")])
    table.add(addresses("www.example.test", "192.0.2.7", below="nxdomain"))
    table.exempt("corp.example.test")
    assert table.match(name_to_wire("a.b.example.test")).apex == name_to_wire("example.test")  # type: ignore[union-attr]
    assert table.match(name_to_wire("x.www.example.test")).apex == name_to_wire("www.example.test")  # type: ignore[union-attr]
    assert table.match(name_to_wire("host.corp.example.test")) is None
    assert table.match(name_to_wire("example.com")) is None
