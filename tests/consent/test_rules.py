"""Consent rules over real sockets: scopes, lifetime, notices, withdrawal, network profiles.

dnsgate runs in-process on loopback with a fake wall clock; clients are dnspython and aiohttp
from chosen 127.0.x.y source addresses. Profiles by network (tests/support/consent_fixtures.py):
127.0.1.0/24 opt-out, 127.0.2.0/24 kiosk, 127.0.3.0/24 deny, 127.0.4.0/24 allow, else opt-in.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import dns.rcode
import pytest

from tests.conftest import Gate, make_config, running_gate, with_store
from tests.support.consent_fixtures import (
    ALLOW,
    DENY,
    KIOSK,
    OPT_OUT,
    PIXEL,
    FakeClock,
    consent_config,
    eventually,
    parse_jsonl,
    two_vendor_catalog,
)
from tests.support.stub_upstream import StubUpstream

DAY = 86_400.0
GRANT = {"categories": ["marketing"]}
TRACKER = "trackcmp.net"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def gate(upstream: StubUpstream, data_dir: Path, tmp_path: Path, clock: FakeClock,
               consent_store: str) -> AsyncIterator[Gate]:
    """dnsgate with SQLite, and again with Redis: every rule holds for both stores."""
    upstream.add(PIXEL, f"{PIXEL}. 300 IN A 198.51.100.9")
    cfg = consent_config(with_store(make_config(upstream, data_dir), consent_store),
                         catalog=two_vendor_catalog(tmp_path))
    async with running_gate(cfg, wall=clock) as g:
        yield g


async def rcode(g: Gate, source: str, name: str = TRACKER, **kw: Any) -> int:
    return (await g.query(name, source=source, **kw)).rcode()


async def log_of(g: Gate, query: str = "") -> list[dict[str, Any]]:
    status, text = await g.http("GET", f"/v1/audit/export?format=jsonl{query}", admin=True)
    assert status == 200
    return parse_jsonl(text)


def seconds(iso_text: str) -> float:
    return dt.datetime.fromisoformat(iso_text.replace("Z", "+00:00")).timestamp()


# -- scopes ------------------------------------------------------------------------------------


async def test_vendor_refusal_beats_a_category_grant(gate: Gate) -> None:
    me = "127.0.0.31"
    status, body = await gate.http("PUT", "/v1/consent", source=me,
                                   json={"choices": {"marketing": True}, "vendors": {"activecampaign": False}})
    assert status == 200
    allowed = {v["id"]: v["allowed"] for v in body["vendors"]}
    assert allowed == {"activecampaign": False, "pixelco": True}
    assert await rcode(gate, me) == dns.rcode.NXDOMAIN
    assert await rcode(gate, me, PIXEL) == dns.rcode.NOERROR


async def test_vendor_grant_opens_only_that_vendor(gate: Gate) -> None:
    me = "127.0.0.32"
    status, body = await gate.http("PUT", "/v1/consent", source=me,
                                   json={"choices": {"marketing": False}, "vendors": {"pixelco": True}})
    assert status == 200 and body["choice"]["vendors"] == {"pixelco": True}
    assert await rcode(gate, me, PIXEL) == dns.rcode.NOERROR
    assert await rcode(gate, me) == dns.rcode.NXDOMAIN
    other = "127.0.0.33"  # a vendor grant alone, the category undecided
    await gate.http("PUT", "/v1/consent", source=other, json={"vendors": {"pixelco": True}})
    assert await rcode(gate, other, PIXEL) == dns.rcode.NOERROR
    assert await rcode(gate, other) == dns.rcode.NXDOMAIN


async def test_a_refusal_is_recorded_as_a_choice(gate: Gate) -> None:
    me = "127.0.0.34"
    status, body = await gate.http("PUT", "/v1/consent", source=me, json={"choices": {"marketing": False}})
    assert status == 200 and body["choice"]["categories"] == {"marketing": False} and body["categories"] == {}
    (event,) = await log_of(gate, f"&client={me}")
    assert event["action"] == "refusal" and event["categories"] == {"marketing": False}


# -- lifetime ----------------------------------------------------------------------------------


async def test_every_choice_expires_and_the_expiry_is_recorded(gate: Gate, clock: FakeClock) -> None:
    me = "127.0.0.35"
    status, body = await gate.http("PUT", "/v1/consent", source=me, json={**GRANT, "days": 30})
    assert status == 200
    grant_id = body["choice"]["id"]
    clock.advance(29 * DAY)
    assert await rcode(gate, me) == dns.rcode.NOERROR
    clock.advance(2 * DAY)
    assert await rcode(gate, me) == dns.rcode.NXDOMAIN  # at once, whether or not the sweep has run

    async def expiry_recorded() -> bool:
        return any(e["action"] == "expiry" and e["supersedes"] == grant_id for e in await log_of(gate))

    await eventually(expiry_recorded)
    status, body = await gate.http("GET", "/v1/consent", source=me)
    assert body["choice"] is None


@pytest.mark.parametrize(("source", "days"), [("127.0.0.36", 180), (OPT_OUT + "36", 395), (KIOSK + "36", 1)])
async def test_choice_lifetime_depends_on_the_profile(gate: Gate, source: str, days: int) -> None:
    status, body = await gate.http("PUT", "/v1/consent", source=source, json=GRANT)
    assert status == 200
    choice = body["choice"]
    assert seconds(choice["expires_at"]) - seconds(choice["made_at"]) == days * DAY


async def test_no_choice_outlives_thirteen_months(gate: Gate) -> None:
    status, body = await gate.http("PUT", "/v1/consent", json={**GRANT, "days": 396})
    assert status == 400 and body["error"]["field"] == "days"


# -- the notice --------------------------------------------------------------------------------


async def test_a_new_notice_stops_earlier_grants_until_chosen_again(
        upstream: StubUpstream, data_dir: Path, tmp_path: Path, clock: FakeClock) -> None:
    upstream.add(PIXEL, f"{PIXEL}. 300 IN A 198.51.100.9")
    catalog = two_vendor_catalog(tmp_path)
    base = make_config(upstream, data_dir)
    granted, refused = "127.0.0.37", OPT_OUT + "37"
    async with running_gate(consent_config(base, catalog=catalog), wall=clock) as g:
        status, notice = await g.http("GET", "/v1/notice")
        assert status == 200 and notice["default_language"] == "en"
        old_sha = notice["languages"]["en"]["sha256"]
        assert (await g.http("PUT", "/v1/consent", source=granted,
                             json={**GRANT, "notice": {"sha256": old_sha, "version": notice["version"]}}))[0] == 200
        assert (await g.http("PUT", "/v1/consent", source=refused, json={"choices": {"marketing": False}}))[0] == 200
        assert await rcode(g, granted) == dns.rcode.NOERROR
        assert await rcode(g, refused) == dns.rcode.NXDOMAIN

    reworded = tmp_path / "notice.toml"
    reworded.write_text('version = "2"\n[text]\nen = "We changed a word."\n', encoding="utf-8")
    async with running_gate(consent_config(base, catalog=catalog, notice=str(reworded)), wall=clock) as g:
        assert await rcode(g, granted) == dns.rcode.NXDOMAIN
        assert await rcode(g, refused) == dns.rcode.NXDOMAIN  # a refusal keeps counting
        status, body = await g.http("GET", "/v1/consent", source=granted)
        assert body["choice"]["notice"]["current"] is False and body["categories"] == {}
        assert "changed since" in body["vendors"][0]["reason"]
        status, body = await g.http("PUT", "/v1/consent", source=granted, json={**GRANT, "notice": {"sha256": old_sha}})
        assert status == 409 and body["error"]["code"] == "notice_changed" and body["error"]["field"] == "notice.sha256"
        assert await rcode(g, granted) == dns.rcode.NXDOMAIN  # the refused request changed nothing
        assert (await g.http("PUT", "/v1/consent", source=granted, json=GRANT))[0] == 200
        assert await rcode(g, granted) == dns.rcode.NOERROR

    bumped = two_vendor_catalog(tmp_path, version="2099-01-01")
    bumped.write_text(bumped.read_text().replace('name = "ActiveCampaign"', 'name = "ActiveCampaign Inc."', 1))
    async with running_gate(consent_config(base, catalog=bumped, notice=str(reworded)), wall=clock) as g:
        assert await rcode(g, granted) == dns.rcode.NXDOMAIN  # the vendor's facts changed
        assert await rcode(g, granted, PIXEL) == dns.rcode.NOERROR  # PixelCo's did not


# -- withdrawal --------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["DELETE", "PUT"])
async def test_withdrawal_is_one_action_effective_on_the_next_query(gate: Gate, how: str) -> None:
    me = "127.0.0.38"
    status, body = await gate.http("PUT", "/v1/consent", source=me, json=GRANT)
    grant_id = body["choice"]["id"]
    assert await rcode(gate, me) == dns.rcode.NOERROR
    if how == "DELETE":
        status, body = await gate.http("DELETE", "/v1/consent", source=me)
    else:
        status, body = await gate.http("PUT", "/v1/consent", source=me, json={"choices": {"marketing": False}})
    assert status == 200 and body["vendors"][0]["allowed"] is False  # answered with the new state
    assert await rcode(gate, me) == dns.rcode.NXDOMAIN
    withdrawal = (await log_of(gate, f"&client={me}"))[-1]
    assert withdrawal["action"] == "withdrawal" and withdrawal["supersedes"] == grant_id


# -- profiles ----------------------------------------------------------------------------------


async def test_opt_out_network_allows_until_gpc_opts_out(gate: Gate) -> None:
    me = OPT_OUT + "10"
    assert await rcode(gate, me) == dns.rcode.NOERROR  # no choice needed on an opt-out network
    status, body = await gate.http("GET", "/v1/consent", source=me)
    assert body["profile"]["name"] == "opt-out" and "127.0.1.0/24" in body["profile"]["why"]
    assert body["vendors"][0]["allowed"] is True and body["ask_again_after"] is None

    status, body = await gate.http("GET", "/v1/consent", source=me, headers={"Sec-GPC": "1"})
    assert status == 200
    assert {v["id"]: v["allowed"] for v in body["vendors"]} == {"activecampaign": False, "pixelco": True}
    made = seconds(body["choice"]["made_at"])
    assert seconds(body["ask_again_after"]) == made + 365 * DAY  # not re-asked for 12 months
    assert await rcode(gate, me) == dns.rcode.NXDOMAIN
    assert await rcode(gate, me, PIXEL) == dns.rcode.NOERROR  # pixelco does not sell or share data

    (event,) = await log_of(gate, f"&client={me}")
    assert event["action"] == "refusal" and event["sec_gpc"] == "1" and "Sec-GPC" in event["reason"]
    assert event["vendors"] == {"activecampaign": False}
    await gate.http("GET", "/v1/consent", source=me, headers={"Sec-GPC": "1"})
    assert len(await log_of(gate, f"&client={me}")) == 1  # already opted out: nothing new


async def test_explicit_consent_despite_gpc_holds_but_gpc_overrides_an_earlier_allow(gate: Gate) -> None:
    despite, earlier = OPT_OUT + "11", OPT_OUT + "12"
    gpc = {"Sec-GPC": "1"}
    status, body = await gate.http("PUT", "/v1/consent", source=despite, json=GRANT, headers=gpc)
    assert status == 200 and body["choice"]["sec_gpc"] == "1"
    await gate.http("GET", "/v1/consent", source=despite, headers=gpc)
    assert await rcode(gate, despite) == dns.rcode.NOERROR
    assert [e["action"] for e in await log_of(gate, f"&client={despite}")] == ["grant"]

    await gate.http("PUT", "/v1/consent", source=earlier, json=GRANT)
    await gate.http("GET", "/v1/whoami", source=earlier, headers=gpc)
    assert await rcode(gate, earlier) == dns.rcode.NXDOMAIN
    assert [e["action"] for e in await log_of(gate, f"&client={earlier}")] == ["grant", "refusal"]


async def test_gpc_on_an_opt_in_network_records_nothing(gate: Gate) -> None:
    status, body = await gate.http("GET", "/v1/consent", source="127.0.0.39", headers={"Sec-GPC": "1"})
    assert status == 200 and body["choice"] is None
    assert await log_of(gate, "&client=127.0.0.39") == []


async def test_kiosk_session_end_resets_the_choice(gate: Gate) -> None:
    kiosk = KIOSK + "10"
    await gate.http("PUT", "/v1/consent", source=kiosk, json=GRANT)
    assert await rcode(gate, kiosk) == dns.rcode.NOERROR
    status, body = await gate.http("POST", "/v1/session/end", source=kiosk)
    assert status == 200 and body["choice"] is None and body["vendors"][0]["allowed"] is False
    assert await rcode(gate, kiosk) == dns.rcode.NXDOMAIN
    reset = (await log_of(gate, f"&client={kiosk}"))[-1]
    assert reset["action"] == "reset" and "session ended" in reset["reason"] and reset["profile"] == "kiosk"
    status, body = await gate.http("POST", "/v1/session/end", source="127.0.0.40")
    assert status == 409 and body["error"]["code"] == "not_kiosk"


async def test_kiosk_choice_resets_after_idle_minutes_without_dns_queries(gate: Gate, clock: FakeClock) -> None:
    kiosk = KIOSK + "11"
    _status, body = await gate.http("PUT", "/v1/consent", source=kiosk, json=GRANT)
    assert body["kiosk"]["idle_minutes"] == 15
    for _ in range(3):  # queries every 10 minutes keep the session
        clock.advance(600)
        assert await rcode(gate, kiosk, "host.example.test") == dns.rcode.NOERROR
    assert await rcode(gate, kiosk) == dns.rcode.NOERROR
    clock.advance(16 * 60)
    assert await rcode(gate, kiosk) == dns.rcode.NXDOMAIN

    async def reset_recorded() -> bool:
        return any(e["action"] == "reset" for e in await log_of(gate, f"&client={kiosk}"))

    await eventually(reset_recorded)
    reset = (await log_of(gate, f"&client={kiosk}"))[-1]
    assert "idle" in reset["reason"] and reset["channel"] == "system"
    assert (await gate.http("GET", "/v1/consent", source=kiosk))[1]["choice"] is None


@pytest.mark.parametrize(("source", "allowed"), [(DENY + "5", False), (ALLOW + "5", True)])
async def test_deny_and_allow_networks_are_fixed(gate: Gate, source: str, allowed: bool) -> None:
    expected = dns.rcode.NOERROR if allowed else dns.rcode.NXDOMAIN
    assert await rcode(gate, source) == expected
    status, body = await gate.http("PUT", "/v1/consent", source=source,
                                   json={"choices": {"marketing": not allowed}})
    assert status == 409 and body["error"]["code"] == "profile_fixed"
    status, body = await gate.http("PUT", f"/v1/clients/{source}/consent", json=GRANT, admin=True)
    assert status == 409
    assert await rcode(gate, source) == expected
    status, body = await gate.http("GET", "/v1/consent", source=source)
    assert body["profile"]["name"] == ("allow" if allowed else "deny")


async def test_a_reloaded_catalog_is_a_new_notice_and_changed_facts_ask_again(
        upstream: StubUpstream, data_dir: Path, tmp_path: Path, clock: FakeClock) -> None:
    upstream.add(PIXEL, f"{PIXEL}. 300 IN A 198.51.100.9")
    catalog = two_vendor_catalog(tmp_path)
    cfg = consent_config(make_config(upstream, data_dir), catalog=catalog)
    me = "127.0.0.71"
    async with running_gate(cfg, lambda: cfg, wall=clock) as g:
        await g.http("PUT", "/v1/consent", source=me, json=GRANT)
        assert await rcode(g, me) == dns.rcode.NOERROR
        _, before = await g.http("GET", "/v1/notice")
        catalog.write_text(catalog.read_text().replace(
            'version = "2026-11-28"', 'version = "2026-12-24"', 1), encoding="utf-8")
        status, report = await g.http("POST", "/v1/reload", admin=True)
        assert status == 200 and report["catalog"]["version"] == "2026-12-24"
        status, body = await g.http("GET", "/v1/notice")
        assert body["catalog"] == "2026-12-24" and body["version"] != before["version"]
        assert await rcode(g, me) == dns.rcode.NOERROR  # a new version, but what was shown is the same
        catalog.write_text(catalog.read_text().replace(
            "ActiveCampaign is a CRM", "ActiveCampaign is a CRM, ad network", 1), encoding="utf-8")
        assert (await g.http("POST", "/v1/reload", admin=True))[0] == 200
        assert await rcode(g, me) == dns.rcode.NXDOMAIN  # the facts shown changed: choose again
        assert await rcode(g, me, PIXEL) == dns.rcode.NOERROR  # PixelCo's did not
        assert (await g.http("PUT", "/v1/consent", source=me, json=GRANT))[0] == 200
        assert await rcode(g, me) == dns.rcode.NOERROR
        assert await rcode(g, me, PIXEL) == dns.rcode.NOERROR  # the second vendor, a new object after the reload
