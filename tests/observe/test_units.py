"""The pure pieces behind the evidence and the counts, without sockets: the report's verdict,
JUnit output, time parsing, per-query counting and the log entries the pipeline records, the
consent watch's events, and JSON logs."""

from __future__ import annotations

import asyncio
import gc
import io
import json
import logging
import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Literal

import dns.message
import pytest

from dnsgate.config import QueryLogConfig
from dnsgate.consent.model import Grant, Subject
from dnsgate.consent.records import Event as ConsentEvent
from dnsgate.dns.pipeline import Forward
from dnsgate.dns.tally import CACHED, FORWARDED, SINKHOLED, LogEntry
from dnsgate.http.observe_api import parse_time
from dnsgate.logs import setup_logging
from dnsgate.observe.events import ConsentWatch, EventHub
from dnsgate.observe.querylog import QueryLog
from dnsgate.observe.querylog_db import QueryLogDb
from dnsgate.observe.report import Watched, build_report, junit
from tests.dns.test_pipeline import Clock, build, forward, grant, query
from tests.support.consent_fixtures import eventually


@pytest.fixture
def clock() -> Clock:
    return Clock()


WATCHED = (Watched("trackcmp.net", "activecampaign", "marketing"), Watched("*.api-us1.com", "activecampaign",
                                                                             "marketing"))


def row(at: float, outcome: str, name: str = "trackcmp.net", client: str = "10.0.0.1", vendor: str | None =
        "activecampaign", granted_at: float | None = None, expires: float | None = None) -> dict[str, Any]:
    return {"at": at, "client": client, "name": name, "type": "A", "outcome": outcome, "vendor": vendor,
            "category": "marketing" if vendor else None, "granted_at": granted_at, "grant_expires_at": expires,
            "grant_source": "self" if granted_at else None}


def report(gated: list[dict[str, Any]], ungated: list[dict[str, Any]] | None = None, **kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"since": 0.0, "until": 2e9, "generated_at": 1e9, "mode": "gated-only", "dropped": 0,
                            "watched": WATCHED, "vendor_names": {"activecampaign": "ActiveCampaign"}}
    args.update(kw)
    return build_report(gated=gated, ungated=ungated or [], **args)


def test_blocked_then_allowed_with_a_grant_passes() -> None:
    r = report([row(100, "sinkholed"), row(200, "forwarded", granted_at=150, expires=1000),
                row(300, "cached", granted_at=150, expires=1000)])
    assert r["verdict"] == "pass" and r["totals"] == {"queries": 3, "sinkholed": 1, "allowed": 2, "servfail": 0}
    (v,) = r["clients"][0]["vendors"]
    assert (v["first_seen"], v["last_seen"]) == ("1970-01-01T00:01:40.000Z", "1970-01-01T00:05:00.000Z")
    assert v["allowed_queries"][0]["consent"]["expires_at"] == "1970-01-01T00:16:40.000Z"


@pytest.mark.parametrize(("granted_at", "expires", "reason"), [
    (None, None, "without a grant"), (150, 190, "after the grant expired"), (250, 1000, "before the grant")])
def test_an_answer_without_a_grant_in_force_fails(granted_at: float | None, expires: float | None,
                                                  reason: str) -> None:
    r = report([row(200, "forwarded", granted_at=granted_at, expires=expires)])
    assert r["verdict"] == "fail"
    (violation,) = r["violations"]
    assert reason in violation["reason"] and violation["client"] == "10.0.0.1"


def test_ungated_catalog_names_fail_but_lookalikes_do_not() -> None:
    r = report([], [row(10, "forwarded", name="acct.api-us1.com", vendor=None),
                    row(11, "forwarded", name="api-us1.com", vendor=None),
                    row(12, "forwarded", name="nottrackcmp.net", vendor=None)], mode="full")
    assert [v["name"] for v in r["violations"]] == ["acct.api-us1.com"]
    assert r["violations"][0]["gated"] is False
    # the name was not gated: the verdict does not call it a gated query
    assert r["problems"] == ["1 query for catalog names that this deployment does not gate "
                             "(gate.disabled_domains) resolved without consent"]


def test_the_problems_count_gated_and_ungated_names_apart() -> None:
    r = report([row(200, "forwarded"), row(201, "cached")], [row(10, "forwarded", name="acct.api-us1.com",
                                                                  vendor=None)], mode="full")
    assert r["problems"] == ["2 queries for gated names resolved without consent",
                             "1 query for catalog names that this deployment does not gate "
                             "(gate.disabled_domains) resolved without consent"]
    assert [v["gated"] for v in r["violations"]] == [True, True, False]


def test_dropped_entries_or_no_log_make_the_evidence_incomplete() -> None:
    assert report([], dropped=4)["verdict"] == "fail"
    assert report([], mode="off")["verdict"] == "fail"
    assert report([])["verdict"] == "pass"


def test_junit_has_a_case_per_client_and_vendor() -> None:
    r = report([row(100, "sinkholed", client="10.0.0.1"), row(200, "forwarded", client="10.0.0.2")])
    suite = ET.fromstring(junit(r)).find("testsuite")
    assert suite is not None and (suite.get("tests"), suite.get("failures")) == ("3", "1")
    failed = suite.find("testcase[@classname='dnsgate.evidence.client_10_0_0_2']/failure")
    assert failed is not None and "without a grant" in (failed.get("message") or "")
    names = {(c.get("classname"), c.get("name")) for c in suite.iter("testcase")}
    assert ("dnsgate.evidence.client_10_0_0_1", "10.0.0.1 activecampaign: nothing resolved without consent") in names


@pytest.mark.parametrize(("client", "classname"), [
    ("192.168.1.20", "dnsgate.evidence.client_192_168_1_20"), ("2001:db8::1", "dnsgate.evidence.client_2001_db8__1"),
    ("anon-3f2a", "dnsgate.evidence.client_anon-3f2a")])
def test_junit_class_names_have_no_dots_from_addresses(client: str, classname: str) -> None:
    suite = ET.fromstring(junit(report([row(100, "sinkholed", client=client)]))).find("testsuite")
    assert suite is not None
    classes = [c.get("classname") for c in suite.iter("testcase")]
    assert classes == [classname, "dnsgate.evidence"]  # CI tools split at dots: exactly one package


@pytest.mark.parametrize(("text", "expected"), [
    ("2026-11-28T10:00:00Z", 1795860000.0), ("2026-11-28T11:00:00+01:00", 1795860000.0),
    ("2026-11-28T10:00:00", 1795860000.0), ("1795860000", 1795860000.0), ("15m", 1795860000.0 - 900),
    ("2h", 1795860000.0 - 7200), ("1.5d", 1795860000.0 - 129600), ("30s", 1795860000.0 - 30)])
def test_parse_time(text: str, expected: float) -> None:
    assert parse_time(text, 1795860000.0, "since") == expected


def test_counts_by_type_protocol_and_outcome_and_the_log_entries(clock: Clock) -> None:
    p = build(clock)
    gated: list[LogEntry] = []
    plain: list[LogEntry] = []
    p.log_gated, p.log_all = gated.append, plain.append
    forward(p, query("host.example.test", "AAAA"), "host.example.test. 300 IN AAAA 2001:db8::10")
    p.answer(query("host.example.test", "AAAA").to_wire(), "10.0.0.1", True)  # cached, over TCP
    p.answer(query("trackcmp.net", "HTTPS").to_wire(), "10.0.0.1", False)  # sinkholed, fast path
    p.answer(query("trackcmp.net", "TYPE300").to_wire(), "10.0.0.1", False)  # sinkholed, type >= 256
    grant(p, "10.0.0.2")
    forward(p, query("trackcmp.net"), "trackcmp.net. 300 IN A 198.51.100.1", client="10.0.0.2")
    p.answer(query("trackcmp.net").to_wire(), "10.0.0.2", False)  # allowed, from the cache
    counts = {(t, proto, o): n for t, proto, o, n in p.counters.series() if n}
    assert counts == {("AAAA", "udp", "forwarded"): 1, ("AAAA", "tcp", "cached"): 1, ("HTTPS", "udp", "sinkholed"): 1,
                      ("OTHER", "udp", "sinkholed"): 1, ("A", "udp", "forwarded"): 1, ("A", "udp", "cached"): 1}
    assert [(e[1], e[4]) for e in plain] == [("127.0.0.1", FORWARDED), ("10.0.0.1", CACHED)]
    assert [(e[4], e[7] is not None) for e in gated] == [(SINKHOLED, False), (SINKHOLED, False),
                                                         (FORWARDED, True), (CACHED, True)]
    assert gated[3][7] == Grant("marketing", 0.0, 2_000_000_000.0, "self")  # the grant that allowed it
    assert p.durations.count == 2


def test_sinkholed_log_entries_hold_nothing_the_cycle_collector_must_walk(clock: Clock) -> None:
    # A flood of blocked queries queues ~10 000 entries a second: they must not pile up in the
    # old generation (each full GC pass walked ~40 000 of them, up to 57 ms, before).
    p = build(clock)
    gated: list[LogEntry] = []
    p.log_gated = gated.append
    p.answer(query("trackcmp.net").to_wire(), "10.0.0.1", False)  # fast path
    p._answer_general(query("x.trackcmp.net", "AAAA").to_wire(), "10.0.0.1", False)
    assert [e[6] for e in gated] == [("activecampaign", "marketing")] * 2
    gc.collect()
    assert not any(gc.is_tracked(e) for e in gated)


def test_fast_and_general_paths_count_alike(clock: Clock) -> None:
    p = build(clock)
    forward(p, query("host.example.test"), "host.example.test. 300 IN A 192.0.2.10")
    for q in (query("host.example.test"), query("trackcmp.net", "AAAA")):
        before = list(p.counters.counts)
        p.answer(q.to_wire(), "10.0.0.1", False)
        fast = [b - a for a, b in zip(before, p.counters.counts, strict=True)]
        p._answer_general(q.to_wire(), "10.0.0.1", False)
        general = [b - a - f for a, b, f in zip(before, p.counters.counts, fast, strict=True)]
        assert fast == general and sum(fast) == 1


def test_rejections_are_counted_without_a_question(clock: Clock) -> None:
    p = build(clock)
    p.answer(b"\x01\x02\x01\x00\x00\x01" + b"\xff" * 20, "10.0.0.1", False)
    p.answer(b"\x00" * 5, "10.0.0.1", False)
    counts = {(t, o): n for t, _, o, n in p.counters.series() if n}
    assert counts == {("NONE", "formerr"): 1, ("NONE", "dropped"): 1}


def test_servfail_of_a_gated_query_is_recorded_as_evidence(clock: Clock) -> None:
    p = build(clock)
    gated: list[LogEntry] = []
    p.log_gated = gated.append
    grant(p, "10.0.0.2")
    out = p.answer(query("trackcmp.net").to_wire(), "10.0.0.2", False)
    assert isinstance(out, Forward)
    dns.message.from_wire(p.servfail(out))
    assert [e[4] for e in gated] == [3]  # SERVFAIL outcome, nothing resolved


async def test_consent_watch_publishes_the_consent_logs_events_and_counts_them() -> None:
    hub = EventHub()
    now = 1_000_000.0
    watch = ConsentWatch(hub, str)
    me = Subject("10.0.0.1")
    async with hub.subscribe() as events:
        watch.changed(ConsentEvent("grant", now, me, "opt-in", {"marketing": True, "analytics": False},
                                   expires_at=now + 60, channel="portal", id=1))
        watch.changed(ConsentEvent("expiry", now + 60, me, "opt-in", {"marketing": True}, expires_at=now + 60,
                                   supersedes=1, id=2))
        watch.changed(ConsentEvent("refusal", now, Subject("10.0.0.9"), "opt-in", {"marketing": False}, id=3))
        granted, expired, refused = [await asyncio.wait_for(events.get(), 2) for _ in range(3)]
    assert (granted["action"], expired["action"], refused["action"]) == ("grant", "expiry", "refusal")
    assert granted["categories"] == ["marketing"] and granted["source"] == "self" and granted["client"] == "10.0.0.1"
    assert watch.changes == {"grant": 1, "refusal": 1, "withdrawal": 0, "expiry": 1, "reset": 0, "profile_change": 0}


async def test_a_consent_event_nobody_gets_is_counted_but_not_built() -> None:
    hub = EventHub()
    labelled: list[str] = []

    def label(client: str) -> str:
        labelled.append(client)
        return client

    watch = ConsentWatch(hub, label)
    grant = ConsentEvent("grant", 1_000_000.0, Subject("10.0.0.1"), "opt-in", {"marketing": True}, id=1)
    watch.changed(grant)  # no subscriber, no webhook
    assert (labelled, hub.published, watch.changes["grant"]) == ([], 1, 1)
    async with hub.subscribe() as events:
        watch.changed(grant)
        assert (await asyncio.wait_for(events.get(), 2))["client"] == "10.0.0.1"
    assert (labelled, hub.published, watch.changes["grant"]) == (["10.0.0.1"], 2, 2)


def test_json_logs_are_one_object_per_line() -> None:
    out = io.StringIO()
    setup_logging("info", "json", out)
    try:
        logging.getLogger("dnsgate.test").info("consent granted: client=%s", "10.0.0.1")
        logging.getLogger("dnsgate.test").debug("not at info")
    finally:
        setup_logging("warning", "text")
    (line,) = out.getvalue().splitlines()
    record = json.loads(line)
    assert record["msg"] == "consent granted: client=10.0.0.1" and record["level"] == "info"
    assert record["logger"] == "dnsgate.test" and record["ts"].endswith("Z")


async def test_the_log_takes_entries_off_the_loop_in_small_steps_and_writes_on_its_interval(
        clock: Clock, tmp_path: Path) -> None:
    # A flood's second of entries taken at once held the event loop for ~23 ms (70 000 entries).
    # The write is waited for, not timed: a loaded machine may take a while to finish it.
    p = build(clock)
    interval = 1.5
    log = QueryLog(QueryLogConfig(flush_interval=interval), QueryLogDb(tmp_path / "q.sqlite3"),
                   EventHub("", 1.0), key=b"", sinkhole_rcode=3)
    p.log_gated, p.log_all = log.sinks()
    loop = asyncio.get_running_loop()
    started = loop.time()
    task = asyncio.create_task(log.run())
    try:
        p.answer(query("trackcmp.net").to_wire(), "10.0.0.1", False)
        await asyncio.sleep(0.3)
        if loop.time() - started < interval:  # (unless this process was held up past the interval)
            assert not log.pending and log.queued == 1 and log.written == 0  # taken, not yet written
        assert log.gated == {("activecampaign", "sinkholed"): 1}

        async def written() -> bool:
            return log.written > 0

        await eventually(written, 10.0)
        assert loop.time() - started >= interval  # on its interval, not before
        assert log.queued == 0 and log.written == 1
    finally:
        task.cancel()
        await log.close()


@pytest.mark.parametrize("mode", ["gated-only", "full"])
async def test_take_counts_gated_queries_per_vendor_and_keeps_clients_in_last_seen_order(
        mode: Literal["gated-only", "full"], tmp_path: Path) -> None:
    """What `take` derives from a batch (counted in C passes when every entry is gated, as in
    gated-only mode): queries per vendor and decision, and per client the last time it asked for a
    gated name and the last time one was answered."""
    mono = [1000.0]
    log = QueryLog(QueryLogConfig(mode=mode), QueryLogDb(tmp_path / "q.sqlite3"), EventHub("", 1.0), key=b"",
                   sinkhole_rcode=3, mono=lambda: mono[0])
    vendor, other = ("activecampaign", "marketing"), ("hotjar", "analytics")
    question = query("trackcmp.net").to_wire()[12:]
    entries: list[LogEntry] = [
        (1.0, "10.0.0.1", question, 0, SINKHOLED, -1, vendor, None, 0.0),
        (2.0, "10.0.0.2", question, 0, SINKHOLED, -1, other, None, 0.0),
        (3.0, "10.0.0.1", question, 0, CACHED, 0, vendor, None, 0.0),
        (4.0, "10.0.0.1", question, 0, SINKHOLED, -1, vendor, None, 0.0),
    ]
    if mode == "full":  # queries for names nobody gates: in the log, never counted as gated
        entries[1:1] = [(1.5, "10.0.0.3", question, 0, CACHED, 0, None, None, 0.0)]
        entries.append((5.0, "10.0.0.2", question, 0, FORWARDED, 0, None, None, 0.01))
    try:
        log.pending.extend(entries)
        log.take()
        assert log.gated == {("activecampaign", "sinkholed"): 2, ("activecampaign", "allowed"): 1,
                             ("hotjar", "sinkholed"): 1}
        assert log._gated_clients == {"10.0.0.2": (2.0, -math.inf), "10.0.0.1": (4.0, 3.0)}
        assert list(log._gated_clients) == ["10.0.0.1", "10.0.0.2"]  # in the order each was first seen here
        assert log.tracker_clients_since(2.0) == (2, 1) and log.tracker_clients_since(3.5) == (1, 0)
        # a later batch: 10.0.0.2 asks again (it moves to the end), and its earlier answer is kept
        # (a flood's batch: one vendor and outcome throughout)
        log.pending.extend([(5.5, "10.0.0.2", question, 0, SINKHOLED, -1, other, None, 0.0),
                            (6.0, "10.0.0.2", question, 0, SINKHOLED, -1, other, None, 0.0)])
        log.take()
        assert log.gated[("hotjar", "sinkholed")] == 3
        assert list(log._gated_clients) == ["10.0.0.1", "10.0.0.2"]
        assert log._gated_clients["10.0.0.2"] == (6.0, -math.inf)
        log.pending.append((7.0, "10.0.0.1", question, 0, SINKHOLED, -1, vendor, None, 0.0))
        log.take()
        assert list(log._gated_clients) == ["10.0.0.2", "10.0.0.1"]
        assert log._gated_clients["10.0.0.1"] == (7.0, 3.0)  # its last allowed query stays
        assert log.gated[("activecampaign", "sinkholed")] == 3
        await log.flush()
        assert log.written == len(entries) + 3
    finally:
        await log.close()
