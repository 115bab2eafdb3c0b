"""What dnsgate keeps must not betray who someone is: the anonymous query log shares no value with the
consent store, the databases and the data dir are private to dnsgate's user (or its group), and the
status other sites may read is not a cross-site identifier."""

from __future__ import annotations

import grp
import os
import re
import sqlite3
import stat
from dataclasses import replace
from pathlib import Path

import dns.rcode
import pytest

from dnsgate.app.primary import StartupError
from dnsgate.config import QueryLogConfig
from tests.conftest import Gate, make_config, running_gate
from tests.security.helpers import GRANT, TRACKER
from tests.support.stub_upstream import StubUpstream

CLIENT = "127.0.0.20"


async def test_the_anonymous_query_log_does_not_join_the_consent_store(upstream: StubUpstream,
                                                                       data_dir: Path) -> None:
    base = make_config(upstream, data_dir)
    async with running_gate(base) as g:  # the log kept exact grant times before it became anonymous
        assert (await g.http("PUT", "/v1/consent", source=CLIENT, json=GRANT))[0] == 200
        assert (await g.query(TRACKER, source=CLIENT)).rcode() == dns.rcode.NOERROR
        status, body = await g.http("GET", "/v1/queries?limit=10", admin=True)  # flushes the log
        assert status == 200 and body["entries"][0]["consent"]["granted_at"] is not None
    async with running_gate(replace(base, querylog=QueryLogConfig(mode="anonymous"))) as g:
        assert (await g.query(TRACKER, source=CLIENT)).rcode() == dns.rcode.NOERROR
        assert (await g.query(TRACKER, source="127.0.0.21")).rcode() == dns.rcode.NXDOMAIN
        status, body = await g.http("GET", "/v1/queries?limit=10", admin=True)
        assert status == 200 and len(body["entries"]) == 3
        consent = body["entries"][1]["consent"]  # newest first: the anonymous allowed query
        assert consent == {"category": "marketing", "granted_at": None, "expires_at": None, "source": "self"}
        status, report = await g.http("GET", "/v1/report", admin=True)
        assert status == 200 and report["verdict"] == "pass", report["problems"]
    db = sqlite3.connect(data_dir / "querylog.sqlite3")
    db.execute("ATTACH DATABASE ? AS consent", (str(data_dir / "consent.sqlite3"),))
    events = db.execute("SELECT at, expires_at FROM consent.events").fetchall()
    assert events  # the grant is in the consent log
    rows = db.execute("SELECT * FROM queries").fetchall()
    columns = [d[0] for d in db.execute("SELECT * FROM queries").description]
    assert rows
    times = {t for e in events for t in e if t is not None}
    for row in rows:
        record = dict(zip(columns, row, strict=True))
        # the review's join: exact grant times equal to the consent log's
        assert not {record.get("granted_at"), record.get("grant_expires_at")} & times, record
    joined = db.execute("SELECT COUNT(*) FROM queries q JOIN consent.events e "
                        "ON q.granted_at = e.at OR q.grant_expires_at = e.expires_at").fetchone()[0]
    assert joined == 0
    # what is left: whether consent allowed the answer
    allowed = db.execute("SELECT grant_source FROM queries WHERE vendor IS NOT NULL AND outcome != 'sinkholed'")
    assert [r[0] for r in allowed] == ["self", "self"]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _database_files(data_dir: Path) -> list[Path]:
    return [p for p in data_dir.iterdir() if p.name.startswith(("consent.sqlite3", "querylog.sqlite3"))]


async def test_databases_and_the_data_dir_are_private(upstream: StubUpstream, data_dir: Path) -> None:
    cfg = replace(make_config(upstream, data_dir), querylog=QueryLogConfig(mode="anonymous"))
    cfg = replace(cfg, api=replace(cfg.api, admin_token=""))  # and a generated admin token
    async with running_gate(cfg) as g:
        await g.http("PUT", "/v1/consent", source=CLIENT, json=GRANT)
        files = _database_files(data_dir)
        assert {p.name for p in files} >= {"consent.sqlite3", "consent.sqlite3-wal", "querylog.sqlite3"}
        assert _mode(data_dir) == 0o700
        for path in [*files, data_dir / "querylog.key", data_dir / "admin-token"]:
            assert _mode(path) == 0o600, path


async def test_an_existing_data_dir_is_made_private(upstream: StubUpstream, data_dir: Path) -> None:
    cfg = make_config(upstream, data_dir)
    async with running_gate(cfg) as g:
        await g.http("PUT", "/v1/consent", source=CLIENT, json=GRANT)
    os.chmod(data_dir, 0o755)
    for path in _database_files(data_dir):
        os.chmod(path, 0o644)
    async with running_gate(cfg) as g:
        assert (await g.http("GET", "/v1/consent", source=CLIENT))[1]["categories"]  # the data is still there
        assert _mode(data_dir) == 0o700
        for path in _database_files(data_dir):
            assert _mode(path) == 0o600, path


def _group(path: Path) -> int:
    return path.stat().st_gid


async def test_a_configured_group_may_read(upstream: StubUpstream, data_dir: Path) -> None:
    group = grp.getgrgid(os.getgid()).gr_name
    base = make_config(upstream, data_dir)
    async with running_gate(replace(base, storage=replace(base.storage, group=group))) as g:
        await g.http("PUT", "/v1/consent", source=CLIENT, json=GRANT)
        # setgid: the files SQLite adds later (-wal, -shm) take the group too
        assert _mode(data_dir) == 0o750 | stat.S_ISGID and _group(data_dir) == os.getgid()
        files = _database_files(data_dir)
        assert {p.name for p in files} >= {"consent.sqlite3", "consent.sqlite3-wal", "querylog.sqlite3"}
        for path in files:
            assert _mode(path) == 0o640 and _group(path) == os.getgid(), path
    base = replace(base, storage=replace(base.storage, group="no-such-group-dnsgate"))
    with pytest.raises(StartupError, match=r"^storage\.group: no group 'no-such-group-dnsgate'"):
        async with running_gate(base):
            pass


async def test_the_status_for_other_sites_gives_the_day_only(gate: Gate) -> None:
    await gate.http("PUT", "/v1/consent", source=CLIENT, json=GRANT)
    status, body = await gate.http("GET", "/v1/consent/status", source=CLIENT)
    assert status == 200
    until = body["vendors"]["activecampaign"]["until"]
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", until), until
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", body["categories"]["marketing"]["until"])
