"""A kiosk session that really ends: every identity the session's choices reached (the kiosk's own
address and MAC, the address it also chose through, every DNS source a choice was carried to) is
reset when the session ends, by the button or for idleness, with an event each; and nothing a kiosk
chose outlives the kiosk lifetime. Two visitors in a row, on one fake clock."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import dns.rcode
import pytest

from dnsgate.consent.export import parse_time
from tests.conftest import TOKEN, Gate, make_config, running_gate, with_store
from tests.support.consent_fixtures import (
    KIOSK,
    FakeClock,
    FakeNeighbours,
    consent_config,
    eventually,
    parse_jsonl,
    two_vendor_catalog,
)
from tests.support.stub_upstream import StubUpstream

GRANT = {"categories": ["marketing"], "channel": "portal"}
# marketing allowed but for one of its vendors: what pairing may carry to the DNS source is the refusal
MOSTLY = {"choices": {"marketing": True}, "vendors": {"pixelco": False}, "channel": "portal"}
REFUSE = {"categories": [], "channel": "portal"}
TRACKER = "trackcmp.net"
KIOSK_HTTP = KIOSK + "70"  # the kiosk's browser, over one address family (the kiosk network)
KIOSK_OTHER = "127.0.9.71"  # the kiosk's address of the other family, outside the kiosk network
KIOSK_DNS = "127.0.9.72"  # where the kiosk's DNS queries come from (a forwarder, another family)
KIOSK_MAC = "02:00:00:00:00:70"
MINUTE = 60.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def gate(upstream: StubUpstream, data_dir: Path, tmp_path: Path, clock: FakeClock,
               consent_store: str) -> AsyncIterator[Gate]:
    neighbours = FakeNeighbours({KIOSK_HTTP: KIOSK_MAC})
    cfg = consent_config(with_store(make_config(upstream, data_dir), consent_store),
                         catalog=two_vendor_catalog(tmp_path))
    async with running_gate(cfg, wall=clock, neighbours=neighbours) as g:
        yield g


async def rcode(g: Gate, source: str, name: str = TRACKER) -> int:
    return (await g.query(name, source=source)).rcode()


async def events_of(g: Gate, client: str) -> list[dict[str, Any]]:
    status, text = await g.http("GET", f"/v1/audit/export?format=jsonl&client={client}", admin=True)
    assert status == 200
    return parse_jsonl(text)


async def choose(g: Gate, clock: FakeClock, body: dict[str, Any], dns_source: str = KIOSK_DNS,
                 other: str = KIOSK_OTHER) -> dict[str, Any]:
    """What the portal page does on the kiosk: the choice through its own address, then through the
    kiosk's `other` address with the token the first answer carried, then the pairing lookup (which
    comes from `dns_source`)."""
    status, first = await g.http("PUT", "/v1/consent", source=KIOSK_HTTP, json=body)
    assert status == 200
    status, second = await g.http("PUT", "/v1/consent", source=other,
                                  json={**body, "pairing": first["pairing"]["token"]})
    assert status == 200, second
    clock.advance(1)
    assert (await g.query(first["pairing"]["name"], source=dns_source)).rcode() == dns.rcode.NOERROR

    async def linked() -> bool:
        who = (await g.http("GET", "/v1/whoami", source=KIOSK_HTTP))[1]
        return who["dns"] is not None and who["dns"]["address"] == dns_source

    await eventually(linked)
    return {"first": first, "second": second}


async def no_choice_anywhere(g: Gate, other: str = KIOSK_OTHER) -> None:
    for source in (KIOSK_HTTP, other, KIOSK_DNS):
        state = (await g.http("GET", "/v1/consent", source=source))[1]
        assert state["choice"] is None, (source, state["choice"])
        assert await rcode(g, source) == dns.rcode.NXDOMAIN, source


async def test_a_kiosk_with_a_paired_dns_source_through_two_visitors(gate: Gate, clock: FakeClock) -> None:
    # Visitor 1 accepts, all but one vendor.
    made = await choose(gate, clock, MOSTLY)
    first, second = made["first"], made["second"]
    assert first["choice"]["subject"] == {"address": KIOSK_HTTP, "mac": KIOSK_MAC, "network": None}
    assert await rcode(gate, KIOSK_HTTP) == dns.rcode.NOERROR
    assert await rcode(gate, KIOSK_OTHER) == dns.rcode.NOERROR  # its own grant, made through the page
    assert await rcode(gate, KIOSK_DNS) == dns.rcode.NXDOMAIN  # pairing never carries a grant
    # the other address is opt-in (180 days), but this choice belongs to a kiosk session: 1 day at most
    assert parse_time(second["choice"]["expires_at"]) <= parse_time(first["choice"]["expires_at"])
    carried = (await events_of(gate, KIOSK_DNS))[-1]
    assert carried["channel"] == "pairing" and carried["vendors"] == {"pixelco": False} and not carried["categories"]

    clock.advance(MINUTE)
    status, ended = await gate.http("POST", "/v1/session/end", source=KIOSK_HTTP, json={})
    assert status == 200 and ended["choice"] is None
    await no_choice_anywhere(gate)  # visitor 2 starts with no choice, on every identity of the kiosk
    for client in (KIOSK_MAC, KIOSK_OTHER, KIOSK_DNS):
        reset = (await events_of(gate, client))[-1]
        assert reset["action"] == "reset" and "session ended" in reset["reason"], reset
        if client != KIOSK_MAC:
            assert f"kiosk session of device {KIOSK_MAC} (at {KIOSK_HTTP})" in reset["reason"], reset

    # Visitor 2 refuses, then accepts after all, then walks away.
    await choose(gate, clock, REFUSE)
    assert await rcode(gate, KIOSK_OTHER) == dns.rcode.NXDOMAIN
    clock.advance(MINUTE)
    await choose(gate, clock, GRANT)
    assert await rcode(gate, KIOSK_OTHER) == dns.rcode.NOERROR
    # the kiosk is in use as long as any of its identities asks: here only its DNS source does
    for _ in range(3):
        clock.advance(10 * MINUTE)
        assert await rcode(gate, KIOSK_DNS, "host.example.test") == dns.rcode.NOERROR
    assert await rcode(gate, KIOSK_OTHER) == dns.rcode.NOERROR
    assert (await gate.http("GET", "/v1/consent", source=KIOSK_HTTP))[1]["choice"] is not None

    clock.advance(16 * MINUTE)  # nobody asks for more than the idle time: the session ends

    async def idle_reset() -> bool:
        return all([(await events_of(gate, c))[-1]["action"] == "reset" for c in (KIOSK_MAC, KIOSK_OTHER, KIOSK_DNS)])

    await eventually(idle_reset)
    for client in (KIOSK_MAC, KIOSK_OTHER, KIOSK_DNS):
        assert "kiosk session idle" in (await events_of(gate, client))[-1]["reason"]
    await no_choice_anywhere(gate)


async def test_a_kiosk_choice_never_outlives_the_kiosk_lifetime(gate: Gate, clock: FakeClock) -> None:
    await choose(gate, clock, GRANT)
    # queries keep the session in use for longer than the kiosk lifetime (consent.kiosk_days = 1)
    for _ in range(6 * 24 + 1):
        clock.advance(10 * MINUTE)
        assert await rcode(gate, KIOSK_DNS, "host.example.test") == dns.rcode.NOERROR
    assert await rcode(gate, KIOSK_OTHER) == dns.rcode.NXDOMAIN
    assert await rcode(gate, KIOSK_HTTP) == dns.rcode.NXDOMAIN


async def test_the_kiosks_other_address_is_also_its_dns_source(gate: Gate, clock: FakeClock) -> None:
    """The common case: HTTP over one family, DNS and the page's second submission over the other."""
    await choose(gate, clock, GRANT, dns_source=KIOSK_OTHER)
    assert await rcode(gate, KIOSK_OTHER) == dns.rcode.NOERROR
    clock.advance(MINUTE)
    assert (await gate.http("POST", "/v1/session/end", source=KIOSK_HTTP, json={}))[0] == 200
    assert (await gate.http("GET", "/v1/consent", source=KIOSK_OTHER))[1]["choice"] is None
    assert await rcode(gate, KIOSK_OTHER) == dns.rcode.NXDOMAIN
    assert (await events_of(gate, KIOSK_OTHER))[-1]["action"] == "reset"


KIOSK_SECOND = KIOSK + "200"  # the kiosk's other address inside the kiosk network


async def admin_cli(g: Gate, *args: str) -> tuple[int, str]:
    """`dnsgate …` as a real process against the admin API."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DNSGATE_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dnsgate", *args, "--api", f"http://{g.running.api}", "--token", TOKEN,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env)
    out, _ = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode is not None
    return process.returncode, out.decode()


@pytest.mark.parametrize("other", [KIOSK_OTHER, KIOSK_SECOND])
@pytest.mark.parametrize("how", ["cli reset", "admin session end", "admin withdrawal"])
async def test_an_admin_ending_the_session_reaches_every_linked_address(gate: Gate, clock: FakeClock, how: str,
                                                                        other: str) -> None:
    """Whichever way an admin ends a kiosk's session or its choice (`dnsgate consent reset`, its
    session end, its withdrawal), it reaches what the kiosk's own End session reaches: the address the
    page chose through with the token, the DNS source that looked the token up, each with an event."""
    await choose(gate, clock, MOSTLY, other=other)
    assert await rcode(gate, other) == dns.rcode.NOERROR
    clock.advance(MINUTE)
    if how == "cli reset":
        code, out = await admin_cli(gate, "consent", "reset", KIOSK_HTTP)
        assert code == 0, out
    elif how == "admin session end":
        status, _ = await gate.http("POST", f"/v1/clients/{KIOSK_HTTP}/session/end", admin=True, json={})
        assert status == 200
    else:
        status, _ = await gate.http("DELETE", f"/v1/clients/{KIOSK_HTTP}/consent", admin=True)
        assert status == 200
    for source in (KIOSK_HTTP, other, KIOSK_DNS):
        assert await rcode(gate, source) == dns.rcode.NXDOMAIN, source
    for client in (KIOSK_MAC, other, KIOSK_DNS):
        last = (await events_of(gate, client))[-1]
        if how == "admin withdrawal":
            assert last["action"] in ("withdrawal", "refusal") and last["categories"] == {"marketing": False}, last
        else:
            assert last["action"] == "reset", last
        assert "admin" in last["reason"] or last["channel"] == "admin", last
        if client != KIOSK_MAC:
            assert last["channel"] == "pairing" and f"device {KIOSK_MAC} (at {KIOSK_HTTP})" in last["reason"], last
    if how != "admin withdrawal":
        await no_choice_anywhere(gate, other)


SNIFFER = "127.0.9.99"  # another device, which saw the kiosk's pairing name go by on the network


async def test_a_token_links_one_other_address_and_dies_with_the_session(gate: Gate, clock: FakeClock) -> None:
    """A pairing token travels as a plain DNS name: whoever sees it must not link itself to the kiosk
    (its queries would keep visitor 1's session, and grant, alive for visitor 2), nor use it after
    the session that was given it ended."""
    status, first = await gate.http("PUT", "/v1/consent", source=KIOSK_HTTP, json=GRANT)
    assert status == 200
    token = first["pairing"]["token"]
    body = {**GRANT, "pairing": token}
    assert (await gate.http("PUT", "/v1/consent", source=KIOSK_OTHER, json=body))[0] == 200
    assert (await gate.http("PUT", "/v1/consent", source=KIOSK_OTHER, json=body))[0] == 200  # (the page again)
    status, refused = await gate.http("PUT", "/v1/consent", source=SNIFFER, json=body)
    assert status == 400 and refused["error"]["field"] == "pairing", refused
    assert "another address" in refused["error"]["message"]
    assert (await gate.http("GET", "/v1/consent", source=SNIFFER))[1]["choice"] is None  # nothing recorded
    # visitor 1 walks away; the sniffer asks away, but is nothing to the kiosk: the session ends idle
    for _ in range(2):
        clock.advance(10 * MINUTE)
        assert await rcode(gate, SNIFFER, "host.example.test") == dns.rcode.NOERROR

    async def idle_reset() -> bool:
        return bool((await events_of(gate, KIOSK_MAC))[-1]["action"] == "reset")

    await eventually(idle_reset)
    assert await rcode(gate, KIOSK_HTTP) == dns.rcode.NXDOMAIN and await rcode(gate, KIOSK_OTHER) == dns.rcode.NXDOMAIN

    # A token given before a session end counts no more after it, on HTTP and on DNS alike.
    status, first = await gate.http("PUT", "/v1/consent", source=KIOSK_HTTP, json=GRANT)
    assert status == 200
    clock.advance(MINUTE)
    assert (await gate.http("POST", "/v1/session/end", source=KIOSK_HTTP, json={}))[0] == 200
    status, refused = await gate.http("PUT", "/v1/consent", source=KIOSK_OTHER,
                                      json={**GRANT, "pairing": first["pairing"]["token"]})
    assert status == 400 and refused["error"]["field"] == "pairing", refused
    assert (await gate.query(first["pairing"]["name"], source=KIOSK_DNS)).rcode() == dns.rcode.NXDOMAIN
    # the next visitor's page pairs with the token it is given
    await choose(gate, clock, GRANT)
    assert await rcode(gate, KIOSK_OTHER) == dns.rcode.NOERROR


# -- one session, every identity: the DNS answer and the API view judge it alike -------------------

@contextlib.asynccontextmanager
async def kiosk_gate(upstream: StubUpstream, data_dir: Path, tmp_path: Path, clock: FakeClock, store: str,
                     sweep_interval: float) -> AsyncIterator[Gate]:
    neighbours = FakeNeighbours({KIOSK_HTTP: KIOSK_MAC})
    cfg = consent_config(with_store(make_config(upstream, data_dir), store), catalog=two_vendor_catalog(tmp_path),
                         sweep_interval=sweep_interval)
    async with running_gate(cfg, wall=clock, neighbours=neighbours) as g:
        yield g


async def live_everywhere(g: Gate) -> None:
    """The session is in use: the kiosk's own DNS answer and its API view say so alike."""
    assert await rcode(g, KIOSK_HTTP) == dns.rcode.NOERROR
    view = (await g.http("GET", "/v1/consent", source=KIOSK_HTTP))[1]
    assert view["choice"] is not None, view["notes"]
    assert await rcode(g, KIOSK_OTHER) == dns.rcode.NOERROR


async def test_a_session_kept_in_use_by_its_dns_source_is_live_on_every_path(
        upstream: StubUpstream, data_dir: Path, tmp_path: Path, clock: FakeClock, consent_store: str) -> None:
    """Only the kiosk's DNS source asks for longer than the idle time: the kiosk's own query, then its
    view, find the session in use, and both find it idle once nobody asked for the idle time. The
    sweeper never runs here (an hour apart), so nothing but the way each path judges the session
    decides."""
    async with kiosk_gate(upstream, data_dir, tmp_path, clock, consent_store, 3600.0) as g:
        await choose(g, clock, GRANT)
        for _ in range(3):
            clock.advance(10 * MINUTE)
            assert await rcode(g, KIOSK_DNS, "host.example.test") == dns.rcode.NOERROR
        await live_everywhere(g)
        clock.advance(10 * MINUTE)  # the kiosk's own query keeps it in use too
        await live_everywhere(g)
        clock.advance(16 * MINUTE)
        assert await rcode(g, KIOSK_HTTP) == dns.rcode.NXDOMAIN
        view = (await g.http("GET", "/v1/consent", source=KIOSK_HTTP))[1]
        assert view["choice"] is None and any("went idle" in note for note in view["notes"]), view
        assert await rcode(g, KIOSK_DNS, "host.example.test") == dns.rcode.NOERROR  # (revives nothing)
        assert await rcode(g, KIOSK_HTTP) == dns.rcode.NXDOMAIN
        assert (await g.http("GET", "/v1/consent", source=KIOSK_HTTP))[1]["choice"] is None


class HeldActivity:
    """Holds each sweep's exchange of kiosk activity with Redis until the test lets it go: what a
    busy machine does to a sweep now and then, while DNS queries go on being answered."""

    def __init__(self, share: Any) -> None:
        self.share = share
        self.holding = False
        self.waiting: asyncio.Queue[asyncio.Event] = asyncio.Queue()
        self.done = 0

    async def __call__(self, store: Any, seen: Any, forget_before: float) -> dict[str, float]:
        if self.holding:
            go = asyncio.Event()
            await self.waiting.put(go)
            await go.wait()
        try:
            return dict(await self.share(store, seen, forget_before))
        finally:
            self.done += 1

    async def next_held(self) -> asyncio.Event:
        return await asyncio.wait_for(self.waiting.get(), 5)


async def test_a_sweep_waiting_for_redis_while_the_dns_source_asks_leaves_the_session_live(
        upstream: StubUpstream, data_dir: Path, tmp_path: Path, clock: FakeClock, redis_server: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweep reads the clock, then waits for Redis's merged activity; queries from the kiosk's DNS
    source answered meanwhile are later than the sweep's clock. They keep the session in use: the
    sweep must not end it as idle (visitor 2 of the test above, on a loaded machine)."""
    from dnsgate.consent.redis_store import RedisBackend
    held = HeldActivity(RedisBackend.share_activity)

    async def share_activity(store: RedisBackend, seen: Any, forget_before: float) -> dict[str, float]:
        return await held(store, seen, forget_before)

    monkeypatch.setattr(RedisBackend, "share_activity", share_activity)
    async with kiosk_gate(upstream, data_dir, tmp_path, clock, redis_server.url, 0.05) as g:
        await choose(g, clock, GRANT)
        held.holding = True
        (await held.next_held()).set()  # a sweep from before: let it finish
        clock.advance(10 * MINUTE)
        assert await rcode(g, KIOSK_DNS, "host.example.test") == dns.rcode.NOERROR
        clock.advance(10 * MINUTE)
        go = await held.next_held()  # this sweep's clock: 20 minutes after the kiosk's own last query
        assert await rcode(g, KIOSK_DNS, "host.example.test") == dns.rcode.NOERROR
        clock.advance(10 * MINUTE)
        assert await rcode(g, KIOSK_DNS, "host.example.test") == dns.rcode.NOERROR
        held.holding = False
        before = held.done
        go.set()

        async def swept_twice() -> bool:
            return held.done >= before + 2

        await eventually(swept_twice)
        last = (await events_of(g, KIOSK_MAC))[-1]
        assert last["action"] == "grant", last
        assert (await g.http("GET", "/v1/consent", source=KIOSK_HTTP))[1]["choice"] is not None
        await live_everywhere(g)
