"""The cache over loopback: keys, TTLs counting down, clamps, negative caching (RFC 2308), bounds
with LRU, serve-stale (RFC 8767), coalescing of identical queries, prefetch."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import pytest

from dnsgate.config import CacheConfig, Config, UpstreamConfig
from tests.conftest import Gate, make_config, running_gate
from tests.e2e.resolver.conftest import ask, on_path, query_wire
from tests.support.stub_upstream import StubUpstream

pytestmark = pytest.mark.usefixtures("udp_io")  # every test runs on both UDP paths (dns.udp_io)


async def test_key_ignores_case_but_not_type_do_cd(gate: Gate, upstream: StubUpstream) -> None:
    await gate.query("host.example.test")
    await gate.query("HOST.EXAMPLE.TEST")  # same key
    assert upstream.count("host.example.test") == 1
    await gate.query("host.example.test", "AAAA")  # type
    await gate.query("host.example.test", use_edns=0, want_dnssec=True)  # DO
    await ask(gate, query_wire("host.example.test", flags_set=0x0010))  # CD
    assert upstream.count("host.example.test") == 4
    await gate.query("host.example.test", use_edns=0)  # EDNS without DO shares the plain entry
    any_class = dns.message.from_wire(await ask(gate, query_wire("host.example.test", rdclass="ANY")))
    assert any_class.answer  # QCLASS * is answered from the IN entry (test_types_and_rejections.py)
    assert upstream.count("host.example.test") == 4


async def test_ttl_counts_down_on_hits(gate: Gate, upstream: StubUpstream) -> None:
    first = await gate.query("host.example.test")
    assert first.answer[0].ttl == 300
    await asyncio.sleep(1.1)  # let a second of cache age pass: this test is about time
    again = await gate.query("host.example.test")
    assert 297 <= again.answer[0].ttl <= 299
    assert upstream.count("host.example.test") == 1


async def test_ttl_clamps(upstream: StubUpstream, data_dir: Path, path: str) -> None:
    upstream.add("short.example.test", "short.example.test. 5 IN A 192.0.2.40")
    cfg = make_config(upstream, data_dir, cache=CacheConfig(min_ttl=60, max_ttl=120))
    async with running_gate(cfg) as g:
        short = await on_path(g, upstream, path, lambda: query_wire("short.example.test"))
        long = await on_path(g, upstream, path, lambda: query_wire("host.example.test"))
        assert 59 <= short.answer[0].ttl <= 60 and 119 <= long.answer[0].ttl <= 120


async def test_negative_answers_cached_for_the_soa_minimum(gate: Gate, upstream: StubUpstream, path: str) -> None:
    reply = await on_path(gate, upstream, path, lambda: query_wire("gone.example.test"))
    assert reply.rcode() == dns.rcode.NXDOMAIN
    (soa,) = reply.authority
    assert 59 <= soa.ttl <= 60  # min(SOA TTL 300, MINIMUM 60), RFC 2308 §5
    nodata = await on_path(gate, upstream, path, lambda: query_wire("other.example.test", "AAAA"))
    assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer and 59 <= nodata.authority[0].ttl <= 60


async def test_servfail_is_not_cached(gate: Gate, upstream: StubUpstream) -> None:
    upstream.rcode = dns.rcode.SERVFAIL
    assert (await gate.query("host.example.test")).rcode() == dns.rcode.SERVFAIL
    assert upstream.count("host.example.test") == 1  # asked once, not hammered until the deadline
    upstream.rcode = None
    assert (await gate.query("host.example.test")).rcode() == dns.rcode.NOERROR


async def test_entry_bound_evicts_least_recently_used(upstream: StubUpstream, data_dir: Path) -> None:
    for i in range(4):
        upstream.add(f"n{i}.example.test", f"n{i}.example.test. 300 IN A 192.0.2.{i}")
    async with running_gate(make_config(upstream, data_dir, cache=CacheConfig(max_entries=3))) as g:
        for i in range(3):
            await g.query(f"n{i}.example.test")
        await g.query("n0.example.test")  # n0 is now the most recently used; n1 the least
        await g.query("n3.example.test")  # evicts n1
        for i in (0, 2, 3):
            await g.query(f"n{i}.example.test")
        assert [upstream.count(f"n{i}.example.test") for i in range(4)] == [1, 1, 1, 1]
        await g.query("n1.example.test")
        assert upstream.count("n1.example.test") == 2


async def test_byte_bound(upstream: StubUpstream, data_dir: Path) -> None:
    upstream.add("big.example.test", *(f'big.example.test. 300 IN TXT "{"x" * 200} {i}"' for i in range(20)))
    async with running_gate(make_config(upstream, data_dir, cache=CacheConfig(max_bytes=2000))) as g:
        for _ in range(2):
            assert len((await g.query("big.example.test", "TXT", tcp=True)).answer[0]) == 20
            assert len((await g.query("host.example.test")).answer[0]) == 1
        assert upstream.count("big.example.test") == 2  # ~4 kB never fits in 2000 bytes
        assert upstream.count("host.example.test") == 1  # a small answer does


async def test_identical_queries_in_flight_are_coalesced(upstream: StubUpstream, data_dir: Path) -> None:
    upstream.delay = 0.2
    # One attempt (a second, asked when a loaded machine held the 0.2 s reply past the usual 0.5 s
    # attempt, would count twice upstream).
    cfg = make_config(upstream, data_dir, upstream=UpstreamConfig(servers=(upstream.address,), timeout=1.5,
                                                                  attempt_timeout=1.5))
    async with running_gate(cfg) as gate:
        replies = await asyncio.gather(*(gate.query("host.example.test", source=f"127.0.0.{10 + i}")
                                         for i in range(20)))
    assert all(r.answer for r in replies)
    assert upstream.count("host.example.test") == 1


def _stale_config(upstream: StubUpstream, data_dir: Path, on: bool) -> Config:
    return make_config(upstream, data_dir, cache=CacheConfig(serve_stale=on, stale_ttl=30, stale_max_age=60),
                       upstream=UpstreamConfig(servers=(upstream.address,), timeout=0.6, attempt_timeout=0.3))


async def test_serve_stale_when_every_upstream_fails(upstream: StubUpstream, data_dir: Path) -> None:
    upstream.add("brief.example.test", "brief.example.test. 1 IN A 192.0.2.50")
    async with running_gate(_stale_config(upstream, data_dir, True)) as g:
        assert (await g.query("brief.example.test")).answer
        await asyncio.sleep(1.1)  # let the entry expire
        upstream.silent = True
        stale = await g.query("brief.example.test", use_edns=0)
        assert stale.rcode() == dns.rcode.NOERROR and stale.answer[0].ttl == 30
        assert [r.to_text() for r in stale.answer[0]] == ["192.0.2.50"]
        (ede,) = stale.options
        assert isinstance(ede, dns.edns.EDEOption) and ede.code == dns.edns.EDECode.STALE_ANSWER
        plain = await g.query("brief.example.test", tcp=True)
        assert plain.answer[0].ttl == 30 and plain.edns == -1
        assert (await g.query("never.example.test")).rcode() == dns.rcode.SERVFAIL  # nothing stale to give
        upstream.silent = False
        fresh = await g.query("brief.example.test")
        assert fresh.answer[0].ttl == 1  # upstream back: fresh data again


async def test_serve_stale_is_off_by_default(upstream: StubUpstream, data_dir: Path) -> None:
    upstream.add("brief.example.test", "brief.example.test. 1 IN A 192.0.2.50")
    async with running_gate(_stale_config(upstream, data_dir, False)) as g:
        assert (await g.query("brief.example.test")).answer
        await asyncio.sleep(1.1)
        upstream.silent = True
        assert (await g.query("brief.example.test")).rcode() == dns.rcode.SERVFAIL


async def test_stale_answers_are_still_gated(upstream: StubUpstream, data_dir: Path) -> None:
    upstream.zone["trackcmp.net"] = ["trackcmp.net. 1 IN A 198.51.100.1"]
    async with running_gate(_stale_config(upstream, data_dir, True)) as g:
        assert (await g.http("PUT", "/v1/consent", source="127.0.0.2", json={"categories": ["marketing"]}))[0] == 200
        assert (await g.query("trackcmp.net", source="127.0.0.2")).answer
        await asyncio.sleep(1.1)
        upstream.silent = True
        assert (await g.query("trackcmp.net", source="127.0.0.2")).answer[0].ttl == 30
        assert (await g.query("trackcmp.net", source="127.0.0.3")).rcode() == dns.rcode.NXDOMAIN


async def hit_in_its_last_tenth(g: Gate, upstream: StubUpstream) -> str:
    """A name with a 2 s TTL asked, then asked again 1.85 s later: in the last tenth of its cached
    life. That second query is a hit only if it came within 2 s of the first being sent, which a
    machine that held this process up may miss by 0.15 s: then the pair is tried again with
    another name (each asked upstream once by the first query of its pair). Returns the name."""
    loop = asyncio.get_running_loop()
    for attempt in range(5):
        name = f"pop{attempt}.example.test"
        upstream.add(name, f"{name}. 2 IN A 192.0.2.60")
        asked = loop.time()
        assert (await g.query(name)).answer
        await asyncio.sleep(1.85)
        assert (await g.query(name)).answer
        if loop.time() - asked < 2.0:
            return name
    raise AssertionError("no query came within an entry's life: the machine held this test up each time")


async def test_prefetch_refreshes_a_popular_entry_before_it_expires(upstream: StubUpstream, data_dir: Path) -> None:
    cfg = make_config(upstream, data_dir, cache=replace(CacheConfig(), prefetch=True))
    async with running_gate(cfg) as g:
        name = await hit_in_its_last_tenth(g, upstream)
        await upstream.wait_for(name, 2)  # refreshed in the background
        await asyncio.sleep(0.3)  # past the original expiry: the refreshed entry answers
        assert (await g.query(name)).answer
        assert upstream.count(name) == 2


async def test_no_prefetch_by_default(gate: Gate, upstream: StubUpstream) -> None:
    name = await hit_in_its_last_tenth(gate, upstream)
    await asyncio.sleep(0.3)
    assert upstream.count(name) == 1  # expired, not yet asked again
