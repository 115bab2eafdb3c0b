"""Several dnsgate instances sharing consent through a real Redis.

Each test starts its own redis-server (loopback, free port, appendfsync always; tests/support/redis_server.py)
and two or three dnsgate instances in-process, each with its own DNS and API sockets. A choice made
through one instance's API must decide DNS queries on the others within a second; restarts, Redis
crashes and concurrent changes must lose no acknowledged choice.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import dns.rcode
import redis.asyncio as aioredis

from dnsgate.consent.model import Choice, Subject
from dnsgate.consent.records import Event, Step
from dnsgate.consent.redis_store import RedisBackend
from tests.conftest import Gate, make_config, running_gate, with_store
from tests.support.consent_fixtures import ALLOW, FakeClock, consent_config, eventually, parse_jsonl
from tests.support.redis_server import RedisServer
from tests.support.stub_upstream import StubUpstream

TRACKER = "trackcmp.net"
GRANT = {"categories": ["marketing"]}
SECOND = 1.0  # the promised bound: a change through any instance applies everywhere within a second
LEASE = 4.0  # an instance cut off from Redis stops applying grants after this (2 x storage.redis_timeout)


def shared(upstream: StubUpstream, tmp_path: Path, name: str, redis: RedisServer) -> Any:
    return consent_config(with_store(make_config(upstream, tmp_path / name), redis.url))


@contextlib.asynccontextmanager
async def instances(upstream: StubUpstream, tmp_path: Path, redis: RedisServer, n: int,
                    **hooks: Any) -> AsyncIterator[list[Gate]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(running_gate(shared(upstream, tmp_path, f"i{i}", redis), **hooks))
               for i in range(n)]


async def allowed(g: Gate, client: str) -> bool:
    rcode = (await g.query(TRACKER, source=client)).rcode()
    assert rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN)
    return rcode == dns.rcode.NOERROR


async def within(limit: float, check: Callable[[], Awaitable[bool]]) -> float:
    """Seconds until `check()` holds (polled every 5 ms); fails if that takes longer than `limit`."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not await check():
        if loop.time() - start > limit:
            raise AssertionError(f"not within {limit} s")
        await asyncio.sleep(0.005)
    return loop.time() - start


async def export(g: Gate) -> list[dict[str, Any]]:
    status, text = await g.http("GET", "/v1/audit/export?format=jsonl", admin=True)
    assert status == 200, text
    return parse_jsonl(text)


async def store_state(g: Gate) -> str:
    status, body = await g.http("GET", "/healthz")
    assert status == 200
    return str(body["consent_store"])


async def metric(g: Gate, name: str) -> float:
    status, text = await g.http("GET", "/metrics")
    assert status == 200
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


# -- propagation -----------------------------------------------------------------------------------


async def test_a_choice_through_one_instance_decides_queries_on_the_others_within_a_second(
        upstream: StubUpstream, tmp_path: Path, redis_server: RedisServer) -> None:
    me = "127.0.0.41"
    async with instances(upstream, tmp_path, redis_server, 3) as (a, b, c):
        assert not await allowed(b, me) and not await allowed(c, me)
        status, _ = await a.http("PUT", "/v1/consent", source=me, json=GRANT)
        assert status == 200
        for other in (b, c):
            await within(SECOND, lambda other=other: allowed(other, me))  # type: ignore[misc]
        status, _ = await b.http("DELETE", "/v1/consent", source=me)
        assert status == 200
        assert not await allowed(b, me)  # the instance that took the change: at once
        for other in (a, c):
            await within(SECOND, lambda other=other: not_allowed(other, me))  # type: ignore[misc]
        # An admin's choice for a whole network, through the third instance.
        status, _ = await c.http("PUT", "/v1/clients/127.0.9.0/24/consent", admin=True, json=GRANT)
        assert status == 200
        for other in (a, b):
            await within(SECOND, lambda other=other: allowed(other, "127.0.9.7"))  # type: ignore[misc]
        # Every instance exports the same log, and it is the one a single store would have.
        logs = [await export(g) for g in (a, b, c)]
        assert logs[0] == logs[1] == logs[2]
        assert [e["action"] for e in logs[0]] == ["grant", "withdrawal", "grant"]
        assert logs[0][1]["supersedes"] == logs[0][0]["id"]
        for g in (a, b, c):  # each applied the two changes made through the other two
            assert await metric(g, "dnsgate_consent_remote_changes_total") == 2


async def not_allowed(g: Gate, client: str) -> bool:
    return not await allowed(g, client)


async def test_a_restarted_instance_rebuilds_its_table_before_it_answers(
        upstream: StubUpstream, tmp_path: Path, redis_server: RedisServer) -> None:
    x, y = "127.0.0.42", "127.0.0.43"
    cfg_b = shared(upstream, tmp_path, "b", redis_server)
    async with running_gate(shared(upstream, tmp_path, "a", redis_server)) as a:
        async with running_gate(cfg_b) as b:
            assert (await a.http("PUT", "/v1/consent", source=x, json=GRANT))[0] == 200
            await within(SECOND, lambda: allowed(b, x))
        # B is down while X withdraws and Y grants through A.
        assert (await a.http("DELETE", "/v1/consent", source=x))[0] == 200
        assert (await a.http("PUT", "/v1/consent", source=y, json=GRANT))[0] == 200
        async with running_gate(cfg_b) as b:
            # The very first queries after the ready line are decided on the current state.
            assert not await allowed(b, x)
            assert await allowed(b, y)
            assert await store_state(b) == "ok"
            assert await export(b) == await export(a)
            # And B follows changes again.
            assert (await a.http("DELETE", "/v1/consent", source=y))[0] == 200
            await within(SECOND, lambda: not_allowed(b, y))


# -- expiry and concurrency ------------------------------------------------------------------------


async def test_an_expiry_applies_on_every_instance_and_is_recorded_once(
        upstream: StubUpstream, tmp_path: Path, redis_server: RedisServer) -> None:
    me = "127.0.0.44"
    clock = FakeClock()
    async with instances(upstream, tmp_path, redis_server, 3, wall=clock) as gates:
        a, b, _ = gates
        status, body = await a.http("PUT", "/v1/consent", source=me, json={**GRANT, "days": 1})
        assert status == 200
        choice_id = body["choice"]["id"]
        for g in gates:
            await within(SECOND, lambda g=g: allowed(g, me))  # type: ignore[misc]
        clock.advance(86_400 + 1)
        for g in gates:  # from each table's own clock, before any sweeper has run
            assert not await allowed(g, me)

        async def expiry_recorded() -> bool:
            return any(e["action"] == "expiry" for e in await export(b))
        await eventually(expiry_recorded)
        # Three sweepers every 50 ms: give them time to record it again, which they must not.
        for g in gates:
            await eventually(lambda g=g: swept(g), timeout=2.0)  # type: ignore[misc]
        expiries = [e for e in await export(a) if e["action"] == "expiry"]
        assert len(expiries) == 1 and expiries[0]["supersedes"] == choice_id
        client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
        try:
            assert await client.zscore("dnsgate:choices", str(choice_id)) is None
            assert not await client.exists(f"dnsgate:choice:{choice_id}")
        finally:
            await client.aclose()


async def swept(g: Gate) -> bool:
    """The instance's table no longer holds any choice (its sweeper or its follower removed it)."""
    status, body = await g.http("GET", "/v1/clients", admin=True)
    assert status == 200
    return not body["clients"]


async def test_concurrent_changes_through_two_instances_end_in_one_choice(
        upstream: StubUpstream, tmp_path: Path, redis_server: RedisServer) -> None:
    me = "127.0.0.45"
    async with instances(upstream, tmp_path, redis_server, 2) as (a, b):
        for _ in range(10):
            results = await asyncio.gather(
                a.http("PUT", f"/v1/clients/{me}/consent", admin=True, json=GRANT),
                b.http("DELETE", f"/v1/clients/{me}/consent", admin=True))
            assert [status for status, _ in results] == [200, 200]

        async def agree() -> bool:
            views = [(await g.http("GET", "/v1/clients", admin=True))[1]["clients"] for g in (a, b)]
            return bool(views[0] == views[1])
        await eventually(agree, timeout=SECOND)
        clients = (await a.http("GET", "/v1/clients", admin=True))[1]["clients"]
        assert len(clients) == 1  # one choice in force, not one per instance
        log = await export(a)
        assert len(log) == 20
        # Each change superseded the one before it, whichever instance recorded either: no fork.
        for before, after in itertools.pairwise(log):
            assert after["supersedes"] == before["id"]
        assert clients[0]["choice"]["id"] == log[-1]["id"]
        assert await allowed(a, me) == await allowed(b, me) == (log[-1]["action"] == "grant")


# -- Redis unreachable -----------------------------------------------------------------------------


async def test_redis_down_fails_closed_answers_503_and_catches_up_when_it_returns(
        upstream: StubUpstream, tmp_path: Path, redis_server: RedisServer) -> None:
    granted, other = "127.0.0.46", "127.0.0.47"
    async with instances(upstream, tmp_path, redis_server, 2) as (a, b):
        assert (await a.http("PUT", "/v1/consent", source=granted, json=GRANT))[0] == 200
        await within(SECOND, lambda: allowed(b, granted))
        redis_server.stop(kill=True)

        for g in (a, b):
            await eventually(lambda g=g: problem(g), timeout=5.0)  # type: ignore[misc]
            assert await metric(g, "dnsgate_consent_store_up") == 0
        status, body = await a.http("PUT", "/v1/consent", source=other, json=GRANT)
        assert status == 503 and body["error"]["code"] == "consent_store_unavailable"
        status, body = await b.http("DELETE", "/v1/consent", source=granted)
        assert status == 202 and "not recorded yet" in body["held"]
        assert not await allowed(b, granted)  # the "no" holds at once where it was said
        assert (await a.http("GET", "/v1/audit/export", admin=True))[0] == 503
        # A cannot know of it: once it has heard nothing from Redis for its lease, it stops applying
        # grants, so a withdrawal made anywhere holds everywhere; nobody else gets a tracker meanwhile.
        await within(LEASE + 1.0, lambda: not_allowed(a, granted))
        for g in (a, b):
            assert not await allowed(g, other)
        assert await metric(a, "dnsgate_consent_store_errors_total") >= 2

        redis_server.start()
        for g in (a, b):
            await eventually(lambda g=g: store_ok(g), timeout=5.0)  # type: ignore[misc]
            assert await metric(g, "dnsgate_consent_store_up") == 1
        # No restart needed: B records the withdrawal it held, and changes flow both ways again.
        await eventually(lambda: withdrawals_held(b, 0), timeout=5.0)
        assert (await b.http("PUT", "/v1/consent", source=other, json=GRANT))[0] == 200
        await within(SECOND, lambda: allowed(a, other))
        assert not await allowed(a, granted)
        assert [e["action"] for e in await export(b)] == ["grant", "withdrawal", "grant"]


async def withdrawals_held(g: Gate, n: int) -> bool:
    return await metric(g, "dnsgate_consent_withdrawals_held") == n


async def problem(g: Gate) -> bool:
    return await store_state(g) != "ok"


async def store_ok(g: Gate) -> bool:
    return await store_state(g) == "ok"


async def test_an_instance_started_without_redis_holds_closed_until_redis_answers(
        upstream: StubUpstream, tmp_path: Path, redis_server: RedisServer) -> None:
    me, fixed = "127.0.0.48", ALLOW + "9"  # a grant, and a client of an `allow` network
    async with running_gate(shared(upstream, tmp_path, "a", redis_server)) as a:
        assert (await a.http("PUT", "/v1/consent", source=me, json=GRANT))[0] == 200
        assert await allowed(a, fixed)
    redis_server.stop()
    async with running_gate(shared(upstream, tmp_path, "b", redis_server)) as b:
        assert await problem(b)
        # Nothing is known: fail closed, even where the profile would allow.
        assert not await allowed(b, me)
        assert not await allowed(b, fixed)
        assert (await b.http("PUT", "/v1/consent", source=me, json=GRANT))[0] == 503
        redis_server.start()
        await eventually(lambda: store_ok(b), timeout=5.0)
        assert await allowed(b, me)
        assert await allowed(b, fixed)


async def test_no_acknowledged_choice_is_lost_when_redis_crashes_mid_stream(
        upstream: StubUpstream, tmp_path: Path, redis_server: RedisServer) -> None:
    """Clients keep changing their choices through both instances while Redis is killed (SIGKILL)
    and restarted. Every change answered 200 must be in the log afterwards, and every client's
    choice in force must be its last acknowledged one (or a later one whose answer was lost)."""
    clients = [f"127.0.0.{i}" for i in range(100, 112)]
    acknowledged: dict[str, list[tuple[int, str]]] = {c: [] for c in clients}
    refused = 0
    async with instances(upstream, tmp_path, redis_server, 2) as gates:
        stop = asyncio.Event()

        async def client_loop(n: int, client: str) -> None:
            nonlocal refused
            grant = True
            while not stop.is_set():
                g = gates[n % 2]
                n += 1
                try:
                    if grant:
                        status, body = await g.http("PUT", "/v1/consent", source=client, json=GRANT)
                    else:
                        status, body = await g.http("DELETE", "/v1/consent", source=client)
                except OSError:
                    status, body = 0, None
                if status == 200:
                    acknowledged[client].append((body["choice"]["id"], body["choice"]["categories"]["marketing"]))
                    grant = not grant
                elif status == 202:  # a withdrawal held where it was made, recorded once Redis is back
                    assert not grant and "held" in body
                    grant = not grant
                    refused += 1
                else:
                    assert status == 503, body
                    refused += 1
                    await asyncio.sleep(0.02)

        writers = [asyncio.create_task(client_loop(i, c)) for i, c in enumerate(clients)]
        try:
            await eventually(lambda: changes_at_least(acknowledged, 100), timeout=10.0)
            redis_server.stop(kill=True)
            await eventually(lambda: problem(gates[0]), timeout=5.0)
            redis_server.start()
            before = sum(len(v) for v in acknowledged.values())
            await eventually(lambda: changes_at_least(acknowledged, before + 100), timeout=15.0)
        finally:
            stop.set()
            await asyncio.gather(*writers)
        assert refused > 0  # the crash was felt (a change answered 503, or a withdrawal held)
        for g in gates:
            await eventually(lambda g=g: withdrawals_held(g, 0), timeout=10.0)  # type: ignore[misc]
        log = {e["id"]: e for e in await export(gates[1])}
        for client, acks in acknowledged.items():
            for choice_id, granted in acks:
                assert choice_id in log, f"acknowledged choice #{choice_id} of {client} lost"
                assert log[choice_id]["address"] == client
                assert log[choice_id]["categories"]["marketing"] is granted

        async def settled() -> bool:
            for g in gates:
                views = {v["identity"]["address"]: v for v in (await g.http("GET", "/v1/clients", admin=True))[1]
                         ["clients"]}
                for client, acks in acknowledged.items():
                    if views[client]["choice"]["id"] < acks[-1][0]:
                        return False
            return True
        await eventually(settled, timeout=SECOND)
        for client, acks in acknowledged.items():
            for g in gates:
                assert await allowed(g, client) == log[max(
                    e["id"] for e in log.values() if e["address"] == client)]["categories"]["marketing"]
            assert acks


async def changes_at_least(acknowledged: dict[str, list[tuple[int, str]]], n: int) -> bool:
    return sum(len(v) for v in acknowledged.values()) >= n


# -- the data in Redis -----------------------------------------------------------------------------


async def test_choices_are_hashes_until_an_event_ends_them_and_the_log_is_a_stream(
        upstream: StubUpstream, tmp_path: Path, redis_server: RedisServer) -> None:
    me = "127.0.0.49"
    async with running_gate(shared(upstream, tmp_path, "a", redis_server)) as a:
        status, body = await a.http("PUT", "/v1/consent", source=me, json={**GRANT, "days": 3})
        assert status == 200
        choice_id = body["choice"]["id"]
        client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
        try:
            # no expiry of its own: the event that ends the choice (its expiry recorded) deletes it
            assert await client.pttl(f"dnsgate:choice:{choice_id}") == -1
            fields = await client.hgetall(f"dnsgate:choice:{choice_id}")
            assert fields["address"] == me and json.loads(fields["categories"])["marketing"] is True
            entries: Any = await client.xrange("dnsgate:log")
            assert [entry_id for entry_id, _ in entries] == [f"{choice_id}-0"]
            assert entries[0][1]["action"] == "grant" and entries[0][1]["client"] == me
            assert (await client.xinfo_stream("dnsgate:log"))["length"] == 1
        finally:
            await client.aclose()


async def test_a_choice_rebuilt_after_its_hash_is_gone_keeps_its_later_updates(redis_server: RedisServer) -> None:
    """A choice's profile change and its migration are written to its hash. Redis once dropped that
    hash at the choice's expiry, though an opt-out outlives it, and a load then rebuilt the choice from
    the event that made it, without them: the opt-out lapsed, the items it covered were lost. The
    hash is kept until an event ends the choice; one an older dnsgate let expire is rebuilt with
    every update the log holds for it."""
    now = time.time()
    subject = Subject("10.0.0.9")
    # an opt-in refusal from before choices named their items, ending a second from now
    made = Event("refusal", now - 60, subject, "opt-in", {"marketing": False}, {}, now + 1.0, None, "device")
    store = RedisBackend(redis_server.url)
    try:
        await store.load()
        (cid,) = (await store.commit([Step(made, makes_choice=True)], store.position, "c1",
                                     time.monotonic() + 5)).ids
        assert cid is not None
        # the network became opt-out (the refusal now stands), and the choice was migrated to its items
        change = Event("profile_change", now, subject, "opt-out", {"marketing": False}, {}, made.expires_at, None,
                       "system", supersedes=cid)
        migration = Event("migration", now, subject, "opt-out", {"marketing": False}, {}, made.expires_at, None,
                          "system", supersedes=cid, items={"vendor:activecampaign": "f" * 16}, terms="t" * 64)
        await store.commit([Step(change, sets_profile_of=cid), Step(migration, sets_items_of=cid)], store.position,
                           "c2", time.monotonic() + 5)
        await asyncio.sleep(max(0.0, now + 1.5 - time.time()))  # past the choice's expiry, in Redis's clock too

        def as_updated(choice: Choice) -> None:
            assert choice.id == cid and choice.profile == "opt-out" and choice.standing
            assert choice.items == {"vendor:activecampaign": "f" * 16} and choice.terms == "t" * 64

        (loaded,) = (await store.load()).choices
        as_updated(loaded)
        assert await store.redis.ttl(f"dnsgate:choice:{cid}") == -1  # kept until an event ends the choice
        await store.redis.delete(f"dnsgate:choice:{cid}")  # as an older dnsgate's expiry left it
        (rebuilt,) = (await store.load()).choices
        as_updated(rebuilt)
    finally:
        await store.close()
