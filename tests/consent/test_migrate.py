"""`dnsgate store migrate`: SQLite to Redis and back, with a real redis-server.

A deployment's consent, made through dnsgate's API, is copied into Redis; dnsgate on Redis must
then export the very same log (JSON Lines and CSV, byte for byte), list the same choices and
answer DNS the same; and copied back into a new SQLite file, the same again.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from dnsgate.cli.main import main
from dnsgate.consent.migrate import migrate
from dnsgate.consent.model import Subject
from dnsgate.consent.records import Event, EventFilter, Step
from dnsgate.consent.redis_store import RedisBackend
from dnsgate.consent.sqlite_store import SqliteBackend
from tests.conftest import Gate, make_config, running_gate, with_store
from tests.support.consent_fixtures import KIOSK, OPT_OUT, FakeClock, consent_config, eventually
from tests.support.redis_server import RedisServer
from tests.support.stub_upstream import StubUpstream

GRANT = {"categories": ["marketing"]}
PROBES = ("127.0.0.51", "127.0.0.52", "127.0.0.53", "127.0.0.54", "127.0.9.5", OPT_OUT + "51", KIOSK + "51")


async def state(g: Gate) -> tuple[str, str, Any, list[bool]]:
    _, jsonl = await g.http("GET", "/v1/audit/export?format=jsonl", admin=True)
    _, csv = await g.http("GET", "/v1/audit/export?format=csv", admin=True)
    _, clients = await g.http("GET", "/v1/clients", admin=True)
    answers = [(await g.query("trackcmp.net", source=source)).rcode() == 0 for source in PROBES]
    return jsonl, csv, clients, answers


async def cli(*args: str) -> int:
    return await asyncio.to_thread(main, ["store", "migrate", *args])


async def test_sqlite_to_redis_and_back_keeps_every_choice_and_exports_the_same_log(
        upstream: StubUpstream, tmp_path: Path, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]) -> None:
    clock = FakeClock()
    sqlite_cfg = consent_config(make_config(upstream, tmp_path / "sqlite"))
    async with running_gate(sqlite_cfg, wall=clock) as g:
        await g.http("PUT", "/v1/consent", source="127.0.0.51", json={"choices": {"marketing": True},
                                                                       "vendors": {"activecampaign": True}})
        await g.http("PUT", "/v1/consent", source="127.0.0.52", json={**GRANT, "days": 1})
        await g.http("PUT", "/v1/consent", source="127.0.0.53", json=GRANT)
        await g.http("DELETE", "/v1/consent", source="127.0.0.53")
        await g.http("PUT", "/v1/clients/127.0.9.0/24/consent", json=GRANT, admin=True)
        await g.http("GET", "/v1/consent", source=OPT_OUT + "51", headers={"Sec-GPC": "1"})
        await g.http("PUT", "/v1/consent", source=KIOSK + "51", json=GRANT)
        _, body = await g.http("PUT", "/v1/consent", source="127.0.0.55", json={"categories": []})
        await g.query(body["pairing"]["name"], source="127.0.0.54")  # 127.0.0.54 is paired: refusals carried
        clock.advance(2 * 86_400)  # 127.0.0.52 and the kiosk: their choices expire and are recorded

        async def swept() -> bool:
            return "expiry" in (await g.http("GET", "/v1/audit/export", admin=True))[1]

        async def paired() -> bool:
            choice = (await g.http("GET", "/v1/consent", source="127.0.0.54"))[1]["choice"]
            return choice is not None and choice["channel"] == "pairing"

        await eventually(swept)
        await eventually(paired)
        original = await state(g)
    assert original[3] == [True, False, False, False, True, False, False]

    sqlite_file = tmp_path / "sqlite" / "consent.sqlite3"
    assert await cli("--from", f"sqlite:{sqlite_file}", "--to", redis_server.url) == 0
    said = capsys.readouterr().out
    assert f"copied 11 events, 6 choices and 1 pairings from sqlite:{sqlite_file} to {redis_server.url}" in said

    redis_cfg = consent_config(with_store(make_config(upstream, tmp_path / "redis"), redis_server.url))
    async with running_gate(redis_cfg, wall=clock) as g:
        assert await state(g) == original
        # The log goes on from the copied ids.
        _, body = await g.http("PUT", "/v1/consent", source="127.0.0.56", json=GRANT)
        assert body["choice"]["id"] == 12
        on_redis = await state(g)

    back = tmp_path / "back" / "consent.sqlite3"
    assert await cli("--from", redis_server.url, "--to", f"sqlite:{back}") == 0
    async with running_gate(consent_config(make_config(upstream, tmp_path / "back")), wall=clock) as g:
        assert await state(g) == on_redis


async def test_migration_refuses_a_store_that_holds_consent_and_names_bad_stores(
        upstream: StubUpstream, tmp_path: Path, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]) -> None:
    async with running_gate(consent_config(make_config(upstream, tmp_path / "a"))) as g:
        await g.http("PUT", "/v1/consent", source="127.0.0.51", json=GRANT)
    source = f"sqlite:{tmp_path / 'a' / 'consent.sqlite3'}"
    assert await cli("--from", source, "--to", redis_server.url) == 0
    capsys.readouterr()
    assert await cli("--from", source, "--to", redis_server.url) == 1
    assert "already holds consent (keys dnsgate:*); migrate only into an empty store" in capsys.readouterr().err
    assert await cli("--from", redis_server.url, "--to", source) == 1
    assert "already holds consent events" in capsys.readouterr().err
    # Another prefix in the same Redis is another, empty store.
    assert await cli("--from", source, "--to", redis_server.url, "--redis-prefix", "site2:") == 0
    capsys.readouterr()
    assert await cli("--from", f"sqlite:{tmp_path / 'missing.sqlite3'}", "--to", redis_server.url) == 1
    assert "--from: " in capsys.readouterr().err
    assert await cli("--from", "ftp://example.com/consent", "--to", redis_server.url) == 2
    assert "--from: expected sqlite:PATH or a Redis URL" in capsys.readouterr().err
    assert await cli("--from", source, "--to", source) == 2
    redis_server.stop()
    assert await cli("--from", source, "--to", redis_server.url.replace("/0", "/1"), "--timeout", "1") == 1
    assert f"redis://127.0.0.1:{redis_server.port}/1" in capsys.readouterr().err


async def test_choices_whose_expiry_passed_in_redis_are_still_recorded_when_they_expire(
        tmp_path: Path, redis_server: RedisServer) -> None:
    """A choice copied (or made) with an expiry already past stays in force until its expiry is
    recorded: its hash is kept until then, and the expiry step ends it exactly once."""
    now = time.time()
    lite = SqliteBackend.open(tmp_path / "consent.sqlite3")
    made = Event("grant", now - 10 * 86_400, Subject("10.0.0.9"), "opt-in", {"marketing": True}, {},
                 now - 86_400, None, "device")
    (choice_id,) = (await lite.commit([Step(made, makes_choice=True)], 0, "c1", time.monotonic() + 5)).ids
    assert choice_id == 1
    redis = RedisBackend(redis_server.url)
    try:
        await migrate(lite, redis)
        assert await redis.redis.exists("dnsgate:choice:1")
        (loaded,) = (await redis.load()).choices
        assert loaded.id == 1 and loaded.subject.address == "10.0.0.9" and loaded.expires_at == made.expires_at
        expiry = Event("expiry", now, loaded.subject, "opt-in", loaded.categories, {}, loaded.expires_at, None,
                       "system", supersedes=1)
        step = Step(expiry, ends=(1,), only_if_current=1)
        assert (await redis.commit([step], redis.position, "c2", time.monotonic() + 5)).ids == [2]
        assert (await redis.commit([step], redis.position, "c3", time.monotonic() + 5)).ids == [None]  # once
        assert (await redis.load()).choices == []
        assert [e.action async for e in redis.export(EventFilter())] == ["grant", "expiry"]
    finally:
        await redis.close()
        await lite.close()
