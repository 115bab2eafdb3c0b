"""The gate's promise, end to end: an application runs against dnsgate before and after a consent grant;
/v1/report proves its trackers were blocked before and allowed after (with the grant that allowed
each answer), and /metrics, read with the Prometheus text parser, shows the same counts. A run
where a tracker resolved without consent (its domain switched off) fails the verdict, and
`dnsgate report` exits 1 on it so a CI job can gate on it."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from dnsgate.config import GateConfig, QueryLogConfig
from tests.conftest import TOKEN, Gate, make_config, running_gate
from tests.support.page_app import FIRST_PARTY, TRACKERS
from tests.support.stub_upstream import StubUpstream

ROOT = Path(__file__).resolve().parents[2]
APP = "127.0.0.31"


async def run_app(gate: Gate, source: str, *extra: str) -> dict[str, Any]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.support.page_app", "--server", "127.0.0.1", "--port", str(gate.dns_port),
        "--source", source, *extra, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    result: dict[str, Any] = json.loads(out)
    return result


async def cli(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dnsgate", *args, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def ts(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a /metrics page, parsed by prometheus_client's own parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def total(parsed: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in parsed.items() if n == name and set(labels.items()) <= ls)


async def test_blocked_before_consent_allowed_after_proved_by_report_and_metrics(gate: Gate) -> None:
    started = time.time() - 1
    before = await run_app(gate, APP)
    for name, rdtype in TRACKERS:
        assert before[f"{name} {rdtype}"]["rcode"] == "NXDOMAIN"
    for name, rdtype in FIRST_PARTY:
        assert before[f"{name} {rdtype}"]["rcode"] == "NOERROR"

    status, granted = await gate.http("PUT", "/v1/consent", source=APP, json={"categories": ["marketing"]})
    assert status == 200
    grant = granted["categories"]["marketing"]
    granted_at = ts(grant["granted_at"])  # whole seconds in the consent API

    after = await run_app(gate, APP)
    for name, rdtype in TRACKERS:
        assert after[f"{name} {rdtype}"]["rcode"] == "NOERROR"
    assert after["trackcmp.net A"]["addresses"] == ["198.51.100.1"]

    status, report = await gate.http("GET", f"/v1/report?since={started:.3f}", admin=True)
    assert status == 200
    assert report["verdict"] == "pass", report["problems"]
    assert report["problems"] == [] and report["violations"] == []
    (client,) = report["clients"]
    assert client["client"] == APP
    (ac,) = client["vendors"]
    n = len(TRACKERS)
    assert (ac["vendor"], ac["category"]) == ("activecampaign", "marketing")
    assert (ac["queries"], ac["sinkholed"], ac["allowed"]) == (2 * n, n, n)
    assert ts(ac["first_seen"]) < granted_at + 1 and granted_at <= ts(ac["last_seen"])
    allowed = ac["allowed_queries"]
    assert sorted((q["name"], q["type"]) for q in allowed) == sorted(TRACKERS)
    for q in allowed:  # the consent state at each allowed query: the grant that allowed it
        consent = q["consent"]
        assert (consent["category"], consent["source"]) == ("marketing", "self")
        assert int(ts(consent["granted_at"])) == granted_at
        assert int(ts(consent["expires_at"])) == ts(grant["expires_at"])
        assert ts(q["at"]) >= ts(consent["granted_at"])

    # Every blocked query came before the grant, every allowed one after it.
    status, log = await gate.http("GET", f"/v1/queries?client={APP}&vendor=activecampaign&limit=100", admin=True)
    assert status == 200
    exact_grant = ts(allowed[0]["consent"]["granted_at"])
    assert len(log["entries"]) == 2 * n
    assert all(ts(e["at"]) < exact_grant for e in log["entries"] if e["outcome"] == "sinkholed")
    assert all(ts(e["at"]) >= exact_grant for e in log["entries"] if e["outcome"] != "sinkholed")

    status, text = await gate.http("GET", "/metrics")
    assert status == 200
    parsed = samples(text)
    assert total(parsed, "dnsgate_gated_queries_total", vendor="activecampaign", decision="sinkholed") \
        == ac["sinkholed"] == report["totals"]["sinkholed"]
    assert total(parsed, "dnsgate_gated_queries_total", vendor="activecampaign", decision="allowed") \
        == ac["allowed"] == report["totals"]["allowed"]
    assert total(parsed, "dnsgate_queries_total", outcome="sinkholed") == n
    # every query the app sent is counted once, by type and outcome
    assert total(parsed, "dnsgate_queries_total") == 2 * (n + len(FIRST_PARTY))
    assert total(parsed, "dnsgate_queries_total", type="HTTPS", outcome="sinkholed") == 2
    assert total(parsed, "dnsgate_queries_total", protocol="tcp") == 0
    assert total(parsed, "dnsgate_consent_changes_total", action="grant") == 1
    assert total(parsed, "dnsgate_clients_with_consent", category="marketing") == 1
    assert total(parsed, "dnsgate_upstream_queries_total") >= 1
    assert total(parsed, "dnsgate_upstream_latency_seconds_count") >= 1
    assert total(parsed, "dnsgate_cache_hits_total") == total(parsed, "dnsgate_queries_total", outcome="cached")

    code, out, err = await cli("report", "--api", str(gate.running.api), "--token", TOKEN, "--since", f"{started:.3f}")
    assert code == 0, err
    assert json.loads(out)["verdict"] == "pass"


async def test_a_tracker_resolved_without_consent_fails_the_verdict(upstream: StubUpstream, data_dir: Path,
                                                                     tmp_path: Path) -> None:
    # The office switched the REST API off the gate; the CI network logs every query, so the report
    # sees the tracker's name resolve although nobody consented.
    cfg = make_config(upstream, data_dir, gate=replace(GateConfig(), disabled_domains=("*.api-us1.com",)),
                      querylog=replace(QueryLogConfig(), mode="full"))
    async with running_gate(cfg) as gate:
        started = time.time() - 1
        result = await run_app(gate, APP, "--rest-api")
        assert result["acct.api-us1.com A"]["rcode"] == "NOERROR"  # let through: not gated here
        assert result["trackcmp.net A"]["rcode"] == "NXDOMAIN"

        status, report = await gate.http("GET", f"/v1/report?since={started:.3f}", admin=True)
        assert status == 200
        assert report["verdict"] == "fail"
        (violation,) = report["violations"]
        assert violation["client"] == APP and violation["name"] == "acct.api-us1.com"
        assert violation["vendor"] == "activecampaign" and "gate.disabled_domains" in violation["reason"]

        out_file = tmp_path / "evidence.xml"
        code, _, err = await cli("report", "--api", str(gate.running.api), "--token", TOKEN, "--since", "10m",
                                 "--format", "junit", "--output", str(out_file))
        assert code == 3, err  # a failed verdict, told apart from a dnsgate it could not ask (1)
        assert "verdict fail" in err
        suite = ET.parse(out_file).getroot().find("testsuite")
        assert suite is not None and suite.get("failures") == "1"
        failure = suite.find(f"testcase[@classname='dnsgate.evidence.client_{APP.replace('.', '_')}']/failure")
        assert failure is not None and "acct.api-us1.com" in (failure.text or "")
