"""Discovery of Designated Resolvers (RFC 9462): with DNS over TLS and HTTPS on, `_dns.resolver.arpa`
names them in SVCB records a client can follow, verified as RFC 9462 §4.2 has it (the certificate
covers the address the client asked); NODATA when they are off."""

from __future__ import annotations

import ssl
from pathlib import Path

import dns.asyncquery
import dns.message
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.svcbbase
import pytest

from dnsgate.config import HostPort
from dnsgate.dns.ddr import SVCB, ddr_zones
from tests.conftest import Gate, running_gate
from tests.support.encrypted import SERVER_NAME, Certs, encrypted_config, make_certs
from tests.support.stub_upstream import StubUpstream


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return make_certs(tmp_path / "tls")


async def svcb(gate: Gate, name: str = "_dns.resolver.arpa") -> dns.message.Message:
    q = dns.message.make_query(name, "SVCB")
    return await dns.asyncquery.udp(q, "127.0.0.1", port=gate.dns_port, timeout=3)


def params(rd: dns.rdtypes.svcbbase.SVCBBase) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in rd.params.items():
        out[dns.rdtypes.svcbbase.ParamKey.to_text(key).lower()] = value
    return out


async def test_the_encrypted_listeners_are_designated(upstream: StubUpstream, data_dir: Path, certs: Certs) -> None:
    async with running_gate(encrypted_config(upstream, data_dir, certs, tls=True, https=True)) as g:
        for name in ("_dns.resolver.arpa", f"_dns.{SERVER_NAME}"):
            reply = await svcb(g, name)
            assert reply.rcode() == dns.rcode.NOERROR
            (rrset,) = reply.answer
            records = sorted(rrset, key=lambda rd: rd.priority)
            assert [rd.target.to_text() for rd in records] == [SERVER_NAME + "."] * 2  # the certificate's name
            dot, doh = (params(rd) for rd in records)
            assert list(dot["alpn"].ids) == [b"dot"] and doh["alpn"].ids == (b"h2",)  # type: ignore[attr-defined]
            assert dot["port"].port == g.running.tls[0].port  # type: ignore[attr-defined]
            assert doh["port"].port == g.running.https[0].port  # type: ignore[attr-defined]
            assert doh["dohpath"].value == b"/dns-query{?dns}"  # type: ignore[attr-defined]
            assert [str(a) for a in dot["ipv4hint"].addresses] == ["127.0.0.1"]  # type: ignore[attr-defined]
            assert "dohpath" not in dot
        upstream_asked = upstream.count("_dns.resolver.arpa")
        assert upstream_asked == 0

        # a client follows the designation: verified discovery wants the plain resolver's address
        # (127.0.0.1) in the certificate of the endpoint named
        reply = await svcb(g)
        dot_rd = min(reply.answer[0], key=lambda rd: rd.priority)
        context = ssl.create_default_context(cafile=str(certs.ca_file))
        q = dns.message.make_query("host.example.test", "A")
        answer = await dns.asyncquery.tls(q, "127.0.0.1", port=params(dot_rd)["port"].port,  # type: ignore[attr-defined]
                                          ssl_context=context, server_hostname="127.0.0.1", timeout=3)
        assert answer.rcode() == dns.rcode.NOERROR


async def test_nodata_without_encrypted_listeners(gate: Gate, upstream: StubUpstream) -> None:
    reply = await svcb(gate)
    assert reply.rcode() == dns.rcode.NOERROR and not reply.answer and reply.authority
    assert upstream.count("_dns.resolver.arpa") == 0


def test_a_wildcard_listener_hints_the_address_facing_the_client() -> None:
    (zone,) = ddr_zones([HostPort("0.0.0.0", 853)], [], "")
    assert zone.per_client is not None
    records = zone.per_client("127.0.0.1")[SVCB]
    rd = dns.rdata.from_wire(dns.rdataclass.IN, dns.rdatatype.SVCB, records[0], 0, len(records[0]))
    assert isinstance(rd, dns.rdtypes.svcbbase.SVCBBase)
    assert [str(a) for a in params(rd)["ipv4hint"].addresses] == ["127.0.0.1"]  # type: ignore[attr-defined]
    assert rd.target.to_text() == "."  # no name known: the owner's (RFC 9460 §2.5)
