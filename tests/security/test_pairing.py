"""Only the person it binds can give consent: a pairing name looked up by another device, or through
a forwarder, grants nothing; pairing carries refusals and withdrawals only, never over the target's
own later choice, and the evidence says who acted for whom."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import dns.rcode
import pytest

from tests.conftest import Gate, make_config, running_gate, with_store
from tests.security.helpers import GRANT, TRACKER
from tests.support.consent_fixtures import (
    FakeClock,
    FakeNeighbours,
    consent_config,
    edns_option,
    eventually,
    parse_jsonl,
)
from tests.support.stub_upstream import StubUpstream

ATTACKER, VICTIM = "127.0.0.5", "127.0.0.6"
FORWARDER = "127.0.7.53"
MAC_B = "02:00:00:00:00:0b"


@pytest.fixture
def neighbours() -> FakeNeighbours:
    return FakeNeighbours()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def gate(upstream: StubUpstream, data_dir: Path, neighbours: FakeNeighbours, clock: FakeClock,
               consent_store: str) -> AsyncIterator[Gate]:
    cfg = consent_config(with_store(make_config(upstream, data_dir), consent_store), trusted=(FORWARDER,))
    async with running_gate(cfg, wall=clock, neighbours=neighbours) as g:
        yield g


async def rcode(g: Gate, source: str, **kw: Any) -> int:
    return (await g.query(TRACKER, source=source, **kw)).rcode()


async def log_of(g: Gate, client: str) -> list[dict[str, Any]]:
    status, text = await g.http("GET", f"/v1/audit/export?format=jsonl&client={client}", admin=True)
    assert status == 200
    return parse_jsonl(text)


async def pair(g: Gate, http: str, dns_source: str, name: str, **kw: Any) -> None:
    """`dns_source` looks up the pairing name `http` was given; returns once the link is recorded."""
    assert (await g.query(name, source=dns_source, **kw)).rcode() == dns.rcode.NOERROR

    async def linked() -> bool:
        who = (await g.http("GET", "/v1/whoami", source=http))[1]
        return who["dns"] is not None and who["dns"]["address"] == dns_source

    await eventually(linked)


async def test_pairing_by_another_device_grants_nothing(gate: Gate) -> None:
    """The review's reproduction: one lookup of the attacker's pairing name by the victim's device."""
    _, body = await gate.http("PUT", "/v1/consent", source=ATTACKER, json=GRANT)
    assert await rcode(gate, VICTIM) == dns.rcode.NXDOMAIN
    await pair(gate, ATTACKER, VICTIM, body["pairing"]["name"])
    assert await rcode(gate, VICTIM) == dns.rcode.NXDOMAIN
    assert await rcode(gate, ATTACKER) == dns.rcode.NOERROR  # the attacker's own grant holds for itself
    state = (await gate.http("GET", "/v1/consent", source=VICTIM))[1]
    assert not state["categories"] and not any(v["allowed"] for v in state["vendors"])
    for event in await log_of(gate, VICTIM):
        assert event["action"] != "grant"
        # what pairing carried is the other device's doing, and the evidence says so
        assert event["channel"] == "pairing" and ATTACKER in event["reason"], event


async def test_pairing_never_overwrites_a_refusal(gate: Gate) -> None:
    _, own = await gate.http("PUT", "/v1/consent", source=VICTIM, json={"categories": []})
    _, body = await gate.http("PUT", "/v1/consent", source=ATTACKER, json=GRANT)
    await pair(gate, ATTACKER, VICTIM, body["pairing"]["name"])
    assert await rcode(gate, VICTIM) == dns.rcode.NXDOMAIN
    state = (await gate.http("GET", "/v1/consent", source=VICTIM))[1]
    assert state["choice"]["id"] == own["choice"]["id"]  # the victim's own refusal, untouched
    assert [e["action"] for e in await log_of(gate, VICTIM)] == ["refusal"]


async def test_a_paired_withdrawal_never_overrides_the_targets_own_later_choice(gate: Gate, clock: FakeClock) -> None:
    _, body = await gate.http("PUT", "/v1/consent", source=ATTACKER, json=GRANT)
    await pair(gate, ATTACKER, VICTIM, body["pairing"]["name"])
    clock.advance(1)
    assert (await gate.http("PUT", "/v1/consent", source=VICTIM, json=GRANT))[0] == 200  # the victim's own
    assert await rcode(gate, VICTIM) == dns.rcode.NOERROR
    assert (await gate.http("DELETE", "/v1/consent", source=ATTACKER))[0] == 200
    assert await rcode(gate, ATTACKER) == dns.rcode.NXDOMAIN
    assert await rcode(gate, VICTIM) == dns.rcode.NOERROR
    assert (await log_of(gate, VICTIM))[-1]["action"] == "grant"


async def test_a_paired_withdrawal_never_reaches_the_targets_own_earlier_choice(gate: Gate,
                                                                                 clock: FakeClock) -> None:
    assert (await gate.http("PUT", "/v1/consent", source=VICTIM, json=GRANT))[0] == 200
    clock.advance(1)
    _, body = await gate.http("PUT", "/v1/consent", source=ATTACKER, json=GRANT)
    await pair(gate, ATTACKER, VICTIM, body["pairing"]["name"])
    assert (await gate.http("DELETE", "/v1/consent", source=ATTACKER))[0] == 200
    assert await rcode(gate, VICTIM) == dns.rcode.NOERROR
    assert [e["action"] for e in await log_of(gate, VICTIM)] == ["grant"]


async def test_pairing_carries_refusals_and_says_who_acted(gate: Gate, clock: FakeClock) -> None:
    """What pairing may carry: the HTTP client's refusals (it can only narrow), recorded as the HTTP
    client's doing for the DNS source, on channel `pairing`."""
    device = "127.0.0.7"
    # marketing granted, one of its vendors refused: the refusal is carried, the grant is not
    _, body = await gate.http("PUT", "/v1/consent", source=ATTACKER,
                              json={"choices": {"marketing": True}, "vendors": {"activecampaign": False}})
    await pair(gate, ATTACKER, device, body["pairing"]["name"])

    async def carried() -> bool:
        return bool(await log_of(gate, device))

    await eventually(carried)
    (event,) = await log_of(gate, device)
    assert event["action"] == "refusal" and event["channel"] == "pairing"
    assert event["categories"] == {} and event["vendors"] == {"activecampaign": False}
    assert event["address"] == device
    assert f"address {ATTACKER}" in event["reason"] and f"#{body['choice']['id']}" in event["reason"]
    assert await rcode(gate, device) == dns.rcode.NXDOMAIN
    # a later withdrawal by the HTTP client reaches the paired source, on the same terms
    assert (await gate.http("DELETE", "/v1/consent", source=ATTACKER))[0] == 200
    last = (await log_of(gate, device))[-1]
    assert last["action"] == "refusal" and last["channel"] == "pairing" and ATTACKER in last["reason"]
    assert last["categories"] == {"marketing": False} and last["vendors"] == {"activecampaign": False}
    # an admin's refusal for that client is carried too, and the evidence says who acted
    other = "127.0.0.8"
    _, body = await gate.http("PUT", "/v1/consent", source=ATTACKER, json=GRANT)
    clock.advance(1)  # (the page shows the latest link)
    await pair(gate, ATTACKER, other, body["pairing"]["name"])
    assert await log_of(gate, other) == []  # a grant: nothing to carry
    assert (await gate.http("PUT", f"/v1/clients/{ATTACKER}/consent", admin=True,
                            json={"choices": {"marketing": True}, "vendors": {"activecampaign": False}}))[0] == 200
    (carried_too,) = await log_of(gate, other)
    assert carried_too["channel"] == "pairing" and carried_too["vendors"] == {"activecampaign": False}
    assert f"refusals recorded by an admin for address {ATTACKER} carried by pairing" in carried_too["reason"]


async def test_a_forwarders_address_never_receives_a_grant(gate: Gate) -> None:
    """Through a forwarder that adds no ECS/MAC, the pairing name reaches dnsgate from the forwarder's
    address, which speaks for every device behind it."""
    _, body = await gate.http("PUT", "/v1/consent", source="127.0.7.10", json=GRANT)
    assert (await gate.query(body["pairing"]["name"], source=FORWARDER)).rcode() == dns.rcode.NOERROR
    await eventually(lambda: _whoami_dns(gate, "127.0.7.10"))
    assert await rcode(gate, FORWARDER) == dns.rcode.NXDOMAIN
    # nor by its own HTTP requests (a device behind a NAT that is also the DNS forwarder)
    status, answer = await gate.http("PUT", "/v1/consent", source=FORWARDER, json=GRANT)
    assert status == 409 and answer["error"]["code"] == "forwarder_address"
    assert await rcode(gate, FORWARDER) == dns.rcode.NXDOMAIN
    # a refusal narrows, so it is taken
    assert (await gate.http("PUT", "/v1/consent", source=FORWARDER, json={"categories": []}))[0] == 200


async def _whoami_dns(g: Gate, http: str) -> bool:
    return (await g.http("GET", "/v1/whoami", source=http))[1]["dns"] is not None


async def test_a_device_behind_a_forwarder_is_reached_by_its_own_mac_only(gate: Gate,
                                                                        neighbours: FakeNeighbours) -> None:
    """A grant applies to a DNS identity proven by MAC from a trusted forwarder when that device made
    it (its HTTP requests carry the same MAC); a pairing name it looks up for another does not."""
    mac = [edns_option(65001, bytes.fromhex(MAC_B.replace(":", "")))]
    _, body = await gate.http("PUT", "/v1/consent", source="127.0.7.10", json=GRANT)
    assert (await gate.query(body["pairing"]["name"], source=FORWARDER, options=mac)).rcode() == dns.rcode.NOERROR
    await eventually(lambda: _whoami_dns(gate, "127.0.7.10"))
    assert await rcode(gate, FORWARDER, options=mac) == dns.rcode.NXDOMAIN

    neighbours.table = {"127.0.7.11": MAC_B}

    async def known() -> bool:
        return bool((await gate.http("GET", "/v1/whoami", source="127.0.7.11"))[1]["http"]["mac"] == MAC_B)

    await eventually(known)
    assert (await gate.http("PUT", "/v1/consent", source="127.0.7.11", json=GRANT))[0] == 200
    assert await rcode(gate, FORWARDER, options=mac) == dns.rcode.NOERROR
    assert await rcode(gate, FORWARDER) == dns.rcode.NXDOMAIN  # other devices behind the forwarder: not
