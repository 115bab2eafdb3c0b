"""Who the client is, over real sockets: admin consent for a network, MACs from a (fake) neighbour
table, EDNS options from a trusted forwarder, and pairing HTTP with DNS."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import dns.edns
import dns.rcode
import pytest

from dnsgate.config import ApiConfig
from tests.conftest import TOKEN, Gate, ipv6_loopback, make_config, running_gate, with_store
from tests.security.helpers import request
from tests.support.consent_fixtures import (
    FakeClock,
    FakeNeighbours,
    consent_config,
    edns_option,
    eventually,
    parse_jsonl,
)
from tests.support.stub_upstream import StubUpstream

GRANT = {"categories": ["marketing"]}
TRACKER = "trackcmp.net"
FORWARDER, STRANGER = "127.0.7.53", "127.0.7.54"
MAC_A, MAC_B, MAC_C = "02:00:00:00:00:0a", "02:00:00:00:00:0b", "02:00:00:00:00:0c"


@pytest.fixture
def neighbours() -> FakeNeighbours:
    return FakeNeighbours()


@pytest.fixture
async def gate(upstream: StubUpstream, data_dir: Path, neighbours: FakeNeighbours,
               consent_store: str) -> AsyncIterator[Gate]:
    """dnsgate with SQLite, and again with Redis: identity and pairing hold for both stores."""
    cfg = consent_config(with_store(make_config(upstream, data_dir), consent_store), trusted=(FORWARDER,))
    async with running_gate(cfg, wall=FakeClock(), neighbours=neighbours) as g:
        yield g


async def rcode(g: Gate, source: str, **kw: Any) -> int:
    return (await g.query(TRACKER, source=source, **kw)).rcode()


async def log_of(g: Gate, query: str = "", source: str = "127.0.0.1") -> list[dict[str, Any]]:
    status, text = await g.http("GET", f"/v1/audit/export?format=jsonl{query}", admin=True, source=source)
    assert status == 200
    return parse_jsonl(text)


async def test_admin_consent_for_a_network(gate: Gate) -> None:
    status, body = await gate.http("PUT", "/v1/clients/127.0.5.0/28/consent", json=GRANT, admin=True)
    assert status == 200 and body["choice"]["subject"]["network"] == "127.0.5.0/28"
    assert await rcode(gate, "127.0.5.1") == dns.rcode.NOERROR
    assert await rcode(gate, "127.0.5.14") == dns.rcode.NOERROR
    assert await rcode(gate, "127.0.5.17") == dns.rcode.NXDOMAIN
    # a person's own refusal inside the network beats the admin's grant
    await gate.http("PUT", "/v1/consent", source="127.0.5.2", json={"choices": {"marketing": False}})
    assert await rcode(gate, "127.0.5.2") == dns.rcode.NXDOMAIN
    status, body = await gate.http("GET", "/v1/clients", admin=True)
    assert {c["client"] for c in body["clients"]} == {"127.0.5.0/28", "127.0.5.2"}
    await gate.http("DELETE", "/v1/clients/127.0.5.0/28/consent", admin=True)
    assert await rcode(gate, "127.0.5.1") == dns.rcode.NXDOMAIN
    status, body = await gate.http("PUT", "/v1/clients/127.0.5.1/28/consent", json=GRANT, admin=True)
    assert status == 400 and body["error"]["field"] == "client" and "host bits" in body["error"]["message"]


async def test_a_choice_follows_the_device_by_its_mac(gate: Gate, neighbours: FakeNeighbours) -> None:
    first, second = "127.0.6.1", "127.0.6.2"
    neighbours.table = {first: MAC_A}

    async def seen(address: str, mac: str) -> bool:
        return bool((await gate.http("GET", "/v1/whoami", source=address))[1]["http"]["mac"] == mac)

    await eventually(lambda: seen(first, MAC_A))
    _, body = await gate.http("PUT", "/v1/consent", source=first, json=GRANT)
    assert body["identity"] == {"address": first, "mac": MAC_A, "mac_source": "neighbour table"}
    assert body["choice"]["subject"] == {"address": first, "mac": MAC_A, "network": None}
    assert await rcode(gate, first) == dns.rcode.NOERROR

    # DHCP gives the device another address, and its old address to another device
    neighbours.table = {second: MAC_A, first: MAC_B}
    await eventually(lambda: seen(second, MAC_A))
    assert await rcode(gate, second) == dns.rcode.NOERROR
    assert await rcode(gate, first) == dns.rcode.NXDOMAIN
    _status, body = await gate.http("GET", f"/v1/explain?name={TRACKER}&client={first}", admin=True)
    assert body["answer"] == "sinkhole" and any("now belongs to" in r for r in body["reasons"])
    (grant,) = await log_of(gate, f"&client={MAC_A}")
    assert grant["mac"] == MAC_A and grant["address"] == first


async def test_trusted_forwarder_edns_mac(gate: Gate) -> None:
    status, _ = await gate.http("PUT", f"/v1/clients/{MAC_C}/consent", json=GRANT, admin=True)
    assert status == 200
    raw = edns_option(65001, bytes.fromhex(MAC_C.replace(":", "")))
    text = edns_option(65073, MAC_C.upper().encode())
    assert await rcode(gate, FORWARDER, options=[raw]) == dns.rcode.NOERROR
    assert await rcode(gate, FORWARDER, options=[text], tcp=True) == dns.rcode.NOERROR
    assert await rcode(gate, STRANGER, options=[raw]) == dns.rcode.NXDOMAIN  # not a trusted forwarder
    assert await rcode(gate, FORWARDER) == dns.rcode.NXDOMAIN  # the forwarder itself has no consent


async def test_trusted_forwarder_client_subnet(gate: Gate) -> None:
    await gate.http("PUT", "/v1/clients/127.0.7.99/consent", json=GRANT, admin=True)
    assert await rcode(gate, FORWARDER, options=[dns.edns.ECSOption("127.0.7.99", 32)]) == dns.rcode.NOERROR
    assert await rcode(gate, FORWARDER, options=[dns.edns.ECSOption("127.0.7.98", 32)]) == dns.rcode.NXDOMAIN
    assert await rcode(gate, STRANGER, options=[dns.edns.ECSOption("127.0.7.99", 32)]) == dns.rcode.NXDOMAIN
    # a /24 names a network, not a client: the forwarder's own (absent) consent applies
    assert await rcode(gate, FORWARDER, options=[dns.edns.ECSOption("127.0.7.0", 24)]) == dns.rcode.NXDOMAIN


@pytest.mark.skipif(not ipv6_loopback(), reason="::1 is not configured on this machine")
async def test_pairing_links_the_dns_source_and_each_address_chooses_for_itself(upstream: StubUpstream,
                                                                                 data_dir: Path) -> None:
    """The browser talks HTTP over IPv6 (::1); the device's DNS queries come from 127.0.8.1. Pairing
    finds that source; the grant reaches it only when the page records the choice through it too."""
    base = make_config(upstream, data_dir, api=ApiConfig(listen="[::]:0", admin_token=TOKEN))  # both families
    device = "127.0.8.1"
    async with running_gate(consent_config(base), wall=FakeClock()) as g:
        status, body = await call(g, "PUT", "/v1/consent", source="::1", json=GRANT)
        assert status == 200 and body["client"] == "::1"
        name = body["pairing"]["name"]
        assert name.endswith(".pair.consent.dnsgate.internal")
        assert await rcode(g, device) == dns.rcode.NXDOMAIN
        status, who = await call(g, "GET", "/v1/whoami", source="::1")
        assert who["http"]["address"] == "::1" and who["dns"] is None

        paired = await g.query(name, source=device)
        assert paired.rcode() == dns.rcode.NOERROR and not paired.answer and not paired.authority

        async def bound() -> bool:
            return (await call(g, "GET", "/v1/whoami", source="::1"))[1]["dns"] is not None

        await eventually(bound)
        who = (await call(g, "GET", "/v1/whoami", source="::1"))[1]
        assert who["dns"]["address"] == device
        assert await rcode(g, device) == dns.rcode.NXDOMAIN  # a grant is never carried
        assert (await g.query(name, source=device)).rcode() == dns.rcode.NXDOMAIN  # used once
        assert (await g.query("0" * 20 + ".pair.consent.dnsgate.internal", source=device)).rcode() == \
            dns.rcode.NXDOMAIN
        assert upstream.count(name) == 0  # pairing names never leave dnsgate
        assert await events_of(g, device) == []  # a grant refuses nothing: nothing to carry

        # the page records the same choice through the device's IPv4 address, naming its token
        status, own = await call(g, "PUT", "/v1/consent", source=device,
                                   json={**GRANT, "pairing": body["pairing"]["token"]})
        assert status == 200 and own["choice"]["subject"]["address"] == device
        assert await rcode(g, device) == dns.rcode.NOERROR
        assert "made through this address by the portal of address ::1" in \
            (await events_of(g, device))[-1]["reason"]
        status, answer = await call(g, "PUT", "/v1/consent", source=device, json={**GRANT, "pairing": "a" * 20})
        assert status == 400 and answer["error"]["field"] == "pairing"

        # a withdrawal over HTTP reaches the linked address too, in the same action
        status, _ = await call(g, "DELETE", "/v1/consent", source="::1")
        assert status == 200
        assert await rcode(g, device) == dns.rcode.NXDOMAIN
    # the link outlives a restart
    async with running_gate(consent_config(base), wall=FakeClock()) as g:
        who = (await call(g, "GET", "/v1/whoami", source="::1"))[1]
        assert who["dns"]["address"] == device


async def call(g: Gate, method: str, path: str, *, source: str, json: Any = None,
               admin: bool = False) -> tuple[int, Any]:
    """A request to the dual-stack API at the loopback address of `source`'s family."""
    host = "[::1]" if ":" in source else "127.0.0.1"
    headers = {"Authorization": f"Bearer {TOKEN}"} if admin else {}
    return await request(f"http://{host}:{g.running.api.port}{path}", method, source=source, json=json,
                         headers=headers)


async def events_of(g: Gate, client: str) -> list[dict[str, Any]]:
    status, text = await call(g, "GET", f"/v1/audit/export?format=jsonl&client={client}", source="::1", admin=True)
    assert status == 200
    return parse_jsonl(text)
