"""What a person's choice means for each kind of network, over real sockets: why a name is blocked
(the EDE text), how long a choice lasts per profile, Global Privacy Control on every request, and
exports that no spreadsheet can be made to run.

dnsgate runs in-process on loopback with a fake wall clock; profiles by network as in
tests/support/consent_fixtures.py (127.0.1.0/24 opt-out, 127.0.2.0/24 kiosk, 127.0.3.0/24 deny,
127.0.4.0/24 allow, else opt-in).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import dataclasses
import datetime as dt
import io
import json
import math
import os
import re
import sqlite3
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import dns.edns
import dns.message
import dns.rcode
import pytest
import redis.asyncio as aioredis

from dnsgate.config import Config, ProfilesConfig
from dnsgate.consent.export import csv_header, csv_line, jsonl_line
from dnsgate.consent.model import Subject
from dnsgate.consent.records import Event
from tests.conftest import TOKEN, Gate, make_config, running_gate, with_store
from tests.support.consent_fixtures import (
    DENY,
    KIOSK,
    OPT_OUT,
    PIXEL,
    PROFILE_NETWORKS,
    FakeClock,
    consent_config,
    eventually,
    two_vendor_catalog,
)
from tests.support.stub_upstream import StubUpstream

DAY = 86_400.0
TRACKER = "trackcmp.net"
GPC = {"Sec-GPC": "1"}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def catalog(tmp_path: Path) -> Path:
    return two_vendor_catalog(tmp_path)


@pytest.fixture
async def gate(upstream: StubUpstream, data_dir: Path, catalog: Path, clock: FakeClock) -> AsyncIterator[Gate]:
    upstream.add(PIXEL, f"{PIXEL}. 300 IN A 198.51.100.9")
    cfg = consent_config(make_config(upstream, data_dir), catalog=catalog)
    async with running_gate(cfg, lambda: cfg, wall=clock) as g:
        yield g


async def blocked_because(g: Gate, source: str, name: str = TRACKER) -> str:
    """The EDE text of a sinkholed answer, the same on the first query and the memoized path after it."""
    texts = set()
    for _ in range(2):
        reply = await g.query(name, source=source, use_edns=0)
        assert reply.rcode() == dns.rcode.NXDOMAIN
        (ede,) = [o for o in reply.options if isinstance(o, dns.edns.EDEOption)]
        assert ede.code == dns.edns.EDECode.BLOCKED
        texts.add(ede.text or "")
    (text,) = texts
    return text


def new_catalog_version(path: Path) -> None:
    """A new catalog version that describes ActiveCampaign differently: its grants stop counting."""
    text = path.read_text().replace('version = "', 'version = "9', 1)
    path.write_text(text.replace("ActiveCampaign is a CRM", "ActiveCampaign is an ad network and a CRM", 1),
                    encoding="utf-8")


# -- why a name is blocked ---------------------------------------------------------------------


async def test_the_ede_says_no_consent_only_where_consenting_would_help(gate: Gate, catalog: Path) -> None:
    undecided, refused, gpc, deny, stale = "127.0.0.80", "127.0.0.81", OPT_OUT + "80", DENY + "80", "127.0.0.82"
    assert await blocked_because(gate, undecided) == \
        "ActiveCampaign (activecampaign) is blocked: no consent for category 'marketing'"

    # granted and resolved first, so the refusal meets a cached answer
    assert (await gate.http("PUT", "/v1/consent", source=refused, json={"categories": ["marketing"]}))[0] == 200
    assert (await gate.query(TRACKER, source=refused, use_edns=0)).rcode() == dns.rcode.NOERROR
    assert (await gate.http("PUT", "/v1/consent", source=refused, json={"categories": []}))[0] == 200
    text = await blocked_because(gate, refused)
    assert text == ("ActiveCampaign (activecampaign) is blocked: refused in the consent choice that applies to "
                    "this client")

    assert (await gate.query(TRACKER, source=gpc)).rcode() == dns.rcode.NOERROR  # opt-out: allowed until...
    await gate.http("GET", "/v1/consent", source=gpc, headers=GPC)
    assert await blocked_because(gate, gpc) == \
        "ActiveCampaign (activecampaign) is blocked: opted out of sale/sharing by Global Privacy Control (Sec-GPC)"

    assert await blocked_because(gate, deny) == \
        "ActiveCampaign (activecampaign) is blocked: this network's policy never lets trackers resolve (profile deny)"

    # a grant made under the notice before a catalog change: choosing again helps, and the text says so
    assert (await gate.http("PUT", "/v1/consent", source=stale, json={"categories": ["marketing"]}))[0] == 200
    assert (await gate.query(TRACKER, source=stale)).rcode() == dns.rcode.NOERROR
    new_catalog_version(catalog)
    assert (await gate.http("POST", "/v1/reload", admin=True))[0] == 200
    assert await blocked_because(gate, stale) == ("ActiveCampaign (activecampaign) is blocked: the consent notice "
                                                  "changed since category 'marketing' was granted; choose again")


# -- exports no spreadsheet runs ------------------------------------------------------------------

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
# What a spreadsheet may split a field into cells on: the CSV separators of other locales (German
# Excel splits on ";"), a tab, a pipe, a line break.
CELL_SEPARATORS = re.compile(r"[,;\t|\r\n]")
HOSTILE_AGENTS = [
    "=cmd|' /C calc'!A0", "+SUM(1+1)", "-2+3*cmd|x!A1", "@SUM(A1:A9)",
    # a formula further in, where a spreadsheet splitting on that separator starts a cell
    "Mozilla/5.0;=1+2*cmd|x!A1", "Mozilla/5.0,+SUM(1+1)", "curl/8.5|-2+3*cmd|x!A1", "Mozilla/5.0\t@SUM(A1:A9)",
    "Mozilla/5.0 (X11; -1+cmd|x!A1)", 'Mozilla/5.0;"=1+2"',
]
BENIGN_AGENT = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"


def formula_cells(text: str) -> list[str]:
    """The cells of `text` a spreadsheet would run, however it splits it (spaces and a quote trimmed)."""
    cells = [text, *(part.lstrip(' "') for part in CELL_SEPARATORS.split(text)[1:])]
    return [c for c in cells if c.startswith(FORMULA_START)]


def check_defused(exported: str, sent: str) -> None:
    """`exported` runs in no spreadsheet, says what was sent with only `'`s added, and is `sent` as is
    when nothing in it could run."""
    assert not formula_cells(exported), (exported, sent)
    assert exported.replace("'", "") == sent.replace("'", "")
    if not formula_cells(sent):
        assert exported == sent


async def raw_request(g: Gate, source: str, head: bytes, body: bytes = b"") -> int:
    """One HTTP request written byte for byte (header values no HTTP client library would send)."""
    reader, writer = await asyncio.open_connection(g.running.api.host, g.running.api.port, local_addr=(source, 0))
    try:
        writer.write(head + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 5)
        await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    return int(status_line.split()[1])


def put_consent(host: str, **headers: bytes) -> bytes:
    lines = [b"PUT /v1/consent HTTP/1.1", f"Host: {host}".encode(), b"Content-Type: application/json"]
    lines += [name.replace("_", "-").encode() + b": " + value for name, value in headers.items()]
    return b"\r\n".join(lines) + b"\r\n"


async def cli_export(g: Gate, fmt: str) -> str:
    """`dnsgate consent export` as a process against the running server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DNSGATE_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dnsgate", "consent", "export", "--format", fmt, "--api", str(g.running.api),
        "--token", TOKEN, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    out, err = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0, err
    return out.decode()


async def test_exports_defuse_hostile_header_values(gate: Gate) -> None:
    host, body = str(gate.running.api), json.dumps({"categories": ["marketing"]}).encode()
    sent: dict[str, tuple[str, str]] = {}  # source -> (user agent, Sec-GPC) as dnsgate should record them
    for i, agent in enumerate([*HOSTILE_AGENTS, BENIGN_AGENT]):
        source = f"127.0.0.{140 + i}"
        assert await raw_request(gate, source, put_consent(host, User_Agent=agent.encode()), body) == 200
        sent[source] = (agent, "")
    assert await raw_request(gate, "127.0.0.95", put_consent(host, Sec_GPC=b"=1+2*cmd|x!A1"), body) == 200
    sent["127.0.0.95"] = ("", "=1+2*cmd|x!A1")
    assert await raw_request(gate, "127.0.0.96", put_consent(host, User_Agent=b"\t=1+2", Sec_GPC=b"@x"), body) == 200
    sent["127.0.0.96"] = ("=1+2", "@x")  # a header value's leading tab is whitespace HTTP drops
    assert await raw_request(gate, "127.0.0.98", put_consent(host, Sec_GPC=b"1;=1+2*cmd|x!A1"), body) == 200
    sent["127.0.0.98"] = ("", "1;=1+2*cmd|x!A1")
    # a carriage return inside a header is refused, and nothing is recorded
    assert await raw_request(gate, "127.0.0.97", put_consent(host, User_Agent=b"\r=1+2"), body) == 400

    status, audit = await gate.http("GET", "/v1/audit?limit=100", admin=True)
    recorded = {e["address"]: (e["user_agent"], e["sec_gpc"] or "") for e in audit["events"]}
    assert recorded == sent  # the log keeps what was sent; only the exports defuse it

    exports: dict[str, str] = {}
    for fmt in ("csv", "jsonl"):
        status, exports[f"api {fmt}"] = await gate.http("GET", f"/v1/audit/export?format={fmt}", admin=True)
        assert status == 200
        exports[f"cli {fmt}"] = await cli_export(gate, fmt)
    for how, text in exports.items():
        if how.endswith("csv"):
            records: list[dict[str, Any]] = list(csv.DictReader(io.StringIO(text)))
        else:
            records = [json.loads(line) for line in text.splitlines()]
        assert sorted(r["address"] for r in records) == sorted(sent), how
        for record in records:
            agent, gpc = sent[record["address"]]
            check_defused(record["user_agent"] or "", agent)
            check_defused(record["sec_gpc"] or "", gpc)
            for value in record.values():
                assert not (isinstance(value, str) and formula_cells(value)), (how, value)


def test_every_text_field_of_an_export_is_defused() -> None:
    # Values no HTTP request delivers (a leading tab or CR, a line break), as another store or an
    # old file may hold them.
    hostile = ["\t=1+2", "\r=1+2", "=A1", "+A1", "-A1", "@A1", "ok\n=A1", "ok\r\n-A1", "ok\t\t+A1", "a, @A1",
               "a|=A1", "a;+A1", "a,-A1"]
    for value in hostile:
        e = Event("refusal", 1_800_000_000.0, Subject("10.0.0.1"), "opt-in", {"marketing": False}, {}, 1_900_000_000.0,
                  None, "device", value, value, reason=value, id=1)
        record = json.loads(jsonl_line(e))
        (row,) = csv.DictReader(io.StringIO(csv_header() + csv_line(e)))
        for exported in (record, row):
            for field in ("user_agent", "sec_gpc", "reason"):
                check_defused(exported[field], value)


# -- Global Privacy Control ------------------------------------------------------------------------


async def rcode(g: Gate, source: str, name: str = TRACKER) -> int:
    return (await g.query(name, source=source)).rcode()


async def events_of(g: Gate, client: str) -> list[dict[str, Any]]:
    status, text = await g.http("GET", f"/v1/audit/export?client={client}", admin=True)
    assert status == 200
    return [json.loads(line) for line in text.splitlines()]


# Every kind of request a device makes: the portal's page and files, the status other sites read,
# whoami, the API's reads and the caller's own changes.
GPC_REQUESTS: list[tuple[str, str, Any]] = [
    ("GET", "/", None), ("GET", "/portal/app.js", None), ("GET", "/v1/consent/status", None),
    ("GET", "/v1/consent", None), ("GET", "/v1/whoami", None), ("GET", "/v1/vendors", None),
    ("GET", "/v1/notice", None), ("GET", "/healthz", None), ("GET", "/openapi.json", None),
    ("PUT", "/v1/consent", {"vendors": {"pixelco": True}}), ("DELETE", "/v1/consent", None),
    ("POST", "/v1/reload", None),  # (as admin, from a device on the opt-out network)
]


@pytest.mark.parametrize(("method", "path", "body"), GPC_REQUESTS, ids=[f"{m} {p}" for m, p, _ in GPC_REQUESTS])
async def test_gpc_on_any_request_opts_out_of_sale_and_sharing(gate: Gate, method: str, path: str,
                                                               body: Any) -> None:
    me = OPT_OUT + "100"
    assert await rcode(gate, me) == dns.rcode.NOERROR  # an opt-out network: allowed until the client opts out
    status, answer = await gate.http(method, path, source=me, json=body, headers=GPC, admin=method == "POST")
    assert status == 200
    if path == "/v1/consent/status":  # the answer already shows the opt-out
        assert answer["vendors"]["activecampaign"]["allowed"] is False
        assert answer["vendors"]["pixelco"]["allowed"] is (method != "DELETE")
    assert await rcode(gate, me) == dns.rcode.NXDOMAIN
    if method != "DELETE":
        assert await rcode(gate, me, PIXEL) == dns.rcode.NOERROR  # pixelco does not sell or share data
    (event,) = await events_of(gate, me)
    assert event["sec_gpc"] == "1" and event["gpc_seen_at"] == event["time"]
    assert event["vendors"]["activecampaign"] is False
    if method != "PUT":
        assert "Sec-GPC" in event["reason"] or method == "DELETE"
    # the opt-out is recorded once; later requests carrying the signal find nothing left to opt out of
    await gate.http("GET", "/v1/consent/status", source=me, headers=GPC)
    assert len(await events_of(gate, me)) == 1
    status, state = await gate.http("GET", "/v1/consent", source=me)
    (decision,) = [v for v in state["vendors"] if v["id"] == "activecampaign"]
    assert "Global Privacy Control" in decision["reason"] and decision["until"] is None  # until changed


@pytest.mark.parametrize(("method", "path", "body", "refused"), [
    ("POST", "/v1/session/end", None, 409),  # not a kiosk
    ("PUT", "/v1/consent", {"categories": ["spying"]}, 400),  # a change that fails changes nothing else
    ("GET", "/v1/clients", None, 401),  # an admin's endpoint, without the token
    ("PUT", "/v1/consent", {"vendors": {"pixelco": True}}, 403),  # from another site's page (Origin)
])
async def test_gpc_counts_on_a_request_that_is_refused(gate: Gate, method: str, path: str, body: Any,
                                                      refused: int) -> None:
    me = OPT_OUT + "120"
    headers = {**GPC, "Origin": "https://evil.example"} if refused == 403 else GPC
    status, _ = await gate.http(method, path, source=me, json=body, headers=headers)
    assert status == refused
    assert await rcode(gate, me) == dns.rcode.NXDOMAIN
    (event,) = await events_of(gate, me)
    assert event["action"] == "refusal" and event["vendors"] == {"activecampaign": False}


async def test_gpc_records_nothing_elsewhere_than_on_opt_out_networks(gate: Gate) -> None:
    for other in ("127.0.0.120", "127.0.2.120", DENY + "120"):  # opt-in, kiosk, deny: GPC never grants
        assert (await gate.http("GET", "/v1/consent/status", source=other, headers=GPC))[0] == 200
        assert (await gate.http("PUT", "/v1/consent", source=other, headers=GPC,
                                json={"vendors": {"pixelco": True}}))[0] in (200, 409)
        assert [e["gpc_seen_at"] for e in await events_of(gate, other)] in ([], [None])


async def test_an_unrelated_grant_does_not_cancel_gpc(gate: Gate) -> None:
    me = OPT_OUT + "121"
    unrelated = {"vendors": {"pixelco": True}}  # a marketing vendor that neither sells nor shares data
    # granted pixelco while sending GPC: the sale/share vendor stays opted out
    status, body = await gate.http("PUT", "/v1/consent", source=me, json=unrelated, headers=GPC)
    assert status == 200 and body["choice"]["vendors"] == {"pixelco": True, "activecampaign": False}
    assert await rcode(gate, me) == dns.rcode.NXDOMAIN and await rcode(gate, me, PIXEL) == dns.rcode.NOERROR
    await gate.http("GET", "/v1/consent/status", source=me, headers=GPC)
    assert await rcode(gate, me) == dns.rcode.NXDOMAIN
    # a later choice without the header (another program on the device) does not lift it either
    status, body = await gate.http("PUT", "/v1/consent", source=me, json=unrelated)
    assert status == 200 and body["choice"]["vendors"] == {"pixelco": True, "activecampaign": False}
    assert await rcode(gate, me) == dns.rcode.NXDOMAIN
    first, second = await events_of(gate, me)
    assert second["sec_gpc"] is None and second["gpc_seen_at"] == first["gpc_seen_at"] == first["time"]
    assert "activecampaign stay opted out of sale/sharing: Global Privacy Control applies since" in second["reason"]

    # granted pixelco first, then the signal: the opt-out is added, the grant stays as it was
    other = OPT_OUT + "124"
    await choose(gate, other, unrelated)
    assert await rcode(gate, other) == dns.rcode.NOERROR
    await gate.http("GET", "/v1/whoami", source=other, headers=GPC)
    assert await rcode(gate, other) == dns.rcode.NXDOMAIN and await rcode(gate, other, PIXEL) == dns.rcode.NOERROR
    opt_out = (await events_of(gate, other))[-1]
    assert opt_out["vendors"] == {"pixelco": True, "activecampaign": False}


async def test_a_grant_of_that_vendor_after_gpc_was_seen_wins_and_says_so(gate: Gate, clock: FakeClock) -> None:
    me, before = OPT_OUT + "122", OPT_OUT + "123"
    await gate.http("GET", "/", source=me, headers=GPC)  # the portal's page: opted out
    assert await rcode(gate, me) == dns.rcode.NXDOMAIN
    clock.advance(60)
    status, body = await gate.http("PUT", "/v1/consent", source=me, json={"vendors": {"activecampaign": True}})
    assert status == 200 and await rcode(gate, me) == dns.rcode.NOERROR
    (decision,) = [v for v in body["vendors"] if v["id"] == "activecampaign"]
    assert "after Global Privacy Control was seen (this later grant wins over it)" in decision["reason"]
    await gate.http("GET", "/v1/consent", source=me, headers=GPC)  # the signal again: the grant stands
    assert await rcode(gate, me) == dns.rcode.NOERROR
    opt_out, grant = await events_of(gate, me)
    assert grant["action"] == "grant" and grant["gpc_seen_at"] == opt_out["time"]
    assert "grants activecampaign after Global Privacy Control was seen" in grant["reason"]
    assert "this later, specific grant wins over the signal" in grant["reason"]

    # a grant of its category after the signal covers it too
    by_category = OPT_OUT + "125"
    await gate.http("GET", "/v1/consent/status", source=by_category, headers=GPC)
    assert await rcode(gate, by_category) == dns.rcode.NXDOMAIN
    await choose(gate, by_category, {"choices": {"marketing": True}})
    assert await rcode(gate, by_category) == dns.rcode.NOERROR
    await gate.http("GET", "/v1/consent/status", source=by_category, headers=GPC)
    assert await rcode(gate, by_category) == dns.rcode.NOERROR

    # a grant made before GPC was ever seen does not: the signal is the person's later word
    await gate.http("PUT", "/v1/consent", source=before, json={"vendors": {"activecampaign": True}})
    await gate.http("GET", "/v1/consent/status", source=before, headers=GPC)
    assert await rcode(gate, before) == dns.rcode.NXDOMAIN
    assert [e["action"] for e in await events_of(gate, before)] == ["grant", "refusal"]


# -- lifetimes follow the profile ----------------------------------------------------------------


def seconds(iso_text: str) -> float:
    return dt.datetime.fromisoformat(iso_text.replace("Z", "+00:00")).timestamp()


async def choose(g: Gate, source: str, body: dict[str, Any], **kw: Any) -> dict[str, Any]:
    status, state = await g.http("PUT", "/v1/consent", source=source, json=body, **kw)
    assert status == 200, state
    return dict(state)


@pytest.mark.parametrize(("source", "lifetime"), [("127.0.0.130", 180), (KIOSK + "130", 1), (OPT_OUT + "130", 395)],
                         ids=["opt-in", "kiosk", "opt-out"])
async def test_a_request_may_shorten_a_grant_never_lengthen_it(gate: Gate, clock: FakeClock, source: str,
                                                               lifetime: int) -> None:
    grant = {"choices": {"marketing": True}}  # grants only (the "categories" form refuses the others)
    start = clock.now
    assert seconds((await choose(gate, source, {**grant, "days": 1}))["choice"]["expires_at"]) == start + DAY
    state = await choose(gate, source, {**grant, "days": 395})
    assert seconds(state["choice"]["expires_at"]) == start + lifetime * DAY  # the profile's, not the request's
    assert state["choice"]["refusals_stand"] is False and state["ask_again_after"] is None
    last = (await events_of(gate, source))[-1]
    if lifetime < 395:
        assert f"395 days asked for; a choice on a {state['profile']['name']} network lasts at most {lifetime}" \
            in last["reason"]
    assert seconds((await choose(gate, source, grant))["choice"]["expires_at"]) == start + lifetime * DAY
    # the grant holds to its last second (a kiosk kept in use by its DNS queries) and not after it
    while source.startswith(KIOSK) and clock.now + 600 < start + lifetime * DAY:
        clock.advance(600)
        assert (await gate.query("host.example.test", source=source)).rcode() == dns.rcode.NOERROR
    clock.now = start + lifetime * DAY - 1
    assert await rcode(gate, source) == dns.rcode.NOERROR
    clock.now = start + lifetime * DAY
    if source.startswith(OPT_OUT):
        assert await rcode(gate, source) == dns.rcode.NOERROR  # an opt-out network allows without a grant
    else:
        assert await rcode(gate, source) == dns.rcode.NXDOMAIN

    async def ended() -> bool:
        return (await events_of(gate, source))[-1]["action"] in ("expiry", "reset")

    await eventually(ended)


async def test_refusals_elsewhere_expire_and_say_when_to_ask_again(gate: Gate, clock: FakeClock) -> None:
    start = clock.now
    for source, lifetime in (("127.0.0.131", 180), (KIOSK + "131", 1)):
        state = await choose(gate, source, {"categories": [], "days": 395})  # "Reject all"
        expires = state["choice"]["expires_at"]
        assert seconds(expires) == start + lifetime * DAY and state["choice"]["refusals_stand"] is False
        assert state["ask_again_after"] == expires  # a refusal keeps the person from being asked until it expires


def serving(cfg: Config, clock: FakeClock) -> contextlib.AbstractAsyncContextManager[Gate]:
    return running_gate(cfg, lambda: cfg, wall=clock)


async def test_opt_outs_stand_until_the_person_changes_them(upstream: StubUpstream, data_dir: Path, catalog: Path,
                                                           clock: FakeClock, consent_store: str) -> None:
    upstream.add(PIXEL, f"{PIXEL}. 300 IN A 198.51.100.9")
    cfg = consent_config(with_store(make_config(upstream, data_dir), consent_store), catalog=catalog)
    reject, gpc, mixed, grant = (OPT_OUT + str(n) for n in (140, 141, 142, 143))
    start = clock.now
    async with serving(cfg, clock) as g:
        state = await choose(g, reject, {"categories": [], "days": 30})  # "Reject all"
        assert state["choice"]["expires_at"] == "9999-12-31T23:59:59Z" and state["choice"]["refusals_stand"]
        assert seconds(state["ask_again_after"]) == start + 365 * DAY  # asked again after 12 months, not before
        assert "an opt-out stands until the person changes it: days does not apply" in \
            (await events_of(g, reject))[-1]["reason"]
        await g.http("GET", "/v1/consent/status", source=gpc, headers=GPC)
        _status, state = await g.http("GET", "/v1/consent", source=gpc)
        assert state["choice"]["expires_at"] == "9999-12-31T23:59:59Z"
        assert seconds(state["ask_again_after"]) == start + 365 * DAY
        # refuses marketing but grants pixelco for 30 days: the grant lapses, the refusal stands
        state = await choose(g, mixed, {"choices": {"marketing": False}, "vendors": {"pixelco": True}, "days": 30})
        assert seconds(state["choice"]["expires_at"]) == start + 30 * DAY and state["choice"]["refusals_stand"]
        assert seconds(state["ask_again_after"]) == start + 365 * DAY
        assert await rcode(g, mixed, PIXEL) == dns.rcode.NOERROR and await rcode(g, mixed) == dns.rcode.NXDOMAIN
        if consent_store != "sqlite":  # Redis keeps the opt-out's hash past its grants' expiry: never expires it
            r = aioredis.from_url(consent_store)
            try:
                kept = await r.pexpiretime(f"dnsgate:choice:{state['choice']['id']}")
            finally:
                await r.aclose()
            assert kept == -1  # (no expiry: the event that ends the choice deletes it)
        await choose(g, grant, {"choices": {"marketing": True}, "days": 10})  # grants only: it expires

        clock.advance(400 * DAY)  # past every grant's and the 395-day maximum

        async def grant_expired() -> bool:
            return [e["action"] for e in await events_of(g, grant)] == ["grant", "expiry"]

        await eventually(grant_expired)  # the sweeper has run after the clock moved
        for source in (reject, gpc, mixed):
            assert await rcode(g, source) == dns.rcode.NXDOMAIN, source
            assert "expiry" not in [e["action"] for e in await events_of(g, source)]
        assert await rcode(g, mixed, PIXEL) == dns.rcode.NXDOMAIN  # its grant of pixelco lapsed after 30 days
        _status, state = await g.http("GET", "/v1/consent", source=mixed)
        assert state["categories"] == {} and state["choice"]["active"] is True
        assert any("expired; its refusals are opt-outs, which stand until changed" in n for n in state["notes"])
        until = {v["id"]: v["until"] for v in state["vendors"]}
        assert until == {"activecampaign": None, "pixelco": None}  # no end: until the person changes it

    async with serving(cfg, clock) as g:  # a restart under the same clock: still opted out
        for source in (reject, gpc, mixed):
            assert await rcode(g, source) == dns.rcode.NXDOMAIN, source
        assert await rcode(g, mixed, PIXEL) == dns.rcode.NXDOMAIN
        await choose(g, reject, {"categories": ["marketing"]})  # the person changes it
        assert await rcode(g, reject) == dns.rcode.NOERROR


async def test_a_consent_file_without_the_gpc_column_gains_it(upstream: StubUpstream, data_dir: Path,
                                                              catalog: Path, clock: FakeClock) -> None:
    cfg = consent_config(make_config(upstream, data_dir), catalog=catalog)
    me = OPT_OUT + "150"
    async with serving(cfg, clock) as g:
        await choose(g, me, {"vendors": {"pixelco": True}})
    drop_gpc_columns(data_dir / "consent.sqlite3")  # as an earlier dnsgate left the file
    async with serving(cfg, clock) as g:
        assert await rcode(g, me) == dns.rcode.NOERROR  # the choice is still in force
        await g.http("GET", "/v1/consent/status", source=me, headers=GPC)
        assert await rcode(g, me) == dns.rcode.NXDOMAIN
        grant, opt_out = await events_of(g, me)
        assert grant["gpc_seen_at"] is None and opt_out["gpc_seen_at"] == opt_out["time"]


def drop_gpc_columns(path: Path) -> None:
    with sqlite3.connect(path) as db:
        for table in ("events", "choices"):
            db.execute(f"ALTER TABLE {table} DROP COLUMN gpc_seen_at")
        assert "gpc_seen_at" not in {row[1] for row in db.execute("PRAGMA table_info(choices)")}


SELLER = "px.adco.test"
SELLER_DROP_IN = f'''
version = "1"
[[vendor]]
id = "adco"
name = "AdCo"
category = "marketing"
summary = "Sells what it learns."
ccpa_sale_or_share = true
[[vendor.domain]]
pattern = "{SELLER.split(".", 1)[1]}"
'''


async def test_gpc_stands_for_a_seller_added_later(upstream: StubUpstream, data_dir: Path, catalog: Path,
                                                   tmp_path: Path, clock: FakeClock, consent_store: str) -> None:
    """GPC is a standing signal: a vendor that sells or shares data and is added after the signal was
    seen (a drop-in and a reload) does not resolve for that client until it grants that very vendor;
    no further request is needed."""
    upstream.add(SELLER, f"{SELLER}. 300 IN A 198.51.100.11")
    dropins = tmp_path / "vendors.d"
    dropins.mkdir()
    cfg = consent_config(with_store(make_config(upstream, data_dir), consent_store), catalog=catalog)
    cfg = dataclasses.replace(cfg, gate=dataclasses.replace(cfg.gate, vendors_dir=str(dropins)))
    signalled, rejected, granted, plain = (OPT_OUT + str(n) for n in (130, 131, 132, 133))
    async with serving(cfg, clock) as g:
        await g.http("GET", "/v1/consent/status", source=signalled, headers=GPC)
        await choose(g, rejected, {"categories": []})  # "Reject all", then the signal: nothing left to opt out
        await g.http("GET", "/v1/consent/status", source=rejected, headers=GPC)
        await g.http("GET", "/v1/consent/status", source=granted, headers=GPC)
        clock.advance(60)
        await choose(g, granted, {"categories": ["marketing"]})  # after the signal: it wins for what it covers
        assert await rcode(g, granted) == dns.rcode.NOERROR

        (dropins / "adco.toml").write_text(SELLER_DROP_IN, encoding="utf-8")
        assert (await g.http("POST", "/v1/reload", admin=True))[0] == 200
        for source in (signalled, rejected, granted):
            assert await rcode(g, source, SELLER) == dns.rcode.NXDOMAIN, source
            assert await blocked_because(g, source, SELLER) == \
                "AdCo (adco) is blocked: opted out of sale/sharing by Global Privacy Control (Sec-GPC)"
            _, state = await g.http("GET", "/v1/consent", source=source)
            (adco,) = [v for v in state["vendors"] if v["id"] == "adco"]
            assert not adco["allowed"] and "Global Privacy Control" in adco["reason"], adco
        assert await rcode(g, granted) == dns.rcode.NOERROR  # what it granted after the signal still holds
        assert await rcode(g, plain, SELLER) == dns.rcode.NOERROR  # no signal: allowed until it opts out

        clock.advance(60)
        await choose(g, granted, {"vendors": {"adco": True}})  # the later, specific grant of that vendor wins
        assert await rcode(g, granted, SELLER) == dns.rcode.NOERROR
    async with serving(cfg, clock) as g:  # and it all holds across a restart
        for source in (signalled, rejected):
            assert await rcode(g, source, SELLER) == dns.rcode.NXDOMAIN, source
        assert await rcode(g, granted, SELLER) == dns.rcode.NOERROR


@pytest.mark.parametrize(("profile", "lifetime"), [("opt-in", 180), ("kiosk", 1)])
async def test_an_opt_out_on_a_network_that_is_no_longer_opt_out_gets_the_new_lifetime(
        upstream: StubUpstream, data_dir: Path, catalog: Path, clock: FakeClock, consent_store: str,
        profile: str, lifetime: int) -> None:
    """The network of an opt-out becomes opt-in or kiosk: the opt-out no longer stands there, so it
    lasts what a choice lasts under the new profile, counted from the change (never longer than it
    had), recorded with the profile change; `ask_again_after` says that date, not 9999."""
    cfg = consent_config(with_store(make_config(upstream, data_dir), consent_store), catalog=catalog)
    changed = dataclasses.replace(cfg, profiles=ProfilesConfig(networks=tuple(
        (net, profile if kind == "opt-out" else kind) for net, kind in PROFILE_NETWORKS)))
    reject, mixed = OPT_OUT + "150", OPT_OUT + "151"
    async with serving(cfg, clock) as g:
        state = await choose(g, reject, {"categories": []})
        assert state["choice"]["expires_at"] == "9999-12-31T23:59:59Z"
        # refuses marketing, grants pixelco for 300 days
        await choose(g, mixed, {"choices": {"marketing": False}, "vendors": {"pixelco": True}, "days": 300})
    clock.advance(60)
    changed_at = clock.now
    async with serving(changed, clock) as g:
        for source, before in ((reject, math.inf), (mixed, changed_at - 60 + 300 * DAY)):
            _, state = await g.http("GET", "/v1/consent", source=source)
            expected = min(before, changed_at + lifetime * DAY)
            assert state["profile"]["name"] == profile
            assert seconds(state["choice"]["expires_at"]) == expected, (source, state["choice"])
            assert state["choice"]["refusals_stand"] is False
            assert seconds(state["ask_again_after"]) == expected
            change = (await events_of(g, source))[-1]
            assert change["action"] == "profile_change" and seconds(change["expires_at"]) == expected
    async with serving(changed, clock) as g:  # as recorded, after a restart (and not recorded again)
        _, state = await g.http("GET", "/v1/consent", source=reject)
        assert seconds(state["choice"]["expires_at"]) == changed_at + lifetime * DAY
        assert [e["action"] for e in await events_of(g, reject)] == ["refusal", "profile_change"]
        clock.advance(lifetime * DAY + 1)

        async def expired() -> bool:
            return bool((await events_of(g, reject))[-1]["action"] == "expiry")

        await eventually(expired)
        assert (await g.http("GET", "/v1/consent", source=reject))[1]["choice"] is None
