"""The SQLite consent store failing underneath dnsgate run as a real process: a full disk, a
read-only data dir, damaged pages. What a 200, a 202 or a 503 promised must hold on its DNS answers,
in the exported log, and after a restart.

The data dir is a small tmpfs mounted by the test where it runs as root (tests/support/small_disk.py:
unmounted in a finally), else a plain dir with a file size limit. dnsgate is started and stopped
by PID (tests/reliability/process.py); the ledger is tests/support/consent_ledger.py's.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import dns.asyncquery
import dns.message
import dns.rcode
import pytest

from tests.reliability.process import Served, serve
from tests.support.consent_fixtures import parse_jsonl
from tests.support.consent_ledger import (
    GRANT,
    Ledger,
    RunQueue,
    check_exact,
    check_log,
    check_safe,
    churn,
    eventually,
    record,
    resolves,
)
from tests.support.small_disk import small_disk
from tests.support.stub_upstream import StubUpstream

pytestmark = pytest.mark.timeout(150)

TOKEN = "fault-injection"
CLIENTS = [f"127.0.0.{i}" for i in range(80, 90)]
DEADLINE = 2.0  # a change's deadline with SQLite: every change is answered within it...
# ...plus the test's client, once the time dnsgate's threads and this one waited for a CPU after the
# deadline is taken off (`Ledger.late`: a loaded machine's delay, which no deadline can shorten).
LATE = 0.5


@dataclass
class Proc:
    """dnsgate as a process, as the ledger drives it."""

    served: Served

    async def http(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session, session.request(
                method, self.served.api + path, json=body, headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            if r.content_type == "application/json":
                return r.status, await r.json()
            return r.status, await r.text()

    async def change(self, client: str, grant: bool) -> tuple[int, Any]:
        path = f"/v1/clients/{client}/consent"
        return await (self.http("PUT", path, GRANT) if grant else self.http("DELETE", path))

    async def allowed(self, client: str) -> bool:
        return await resolves(self.served.dns_port, client)

    async def export(self) -> list[dict[str, Any]]:
        status, text = await self.http("GET", "/v1/audit/export?format=jsonl")
        assert status == 200, text
        return parse_jsonl(text)

    async def health(self) -> dict[str, Any]:
        status, body = await self.http("GET", "/healthz")
        assert status == 200
        return dict(body)

    async def settled(self) -> bool:
        health = await self.health()
        return bool(health["consent_store"] == "ok" and health["consent_withdrawals_held"] == 0)


async def start(upstream: StubUpstream, data_dir: Path) -> Proc:
    return Proc(await serve(upstream.address, data_dir, token=TOKEN))


async def seeded(upstream: StubUpstream, data_dir: Path, ledger: Ledger) -> list[str]:
    """dnsgate run once on `data_dir`: a second of changes, then grants for the ledger's first two
    clients; stopped. The clients granted at the end."""
    proc = await start(upstream, data_dir)
    try:
        await churn(ledger, [proc], 1.0)
        for client in ledger.clients[:2]:
            assert (await ledger.change(proc, 0, client, True)).status == 200
    finally:
        await proc.served.stop()
    return [c for c in ledger.clients if ledger.expected(c)]


async def test_disk_full(upstream: StubUpstream, tmp_path: Path) -> None:
    """Grants fail (503) while the disk is full, withdrawals hold at once (202) and are written once
    there is room again: a restart afterwards still has them."""
    ledger = Ledger(CLIENTS)
    with small_disk(tmp_path / "data", "16m") as disk:
        proc = await start(upstream, disk.path)
        try:
            # (dnsgate's threads and this one: their waits for a CPU are the machine's delay)
            with RunQueue(proc.served.process.pid) as ledger.run_queue:
                disk.pid = proc.served.process.pid
                await churn(ledger, [proc], 1.5)
                await check_exact(ledger, [proc], within=1.0)
                disk.fill()
                before = ledger.statuses()
                for _ in range(20):  # until the log's free pages are used up too
                    await churn(ledger, [proc], 1.0)
                    if (ledger.statuses() - before)[503] and (ledger.statuses() - before)[202]:
                        break
                during = ledger.statuses() - before
                assert during[503] > 0 and during[202] > 0, during
                assert ledger.late(DEADLINE) < LATE, ledger.summary(DEADLINE)
                await check_safe(ledger, [proc])
                health = await proc.health()
                assert health["consent_store"] != "ok" and health["consent_withdrawals_held"] > 0
                assert await resolves_normally(proc)  # DNS goes on
                disk.free()
                recovered = await eventually(proc.settled, 15.0, "the held withdrawals written")
                await churn(ledger, [proc], 1.0)
                await check_exact(ledger, [proc], within=1.0)
                check_log(ledger, await proc.export())
        finally:
            log = await proc.served.stop()
        assert sum("consent store unavailable" in line and "ERROR" in line for line in log) <= 3, log[-20:]
        proc = await start(upstream, disk.path)  # what was answered 200 or 202 survives a restart
        try:
            await check_exact(ledger, [proc], within=0.0)
            check_log(ledger, await proc.export())
        finally:
            await proc.served.stop()
    record("sqlite_disk_full" if disk.tmpfs else "sqlite_file_size_limit", ledger, during, recovered=recovered,
           late=ledger.late(DEADLINE))


async def resolves_normally(proc: Proc) -> bool:
    """A name that is not gated still resolves: DNS goes on whatever the consent store does."""
    reply = await dns.asyncquery.udp(dns.message.make_query("host.example.test", "A"), "127.0.0.1",
                                     port=proc.served.dns_port, timeout=3)
    return reply.rcode() == dns.rcode.NOERROR


async def test_read_only_data_dir_at_start(upstream: StubUpstream, tmp_path: Path) -> None:
    """A data dir that cannot be written at start (a read-only mount): dnsgate starts all the same,
    fail-closed, with the query log off, and says why. (Made read-only while running, a file open
    for writing keeps its mount writable: what a write that fails does is the full disk's test.)"""
    ledger = Ledger(CLIENTS[:4])
    with small_disk(tmp_path / "data", "8m") as disk:
        if not disk.can_remount:  # (dnsgate gives its own dir back its write bit: only a mount stays read-only)
            pytest.skip("a read-only mount needs root and the right to mount")
        granted = await seeded(upstream, disk.path, ledger)
        disk.read_only()
        try:
            proc = await start(upstream, disk.path)  # starts: no exit 1 over the query log
            try:
                health = await proc.health()
                assert health["consent_store"] != "ok", health  # the reason (read-only, cannot open)
                assert health["query_log"].startswith("disabled: "), health
                assert await resolves_normally(proc)
                for client in granted:
                    assert not await proc.allowed(client)  # fail-closed
                assert (await proc.change(granted[0], True))[0] == 503
            finally:
                log = await proc.served.stop()
            assert any("WARNING" in line and "query log disabled" in line for line in log), log[-10:]
        finally:
            disk.writable()
        proc = await start(upstream, disk.path)  # writable again: everything is there
        try:
            await check_exact(ledger, [proc], within=0.0)
        finally:
            await proc.served.stop()
    record("sqlite_read_only_at_start", ledger)


def corrupt_table(db: Path, table: str) -> None:
    """Overwrite the root page of `table` with garbage (the file must not be open)."""
    conn = sqlite3.connect(db)
    try:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        (root,) = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", [table]).fetchone()
    finally:
        conn.close()
    with open(db, "r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(b"\xa5" * page_size)


@pytest.mark.parametrize("table", ["events", "retention_runs"])
async def test_damaged_consent_store_starts_fail_closed(upstream: StubUpstream, tmp_path: Path, table: str) -> None:
    ledger = Ledger(CLIENTS[:4])
    data = tmp_path / "data"
    granted = await seeded(upstream, data, ledger)
    corrupt_table(data / "consent.sqlite3", table)
    proc = await start(upstream, data)
    try:
        health = await proc.health()
        assert "damaged" in health["consent_store"] and "quick_check" in health["consent_store"], health
        for client in granted:
            assert not await proc.allowed(client)
        status, body = await proc.change(granted[0], True)
        assert status == 503 and body["error"]["code"] == "consent_store_unavailable"
        assert await resolves_normally(proc)
    finally:
        await proc.served.stop()
    record(f"sqlite_damaged_{table}", ledger)


async def test_damaged_query_log_is_turned_off_not_fatal(upstream: StubUpstream, tmp_path: Path) -> None:
    ledger = Ledger(CLIENTS[:4])
    data = tmp_path / "data"
    proc = await start(upstream, data)
    try:
        await churn(ledger, [proc], 1.0)
    finally:
        await proc.served.stop()
    corrupt_table(data / "querylog.sqlite3", "queries")
    proc = await start(upstream, data)
    try:
        health = await proc.health()
        assert health["query_log"].startswith("disabled: ") and "damaged" in health["query_log"], health
        assert health["consent_store"] == "ok"
        await check_exact(ledger, [proc], within=0.0)  # consent is not affected
        await churn(ledger, [proc], 1.0)
        await check_exact(ledger, [proc], within=1.0)
    finally:
        log = await proc.served.stop()
    assert any("WARNING" in line and "query log disabled" in line for line in log), log[-10:]
    record("sqlite_damaged_query_log", ledger)
