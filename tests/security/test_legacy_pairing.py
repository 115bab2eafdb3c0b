"""A consent store from before pairing stopped carrying grants: the grants it copied to another
identity (reason "paired with HTTP client …") stop counting at the first start, each ended with a
recorded reset, and `dnsgate consent paired` lists them for the operator. The same store copied to
Redis behaves the same."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import dns.rcode

from dnsgate.cli.main import main
from dnsgate.consent.model import NoticeRef, Subject
from dnsgate.consent.notice import builtin_notice_text, parse_notice_text
from dnsgate.consent.records import Event, Step
from dnsgate.consent.sqlite_store import ConsentStore
from tests.conftest import Gate, make_config, running_gate, with_store
from tests.security.helpers import TRACKER
from tests.support.consent_fixtures import CATALOG, FakeClock, consent_config, parse_jsonl
from tests.support.redis_server import RedisServer
from tests.support.stub_upstream import StubUpstream

HTTP, COPY, OWN = "127.0.0.5", "127.0.0.6", "127.0.0.7"
NOW = 1_800_000_000.0
NOTICE_TEXT = parse_notice_text(builtin_notice_text())
SHOWN = NoticeRef(CATALOG.version, NOTICE_TEXT.version, NOTICE_TEXT.hashes["en"], "en")
GRANTED = {"marketing": True, "analytics": False}


def legacy_store(path: Path) -> None:
    """What an older dnsgate recorded: a grant by HTTP, a copy of it for the DNS source that looked up
    its pairing name, and another linked source whose grant was its own."""
    path.parent.mkdir(parents=True, exist_ok=True)
    store = ConsentStore(path)

    def grant(at: float, address: str, reason: str = "", pairing: tuple[str, str] | None = None) -> Step:
        return Step(Event("grant", at, Subject(address), "opt-in", GRANTED, {}, NOW + 86_400 * 30, SHOWN, "portal",
                          reason=reason), makes_choice=True, pairing=pairing)

    store.commit([grant(NOW - 300, HTTP)])
    store.commit([grant(NOW - 290, COPY, f"paired with HTTP client address {HTTP}: copy of choice #1",
                        pairing=(HTTP, COPY))])
    store.commit([grant(NOW - 280, OWN)])
    store.remember_pairing(HTTP, OWN, NOW - 285)
    store.close()


async def rcode(g: Gate, source: str) -> int:
    return (await g.query(TRACKER, source=source)).rcode()


async def cli(g: Gate, *args: str) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DNSGATE_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dnsgate", *args, "--api", str(g.running.api), "--token", "test-admin-token",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    out, err = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0, err
    return process.returncode, out.decode()


async def check(g: Gate) -> None:
    assert await rcode(g, COPY) == dns.rcode.NXDOMAIN  # the copy no longer counts
    assert await rcode(g, HTTP) == dns.rcode.NOERROR  # the device that made it keeps it
    assert await rcode(g, OWN) == dns.rcode.NOERROR  # a linked source's own grant stays
    _, text = await g.http("GET", f"/v1/audit/export?format=jsonl&client={COPY}", admin=True)
    reset = parse_jsonl(text)[-1]
    assert reset["action"] == "reset" and reset["supersedes"] == 2 and reset["channel"] == "system"
    assert "copied by pairing" in reset["reason"]
    _, out = await cli(g, "consent", "paired")
    assert out.splitlines()[0].startswith("#2 ") and f"{COPY}: granted marketing" in out
    assert f"paired with HTTP client address {HTTP}" in out and f"ended by #{reset['id']} (reset" in out
    assert out.count("\n#") == 0  # one copy listed


async def test_grants_pairing_copied_stop_counting_and_are_listed(upstream: StubUpstream, data_dir: Path,
                                                                 tmp_path: Path, redis_server: RedisServer) -> None:
    legacy_store(data_dir / "consent.sqlite3")
    reference = tmp_path / "reference.sqlite3"
    legacy_store(reference)
    cfg = consent_config(make_config(upstream, data_dir))
    async with running_gate(cfg, wall=FakeClock(NOW)) as g:
        await check(g)
    async with running_gate(cfg, wall=FakeClock(NOW)) as g:  # once: a restart records nothing more
        await check(g)

    # the same legacy store moved to Redis first
    assert await asyncio.to_thread(main, ["store", "migrate", "--from", f"sqlite:{reference}",
                                          "--to", redis_server.url]) == 0
    redis_cfg = consent_config(with_store(make_config(upstream, tmp_path / "redis"), redis_server.url))
    async with running_gate(redis_cfg, wall=FakeClock(NOW)) as g:
        await check(g)
