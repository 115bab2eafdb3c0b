"""Proof of consent over real sockets: the event log's fields, export with filters, append-only,
retention, a restart that keeps everything, and the in-place migration of a version 1 database."""

from __future__ import annotations

import csv
import io
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import dns.rcode
import pytest

from dnsgate.config import ProfilesConfig
from tests.conftest import Gate, make_config, running_gate, with_store
from tests.support.consent_fixtures import (
    DENY,
    KIOSK,
    OPT_OUT,
    FakeClock,
    FakeNeighbours,
    consent_config,
    eventually,
    parse_jsonl,
)
from tests.support.stub_upstream import StubUpstream

GRANT = {"categories": ["marketing"]}
DAY = 86_400.0
MAC = "02:00:00:00:00:31"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def neighbours() -> FakeNeighbours:
    return FakeNeighbours({"127.0.0.41": MAC})


@pytest.fixture
async def gate(upstream: StubUpstream, data_dir: Path, clock: FakeClock, neighbours: FakeNeighbours,
               consent_store: str) -> AsyncIterator[Gate]:
    """dnsgate with SQLite, and again with Redis: the log records and exports the same for both."""
    cfg = consent_config(with_store(make_config(upstream, data_dir), consent_store))
    cfg = replace(cfg, portal=replace(cfg.portal, operator=OPERATOR["operator"], contact=OPERATOR["contact"],
                                      privacy_url=OPERATOR["privacy_url"]))
    async with running_gate(cfg, wall=clock, neighbours=neighbours) as g:
        yield g


OPERATOR = {"operator": "Example Café GmbH", "contact": "privacy@example.test",
            "privacy_url": "https://example.test/privacy"}


async def export(g: Gate, query: str = "", fmt: str = "jsonl") -> str:
    status, text = await g.http("GET", f"/v1/audit/export?format={fmt}{query}", admin=True)
    assert status == 200, text
    return str(text)


async def test_each_event_carries_what_a_proof_of_consent_needs(gate: Gate, clock: FakeClock) -> None:
    status, notice = await gate.http("GET", "/v1/notice")
    sha = notice["languages"]["en"]["sha256"]
    headers = {"User-Agent": "Firefox/140", "Sec-GPC": "0"}
    status, _body = await gate.http("PUT", "/v1/consent", source="127.0.0.41", headers=headers, json={
        "choices": {"marketing": True, "analytics": False}, "vendors": {"activecampaign": True},
        "notice": {"version": notice["version"], "sha256": sha}, "language": "en", "channel": "portal"})
    assert status == 200
    clock.advance(60)
    await gate.http("DELETE", "/v1/consent", source="127.0.0.41", headers={"User-Agent": "Firefox/140"})
    grant, withdrawal = parse_jsonl(await export(gate))
    fingerprint = next(i["fingerprint"] for i in notice["items"] if i["id"] == "activecampaign")
    assert grant == {
        "id": grant["id"], "time": "2027-01-15T08:00:00Z", "action": "grant",
        "address": "127.0.0.41", "mac": MAC, "network": None, "profile": "opt-in",
        # Analytics lists nothing here: the choice records nothing for it
        "categories": {"marketing": True}, "vendors": {"activecampaign": True},
        "expires_at": "2027-07-14T08:00:00Z", "notice_catalog": notice["catalog"],
        "notice_version": notice["version"], "notice_sha256": sha, "language": "en", "channel": "portal",
        "user_agent": "Firefox/140", "sec_gpc": "0", "gpc_seen_at": None, "supersedes": None, "reason": "",
        "notice_shown": True, "covers": {"vendor:activecampaign": fingerprint},
        "terms_sha256": notice["languages"]["en"]["terms_sha256"], "operator": "Example Café GmbH",
        "operator_contact": "privacy@example.test", "operator_privacy_url": "https://example.test/privacy",
    }
    assert notice["operator"] == {"name": "Example Café GmbH", "contact": "privacy@example.test",
                                  "privacy_url": "https://example.test/privacy"}
    assert withdrawal["action"] == "withdrawal" and withdrawal["supersedes"] == grant["id"]
    assert withdrawal["categories"] == {"marketing": False}
    assert withdrawal["vendors"] == {"activecampaign": False} and withdrawal["time"] == "2027-01-15T08:01:00Z"
    # The withdrawal named no notice (a device's DELETE): the record says so rather than claim one.
    assert withdrawal["notice_shown"] is False and withdrawal["notice_version"] is None
    assert withdrawal["covers"] == {"vendor:activecampaign": fingerprint}
    assert withdrawal["operator"] == "Example Café GmbH"


async def test_export_filters_by_time_and_client_as_jsonl_and_csv(gate: Gate, clock: FakeClock) -> None:
    await gate.http("PUT", "/v1/consent", source="127.0.0.42", json=GRANT)
    clock.advance(DAY)
    await gate.http("PUT", "/v1/consent", source="127.0.0.43", json=GRANT)
    await gate.http("PUT", "/v1/consent", source="127.0.0.41", json=GRANT)  # has a MAC
    await gate.http("PUT", "/v1/clients/127.0.9.0/24/consent", json=GRANT, admin=True)
    everything = parse_jsonl(await export(gate))
    assert len(everything) == 4 and [e["id"] for e in everything] == sorted(e["id"] for e in everything)
    assert [e["address"] for e in parse_jsonl(await export(gate, "&until=2027-01-16"))] == ["127.0.0.42"]
    assert len(parse_jsonl(await export(gate, "&since=2027-01-16T00:00:00Z"))) == 3
    assert [e["address"] for e in parse_jsonl(await export(gate, "&client=127.0.0.43"))] == ["127.0.0.43"]
    assert [e["mac"] for e in parse_jsonl(await export(gate, f"&client={MAC}"))] == [MAC]
    assert [e["network"] for e in parse_jsonl(await export(gate, "&client=127.0.9.0/24"))] == ["127.0.9.0/24"]
    wide = parse_jsonl(await export(gate, "&client=127.0.0.0/16"))  # addresses and networks inside it
    assert {e["address"] or e["network"] for e in wide} == {"127.0.0.41", "127.0.0.42", "127.0.0.43",
                                                           "127.0.9.0/24"}
    assert parse_jsonl(await export(gate, "&client=127.0.0.40/31")) == [everything[2]]
    rows = list(csv.DictReader(io.StringIO(await export(gate, fmt="csv"))))
    assert len(rows) == 4 and rows[0]["categories"] == "marketing=granted"
    assert rows[0]["covers"].startswith("vendor:activecampaign=") and rows[0]["notice_shown"] == "no"
    assert rows[0]["operator"] == "Example Café GmbH"
    assert rows[0]["time"] == everything[0]["time"] and rows[0]["expires_at"]
    for query, field in (("&format=xml", "format"), ("&since=yesterday", "since"), ("&client=nobody", "client")):
        status, body = await gate.http("GET", f"/v1/audit/export?{query}", admin=True)
        assert status == 400 and body["error"]["field"] == field
    assert (await gate.http("GET", "/v1/audit/export"))[0] == 401


async def test_the_log_is_append_only(upstream: StubUpstream, data_dir: Path) -> None:
    async with running_gate(consent_config(make_config(upstream, data_dir))) as gate:
        await gate.http("PUT", "/v1/consent", source="127.0.0.42", json=GRANT)
        await gate.http("DELETE", "/v1/consent", source="127.0.0.42")
    with sqlite3.connect(data_dir / "consent.sqlite3") as db:
        for statement in ("UPDATE events SET action = 'forged'", "DELETE FROM events",
                          "UPDATE events SET user_agent = '' WHERE id = 1"):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                db.execute(statement)
        assert db.execute("SELECT COUNT(*) FROM events").fetchone() == (2,)


async def test_retention_purges_old_events_but_never_the_proof_of_a_choice_in_force(
        upstream: StubUpstream, data_dir: Path, clock: FakeClock, consent_store: str) -> None:
    cfg = consent_config(with_store(make_config(upstream, data_dir), consent_store), retention_days=1)
    async with running_gate(cfg, wall=clock) as g:
        await g.http("PUT", "/v1/consent", source="127.0.0.44", json=GRANT)
        await g.http("DELETE", "/v1/consent", source="127.0.0.44")  # the grant is superseded
        await g.http("PUT", "/v1/consent", source="127.0.0.45", json=GRANT)
        clock.advance(2 * DAY)

        async def purged() -> bool:
            return len(parse_jsonl(await export(g))) == 2

        await eventually(purged)
        remaining = parse_jsonl(await export(g))
        assert [(e["address"], e["action"]) for e in remaining] == [("127.0.0.44", "withdrawal"),
                                                                    ("127.0.0.45", "grant")]
        assert (await g.query("trackcmp.net", source="127.0.0.45")).rcode() == dns.rcode.NOERROR


async def test_a_restart_keeps_every_choice_and_the_event_log_intact(
        upstream: StubUpstream, data_dir: Path, clock: FakeClock, neighbours: FakeNeighbours,
        consent_store: str) -> None:
    cfg = consent_config(with_store(make_config(upstream, data_dir), consent_store))
    probes = [("127.0.0.41", "trackcmp.net"), ("127.0.0.46", "trackcmp.net"), ("127.0.0.47", "trackcmp.net"),
              ("127.0.9.5", "trackcmp.net"), (OPT_OUT + "46", "trackcmp.net"), (KIOSK + "46", "trackcmp.net"),
              ("127.0.0.48", "trackcmp.net")]

    async def snapshot(g: Gate) -> tuple[Any, str, list[dns.rcode.Rcode]]:
        _status, clients = await g.http("GET", "/v1/clients", admin=True)
        answers = [(await g.query(name, source=source)).rcode() for source, name in probes]
        return clients, await export(g), answers

    async with running_gate(cfg, wall=clock, neighbours=neighbours) as g:
        await g.http("PUT", "/v1/consent", source="127.0.0.41", json={"choices": {"marketing": True},
                                                                       "vendors": {"activecampaign": True}})
        await g.http("PUT", "/v1/consent", source="127.0.0.46", json={"choices": {"marketing": False}})
        await g.http("PUT", "/v1/consent", source="127.0.0.47", json=GRANT)
        await g.http("DELETE", "/v1/consent", source="127.0.0.47")
        await g.http("PUT", "/v1/clients/127.0.9.0/24/consent", json=GRANT, admin=True)
        await g.http("PUT", "/v1/clients/02:00:00:00:00:99/consent", json=GRANT, admin=True)
        await g.http("GET", "/v1/consent", source=OPT_OUT + "46", headers={"Sec-GPC": "1"})
        await g.http("PUT", "/v1/consent", source=KIOSK + "46", json=GRANT)
        _status, body = await g.http("PUT", "/v1/consent", source="127.0.0.49", json={"categories": []})
        await g.query(body["pairing"]["name"], source="127.0.0.48")

        async def paired() -> bool:  # pairing carries 127.0.0.49's refusal (never a grant)
            choice = (await g.http("GET", "/v1/consent", source="127.0.0.48"))[1]["choice"]
            return choice is not None and choice["channel"] == "pairing"

        await eventually(paired)
        before = await snapshot(g)
    async with running_gate(cfg, wall=clock, neighbours=neighbours) as g:
        after = await snapshot(g)
    assert after == before
    clients, log, answers = after
    assert len(clients["clients"]) == 9 and len(parse_jsonl(log)) == 10
    assert answers == [0, 3, 3, 0, 3, 0, 3]


# -- migrating a version 1 database -----------------------------------------------------------------

ISSUE2_SCHEMA = """
CREATE TABLE [grants] ([client] TEXT, [category] TEXT, [granted_at] FLOAT, [expires_at] FLOAT, [source] TEXT,
   [event_id] INTEGER, PRIMARY KEY ([client], [category]));
CREATE TABLE [events] ([id] INTEGER PRIMARY KEY, [at] FLOAT, [client] TEXT, [action] TEXT, [categories] TEXT,
   [expires_at] FLOAT, [source] TEXT, [user_agent] TEXT);
CREATE INDEX events_client ON events(client, at);
CREATE TRIGGER events_no_update BEFORE UPDATE ON events
   BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
CREATE TRIGGER events_no_delete BEFORE DELETE ON events
   BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
PRAGMA user_version=1;
"""


def issue2_database(path: Path, now: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as db:
        db.executescript(ISSUE2_SCHEMA)
        rows = [(1, now - 100, "127.0.0.50", "grant", '["marketing"]', now + DAY, "self", "old-browser/1"),
                (2, now - 90, "127.0.0.50", "withdraw", '["marketing"]', None, "self", "old-browser/1"),
                (3, now - 80, "127.0.0.51", "grant", '["marketing"]', now + DAY, "admin", "curl/8")]
        db.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        db.execute("INSERT INTO grants VALUES ('127.0.0.51', 'marketing', ?, ?, 'admin', 3)", (now - 80, now + DAY))


async def test_issue2_database_is_migrated_in_place(upstream: StubUpstream, data_dir: Path,
                                                    clock: FakeClock) -> None:
    issue2_database(data_dir / "consent.sqlite3", clock.now)
    async with running_gate(consent_config(make_config(upstream, data_dir)), wall=clock) as g:
        log = parse_jsonl(await export(g))
        assert [(e["id"], e["action"], e["address"], e["channel"]) for e in log] == [
            (1, "grant", "127.0.0.50", "device"), (2, "withdrawal", "127.0.0.50", "device"),
            (3, "grant", "127.0.0.51", "admin"), (4, "migration", "127.0.0.51", "system")]
        # The choice in force names what it can be proven to cover: nothing, as it recorded no notice.
        assert log[3]["supersedes"] == 3 and log[3]["covers"] == {} and log[3]["terms_sha256"] is None
        assert log[0]["categories"] == {"marketing": True} and log[0]["user_agent"] == "old-browser/1"
        _status, view = await g.http("GET", "/v1/clients/127.0.0.51/consent", admin=True)
        choice = view["choice"]
        assert choice["id"] == 3 and choice["categories"] == {"marketing": True} and choice["notice"] is None
        # No record of the notice it was given under: it cannot prove consent, so it does not count
        # until the person (or admin) chooses again.
        assert (await g.query("trackcmp.net", source="127.0.0.51")).rcode() == dns.rcode.NXDOMAIN
        assert "does not cover it" in view["vendors"][0]["reason"]
        assert (await g.http("PUT", "/v1/clients/127.0.0.51/consent", json=GRANT, admin=True))[0] == 200
        assert (await g.query("trackcmp.net", source="127.0.0.51")).rcode() == dns.rcode.NOERROR
    with sqlite3.connect(data_dir / "consent.sqlite3") as db:
        assert db.execute("PRAGMA user_version").fetchone() == (3,)
        assert db.execute("SELECT name FROM sqlite_master WHERE name = 'grants'").fetchone() is None
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            db.execute("DELETE FROM events WHERE id = 1")
        stored = db.execute("SELECT id, supersedes FROM events WHERE id = 4").fetchone()
    assert stored == (4, 3)


async def test_a_network_that_changes_profile_is_recorded_at_start(upstream: StubUpstream, data_dir: Path,
                                                                   clock: FakeClock) -> None:
    """127.0.3.0/24 is deny in the tests' profiles; start once with everything opt-in, then with it."""
    base = make_config(upstream, data_dir)
    everything_opt_in = replace(consent_config(base), profiles=ProfilesConfig())
    async with running_gate(everything_opt_in, wall=clock) as g:
        assert (await g.http("PUT", "/v1/consent", source=DENY + "70", json=GRANT))[0] == 200
        assert (await g.query("trackcmp.net", source=DENY + "70")).rcode() == dns.rcode.NOERROR
    clock.advance(60)
    async with running_gate(consent_config(base), wall=clock) as g:
        assert (await g.query("trackcmp.net", source=DENY + "70")).rcode() == dns.rcode.NXDOMAIN
        grant, change = parse_jsonl(await export(g))
        assert change["action"] == "profile_change" and change["supersedes"] == grant["id"]
        assert change["profile"] == "deny" and "from opt-in to deny" in change["reason"]
        assert change["channel"] == "system" and change["address"] == DENY + "70"
        _status, view = await g.http("GET", f"/v1/clients/{DENY}70/consent", admin=True)
        assert view["choice"]["profile"] == "deny" and view["profile"]["name"] == "deny"
    async with running_gate(consent_config(base), wall=clock) as g:
        assert len(parse_jsonl(await export(g))) == 2  # recorded once, not at every start
