"""The query log API, the event stream, the webhook and /metrics over real HTTP, and the log's
privacy modes, retention and overflow against a real SQLite file."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from dnsgate.config import EventsConfig, QueryLogConfig
from tests.conftest import TOKEN, Gate, make_config, running_gate
from tests.support.stub_upstream import StubUpstream

GRANT = {"categories": ["marketing"]}


def log_config(**kw: Any) -> QueryLogConfig:
    return replace(QueryLogConfig(), **kw)


async def test_gated_only_keeps_only_gated_names(gate: Gate) -> None:
    await gate.query("host.example.test", source="127.0.0.51")
    await gate.query("trackcmp.net", source="127.0.0.51")
    status, body = await gate.http("GET", "/v1/queries", admin=True)
    assert status == 200 and body["mode"] == "gated-only"
    (entry,) = body["entries"]
    assert (entry["client"], entry["name"], entry["type"], entry["outcome"], entry["rcode"], entry["vendor"]) == \
        ("127.0.0.51", "trackcmp.net", "A", "sinkholed", 3, "activecampaign")
    assert entry["consent"] is None and entry["protocol"] == "udp"


async def test_full_mode_filters_and_order(upstream: StubUpstream, data_dir: Path) -> None:
    async with running_gate(make_config(upstream, data_dir, querylog=log_config(mode="full"))) as g:
        await g.query("host.example.test", source="127.0.0.52")
        await g.query("HOST.example.test", "AAAA", source="127.0.0.52", tcp=True)
        await g.query("other.example.test", source="127.0.0.53")
        await g.query("x.trackcmp.net", source="127.0.0.53")
        await g.http("PUT", "/v1/consent", source="127.0.0.53", json=GRANT)
        await g.query("x.trackcmp.net", source="127.0.0.53")
        await g.query("nx.example.test", source="127.0.0.53")

        async def names(query: str) -> list[tuple[str, str, str]]:
            status, body = await g.http("GET", "/v1/queries?" + query, admin=True)
            assert status == 200, body
            return [(e["name"], e["type"], e["outcome"]) for e in body["entries"]]

        assert await names("client=127.0.0.52&order=oldest") == [
            ("host.example.test", "A", "forwarded"), ("host.example.test", "AAAA", "forwarded")]
        assert await names("name=*.trackcmp.net") == [("x.trackcmp.net", "A", "forwarded"),
                                                       ("x.trackcmp.net", "A", "sinkholed")]
        assert await names("vendor=activecampaign&outcome=forwarded") == [("x.trackcmp.net", "A", "forwarded")]
        assert await names("name=NX.example.test.") == [("nx.example.test", "A", "forwarded")]
        assert len(await names("limit=2")) == 2
        assert await names("since=1h&until=2000000000&client=127.0.0.52&outcome=cached") == []
        _, body = await g.http("GET", "/v1/queries?client=127.0.0.52&order=oldest", admin=True)
        first = body["entries"][0]["id"]
        assert await names(f"after={first}&client=127.0.0.52") == [("host.example.test", "AAAA", "forwarded")]
        _, body = await g.http("GET", "/v1/queries?name=nx.example.test", admin=True)
        assert body["entries"][0]["rcode"] == 3 and body["entries"][0]["duration_ms"] > 0


async def test_anonymous_mode_hashes_clients_and_still_filters(upstream: StubUpstream, data_dir: Path) -> None:
    async with running_gate(make_config(upstream, data_dir, querylog=log_config(mode="anonymous"))) as g:
        await g.query("host.example.test", source="127.0.0.54")
        await g.query("trackcmp.net", source="127.0.0.55")
        _, body = await g.http("GET", "/v1/queries?client=127.0.0.54", admin=True)
        (entry,) = body["entries"]
        assert entry["client"].startswith("anon-") and "127.0.0.54" not in json.dumps(body)
        _, report = await g.http("GET", "/v1/report?client=127.0.0.55", admin=True)
        assert report["clients"][0]["client"].startswith("anon-") and report["totals"]["sinkholed"] == 1
    with sqlite3.connect(data_dir / "querylog.sqlite3") as db:
        clients = {c for (c,) in db.execute("SELECT client FROM queries")}
    assert len(clients) == 2 and not any(c.startswith("127.") for c in clients)
    assert (data_dir / "querylog.key").stat().st_mode & 0o777 == 0o600


async def test_off_mode_writes_nothing(upstream: StubUpstream, data_dir: Path) -> None:
    async with running_gate(make_config(upstream, data_dir, querylog=log_config(mode="off"))) as g:
        await g.query("trackcmp.net")
        status, body = await g.http("GET", "/v1/queries", admin=True)
        assert status == 409 and body["error"]["code"] == "querylog_off"
        _, report = await g.http("GET", "/v1/report", admin=True)
        assert report["verdict"] == "fail" and "off" in report["problems"][0]
    assert not (data_dir / "querylog.sqlite3").exists()


async def test_overflow_is_dropped_counted_and_fails_the_report(upstream: StubUpstream, data_dir: Path) -> None:
    cfg = make_config(upstream, data_dir, querylog=log_config(queue_size=2, flush_interval=60.0))
    async with running_gate(cfg) as g:
        for _ in range(5):
            await g.query("trackcmp.net")
        _, report = await g.http("GET", "/v1/report", admin=True)
        assert report["querylog"]["dropped"] == 3 and report["totals"]["sinkholed"] == 2
        assert report["verdict"] == "fail" and "dropped" in report["problems"][0]
        _, text = await g.http("GET", "/metrics")
        assert "dnsgate_querylog_dropped_total 3.0" in text
        # the vendor count is taken before the drop: /metrics still counts every query
        assert 'dnsgate_gated_queries_total{decision="sinkholed",vendor="activecampaign"} 5.0' in text


async def test_retention_by_rows(upstream: StubUpstream, data_dir: Path) -> None:
    cfg = make_config(upstream, data_dir, querylog=log_config(mode="full", max_rows=3))
    async with running_gate(cfg) as g:
        for i in range(6):
            await g.query(f"n{i}.example.test")
        _, body = await g.http("GET", "/v1/queries", admin=True)
        assert [e["name"] for e in body["entries"]] == [f"n{i}.example.test" for i in (5, 4, 3)]


@pytest.mark.parametrize(
    ("query", "field"),
    [("client=nope", "client"), ("outcome=blocked", "outcome"), ("limit=0", "limit"), ("since=yesterday", "since"),
     ("after=x", "after"), ("order=random", "order"), ("name=", "name")],
)
async def test_bad_query_parameters_are_400_naming_the_field(gate: Gate, query: str, field: str) -> None:
    status, body = await gate.http("GET", "/v1/queries?" + query, admin=True)
    assert status == 400 and body["error"]["field"] == field


@pytest.mark.parametrize("path", ["/v1/queries", "/v1/report", "/v1/events", "/v1/top"])
async def test_log_report_and_events_need_the_admin_token(gate: Gate, path: str) -> None:
    status, body = await gate.http("GET", path)
    assert status == 401 and body["error"]["code"] == "unauthorized"


async def test_report_window_and_format_errors(gate: Gate) -> None:
    status, body = await gate.http("GET", "/v1/report?since=2026-01-02T00:00:00Z&until=2026-01-01", admin=True)
    assert status == 400 and body["error"]["field"] == "until"
    status, body = await gate.http("GET", "/v1/report?format=pdf", admin=True)
    assert status == 400 and body["error"]["field"] == "format"
    status, body = await gate.http("GET", "/v1/report?format=junit", admin=True)
    assert status == 200 and body.startswith("<?xml") and 'failures="0"' in body


async def test_the_report_runs_until_now_by_default(gate: Gate) -> None:
    status, body = await gate.http("GET", "/v1/report?since=1h", admin=True)
    assert status == 200 and body["until"] == body["generated_at"]  # not a second into the future


async def read_events(response: aiohttp.ClientResponse, n: int) -> list[tuple[str, dict[str, Any]]]:
    events: list[tuple[str, dict[str, Any]]] = []
    kind = ""
    while len(events) < n:
        line = (await asyncio.wait_for(response.content.readline(), 5)).decode().rstrip("\n")
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            events.append((kind, json.loads(line[6:])))
    return events


async def test_event_stream_carries_decisions_and_consent_changes(gate: Gate) -> None:
    async with aiohttp.ClientSession() as session, session.get(
            gate.api_url + "/v1/events", headers={"Authorization": f"Bearer {TOKEN}"}) as response:
        assert response.status == 200 and response.content_type == "text/event-stream"
        assert await response.content.readline() == b": dnsgate events\n"  # subscribed: events flow from here
        await gate.query("trackcmp.net", source="127.0.0.56")
        await gate.http("PUT", "/v1/consent", source="127.0.0.56", json=GRANT)
        await gate.query("trackcmp.net", source="127.0.0.56")
        await gate.http("DELETE", "/v1/consent", source="127.0.0.56")
        await gate.http("PUT", "/v1/consent", source="127.0.0.57", json={"categories": []})
        await gate.http("GET", "/metrics")  # makes the log hand over what it holds (it would within 1 s)
        events = await read_events(response, 5)
    decisions = [e for k, e in events if k == "decision"]
    consents = [(e["client"], e["action"]) for k, e in events if k == "consent"]
    assert [(d["client"], d["name"], d["decision"]) for d in decisions] == [
        ("127.0.0.56", "trackcmp.net", "sinkholed"), ("127.0.0.56", "trackcmp.net", "allowed")]
    assert decisions[1]["grant_expires_at"] is not None
    assert consents == [("127.0.0.56", "grant"), ("127.0.0.56", "withdrawal"), ("127.0.0.57", "refusal")]


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[str, list[Any], asyncio.Event]]:
    received: list[Any] = []
    arrived = asyncio.Event()

    async def hook(request: web.Request) -> web.Response:
        received.extend(await request.json())
        arrived.set()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}/hook", received, arrived
    await runner.cleanup()


async def test_webhook_receives_consent_changes(upstream: StubUpstream, data_dir: Path,
                                                receiver: tuple[str, list[Any], asyncio.Event]) -> None:
    url, received, arrived = receiver
    cfg = make_config(upstream, data_dir, events=replace(EventsConfig(), webhook_url=url))
    async with running_gate(cfg) as g:
        await g.http("PUT", "/v1/consent", source="127.0.0.58", json=GRANT)
        await asyncio.wait_for(arrived.wait(), 5)
    assert received[0]["type"] == "consent" and received[0]["action"] == "grant"
    assert received[0]["client"] == "127.0.0.58" and received[0]["categories"] == ["marketing"]


async def test_metrics_counts_by_type_protocol_and_outcome(gate: Gate) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    await gate.query("host.example.test", "AAAA", tcp=True)
    await gate.query("host.example.test", "AAAA", tcp=True)
    await gate.query("host.example.test", "TYPE65280")
    await gate.query("x.trackcmp.net", "HTTPS", tcp=True)
    status, text = await gate.http("GET", "/metrics")
    assert status == 200
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for f in text_string_to_metric_families(text) for s in f.samples}
    q = "dnsgate_queries_total"
    assert got[(q, (("outcome", "forwarded"), ("protocol", "tcp"), ("type", "AAAA")))] == 1
    assert got[(q, (("outcome", "cached"), ("protocol", "tcp"), ("type", "AAAA")))] == 1
    assert got[(q, (("outcome", "forwarded"), ("protocol", "udp"), ("type", "OTHER")))] == 1
    assert got[(q, (("outcome", "sinkholed"), ("protocol", "tcp"), ("type", "HTTPS")))] == 1
    assert got[("dnsgate_cache_hits_total", ())] == 1 and got[("dnsgate_cache_misses_total", ())] == 2
    assert got[("dnsgate_query_duration_seconds_count", ())] == 2
    (build,) = [dict(labels) for name, labels in got if name == "dnsgate_build_info"]
    assert build["version"] == "0.1.0" and build["catalog"] == "2026-11-28" and build["python"]
    # bounded labels: never a client address or a queried name (the upstream label is configuration)
    assert not any(v == "127.0.0.1" or "example" in v for _, labels in got for _, v in labels)


async def test_top_names_clients_and_timeline(upstream: StubUpstream, data_dir: Path) -> None:
    async with running_gate(make_config(upstream, data_dir, querylog=log_config(mode="full"))) as g:
        for _ in range(3):
            await g.query("host.example.test", source="127.0.0.61")
        await g.query("trackcmp.net", source="127.0.0.61")
        await g.http("PUT", "/v1/consent", source="127.0.0.62", json=GRANT)
        await g.query("trackcmp.net", source="127.0.0.62")
        await g.query("x.trackcmp.net", source="127.0.0.62")
        await g.query("nx.example.test", "AAAA", source="127.0.0.62")
        status, top = await g.http("GET", "/v1/top?since=1h&limit=2", admin=True)
        assert status == 200, top
        assert top["mode"] == "full" and top["step"] == 120.0  # an hour in 30 buckets of 2 minutes
        assert top["names"] == [{"name": "host.example.test", "queries": 3}, {"name": "trackcmp.net", "queries": 2}]
        assert top["gated_names"] == [
            {"name": "trackcmp.net", "vendor": "activecampaign", "queries": 2, "blocked": 1, "allowed": 1},
            {"name": "x.trackcmp.net", "vendor": "activecampaign", "queries": 1, "blocked": 0, "allowed": 1}]
        first, second = top["clients"]
        assert (first["client"], first["queries"], first["gated"], first["blocked"], first["allowed"]) == \
            ("127.0.0.61", 4, 1, 1, 0)
        assert first["consent"] == {"profile": "opt-in", "choice": False, "granted": [], "refused": [],
                                    "expires_at": None}
        assert (second["client"], second["queries"], second["allowed"]) == ("127.0.0.62", 3, 2)
        assert second["consent"]["choice"] is True and second["consent"]["granted"] == ["marketing"]
        kinds: dict[str, int] = {}
        types: dict[str, int] = {}
        for bucket in top["timeline"]:
            for k, n in bucket["kinds"].items():
                kinds[k] = kinds.get(k, 0) + n
            for k, n in bucket["types"].items():
                types[k] = types.get(k, 0) + n
        # the first host.example.test forwarded, the next two from the cache; nx forwarded (NXDOMAIN)
        assert kinds == {"forwarded": 2, "cached": 2, "gated": 1, "allowed": 2}
        assert types == {"A": 6, "AAAA": 1}
        assert [sum(b["actions"].values()) for b in top["consent_changes"]] == [1]
        assert top["consent_changes"][0]["actions"] == {"grant": 1}
        # A window with nothing in it, and one that is not a window.
        status, top = await g.http("GET", "/v1/top?since=2000-01-01T00:00:00Z&until=2000-01-02T00:00:00Z", admin=True)
        assert status == 200 and top["names"] == top["clients"] == top["timeline"] == []
        status, body = await g.http("GET", "/v1/top?since=1h&until=2h", admin=True)
        assert status == 400 and body["error"]["field"] == "until"
        status, body = await g.http("GET", "/v1/top?limit=101", admin=True)
        assert status == 400 and body["error"]["field"] == "limit"


async def test_queries_page_back_search_names_and_pick_gated(upstream: StubUpstream, data_dir: Path) -> None:
    async with running_gate(make_config(upstream, data_dir, querylog=log_config(mode="full"))) as g:
        for name in ("host.example.test", "trackcmp.net", "other.example.test", "x.trackcmp.net", "nottrackcmp.net"):
            await g.query(name, source="127.0.0.63")

        async def names(query: str) -> list[str]:
            status, body = await g.http("GET", "/v1/queries?" + query, admin=True)
            assert status == 200, body
            return [e["name"] for e in body["entries"]]

        _, body = await g.http("GET", "/v1/queries?limit=2", admin=True)
        assert [e["name"] for e in body["entries"]] == ["nottrackcmp.net", "x.trackcmp.net"]
        older = body["entries"][-1]["id"]
        assert await names(f"limit=2&before={older}") == ["other.example.test", "trackcmp.net"]
        assert await names("gated=true") == ["x.trackcmp.net", "trackcmp.net"]
        assert await names("gated=false&name=*example*") == ["other.example.test", "host.example.test"]
        assert await names("name=*track*") == ["nottrackcmp.net", "x.trackcmp.net", "trackcmp.net"]
        assert await names("name=*.trackcmp.net") == ["x.trackcmp.net", "trackcmp.net"]  # as before: and the apex
        assert await names("name=*_*") == []  # LIKE's own wildcards are plain characters
        for query, field in (("before=x", "before"), ("gated=yes", "gated")):
            status, body = await g.http("GET", "/v1/queries?" + query, admin=True)
            assert status == 400 and body["error"]["field"] == field
