"""CNAME chains the upstream leaves unfinished, completed by dnsgate over loopback: the stub sends a
name's CNAME alone (`cname_alone`), as authoritative servers and some forwarders do, and dnsgate
asks for the target itself. On the miss and the hit path, UDP and TCP; the parts are cached by
their own TTLs; the chain is gated on every name in it; loops, long chains, failures and the
deadline end in SERVFAIL and leave nothing waiting. (The same questions to unbound:
test_unbound_parity.py.)"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import dns.edns
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from dnsgate.config import UpstreamConfig
from dnsgate.dns.forwarding import MAX_CHAIN
from tests.conftest import Gate, make_config, running_gate, zone_for_tests
from tests.e2e.resolver.conftest import on_path, query_wire, udp_raw
from tests.support.stub_upstream import StubUpstream

pytestmark = pytest.mark.usefixtures("udp_io")  # every test runs on both UDP paths (dns.udp_io)

GRANT = {"categories": ["marketing"]}


def chained_zone(stub: StubUpstream) -> StubUpstream:
    """Names whose answers stop short at the upstream (and one that does not, for comparison)."""
    zone_for_tests(stub)
    stub.add("www.example.test", "www.example.test. 300 IN CNAME host.example.test.")
    stub.add("c1.example.test", "c1.example.test. 300 IN CNAME c2.example.test.")
    stub.add("c2.example.test", "c2.example.test. 200 IN CNAME host.example.test.")
    stub.add("dangle.example.test", "dangle.example.test. 300 IN CNAME gone.example.test.")
    stub.add("loop1.example.test", "loop1.example.test. 300 IN CNAME loop2.example.test.")
    stub.add("loop2.example.test", "loop2.example.test. 300 IN CNAME loop1.example.test.")
    stub.add("self.example.test", "self.example.test. 300 IN CNAME self.example.test.")
    for n in range(MAX_CHAIN + 1):  # l0 -> l1 -> ... -> l9 -> host: one name too many
        stub.add(f"l{n}.example.test", f"l{n}.example.test. 300 IN CNAME l{n + 1}.example.test.")
    stub.add(f"l{MAX_CHAIN + 1}.example.test", f"l{MAX_CHAIN + 1}.example.test. 300 IN CNAME host.example.test.")
    stub.add("brief.example.test", "brief.example.test. 300 IN CNAME fleeting.example.test.")
    stub.add("fleeting.example.test", "fleeting.example.test. 2 IN A 192.0.2.50")
    stub.add("quick.example.test", "quick.example.test. 2 IN CNAME steady.example.test.")
    stub.add("steady.example.test", "steady.example.test. 300 IN A 192.0.2.51")
    stub.add("fade.example.test", "fade.example.test. 2 IN CNAME gone.example.test.")
    # CNAME cloaking: the vendor seen in the chain's first part, or only in the part dnsgate asks for
    stub.add("metrics.shop.test", "metrics.shop.test. 300 IN CNAME x.trackcmp.net.")
    stub.add("stats.shop.test", "stats.shop.test. 300 IN CNAME edge.cdn.test.")
    stub.add("edge.cdn.test", "edge.cdn.test. 300 IN CNAME x.trackcmp.net.")  # followed by the stub itself
    stub.add("whole.example.test", "whole.example.test. 300 IN CNAME host.example.test.")  # followed as well
    stub.cname_alone = {name for name in stub.zone if any(" CNAME " in r for r in stub.zone[name])} - {
        "edge.cdn.test", "whole.example.test"}
    return stub


@pytest.fixture
async def upstream() -> AsyncIterator[StubUpstream]:
    stub = await chained_zone(StubUpstream()).start()
    yield stub
    await stub.stop()


def chain_of(reply: dns.message.Message) -> list[tuple[str, str, list[str]]]:
    return [(r.name.to_text(), dns.rdatatype.to_text(r.rdtype), sorted(x.to_text() for x in r)) for r in reply.answer]


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
async def test_a_chain_that_stops_short_is_completed(gate: Gate, upstream: StubUpstream, path: str, tcp: bool) -> None:
    for rdtype, address in (("A", "192.0.2.10"), ("AAAA", "2001:db8::10")):
        reply = await on_path(gate, upstream, path, partial(query_wire, "WWW.example.test", rdtype), tcp=tcp)
        assert reply.rcode() == dns.rcode.NOERROR
        assert chain_of(reply) == [("WWW.example.test.", "CNAME", ["host.example.test."]),
                                   ("host.example.test.", rdtype, [address])]
        assert [r.ttl for r in reply.answer] == [300, 300] or path == "hit"
        assert all(r.ttl <= 300 for r in reply.answer)
    # each name asked once for each type: the chain's first part, then the target (cached under its own key)
    assert upstream.count("www.example.test") == 2 and upstream.count("host.example.test") == 2
    direct = await gate.query("host.example.test")  # the target's own answer, from the cache
    assert chain_of(direct) == [("host.example.test.", "A", ["192.0.2.10"])]
    assert upstream.count("host.example.test") == 2


async def test_a_chain_completed_over_several_names(gate: Gate, upstream: StubUpstream, path: str) -> None:
    reply = await on_path(gate, upstream, path, lambda: query_wire("c1.example.test"))
    assert chain_of(reply) == [("c1.example.test.", "CNAME", ["c2.example.test."]),
                               ("c2.example.test.", "CNAME", ["host.example.test."]),
                               ("host.example.test.", "A", ["192.0.2.10"])]
    assert [r.ttl for r in reply.answer] == [300, 200, 300] or path == "hit"
    assert upstream.counts() == {"c1.example.test": 1, "c2.example.test": 1, "host.example.test": 1}


async def test_a_dangling_chain_gets_the_targets_nxdomain(gate: Gate, upstream: StubUpstream, path: str) -> None:
    reply = await on_path(gate, upstream, path, lambda: query_wire("dangle.example.test", use_edns=0))
    assert reply.rcode() == dns.rcode.NXDOMAIN  # as unbound: the name the chain leads to does not exist
    assert chain_of(reply) == [("dangle.example.test.", "CNAME", ["gone.example.test."])]
    (soa,) = reply.authority
    assert soa.rdtype == dns.rdatatype.SOA and soa.name.to_text() == "example.test." and soa.ttl <= 60


async def test_nodata_at_the_end_of_a_completed_chain(gate: Gate, upstream: StubUpstream, path: str) -> None:
    reply = await on_path(gate, upstream, path, lambda: query_wire("www.example.test", "MX"))
    assert reply.rcode() == dns.rcode.NOERROR
    assert chain_of(reply) == [("www.example.test.", "CNAME", ["host.example.test."])]
    assert reply.authority[0].rdtype == dns.rdatatype.SOA
    assert upstream.counts() == {"www.example.test": 1, "host.example.test": 1}


async def test_the_upstreams_own_whole_chain_is_not_asked_again(gate: Gate, upstream: StubUpstream) -> None:
    reply = await gate.query("whole.example.test")
    assert len(reply.answer) == 2 and upstream.counts() == {"whole.example.test": 1}
    nodata = await gate.query("whole.example.test", "MX")  # CNAME + SOA: the upstream followed it and found none
    assert nodata.authority and upstream.counts() == {"whole.example.test": 2}


@pytest.mark.parametrize("name", ["loop1.example.test", "self.example.test", "l0.example.test"])
async def test_loops_and_long_chains_end_in_servfail(gate: Gate, upstream: StubUpstream, name: str) -> None:
    for _ in range(2):  # nothing is cached, nothing is left waiting: the second time goes the same way
        started = time.monotonic()
        reply = await gate.query(name)
        assert reply.rcode() == dns.rcode.SERVFAIL and time.monotonic() - started < 1.0  # not a timeout
    asked = sum(upstream.counts().values())
    assert asked <= 2 * (MAX_CHAIN + 1)  # bounded: each name at most once per query
    assert upstream.count("host.example.test") == 0  # l0's chain would need MAX_CHAIN + 2 names: never reached


async def test_the_parts_are_cached_by_their_own_ttls(gate: Gate, upstream: StubUpstream) -> None:
    assert chain_of(await gate.query("brief.example.test"))[1] == ("fleeting.example.test.", "A", ["192.0.2.50"])
    assert chain_of(await gate.query("quick.example.test"))[1] == ("steady.example.test.", "A", ["192.0.2.51"])
    assert (await gate.query("fade.example.test")).rcode() == dns.rcode.NXDOMAIN
    again = await gate.query("brief.example.test")  # a hit: the chain lives as long as its shortest part
    assert [r.ttl for r in again.answer][1] <= 2 and upstream.count("brief.example.test") == 1
    await asyncio.sleep(2.2)  # this test is about time: both short-lived parts expire
    await gate.query("brief.example.test")
    await gate.query("quick.example.test")
    await gate.query("fade.example.test")
    # brief's CNAME (300 s) came again with the whole chain, fleeting (2 s) was asked again;
    # quick's CNAME (2 s) was asked again, steady (300 s) came from its own cache entry; so did
    # gone's NXDOMAIN (60 s) at the end of fade's CNAME (2 s)
    assert upstream.count("brief.example.test") == 2 and upstream.count("fleeting.example.test") == 2
    assert upstream.count("quick.example.test") == 2 and upstream.count("steady.example.test") == 1
    assert upstream.count("fade.example.test") == 2 and upstream.count("gone.example.test") == 1


async def test_a_vendor_anywhere_in_the_completed_chain_is_gated(gate: Gate, upstream: StubUpstream) -> None:
    # stats.shop.test -> edge.cdn.test is all the first answer says; the vendor shows in the second part
    for _ in ("miss", "hit"):
        blocked = await gate.query("stats.shop.test", source="127.0.0.2", use_edns=0)
        assert blocked.rcode() == dns.rcode.NXDOMAIN and not blocked.answer
        (ede,) = [o for o in blocked.options if isinstance(o, dns.edns.EDEOption)]
        assert "ActiveCampaign" in (ede.text or "") and "alias (CNAME) of trackcmp.net" in (ede.text or "")
    assert upstream.count("stats.shop.test") == 1 and upstream.count("edge.cdn.test") == 1
    assert (await gate.http("PUT", "/v1/consent", source="127.0.0.3", json=GRANT))[0] == 200
    allowed = await gate.query("stats.shop.test", source="127.0.0.3")  # the cached whole chain
    assert chain_of(allowed)[-1] == ("x.trackcmp.net.", "A", ["198.51.100.2"])
    assert all(r.ttl <= 10 for r in allowed.answer)  # capped like the vendor's own names
    assert upstream.count("stats.shop.test") == 1


async def test_a_vendors_name_is_not_asked_for_clients_without_consent(gate: Gate, upstream: StubUpstream) -> None:
    # metrics.shop.test -> x.trackcmp.net: the first answer already shows the vendor
    for _ in range(2):
        blocked = await gate.query("metrics.shop.test", source="127.0.0.2")
        assert blocked.rcode() == dns.rcode.NXDOMAIN and not blocked.answer
    assert upstream.count("x.trackcmp.net") == 0  # the vendor's name never left the network for them
    assert (await gate.http("PUT", "/v1/consent", source="127.0.0.3", json=GRANT))[0] == 200
    allowed = await gate.query("metrics.shop.test", source="127.0.0.3")
    assert chain_of(allowed) == [("metrics.shop.test.", "CNAME", ["x.trackcmp.net."]),
                                 ("x.trackcmp.net.", "A", ["198.51.100.2"])]
    assert upstream.count("x.trackcmp.net") == 1
    blocked = await gate.query("metrics.shop.test", source="127.0.0.2")  # the hit is gated too
    assert blocked.rcode() == dns.rcode.NXDOMAIN and not blocked.answer


async def test_clients_asking_together_share_every_part(upstream: StubUpstream, data_dir: Path) -> None:
    upstream.delay = 0.2
    # One attempt per name (a second, asked when a loaded machine held a 0.2 s reply past the usual
    # 0.5 s attempt, would count twice upstream).
    cfg = make_config(upstream, data_dir, upstream=UpstreamConfig(servers=(upstream.address,), timeout=1.5,
                                                                  attempt_timeout=1.5))
    async with running_gate(cfg) as gate:
        replies = await asyncio.gather(*(gate.query("c1.example.test", source=f"127.0.0.{n}") for n in range(2, 6)),
                                       gate.query("c2.example.test"))  # a client asking the middle of the chain
    assert all(len(r.answer) == 3 for r in replies[:4]) and len(replies[4].answer) == 2
    assert upstream.counts() == {"c1.example.test": 1, "c2.example.test": 1, "host.example.test": 1}


async def test_a_target_that_fails_ends_in_servfail_and_leaves_nothing_waiting(gate: Gate,
                                                                               upstream: StubUpstream) -> None:
    upstream.rcode_for = lambda name, _type, _class: dns.rcode.REFUSED if name == "host.example.test" else None
    assert (await gate.query("www.example.test")).rcode() == dns.rcode.SERVFAIL
    assert (await gate.query("c1.example.test")).rcode() == dns.rcode.SERVFAIL
    upstream.rcode_for = None  # the upstream recovers: every name asked during the failure resolves
    for name, length in (("www.example.test", 2), ("c1.example.test", 3), ("c2.example.test", 2),
                         ("host.example.test", 1)):
        reply = await gate.query(name, timeout=2.0)
        assert reply.rcode() == dns.rcode.NOERROR and len(reply.answer) == length, name


async def test_a_silent_target_ends_within_the_querys_deadline(upstream: StubUpstream, data_dir: Path) -> None:
    upstream.rewrite = lambda query, reply: None if b"\x04host" in query else reply
    cfg = make_config(upstream, data_dir)  # upstream.timeout 1.5 s: the whole chain's, not each name's
    async with running_gate(cfg) as g:
        started = time.monotonic()
        data = await udp_raw(g.dns_port, query_wire("c1.example.test"), timeout=5.0)
        elapsed = time.monotonic() - started
    assert data is not None, f"no reply within {elapsed:.2f} s"
    reply = dns.message.from_wire(data)
    assert reply.rcode() == dns.rcode.SERVFAIL
    # Left to the sweep of stranded forwards, it would end after 3.5 s: a second of room below that
    # for a loaded machine.
    assert cfg.upstream.timeout - 0.1 <= elapsed < cfg.upstream.timeout + 1.0
    assert upstream.count("c1.example.test") == 1 and upstream.count("c2.example.test") == 1


async def test_a_chain_that_joins_a_later_lookup_still_ends_by_its_own_deadline(upstream: StubUpstream,
                                                                                data_dir: Path) -> None:
    upstream.delay = 2.0
    upstream.rewrite = lambda query, reply: None if b"\x04host" in query else reply
    # (one attempt each: a second one, asked if the replies came late, would count twice)
    cfg = make_config(upstream, data_dir, upstream=UpstreamConfig(servers=(upstream.address,), timeout=3.0,
                                                                  attempt_timeout=3.0))
    async with running_gate(cfg) as g:
        async def timed(name: str, after: float) -> tuple[int, float, float]:
            await asyncio.sleep(after)
            started = time.monotonic()
            reply = await g.query(name, timeout=6.0)
            return reply.rcode(), started, time.monotonic()

        # c1's answer (at 2 s) stops at c2, which another client asked for at 1.2 s: c1's query
        # waits on that lookup, whose deadline is 1.2 s later than its own. (Each step 0.8 s or more
        # from the next: room for a loaded machine that holds this process up.)
        (first, started, ended), (second, _, second_ended) = await asyncio.gather(
            timed("c1.example.test", 0.0), timed("c2.example.test", 1.2))
    assert first == second == dns.rcode.SERVFAIL
    # (waiting for c2's lookup, c1 would end with it: at once with the other client's query)
    assert ended - started < cfg.upstream.timeout + 0.8 and second_ended - ended > 0.4
    assert upstream.count("c1.example.test") == 1 and upstream.count("c2.example.test") == 1  # one lookup of c2
