"""What a recorded choice covers, over real sockets: exactly the vendors and lists the person was
shown. An item added later (a block list, a catalog drop-in, through a reload) or described
differently is "no choice yet" for that client until it chooses again; a list refresh that only
changes entries is the same item; the notice versions all of it; choices written before choices
named their items are migrated to what the catalog of their notice proves."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

import dns.edns
import dns.rcode

from dnsgate.config import Config, ListsConfig, ListSource
from dnsgate.consent.notice import builtin_notice_text, parse_notice_text, sha256_text
from tests.conftest import Gate, make_config, running_gate
from tests.support.consent_fixtures import FakeClock, consent_config, parse_jsonl
from tests.support.stub_upstream import StubUpstream

TRACKER = "trackcmp.net"
LISTED, LISTED_ADDRESS = "beacon.localtrackers.test", "198.51.100.77"
DROPPED_IN, DROPPED_IN_ADDRESS = "px.newco.test", "198.51.100.78"
ME = "127.0.0.90"
DROP_IN = f'''
version = "1"
[[vendor]]
id = "newco"
name = "NewCo"
category = "marketing"
summary = "Follows you around."
[[vendor.domain]]
pattern = "{DROPPED_IN.split(".", 1)[1]}"
'''


async def rcode(g: Gate, name: str, source: str = ME) -> int:
    return (await g.query(name, source=source)).rcode()


async def blocked_because(g: Gate, name: str, source: str = ME) -> str:
    """The EDE text of a sinkholed answer."""
    reply = await g.query(name, source=source, use_edns=0)
    assert reply.rcode() == dns.rcode.NXDOMAIN
    (ede,) = [o for o in reply.options if isinstance(o, dns.edns.EDEOption)]
    return ede.text or ""


async def accept_all(g: Gate, source: str = ME) -> dict[str, Any]:
    """What the portal sends for "Accept all": every category it listed, with the notice it showed."""
    _, notice = await g.http("GET", "/v1/notice")
    _, catalog = await g.http("GET", "/v1/vendors")
    status, body = await g.http("PUT", "/v1/consent", source=source, json={
        "categories": [c["id"] for c in catalog["categories"]], "channel": "portal", "language": "en",
        "notice": {"version": notice["version"], "sha256": notice["languages"]["en"]["sha256"]}})
    assert status == 200, body
    return dict(body)


async def export(g: Gate) -> list[dict[str, Any]]:
    status, text = await g.http("GET", f"/v1/audit/export?format=jsonl&client={ME}", admin=True)
    assert status == 200
    return parse_jsonl(text)


def with_list(cfg: Config, path: Path, description: str = "Beacons of a local analytics tracker") -> Config:
    source = ListSource(id="localtrackers", name="Local trackers", category="analytics", file=str(path),
                        description=description)
    return replace(cfg, lists=ListsConfig(sources=(source,)))


async def test_accept_all_then_a_list_is_added_with_a_reload(upstream: StubUpstream, data_dir: Path,
                                                            tmp_path: Path) -> None:
    upstream.add(LISTED, f"{LISTED}. 300 IN A {LISTED_ADDRESS}")
    hosts = tmp_path / "local.hosts"
    hosts.write_text(f"0.0.0.0 {LISTED}\n", encoding="utf-8")
    base = consent_config(make_config(upstream, data_dir))
    current = {"cfg": base}
    async with running_gate(base, lambda: current["cfg"]) as g:
        # Only ActiveCampaign is listed: "Accept all" covers it, and records nothing for empty Analytics.
        chosen = await accept_all(g)
        assert chosen["choice"]["categories"] == {"marketing": True}
        assert [(c["kind"], c["id"]) for c in chosen["choice"]["covers"]] == [("vendor", "activecampaign")]
        _, before = await g.http("GET", "/v1/notice")
        assert await rcode(g, TRACKER) == dns.rcode.NOERROR

        current["cfg"] = with_list(base, hosts)
        assert (await g.http("POST", "/v1/reload", admin=True))[0] == 200
        _, after = await g.http("GET", "/v1/notice")
        assert after["version"] != before["version"]
        assert after["languages"]["en"]["sha256"] != before["languages"]["en"]["sha256"]
        assert [f'{i["kind"]}:{i["id"]}' for i in after["items"]] == [
            "vendor:activecampaign", "list:localtrackers"]
        # Nobody agreed to the list: blocked for this client, and another client, alike.
        assert await rcode(g, LISTED) == dns.rcode.NXDOMAIN
        assert await rcode(g, LISTED, "127.0.0.91") == dns.rcode.NXDOMAIN
        assert await rcode(g, TRACKER) == dns.rcode.NOERROR  # what was agreed to still holds
        _, state = await g.http("GET", "/v1/consent", source=ME)
        assert [(i["kind"], i["id"]) for i in state["new"]] == [("list", "localtrackers")]
        listed = state["lists"][0]
        assert listed["id"] == "localtrackers" and not listed["allowed"] and not listed["by_choice"]
        assert listed["since"] is None and "no choice yet for list localtrackers" in listed["reason"]
        assert await blocked_because(g, LISTED) == \
            "blocked by list 'Local trackers' (localtrackers): not covered by this client's choice: listed after it"
        assert state["choice"]["notice"]["current"] is False  # made under the notice before the list
        # The old choice's record says exactly what it covered.
        grant = next(e for e in await export(g) if e["action"] == "grant")
        assert list(grant["covers"]) == ["vendor:activecampaign"]
        # A page showing the old notice cannot grant the new list: 409, then the page shows it again.
        status, body = await g.http("PUT", "/v1/consent", source=ME, json={
            "categories": ["marketing", "analytics"], "notice": {"version": before["version"]}})
        assert status == 409 and body["error"]["code"] == "notice_changed"

        chosen = await accept_all(g)
        assert {c["id"] for c in chosen["choice"]["covers"]} == {"activecampaign", "localtrackers"}
        assert await rcode(g, LISTED) == dns.rcode.NOERROR
        _, state = await g.http("GET", "/v1/consent", source=ME)
        assert state["new"] == [] and state["lists"][0]["since"] == state["choice"]["made_at"]

        # A refresh that only changes the list's entries is the same list: no new notice, no new item.
        hosts.write_text(f"0.0.0.0 {LISTED}\n0.0.0.0 other.localtrackers.test\n", encoding="utf-8")
        assert (await g.http("POST", "/v1/reload", admin=True))[0] == 200
        _, refreshed = await g.http("GET", "/v1/notice")
        assert refreshed["version"] == after["version"] and refreshed["items"] == after["items"]
        assert await rcode(g, LISTED) == dns.rcode.NOERROR
        _, state = await g.http("GET", "/v1/consent", source=ME)
        assert state["new"] == []

        # A new description of the same list is a new item to agree to.
        current["cfg"] = with_list(base, hosts, description="Beacons, and now session recordings")
        assert (await g.http("POST", "/v1/reload", admin=True))[0] == 200
        assert await rcode(g, LISTED) == dns.rcode.NXDOMAIN
        assert await rcode(g, TRACKER) == dns.rcode.NOERROR
        _, state = await g.http("GET", "/v1/consent", source=ME)
        assert [(i["kind"], i["id"]) for i in state["new"]] == [("list", "localtrackers")]


async def test_accept_all_then_a_vendor_drop_in_with_a_reload(upstream: StubUpstream, data_dir: Path,
                                                             tmp_path: Path) -> None:
    upstream.add(DROPPED_IN, f"{DROPPED_IN}. 300 IN A {DROPPED_IN_ADDRESS}")
    dropins = tmp_path / "vendors.d"
    dropins.mkdir()
    cfg = consent_config(make_config(upstream, data_dir))
    cfg = replace(cfg, gate=replace(cfg.gate, vendors_dir=str(dropins)))
    async with running_gate(cfg, lambda: cfg) as g:
        await accept_all(g)
        _, before = await g.http("GET", "/v1/notice")
        (dropins / "newco.toml").write_text(DROP_IN, encoding="utf-8")
        assert (await g.http("POST", "/v1/reload", admin=True))[0] == 200
        _, after = await g.http("GET", "/v1/notice")
        assert after["version"] != before["version"] and after["catalog"] != before["catalog"]
        # NewCo is in the granted category, but the person never saw it: no choice yet.
        assert await rcode(g, DROPPED_IN) == dns.rcode.NXDOMAIN
        assert await rcode(g, TRACKER) == dns.rcode.NOERROR
        _, state = await g.http("GET", "/v1/consent", source=ME)
        assert [(i["kind"], i["id"]) for i in state["new"]] == [("vendor", "newco")]
        newco = next(v for v in state["vendors"] if v["id"] == "newco")
        assert not newco["allowed"] and newco["since"] is None and "no choice yet" in newco["reason"]
        # The sinkhole says why: the choice predates NewCo (not "no consent for category 'marketing'")
        assert await blocked_because(g, DROPPED_IN) == \
            "NewCo (newco) is blocked: not covered by this client's choice: listed after it"
        assert await blocked_because(g, DROPPED_IN, "127.0.0.91") == \
            "NewCo (newco) is blocked: no consent for category 'marketing'"  # no choice at all
        assert state["categories"]["marketing"]["granted"] is True  # the category grant itself stands
        grant = next(e for e in await export(g) if e["action"] == "grant")
        assert list(grant["covers"]) == ["vendor:activecampaign"]

        await accept_all(g)
        assert await rcode(g, DROPPED_IN) == dns.rcode.NOERROR


async def test_a_choice_through_the_api_says_what_it_covers(upstream: StubUpstream, data_dir: Path) -> None:
    """A device that names categories covers their items as they are now, and the answer says which;
    without a notice, the record says none was shown; an empty category is no grant at all."""
    async with running_gate(consent_config(make_config(upstream, data_dir))) as g:
        status, body = await g.http("PUT", "/v1/consent", source=ME, json={"choices": {"analytics": True}})
        assert status == 400 and body["error"]["code"] == "nothing_listed"
        status, body = await g.http("PUT", "/v1/consent", source=ME, json={"categories": ["marketing"]})
        assert status == 200 and body["choice"]["notice"] is None
        assert [c["id"] for c in body["choice"]["covers"]] == ["activecampaign"]
        (grant,) = await export(g)
        assert grant["notice_shown"] is False and grant["notice_sha256"] is None
        assert list(grant["covers"]) == ["vendor:activecampaign"] and grant["terms_sha256"]


def old_release_store(path: Path, rows: list[dict[str, Any]]) -> None:
    """A consent store as the release before this one wrote it (schema 2: no items, no terms), with
    the notice recorded as it then was: the text's version and the SHA-256 of the text alone."""
    schema = """
    CREATE TABLE [events] ([id] INTEGER PRIMARY KEY, [at] FLOAT, [client] TEXT, [action] TEXT,
       [categories] TEXT, [expires_at] FLOAT, [source] TEXT, [user_agent] TEXT, [mac] TEXT, [network] TEXT,
       [profile] TEXT, [decisions] TEXT, [notice_catalog] TEXT, [notice_version] TEXT, [notice_sha256] TEXT,
       [language] TEXT, [channel] TEXT, [sec_gpc] TEXT, [supersedes] INTEGER, [reason] TEXT);
    CREATE TABLE [choices] ([id] INTEGER PRIMARY KEY, [address] TEXT, [mac] TEXT, [network] TEXT,
       [categories] TEXT, [vendors] TEXT, [made_at] FLOAT, [expires_at] FLOAT, [notice_catalog] TEXT,
       [notice_version] TEXT, [notice_sha256] TEXT, [language] TEXT, [channel] TEXT, [profile] TEXT,
       [sec_gpc] TEXT);
    PRAGMA user_version=2;
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as db:
        db.executescript(schema)
        for r in rows:
            decisions = json.dumps({"categories": r["categories"], "vendors": {}})
            granted = json.dumps([c for c, said in r["categories"].items() if said])
            db.execute("INSERT INTO events VALUES (?, ?, ?, 'grant', ?, ?, 'self', 'Firefox', NULL, NULL, "
                       "'opt-in', ?, ?, ?, ?, 'en', 'portal', NULL, NULL, '')",
                       (r["id"], r["at"], r["address"], granted, r["at"] + 86_400 * 30, decisions, r["catalog"],
                        r["version"], r["sha256"]))
            db.execute("INSERT INTO choices VALUES (?, ?, NULL, NULL, ?, '{}', ?, ?, ?, ?, ?, 'en', 'portal', "
                       "'opt-in', NULL)", (r["id"], r["address"], json.dumps(r["categories"]), r["at"],
                                           r["at"] + 86_400 * 30, r["catalog"], r["version"], r["sha256"]))


async def test_choices_of_the_release_before_are_migrated_to_what_their_catalog_proves(
        upstream: StubUpstream, data_dir: Path, tmp_path: Path) -> None:
    clock = FakeClock()
    text = parse_notice_text(builtin_notice_text())
    hosts = tmp_path / "local.hosts"
    hosts.write_text(f"0.0.0.0 {LISTED}\n", encoding="utf-8")
    upstream.add(LISTED, f"{LISTED}. 300 IN A {LISTED_ADDRESS}")
    cfg = with_list(consent_config(make_config(upstream, data_dir)), hosts)
    shown = {"version": text.version, "sha256": sha256_text(text.texts["en"])}
    old_release_store(data_dir / "consent.sqlite3", [
        # made under the catalog still in force: it proves ActiveCampaign (lists were never in it)
        {"id": 1, "at": clock.now - 60, "address": ME, "categories": {"marketing": True, "analytics": True},
         "catalog": "2026-11-28", **shown},
        # made under another catalog version: nothing can be proven
        {"id": 2, "at": clock.now - 50, "address": "127.0.0.92", "categories": {"marketing": True},
         "catalog": "2020-01-01", **shown},
    ])
    async with running_gate(cfg, wall=clock) as g:
        assert await rcode(g, TRACKER) == dns.rcode.NOERROR
        assert await rcode(g, LISTED) == dns.rcode.NXDOMAIN
        assert await rcode(g, TRACKER, "127.0.0.92") == dns.rcode.NXDOMAIN
        _, text_ = await g.http("GET", "/v1/audit/export?format=jsonl", admin=True)
        migrations = [e for e in parse_jsonl(text_) if e["action"] == "migration"]
        assert [(e["supersedes"], list(e["covers"])) for e in migrations] == [
            (1, ["vendor:activecampaign"]), (2, [])]
        assert migrations[0]["terms_sha256"] and "2026-11-28 is still in force" in migrations[0]["reason"]
        _, state = await g.http("GET", "/v1/consent", source=ME)
        assert [(i["kind"], i["id"]) for i in state["new"]] == [("list", "localtrackers")]
        assert state["vendors"][0]["since"] == state["choice"]["made_at"]  # the original choice's time
    async with running_gate(cfg, wall=clock) as g:  # migrated once, kept: no second migration
        assert await rcode(g, TRACKER) == dns.rcode.NOERROR
        _, text_ = await g.http("GET", "/v1/audit/export?format=jsonl", admin=True)
        assert len([e for e in parse_jsonl(text_) if e["action"] == "migration"]) == 2
