"""Group commit: consent changes that arrive together are recorded in one SQLite transaction (one
fsync), each answered only once it is recorded and in force, and a change that fails inside a group
fails alone: answered 503, nothing of it stored, the others recorded. Real SQLite file, real
aiohttp server, each client from its own loopback address (a choice is only for who makes it)."""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import time
from pathlib import Path

import dns.rcode
import pytest

from dnsgate.consent.model import Subject
from dnsgate.consent.records import Event, Step, StoreError
from dnsgate.consent.sqlite_store import BUSY_TIMEOUT, Abandon, ConsentStore, SqliteBackend
from tests.conftest import Gate, make_config, running_gate
from tests.support.consent_fixtures import parse_jsonl
from tests.support.stub_upstream import StubUpstream

pytestmark = pytest.mark.timeout(120)

GRANT = {"categories": ["marketing"]}
CLIENTS = [f"127.0.0.{i}" for i in range(100, 140)]
REFUSED = "127.0.0.117"  # the change the injected fault hits


async def metric(g: Gate, name: str) -> float:
    _, text = await g.http("GET", "/metrics")
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


async def allowed(g: Gate, client: str) -> bool:
    return (await g.query("trackcmp.net", source=client)).rcode() == dns.rcode.NOERROR


async def grant_all(g: Gate, clients: list[str]) -> list[int]:
    """Every client PUTs its own grant, all at once; as each is answered 200, its next query must
    already be allowed (in force when acknowledged)."""
    async def one(client: str) -> int:
        status, body = await g.http("PUT", "/v1/consent", json=GRANT, source=client)
        if status == 200:
            assert await allowed(g, client), client
        else:
            assert status == 503 and body["error"]["code"] == "consent_store_unavailable", body
            assert not await allowed(g, client), client
        return status
    return list(await asyncio.gather(*(one(c) for c in clients)))


def logged(data_dir: Path) -> list[str]:
    """The clients of the granting events in the file itself."""
    with sqlite3.connect(data_dir / "consent.sqlite3") as db:
        return sorted(r[0] for r in db.execute("SELECT client FROM events WHERE action = 'grant'"))


async def test_changes_arriving_together_share_a_transaction(upstream: StubUpstream, data_dir: Path) -> None:
    async with running_gate(make_config(upstream, data_dir)) as g:
        assert await grant_all(g, CLIENTS) == [200] * len(CLIENTS)
        commits = await metric(g, "dnsgate_consent_commits_total")
        assert await metric(g, "dnsgate_consent_changes_committed_total") == len(CLIENTS)
        assert 1 <= commits < len(CLIENTS)  # grouped: fewer transactions than changes
    assert logged(data_dir) == sorted(CLIENTS)
    async with running_gate(make_config(upstream, data_dir)) as g:  # each one acknowledged is durable
        assert all(await asyncio.gather(*(allowed(g, c) for c in CLIENTS)))


@pytest.mark.parametrize("fault", ["ABORT", "ROLLBACK"])
async def test_a_change_failing_in_a_group_fails_alone(upstream: StubUpstream, data_dir: Path, fault: str) -> None:
    """ABORT: the change's statement fails (its savepoint is rolled back, the group commits);
    ROLLBACK: it takes the whole transaction with it (every change is tried again on its own)."""
    async with running_gate(make_config(upstream, data_dir)) as g:
        assert (await g.http("PUT", "/v1/consent", json=GRANT, source="127.0.0.99"))[0] == 200
        with sqlite3.connect(data_dir / "consent.sqlite3") as db:
            db.execute(f"CREATE TRIGGER test_fault BEFORE INSERT ON events WHEN NEW.client = '{REFUSED}' "
                       f"BEGIN SELECT RAISE({fault}, 'refused by the test'); END")
        statuses = dict(zip(CLIENTS, await grant_all(g, CLIENTS), strict=True))
        assert statuses.pop(REFUSED) == 503
        assert set(statuses.values()) == {200}
        if fault == "ABORT":  # (ROLLBACK: the group it was in is written again change by change)
            assert await metric(g, "dnsgate_consent_commits_total") < len(CLIENTS)
        log = parse_jsonl((await g.http("GET", "/v1/audit/export?format=jsonl", admin=True))[1])
        assert sorted(e["address"] for e in log) == sorted(["127.0.0.99", *statuses])
    assert logged(data_dir) == sorted(["127.0.0.99", *statuses])


async def test_a_store_that_cannot_be_written_fails_the_whole_group(upstream: StubUpstream, data_dir: Path) -> None:
    """The database locked by another process while changes arrive together: each is answered 503
    in time, none is in force or recorded, and what was recorded before is kept."""
    async with running_gate(make_config(upstream, data_dir)) as g:
        assert await grant_all(g, CLIENTS[:5]) == [200] * 5
        locker = sqlite3.connect(data_dir / "consent.sqlite3", isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            assert await grant_all(g, CLIENTS[5:]) == [503] * len(CLIENTS[5:])
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        assert all(await asyncio.gather(*(allowed(g, c) for c in CLIENTS[:5])))
        assert await grant_all(g, CLIENTS[5:]) == [200] * len(CLIENTS[5:])
    assert logged(data_dir) == sorted(CLIENTS)


def grant_step(address: str) -> Step:
    event = Event("grant", 1_000.0, Subject(address, None, None), "opt-in", {"marketing": True}, {}, 9_000.0,
                  channel="device")
    return Step(event, makes_choice=True)


@pytest.mark.parametrize("fault", ["ABORT", "ROLLBACK"])
def test_the_store_commits_a_group_around_a_failing_change(tmp_path: Path, fault: str) -> None:
    """The store itself, a group of five with the third refused: ABORT rolls back its savepoint only
    (one transaction for the other four); ROLLBACK ends the whole transaction, and each change is
    written again in a transaction of its own."""
    store = ConsentStore(tmp_path / "consent.sqlite3")
    try:
        store.db.execute(f"CREATE TRIGGER test_fault BEFORE INSERT ON events WHEN NEW.client = '10.0.0.3' "
                         f"BEGIN SELECT RAISE({fault}, 'refused by the test'); END")
        clients = [f"10.0.0.{i}" for i in range(1, 6)]
        outcomes = store.commit_group([([grant_step(c)], Abandon(time.monotonic() + 5)) for c in clients])
        failed = outcomes.pop(2)
        assert isinstance(failed, StoreError) and "refused by the test" in str(failed)
        assert all(isinstance(o, list) and len(o) == 1 and o[0] for o in outcomes), outcomes
        assert sorted(c.subject.address or "" for c in store.load()) == [c for c in clients if c != "10.0.0.3"]
        assert store.changes_committed == 4
        assert (store.commits, store.groups_broken) == ((1, 0) if fault == "ABORT" else (4, 1))
    finally:
        store.close()


def test_a_change_given_up_on_in_a_group_is_rolled_back_alone(tmp_path: Path) -> None:
    store = ConsentStore(tmp_path / "consent.sqlite3")
    try:
        abandons = [Abandon(time.monotonic() + 5) for _ in range(3)]
        assert abandons[1].now()  # its caller answered before the group reached it
        outcomes = store.commit_group([([grant_step(f"10.0.0.{i}")], a) for i, a in enumerate(abandons)])
        assert isinstance(outcomes[1], StoreError) and "rolled back" in str(outcomes[1])
        assert sorted(c.subject.address or "" for c in store.load()) == ["10.0.0.0", "10.0.0.2"]
        assert store.commits == 1
    finally:
        store.close()


async def test_changes_set_the_lock_wait_only_when_it_changes_and_other_work_waits_as_before(tmp_path: Path) -> None:
    """Every PRAGMA busy_timeout is one more statement (one more wait for the GIL) on the store's
    thread, beside the DNS loop: changes with alike deadlines share one setting; the store's other
    work still waits BUSY_TIMEOUT for a lock held elsewhere."""
    backend = SqliteBackend.open(tmp_path / "consent.sqlite3")
    set_wait: list[str] = []
    backend.store.db.conn.set_trace_callback(lambda sql: set_wait.append(sql) if "busy_timeout=" in sql else None)
    try:
        for i in range(5):
            recorded = await backend.commit([grant_step(f"10.0.0.{i}")], 0, f"c{i}", time.monotonic() + 5.1)
            assert recorded.ids == [i + 1]
        assert 1 <= len(set_wait) <= 2, set_wait  # (two if the deadlines straddled a step; ten before)

        def lock_wait() -> int:
            return int(backend.store.db.conn.execute("PRAGMA busy_timeout").fetchone()[0])

        assert await backend._run(functools.partial(lock_wait)) == int(BUSY_TIMEOUT * 1000)
    finally:
        await backend.close()
