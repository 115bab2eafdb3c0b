"""The portal host's address per client: fixed, configured, or this host's address facing the client
when the API listens on a wildcard (the real kernel answers over loopback)."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import replace
from pathlib import Path

import dns.rcode
import pytest

from dnsgate.config import ApiConfig, DnsConfig, PortalConfig
from dnsgate.dns.portal_address import A_TYPE, AAAA_TYPE, MEMO_LIMIT, PORTAL_TTL, PortalAddresses, facing_address
from tests.conftest import TOKEN, Gate, make_config, running_gate
from tests.support.stub_upstream import StubUpstream

PORTAL = "consent.dnsgate.internal"


def packed(*ips: str) -> tuple[bytes, ...]:
    return tuple(ipaddress.ip_address(ip).packed for ip in ips)


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_a_specific_api_address_is_the_answer_for_everyone() -> None:
    p = PortalAddresses("192.0.2.7", facing=lambda c: pytest.fail("no lookup for a fixed address"))
    assert p.is_fixed and p.records("127.0.0.1") == {A_TYPE: packed("192.0.2.7")}
    assert PortalAddresses("2001:db8::7").records("10.0.0.1") == {AAAA_TYPE: packed("2001:db8::7")}


def test_configured_addresses_win_even_for_a_wildcard_api() -> None:
    p = PortalAddresses("0.0.0.0", ("198.51.100.9", "2001:db8::9"))
    assert p.is_fixed
    assert p.records("10.1.2.3") == {A_TYPE: packed("198.51.100.9"), AAAA_TYPE: packed("2001:db8::9")}


def test_wildcard_answers_the_address_facing_the_client() -> None:
    # Loopback clients are reached from 127.0.0.1, whatever 127/8 address they use.
    assert facing_address("127.0.0.9") == "127.0.0.1"
    p = PortalAddresses("0.0.0.0")
    assert not p.is_fixed
    assert p.records("127.0.0.9") == {A_TYPE: packed("127.0.0.1")}
    assert p.records("127.0.0.9|02:00:00:00:00:01") == {A_TYPE: packed("127.0.0.1")}  # a key with a MAC
    assert p.records("::1") == {}  # an IPv4-only API has no address for an IPv6 client


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback")
def test_dual_stack_wildcard_answers_in_the_clients_family() -> None:
    p = PortalAddresses("::")
    assert p.records("::1") == {AAAA_TYPE: packed("::1")}
    assert p.records("127.0.0.3") == {A_TYPE: packed("127.0.0.1")}


def test_lookups_are_remembered_for_a_while_and_bounded() -> None:
    calls: list[str] = []
    now = [0.0]

    def facing(client: str) -> str:
        calls.append(client)
        return "192.0.2.1"

    p = PortalAddresses("0.0.0.0", facing=facing, mono=lambda: now[0])
    for _ in range(3):
        p.records("10.0.0.1")
    assert calls == ["10.0.0.1"]
    now[0] += 61
    p.records("10.0.0.1")
    assert calls == ["10.0.0.1", "10.0.0.1"]  # an interface address may change: asked again
    for i in range(MEMO_LIMIT + 10):
        p.records(f"10.1.{i // 256}.{i % 256}")
    assert len(p._memo) <= MEMO_LIMIT
    assert PortalAddresses("0.0.0.0", facing=lambda c: None).records("10.9.9.9") == {}  # no route: NODATA


# -- over the wire: dnsgate answers its portal name itself ------------------------------------------

async def answers(g: Gate, rdtype: str, source: str = "127.0.0.1", name: str = PORTAL) -> tuple[str, list[str]]:
    reply = await g.query(name, rdtype, source=source)
    return dns.rcode.to_text(reply.rcode()), [rr.to_text() for rrset in reply.answer for rr in rrset]


async def test_the_portal_name_resolves_to_the_api(gate: Gate, upstream: StubUpstream) -> None:
    assert await answers(gate, "A") == ("NOERROR", ["127.0.0.1"])
    assert await answers(gate, "AAAA") == ("NOERROR", [])  # an IPv4 API: NODATA, not a wrong address
    assert await answers(gate, "A", name="www." + PORTAL) == ("NXDOMAIN", [])  # dnsgate's own zone
    assert upstream.count(PORTAL) == 0  # never asked upstream
    reply = await gate.query(PORTAL, "A")
    assert reply.answer[0].ttl == PORTAL_TTL
    status, _ = await gate.http("POST", "/v1/reload", admin=True)  # a reload rebuilds the local names
    assert status == 200 and await answers(gate, "A") == ("NOERROR", ["127.0.0.1"])


async def test_a_wildcard_api_answers_the_address_facing_each_client(upstream: StubUpstream, data_dir: Path) -> None:
    cfg = make_config(upstream, data_dir, api=ApiConfig(listen="0.0.0.0:0", admin_token=TOKEN))
    async with running_gate(cfg) as g:
        assert await answers(g, "A", source="127.0.0.9") == ("NOERROR", ["127.0.0.1"])
        status, _ = await g.http("GET", "/v1/consent/status", source="127.0.0.9")  # and it is reachable there
        assert status == 200


async def test_configured_portal_addresses_and_host(upstream: StubUpstream, data_dir: Path) -> None:
    cfg = replace(make_config(upstream, data_dir),
                  portal=PortalConfig(host="consent.home.arpa", addresses=("192.0.2.80", "2001:db8::80")))
    async with running_gate(cfg) as g:
        assert await answers(g, "A", name="consent.home.arpa") == ("NOERROR", ["192.0.2.80"])
        assert await answers(g, "AAAA", name="CONSENT.home.arpa.") == ("NOERROR", ["2001:db8::80"])
        assert (await answers(g, "A"))[0] == "NXDOMAIN"  # the default name is not the portal any more


async def test_a_family_name_carries_that_familys_address_only(upstream: StubUpstream, data_dir: Path) -> None:
    """v4.<host> and v6.<host>, for the page's submission through the device's other address family."""
    cfg = replace(make_config(upstream, data_dir),
                  portal=PortalConfig(host="consent.home.arpa", addresses=("192.0.2.80", "2001:db8::80")))
    async with running_gate(cfg) as g:
        assert await answers(g, "A", name="v4.consent.home.arpa") == ("NOERROR", ["192.0.2.80"])
        assert await answers(g, "AAAA", name="v4.consent.home.arpa") == ("NOERROR", [])
        assert await answers(g, "AAAA", name="v6.consent.home.arpa") == ("NOERROR", ["2001:db8::80"])
        assert await answers(g, "A", name="v6.consent.home.arpa") == ("NOERROR", [])
        await answers(g, "A", name="v5.consent.home.arpa")
        assert upstream.count("v5.consent.home.arpa") == 1  # not one of them: forwarded like any name
        assert upstream.count("v4.consent.home.arpa") == 0 and upstream.count("v6.consent.home.arpa") == 0


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6")
async def test_on_a_dual_stack_api_each_family_name_answers_in_the_askers_family(upstream: StubUpstream,
                                                                                data_dir: Path) -> None:
    """HTTP over IPv4, DNS over IPv6: the DNS client asks in the family the page needs."""
    cfg = make_config(upstream, data_dir, api=ApiConfig(listen="[::]:0", admin_token=TOKEN),
                      dns=DnsConfig(listen=("[::]:0",)))
    async with running_gate(cfg) as g:
        v6 = await g.query("v6." + PORTAL, "AAAA", source="::1", server="::1")
        assert [rr.to_text() for rrset in v6.answer for rr in rrset] == ["::1"]
        v6_from_v4 = await g.query("v6." + PORTAL, "AAAA", source="127.0.0.1", server="127.0.0.1")
        assert v6_from_v4.rcode() == dns.rcode.NOERROR and not v6_from_v4.answer  # no IPv6 address known to use
        v4 = await g.query("v4." + PORTAL, "A", source="127.0.0.1", server="127.0.0.1")
        assert [rr.to_text() for rrset in v4.answer for rr in rrset] == ["127.0.0.1"]
