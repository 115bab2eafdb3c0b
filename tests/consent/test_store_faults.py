"""The consent store unavailable (locked, corrupt, disk full): fail closed. Gated names stay blocked
for every client without a recorded grant, the API answers 503 with a clear error, DNS keeps
answering, and the error shows in the log, /healthz and /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import resource
import signal
import sqlite3
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import dns.asyncquery
import dns.message
import dns.rcode
import pytest

from dnsgate.config import ProfilesConfig
from tests.conftest import Gate, make_config, running_gate
from tests.support.consent_fixtures import OPT_OUT, PIXEL, consent_config, eventually, parse_jsonl, two_vendor_catalog
from tests.support.consent_ledger import RunQueue
from tests.support.stub_upstream import StubUpstream

NXDOMAIN, NOERROR = dns.rcode.NXDOMAIN, dns.rcode.NOERROR


async def rcode(g: Gate, name: str, source: str) -> int:
    return (await g.query(name, source=source)).rcode()


async def metric(g: Gate, name: str) -> float:
    _, text = await g.http("GET", "/metrics")
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def corrupt(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_bytes(b"this is not a database, " * 200)


@pytest.mark.parametrize("profile", ["opt-in", "opt-out", "allow"])
async def test_corrupt_store_at_start_fails_closed(upstream: StubUpstream, data_dir: Path, profile: str,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    corrupt(data_dir / "consent.sqlite3")
    cfg = replace(make_config(upstream, data_dir), profiles=ProfilesConfig(default=profile))  # type: ignore[arg-type]
    async with running_gate(cfg) as g:
        assert await rcode(g, "trackcmp.net", "127.0.0.1") == NXDOMAIN  # even where the profile would allow it
        assert await rcode(g, "host.example.test", "127.0.0.1") == NOERROR  # DNS keeps running
        status, body = await g.http("PUT", "/v1/consent", json={"categories": ["marketing"]})
        assert status == 503 and body["error"]["code"] == "consent_store_unavailable"
        assert "nothing was changed" in body["error"]["message"]
        assert await rcode(g, "trackcmp.net", "127.0.0.1") == NXDOMAIN
        assert (await g.http("GET", "/v1/audit", admin=True))[0] == 503
        health = (await g.http("GET", "/healthz"))[1]
        assert "file is not a database" in health["consent_store"]
        assert await metric(g, "dnsgate_consent_store_up") == 0
        assert await metric(g, "dnsgate_consent_store_errors_total") >= 2
    assert any(r.levelno == logging.ERROR and "consent store unavailable" in r.getMessage() for r in caplog.records)


async def test_locked_store_refuses_grants_and_still_honours_withdrawals(upstream: StubUpstream,
                                                                        data_dir: Path) -> None:
    async with running_gate(make_config(upstream, data_dir)) as g:
        assert (await g.http("PUT", "/v1/consent", json={"categories": ["marketing"]}, source="127.0.0.2"))[0] == 200
        assert await rcode(g, "trackcmp.net", "127.0.0.2") == NOERROR
        locker = sqlite3.connect(data_dir / "consent.sqlite3", isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")  # another process holds the database
        try:
            status, body = await g.http("PUT", "/v1/consent", json={"categories": ["marketing"]}, source="127.0.0.3")
            assert status == 503 and "locked" in body["error"]["message"]
            assert await rcode(g, "trackcmp.net", "127.0.0.3") == NXDOMAIN  # no recorded grant: blocked
            assert await rcode(g, "host.example.test", "127.0.0.3") == NOERROR
            status, body = await g.http("DELETE", "/v1/consent", source="127.0.0.2")
            assert status == 202 and "not recorded yet" in body["held"]  # held: in force, not yet recorded
            assert await rcode(g, "trackcmp.net", "127.0.0.2") == NXDOMAIN  # the "no" holds at once
            assert await metric(g, "dnsgate_consent_store_up") == 0
            assert await metric(g, "dnsgate_consent_withdrawals_held") == 1
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        await eventually(lambda: held_recorded(g), timeout=10.0)  # recorded once the lock is gone
        assert await rcode(g, "trackcmp.net", "127.0.0.2") == NXDOMAIN
        assert (await g.http("PUT", "/v1/consent", json={"categories": ["marketing"]}, source="127.0.0.3"))[0] == 200
        assert await rcode(g, "trackcmp.net", "127.0.0.3") == NOERROR
        assert await metric(g, "dnsgate_consent_store_up") == 1
        assert (await g.http("GET", "/healthz"))[1]["consent_store"] == "ok"
        log = parse_jsonl((await g.http("GET", "/v1/audit/export?format=jsonl", admin=True))[1])
        assert [(e["address"], e["action"]) for e in log] == [("127.0.0.2", "grant"), ("127.0.0.2", "withdrawal"),
                                                              ("127.0.0.3", "grant")]
        assert log[1]["supersedes"] == log[0]["id"]
    # After a restart the withdrawal still holds: it was recorded, not only applied in memory.
    async with running_gate(make_config(upstream, data_dir)) as g:
        assert await rcode(g, "trackcmp.net", "127.0.0.2") == NXDOMAIN
        assert await rcode(g, "trackcmp.net", "127.0.0.3") == NOERROR


async def held_recorded(g: Gate) -> bool:
    return await metric(g, "dnsgate_consent_withdrawals_held") == 0


def _limit_file_size(limit: int) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


async def test_full_disk_in_a_real_process(upstream: StubUpstream, tmp_path: Path) -> None:
    """dnsgate as a real process whose files cannot grow (RLIMIT_FSIZE): a grant cannot be written."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DNSGATE_")}
    env["DNSGATE_ADMIN_TOKEN"] = "t"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dnsgate", "serve", "--dns", "127.0.0.1:0", "--api", "127.0.0.1:0",
        "--upstream", upstream.address, "--data-dir", str(tmp_path), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env, preexec_fn=lambda: _limit_file_size(200_000))
    try:
        assert process.stdout is not None and process.stderr is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 15)).decode()
        dns_port = int(line.split("127.0.0.1:")[1].split(";")[0])
        api = "http://127.0.0.1:" + line.split("api http://127.0.0.1:")[1].split(";")[0]
        async with aiohttp.ClientSession() as session:
            statuses = []
            for i in range(200):  # each change grows the event log until the file may grow no more
                async with session.put(f"{api}/v1/clients/10.9.{i >> 8}.{i & 255}/consent",
                                       json={"categories": ["marketing"], "language": "en"},
                                       headers={"Authorization": "Bearer t"}) as r:
                    statuses.append(r.status)
                    if r.status == 503:
                        body = await r.json()
                        assert body["error"]["code"] == "consent_store_unavailable"
                        break
            assert statuses[-1] == 503 and statuses[0] == 200
            q = dns.message.make_query("host.example.test", "A")
            reply = await dns.asyncquery.udp(q, "127.0.0.1", port=dns_port, timeout=3)
            assert reply.rcode() == NOERROR  # DNS keeps running
            gated = await dns.asyncquery.udp(dns.message.make_query("trackcmp.net", "A"), "127.0.0.1",
                                             port=dns_port, timeout=3)
            assert gated.rcode() == NXDOMAIN
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(process.communicate(), 15)
    assert "consent store unavailable" in err.decode()


async def test_a_withdrawal_by_the_portal_form_holds_while_the_store_is_locked(upstream: StubUpstream,
                                                                               data_dir: Path) -> None:
    """The page's form (no JavaScript) during an outage: the withdrawal holds at once, the page says
    that it is not recorded yet, and it is recorded once the store answers."""
    async with running_gate(make_config(upstream, data_dir)) as g, aiohttp.ClientSession() as session:
        async with session.get(g.api_url + "/") as r:
            page = await r.text()
        token = re.search(r'name="token" value="([^"]+)"', page)
        version = re.search(r'name="notice_version" value="([^"]+)"', page)
        sha = re.search(r'name="notice_sha256" value="([^"]+)"', page)
        assert token and version and sha
        form = {"token": token[1], "notice_version": version[1], "notice_sha256": sha[1], "language": "en"}

        async def post(action: str) -> str:
            async with session.post(g.api_url + "/", data={**form, "action": action},
                                    allow_redirects=False) as r:
                assert r.status == 303
                return r.headers["Location"]

        assert await post("accept_all") == "/?done=granted"
        assert await rcode(g, "trackcmp.net", "127.0.0.1") == NOERROR
        locker = sqlite3.connect(data_dir / "consent.sqlite3", isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            assert await post("withdraw") == "/?done=held"
            assert await rcode(g, "trackcmp.net", "127.0.0.1") == NXDOMAIN
            async with session.get(g.api_url + "/?done=held") as r:
                assert "cannot record it right now" in await r.text()
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        await eventually(lambda: held_recorded(g), timeout=10.0)
        log = parse_jsonl((await g.http("GET", "/v1/audit/export?format=jsonl", admin=True))[1])
        assert [e["action"] for e in log] == ["grant", "withdrawal"] and log[1]["channel"] == "portal"


@contextlib.contextmanager
def locked(db: Path) -> Iterator[None]:
    """Another process's transaction holds the consent store for as long as the block runs."""
    locker = sqlite3.connect(db, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        locker.execute("ROLLBACK")
        locker.close()


async def test_what_a_choice_refuses_holds_at_once_though_its_grants_cannot_be_recorded(
        upstream: StubUpstream, data_dir: Path) -> None:
    """A choice that grants one vendor and refuses another the choice in force grants, while the store
    is locked: its grant is refused (503, nothing granted), but its refusal holds at once, as a
    withdrawal would, and is recorded once the store answers, so that a restart keeps it."""
    upstream.add(PIXEL, f"{PIXEL}. 300 IN A 198.51.100.9")
    client = "127.0.0.93"
    cfg = consent_config(make_config(upstream, data_dir), catalog=two_vendor_catalog(data_dir.parent))
    async with running_gate(cfg) as g:
        assert (await g.http("PUT", "/v1/consent", source=client, json={"categories": ["marketing"]}))[0] == 200
        assert await rcode(g, "trackcmp.net", client) == NOERROR and await rcode(g, PIXEL, client) == NOERROR
        with locked(data_dir / "consent.sqlite3"):
            change = asyncio.ensure_future(g.http("PUT", "/v1/consent", source=client,
                                                  json={"vendors": {"activecampaign": False, "pixelco": True}}))
            await asyncio.sleep(0.5)  # the store is still being waited for
            assert not change.done()
            assert await rcode(g, "trackcmp.net", client) == NXDOMAIN  # the "no" holds at once
            status, body = await change
            assert status == 503 and "not recorded yet" in body["held"], body
            assert "nothing this choice grants was changed" in body["error"]["message"]
            assert await rcode(g, "trackcmp.net", client) == NXDOMAIN
            assert await rcode(g, PIXEL, client) == NOERROR  # (granted before: the 503 takes nothing else away)
        await eventually(lambda: held_recorded(g), timeout=10.0)
        log = parse_jsonl((await g.http("GET", "/v1/audit/export?format=jsonl", admin=True))[1])
        assert [e["action"] for e in log] == ["grant", "refusal"], log
        assert log[1]["vendors"] == {"activecampaign": False} and log[1]["categories"]["marketing"] is True
        assert log[1]["supersedes"] == log[0]["id"]
    async with running_gate(cfg) as g:  # recorded, not only applied in memory
        assert await rcode(g, "trackcmp.net", client) == NXDOMAIN
        assert await rcode(g, PIXEL, client) == NOERROR


async def test_a_gpc_choice_is_answered_within_the_deadline_and_its_opt_out_holds_at_once(
        upstream: StubUpstream, data_dir: Path) -> None:
    """Sec-GPC: 1 on a choice that grants another vendor, on an opt-out network, while the store is
    locked: the opt-out holds at once, and the answer (503: the grant is not recorded) comes within
    the change's deadline, not after a second wait for the store to record the opt-out."""
    upstream.add(PIXEL, f"{PIXEL}. 300 IN A 198.51.100.9")
    client = OPT_OUT + "93"
    cfg = consent_config(make_config(upstream, data_dir), catalog=two_vendor_catalog(data_dir.parent))
    async with running_gate(cfg) as g:
        assert await rcode(g, "trackcmp.net", client) == NOERROR  # opt-out network: allowed until...
        with locked(data_dir / "consent.sqlite3"), RunQueue() as run_queue:
            start = time.monotonic()
            change = asyncio.ensure_future(g.http("PUT", "/v1/consent", source=client, headers={"Sec-GPC": "1"},
                                                  json={"vendors": {"pixelco": True}}))
            await asyncio.sleep(0.5)
            assert await rcode(g, "trackcmp.net", client) == NXDOMAIN  # the opt-out holds at once
            status, body = await change
            took = time.monotonic() - start
            assert status == 503 and "held" in body, body
            # (less the time this thread, where dnsgate answers, waited for a CPU after the deadline)
            late = took - 2.0 - run_queue.between(start + 2.0, start + took)
            assert late < 0.5, f"answered after {took:.2f} s, {late:.2f} s late (the deadline is 2 s)"
        await eventually(lambda: held_recorded(g), timeout=10.0)
        assert await rcode(g, "trackcmp.net", client) == NXDOMAIN
        log = parse_jsonl((await g.http("GET", "/v1/audit/export?format=jsonl", admin=True))[1])
        assert [(e["action"], e["vendors"]) for e in log] == [("refusal", {"activecampaign": False})], log
        assert log[0]["sec_gpc"] == "1"


class HeldOutcome:
    """The outcome (result or failure) of the next consent store commit, kept from dnsgate until
    `release`: the store answered, dnsgate hears of it later (a reply still on its way, a loop busy
    elsewhere). The calls after it go through as they come."""

    def __init__(self) -> None:
        self.armed = True
        self.arrived = asyncio.Event()
        self.released = asyncio.Event()

    async def __call__(self, real: Any, *args: Any) -> Any:
        if not self.armed:
            return await real(*args)
        self.armed = False
        try:
            return await real(*args)
        finally:
            self.arrived.set()
            await self.released.wait()


def outage_lines(caplog: pytest.LogCaptureFixture) -> tuple[list[str], list[str]]:
    """The outage's log lines: its start (errors) and its end."""
    messages = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "dnsgate.consent.service"]
    return ([m[:120] for level, m in messages if level >= logging.ERROR],
            [m[:120] for _, m in messages if "reachable again" in m])


def held_commits(monkeypatch: pytest.MonkeyPatch) -> HeldOutcome:
    from dnsgate.consent.sqlite_store import SqliteBackend
    held = HeldOutcome()
    real = SqliteBackend.commit

    async def commit(store: SqliteBackend, *args: Any) -> Any:
        return await held(real, store, *args)

    monkeypatch.setattr(SqliteBackend, "commit", commit)
    return held


async def test_an_answer_sent_before_the_outage_began_does_not_end_it(
        upstream: StubUpstream, data_dir: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A change the store recorded just before it was locked, heard of after the outage was reported:
    the outage goes on (/healthz, /metrics) and is logged once, not again at the next failure."""
    caplog.set_level(logging.INFO, logger="dnsgate")
    held = held_commits(monkeypatch)
    grant = {"categories": ["marketing"]}
    async with running_gate(make_config(upstream, data_dir)) as g:
        first = asyncio.ensure_future(g.http("PUT", "/v1/consent", json=grant, source="127.0.0.2"))
        await asyncio.wait_for(held.arrived.wait(), 10)  # recorded; dnsgate has not heard yet
        with locked(data_dir / "consent.sqlite3"):
            assert (await g.http("PUT", "/v1/consent", json=grant, source="127.0.0.3"))[0] == 503
            held.released.set()
            assert (await first)[0] == 200
            assert (await g.http("GET", "/healthz"))[1]["consent_store"] != "ok"
            assert await metric(g, "dnsgate_consent_store_up") == 0
            assert (await g.http("PUT", "/v1/consent", json=grant, source="127.0.0.4"))[0] == 503
        assert (await g.http("PUT", "/v1/consent", json=grant, source="127.0.0.4"))[0] == 200
        assert (await g.http("GET", "/healthz"))[1]["consent_store"] == "ok"
    errors, back = outage_lines(caplog)
    assert len(errors) == 1 and "consent store unavailable" in errors[0], errors
    assert len(back) == 1, back


async def test_a_failure_from_before_the_store_was_back_does_not_start_another_outage(
        upstream: StubUpstream, data_dir: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A change that failed while the store was locked, heard of after the store answered again: it
    is answered 503, and the store stays reported as back (one outage, logged once)."""
    caplog.set_level(logging.INFO, logger="dnsgate")
    held = held_commits(monkeypatch)
    grant = {"categories": ["marketing"]}
    async with running_gate(make_config(upstream, data_dir)) as g:
        with locked(data_dir / "consent.sqlite3"):
            first = asyncio.ensure_future(g.http("PUT", "/v1/consent", json=grant, source="127.0.0.2"))
            await asyncio.wait_for(held.arrived.wait(), 10)  # failed; dnsgate has not heard yet
            assert (await g.http("PUT", "/v1/consent", json=grant, source="127.0.0.3"))[0] == 503
        assert (await g.http("PUT", "/v1/consent", json=grant, source="127.0.0.4"))[0] == 200
        held.released.set()
        assert (await first)[0] == 503
        assert (await g.http("GET", "/healthz"))[1]["consent_store"] == "ok"
        assert await metric(g, "dnsgate_consent_store_up") == 1
    errors, back = outage_lines(caplog)
    assert len(errors) == 1 and "consent store unavailable" in errors[0], errors
    assert len(back) == 1, back
