"""What a person's choice means for each kind of network, over real sockets: why a name is blocked
(the EDE text), how long a choice lasts per profile, Global Privacy Control on every request, and
exports that no spreadsheet can be made to run.

dnsgate runs in-process on loopback with a fake wall clock; profiles by network as in
tests/consent_fixtures.py (127.0.1.0/24 opt-out, 127.0.2.0/24 kiosk, 127.0.3.0/24 deny,
127.0.4.0/24 allow, else opt-in).
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path

import dns.edns
import dns.message
import dns.rcode
import pytest

from dnsgate.consent import Subject
from dnsgate.consent_log import csv_header, csv_line, jsonl_line
from dnsgate.store import Event
from tests.conftest import Gate, make_config, running_gate
from tests.consent_fixtures import DENY, OPT_OUT, PIXEL, FakeClock, consent_config, two_vendor_catalog
from tests.stub_upstream import StubUpstream

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
HOSTILE_AGENTS = ["=cmd|' /C calc'!A0", "+SUM(1+1)", "-2+3*cmd|x!A1", "@SUM(A1:A9)"]


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


async def test_exports_defuse_hostile_header_values(gate: Gate) -> None:
    host, body = str(gate.running.api), json.dumps({"categories": ["marketing"]}).encode()
    sent: dict[str, tuple[str, str]] = {}  # source -> (user agent, Sec-GPC) as dnsgate should record them
    for i, agent in enumerate(HOSTILE_AGENTS):
        source = f"127.0.0.{90 + i}"
        assert await raw_request(gate, source, put_consent(host, User_Agent=agent.encode()), body) == 200
        sent[source] = (agent, "")
    assert await raw_request(gate, "127.0.0.95", put_consent(host, Sec_GPC=b"=1+2*cmd|x!A1"), body) == 200
    sent["127.0.0.95"] = ("", "=1+2*cmd|x!A1")
    assert await raw_request(gate, "127.0.0.96", put_consent(host, User_Agent=b"\t=1+2", Sec_GPC=b"@x"), body) == 200
    sent["127.0.0.96"] = ("=1+2", "@x")  # a header value's leading tab is whitespace HTTP drops
    # a carriage return inside a header is refused, and nothing is recorded
    assert await raw_request(gate, "127.0.0.97", put_consent(host, User_Agent=b"\r=1+2"), body) == 400

    status, audit = await gate.http("GET", "/v1/audit?limit=100", admin=True)
    recorded = {e["address"]: (e["user_agent"], e["sec_gpc"] or "") for e in audit["events"]}
    assert recorded == sent  # the log keeps what was sent; only the exports defuse it

    status, text = await gate.http("GET", "/v1/audit/export?format=csv", admin=True)
    assert status == 200
    rows = list(csv.DictReader(io.StringIO(text)))
    status, text = await gate.http("GET", "/v1/audit/export?format=jsonl", admin=True)
    records = [json.loads(line) for line in text.splitlines()]
    assert len(rows) == len(records) == len(sent)
    for row, record in zip(rows, records, strict=True):
        agent, gpc = sent[row["address"]]
        for exported in (row, record):
            assert exported["user_agent"] == ("'" + agent if agent.startswith(FORMULA_START) else agent)
            assert (exported["sec_gpc"] or "") == ("'" + gpc if gpc.startswith(FORMULA_START) else gpc)
        cells = [*row.values(), *(v for v in record.values() if isinstance(v, str))]
        assert not [c for c in cells if c.startswith(FORMULA_START)]


def test_every_text_field_of_an_export_is_defused() -> None:
    # Values no HTTP request delivers (a leading tab or CR), as another store or an old file may hold them.
    hostile = ["\t=1+2", "\r=1+2", "=A1", "+A1", "-A1", "@A1"]
    for value in hostile:
        e = Event("refusal", 1_800_000_000.0, Subject("10.0.0.1"), "opt-in", {"marketing": False}, {}, 1_900_000_000.0,
                  None, "device", value, value, reason=value, id=1)
        record = json.loads(jsonl_line(e))
        (row,) = csv.DictReader(io.StringIO(csv_header() + csv_line(e)))
        for exported in (record, row):
            assert exported["user_agent"] == exported["sec_gpc"] == exported["reason"] == "'" + value
