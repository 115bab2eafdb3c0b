"""The client ACL and response rate limiting: pure, through Pipeline.answer, and over real sockets."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import pytest

from dnsgate.config import DEFAULT_ALLOWED, DnsConfig
from dnsgate.dns.admission import Admission
from dnsgate.dns.cache import AnswerCache, TtlPolicy
from dnsgate.dns.pipeline import Forward, Pipeline
from dnsgate.dns.sinkhole import Sinkhole
from tests.conftest import make_config, running_gate
from tests.support import consent_fixtures
from tests.support.stub_upstream import StubUpstream

pytestmark = pytest.mark.usefixtures("udp_io")  # every test runs on both UDP paths (dns.udp_io)


def pipeline(admission: Admission) -> Pipeline:
    return Pipeline(consent_fixtures.CATALOG, consent_fixtures.table(), AnswerCache(1000, 10**7),
                    Sinkhole("nxdomain", 5, 1232), udp_max=1232, plain_ttl=TtlPolicy(0, 86400, None),
                    gated_ttl=TtlPolicy(0, 86400, 10), admission=admission)


def wire(name: str = "host.example.test", rdtype: str = "A", **kw: object) -> bytes:
    return dns.message.make_query(name, rdtype, **kw).to_wire()  # type: ignore[arg-type]


@pytest.mark.parametrize("client", ["127.0.0.1", "::1", "10.1.2.3", "172.31.0.1", "192.168.7.7", "100.64.0.1",
                                    "100.127.255.254", "fd00::1", "fe80::1", "169.254.1.1"])
def test_default_acl_answers_local_networks(client: str) -> None:
    p = pipeline(Admission(DEFAULT_ALLOWED))
    assert isinstance(p.answer(wire(), client, False), Forward)
    assert isinstance(p.answer(wire(), client, True), Forward)


@pytest.mark.parametrize("client", ["8.8.8.8", "100.128.0.1", "172.32.0.1", "2001:db8::1", "192.0.2.1", "unknown"])
@pytest.mark.parametrize("tcp", [False, True])
def test_outside_the_acl_is_refused_with_a_reply_no_larger_than_the_query(client: str, tcp: bool) -> None:
    p = pipeline(Admission(DEFAULT_ALLOWED))
    for query in (wire(), wire(use_edns=0, payload=4096, want_dnssec=True), wire("trackcmp.net", "ANY"),
                  wire("x" * 60 + ".example.test", "TXT", use_edns=0)):
        reply = p.answer(query, client, tcp)
        assert isinstance(reply, bytes)
        r = dns.message.from_wire(reply)
        q = dns.message.from_wire(query)
        assert r.rcode() == dns.rcode.REFUSED and r.id == q.id and r.question == q.question
        assert len(reply) <= len(query)
    assert p.answer(b"\x12\x34\x80" + b"\x00" * 20, client, tcp) is None  # QR=1: never answered
    assert p.answer(b"\x00\x01", client, tcp) is None
    assert p.admission.refused == 6
    assert p.counters.outcome(6) == 4  # REFUSED counted (tally.REFUSED)


def test_rate_limit_per_prefix_drops_and_slips_then_refills() -> None:
    p = pipeline(Admission(DEFAULT_ALLOWED, rate=5, slip=2, exempt=()))
    answers = [p.answer(wire(), "192.168.1.10" if i % 2 else "192.168.1.20", False) for i in range(15)]
    assert all(isinstance(a, Forward) for a in answers[:5])  # one bucket for the /24
    over = answers[5:]
    slipped = [a for a in over if isinstance(a, bytes)]
    assert len(slipped) == 5 and over.count(None) == 5  # every second one slips
    for reply in slipped:
        r = dns.message.from_wire(reply)
        assert r.flags & dns.flags.TC and not r.answer and len(reply) <= len(wire())
    assert isinstance(p.answer(wire(), "192.168.2.1", False), Forward)  # another prefix has its own bucket
    assert isinstance(p.answer(wire(), "192.168.1.10", True), Forward)  # TCP proves the source: never limited
    assert isinstance(p.answer(wire(), "127.0.0.1", False), Forward)
    assert (p.admission.dropped, p.admission.slipped) == (5, 5)
    p.admission.tick()
    assert all(isinstance(p.answer(wire(), "192.168.1.30", False), Forward) for _ in range(5))
    assert p.answer(wire(), "192.168.1.30", False) is None


def test_loopback_is_exempt_and_rate_zero_is_off() -> None:
    p = pipeline(Admission(DEFAULT_ALLOWED, rate=2))
    assert all(isinstance(p.answer(wire(), "127.0.0.9", False), Forward) for _ in range(100))
    p = pipeline(Admission(DEFAULT_ALLOWED, rate=0))
    assert all(isinstance(p.answer(wire(), "10.0.0.9", False), Forward) for _ in range(100))


def test_ipv6_prefix_groups_by_56() -> None:
    p = pipeline(Admission(DEFAULT_ALLOWED, rate=3, slip=0, exempt=()))
    results = [p.answer(wire(), f"fd00:1:2:3{i:x}::1", False) for i in range(6)]  # all in fd00:1:2:300::/56
    assert [isinstance(r, Forward) for r in results] == [True] * 3 + [False] * 3
    assert isinstance(p.answer(wire(), "fd00:1:2:400::1", False), Forward)


def test_refused_clients_are_rate_limited_too() -> None:
    p = pipeline(Admission(DEFAULT_ALLOWED, rate=2, slip=1, exempt=()))
    out = [p.answer(wire(), "203.0.113.5", False) for _ in range(5)]
    assert [type(o).__name__ for o in out] == ["bytes", "bytes", "NoneType", "NoneType", "NoneType"]  # no slip


def test_memo_and_buckets_stay_bounded() -> None:
    a = Admission(DEFAULT_ALLOWED, rate=10, exempt=())
    p = pipeline(a)
    for i in range(70_000):
        p.answer(wire(), f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", False)
    assert len(a.gates) <= 65_536
    a.tick()
    assert len(a.buckets) <= 2 * 65_536


# ------------------------------------------------------------------------------------------------
# Over real sockets


async def test_acl_refuses_over_udp_and_tcp(upstream: StubUpstream, data_dir: Path) -> None:
    cfg = make_config(upstream, data_dir)
    cfg = replace(cfg, dns=replace(cfg.dns, allow_clients=("127.0.0.2/32",)))
    async with running_gate(cfg) as g:
        for tcp in (False, True):
            refused = await g.query("host.example.test", source="127.0.0.1", tcp=tcp)
            assert refused.rcode() == dns.rcode.REFUSED and not refused.answer
            ok = await g.query("host.example.test", source="127.0.0.2", tcp=tcp)
            assert ok.rcode() == dns.rcode.NOERROR and ok.answer
    assert upstream.count("host.example.test") == 1


async def test_rate_limit_over_udp_sockets(upstream: StubUpstream, data_dir: Path) -> None:
    cfg = make_config(upstream, data_dir)
    cfg = replace(cfg, dns=replace(cfg.dns, rate_limit=4, rate_limit_slip=2, rate_limit_exempt=()))
    async with running_gate(cfg) as g:
        answered = truncated = silent = 0
        for _ in range(12):
            try:
                r = await g.query("host.example.test", source="127.0.0.3", timeout=0.3)
            except dns.exception.Timeout:
                silent += 1
                continue
            if r.flags & dns.flags.TC:
                truncated += 1
            else:
                answered += 1
        # At most 4 (+4 if a refill tick fell inside the loop) answered; the rest dropped or slipped.
        assert 4 <= answered <= 8 and truncated >= 2 and silent >= 2
        r = await g.query("host.example.test", source="127.0.0.3", tcp=True)  # the retry a TC invites
        assert r.answer
        await asyncio.sleep(0)


def test_defaults_match_the_documented_acl() -> None:
    assert DnsConfig().allow_clients == DEFAULT_ALLOWED


def test_amplification_is_bounded() -> None:
    """The figures of tests/bench/amplification.py, held as limits."""
    from tests.bench import amplification as amp

    assert amp.worst(amp.pipeline(), amp.OUTSIDE)[0] <= 1.0  # REFUSED is never larger than the query
    inside, _ = amp.worst(amp.pipeline(), amp.INSIDE)
    assert inside <= 1232 / 17  # at most udp_max_size for the smallest possible query
    big = dns.message.make_query(amp.BIG, "TXT").to_wire()
    assert amp.flood(amp.pipeline(), amp.OUTSIDE, big, 20_000)[0] < 0.1
    assert amp.flood(amp.pipeline(), amp.INSIDE, big, 20_000)[0] < 1.0  # rate limit and slip
