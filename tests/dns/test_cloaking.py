"""Answers that lead into a gated vendor (CNAME cloaking, aliases, addresses), driven without sockets."""

from __future__ import annotations

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import pytest

from dnsgate.config import ListSource
from dnsgate.dns.cache import Entry, TtlPolicy
from dnsgate.dns.pipeline import Forward, Pipeline
from dnsgate.dns.sinkhole import Sinkhole
from dnsgate.rules.blocklists import build_index, parse_list
from dnsgate.rules.catalog import Catalog, builtin_catalog_text, parse_catalog_files
from dnsgate.rules.ruleset import list_rule
from tests.dns.test_pipeline import Clock, answer, build, forward, grant, query, upstream_reply
from tests.rules.test_catalog_dropins import ADS

CLOAK = "metrics.shop.example. 300 IN CNAME x.trackcmp.net."
TRACKER_A = "x.trackcmp.net. 300 IN A 198.51.100.2"
# NODATA at the end of the chain, as a recursive upstream says it (without it the chain stops short:
# the resolver asks for the target, test_chains.py)
TRACKER_SOA = "trackcmp.net. 300 IN SOA ns.trackcmp.net. host.trackcmp.net. 1 3600 600 86400 60"


@pytest.fixture
def clock() -> Clock:
    return Clock()


def with_catalog(p: Pipeline, catalog: Catalog) -> Pipeline:
    p.install(catalog, p.sinkhole, p.plain_ttl, p.gated_ttl)
    return p


def ede(reply: dns.message.Message) -> str:
    (option,) = [o for o in reply.options if isinstance(o, dns.edns.EDEOption)]
    assert option.code == dns.edns.EDECode.BLOCKED
    return option.text or ""


def assert_sinkholed(reply: dns.message.Message, qname: str) -> None:
    assert reply.rcode() == dns.rcode.NXDOMAIN and not reply.answer
    (soa,) = reply.authority
    assert soa.name.to_text() == qname + "."  # in bailiwick: the SOA is the asked name's, not the tracker's
    assert soa.ttl == 5


# ANY is not forwarded at all (RFC 8482: dnsgate answers HINFO itself), so no cloaked answer can come back.
@pytest.mark.parametrize("rdtype", ["A", "AAAA", "HTTPS", "TXT", "MX", "CNAME"])
def test_cloaked_tracker_is_gated_on_miss_and_hit(clock: Clock, rdtype: str) -> None:
    p = build(clock)
    records = [CLOAK, TRACKER_A] if rdtype == "A" else [CLOAK]
    soa = None if rdtype in ("A", "CNAME") else TRACKER_SOA
    miss = forward(p, query("metrics.shop.example", rdtype, use_edns=0), *records, soa=soa)
    assert_sinkholed(miss, "metrics.shop.example")
    assert ede(miss) == ("ActiveCampaign (activecampaign) is blocked: no consent for category 'marketing'; "
                         "the name is an alias (CNAME) of trackcmp.net")
    hit = answer(p, query("Metrics.Shop.Example", rdtype, use_edns=0))
    assert_sinkholed(hit, "Metrics.Shop.Example")
    assert p.counters.cached == 0 and p.counters.sinkholed == 2

    grant(p, "127.0.0.2")
    allowed = answer(p, query("metrics.shop.example", rdtype), "127.0.0.2")  # the cached answer
    assert allowed.rcode() == dns.rcode.NOERROR
    assert allowed.answer[0].to_text().startswith("metrics.shop.example. 10 IN CNAME")  # capped like the tracker
    assert_sinkholed(answer(p, query("metrics.shop.example", rdtype)), "metrics.shop.example")


def test_a_longer_chain_and_a_dname(clock: Clock) -> None:
    p = build(clock)
    chain = forward(p, query("a.shop.example"), "a.shop.example. 300 IN CNAME b.cdn.example.",
                    "b.cdn.example. 300 IN CNAME c.prism.app-us1.com.", "c.prism.app-us1.com. 300 IN A 198.51.100.3")
    assert chain.rcode() == dns.rcode.NXDOMAIN
    dname = forward(p, query("x.track.shop.example"), "track.shop.example. 300 IN DNAME trackcmp.net.",
                    "x.track.shop.example. 300 IN CNAME x.trackcmp.net.", TRACKER_A)
    assert dname.rcode() == dns.rcode.NXDOMAIN


def test_a_cname_to_an_ungated_name_is_answered(clock: Clock) -> None:
    p = build(clock)
    r = forward(p, query("www.shop.example"), "www.shop.example. 300 IN CNAME shop.cdn.example.",
                "shop.cdn.example. 300 IN A 192.0.2.7")
    assert r.rcode() == dns.rcode.NOERROR and r.answer[0].ttl == 300  # not capped either
    # look-alikes of the tracker in an answer are not the tracker
    r = forward(p, query("x.shop.example"), "x.shop.example. 300 IN CNAME trackcmp.net.evil.test.",
                "trackcmp.net.evil.test. 300 IN A 192.0.2.8")
    assert r.rcode() == dns.rcode.NOERROR


@pytest.mark.parametrize(("rdata", "gated"), [
    ("0 x.trackcmp.net.", True),  # AliasMode into the tracker
    ("1 x.trackcmp.net. alpn=h2", True),  # ServiceMode served by the tracker
    ("1 . alpn=h2 ipv4hint=192.0.2.1", False),  # served by the name itself
    ("1 svc.cdn.example. alpn=h2", False),
])
def test_https_targets(clock: Clock, rdata: str, gated: bool) -> None:
    p = build(clock)
    r = forward(p, query("shop.example", "HTTPS"), f"shop.example. 300 IN HTTPS {rdata}")
    assert (r.rcode() == dns.rcode.NXDOMAIN) is gated


def with_ip_ranges(clock: Clock) -> Pipeline:
    return with_catalog(build(clock), parse_catalog_files(("vendors.toml", builtin_catalog_text()),
                                                          [("ads.toml", ADS)]))


@pytest.mark.parametrize(("rdtype", "record", "gated"), [
    ("A", "203.0.113.9", True),
    ("A", "203.0.113.200", False),
    ("AAAA", "2001:db8:ad::1", True),
    ("AAAA", "2001:db8:1::1", False),
    ("HTTPS", "1 . ipv4hint=192.0.2.1,203.0.113.1", True),
    ("HTTPS", "1 . ipv6hint=2001:db8:ad::5", True),
    ("HTTPS", "1 . ipv4hint=192.0.2.1 ipv6hint=2001:db8::1", False),
])
def test_answers_inside_a_vendors_ip_ranges(clock: Clock, rdtype: str, record: str, gated: bool) -> None:
    p = with_ip_ranges(clock)
    r = forward(p, query("shop.example", rdtype, use_edns=0), f"shop.example. 300 IN {rdtype} {record}")
    assert (r.rcode() == dns.rcode.NXDOMAIN) is gated
    if gated:
        assert ede(r).startswith("AdCo (adco) is blocked: no consent for category 'ads'; the answer points into ")
        assert answer(p, query("shop.example", rdtype)).rcode() == dns.rcode.NXDOMAIN  # hit
        grant(p, "127.0.0.2", "ads")
        assert answer(p, query("shop.example", rdtype), "127.0.0.2").rcode() == dns.rcode.NOERROR


def test_a_cname_into_an_imported_list(clock: Clock) -> None:
    rule = list_rule(ListSource(id="easyprivacy", name="EasyPrivacy", category="analytics", file="/x"))
    index = build_index([(rule, parse_list([b"||stats.example.net^\n"]))], [])
    p = with_catalog(build(clock), build(clock).catalog.with_lists(index, (rule.vendor,)))
    assert_sinkholed(answer(p, query("a.stats.example.net")), "a.stats.example.net")  # listed itself
    r = forward(p, query("stats.shop.example", use_edns=0), "stats.shop.example. 300 IN CNAME s.stats.example.net.",
                "s.stats.example.net. 300 IN A 192.0.2.9")
    assert_sinkholed(r, "stats.shop.example")
    assert ede(r) == ("blocked by list 'EasyPrivacy' (easyprivacy): no consent for category 'analytics'; "
                      "the name is an alias (CNAME) of a listed name")
    grant(p, "127.0.0.2", "analytics")
    assert answer(p, query("stats.shop.example"), "127.0.0.2").rcode() == dns.rcode.NOERROR


def test_fast_path_agrees_on_list_blocked_names(clock: Clock) -> None:
    rule = list_rule(ListSource(id="ads", category="analytics", file="/x"))
    p = build(clock)
    with_catalog(p, p.catalog.with_lists(build_index([(rule, parse_list([b"0.0.0.0 ads.example.net\n"]))], [])))
    for q in (query("ads.example.net"), query("ADS.example.net", "AAAA", use_edns=0, want_dnssec=True)):
        wire_q = q.to_wire()
        general = p._answer_general(wire_q, "127.0.0.1", False)  # fills the memo
        fast = p.answer(wire_q, "127.0.0.1", False)
        assert isinstance(fast, bytes) and fast == general
        assert dns.message.from_wire(fast).rcode() == dns.rcode.NXDOMAIN


def test_fast_path_agrees_on_cloaked_hits(clock: Clock) -> None:
    p = build(clock)
    grant(p, "127.0.0.2")
    forward(p, query("metrics.shop.example"), CLOAK, TRACKER_A)
    forward(p, query("metrics.shop.example", use_edns=0, want_dnssec=True), CLOAK, TRACKER_A)
    for q, client in [(query("metrics.shop.example"), "127.0.0.1"), (query("metrics.shop.example"), "127.0.0.2"),
                      (query("METRICS.shop.example", use_edns=0, want_dnssec=True), "127.0.0.1"),
                      (query("metrics.shop.example", use_edns=0, want_dnssec=True), "127.0.0.2")]:
        wire_q = q.to_wire()
        fast = p.answer(wire_q, client, False)
        assert isinstance(fast, bytes) and fast == p._answer_general(wire_q, client, False)


def test_install_swaps_rules_and_empties_the_cache(clock: Clock) -> None:
    p = build(clock)
    forward(p, query("metrics.shop.example"), CLOAK, TRACKER_A)
    forward(p, query("host.example.test"), "host.example.test. 300 IN A 192.0.2.10")
    assert len(p.cache) == 2
    office = p.catalog.without_vendors(["activecampaign"])
    p.install(office, Sinkhole("null", 7, 1232), TtlPolicy(0, 60, None), TtlPolicy(0, 60, 5))
    assert len(p.cache) == 0 and p.catalog is office
    r = forward(p, query("metrics.shop.example"), CLOAK, TRACKER_A)
    assert r.rcode() == dns.rcode.NOERROR and r.answer[0].ttl == 60  # the new TTL policy


def test_a_forward_that_straddles_a_reload_is_gated_by_the_new_rules(clock: Clock) -> None:
    p = build(clock)
    old = p.catalog
    p.install(old.without_vendors(["activecampaign"]), p.sinkhole, p.plain_ttl, p.gated_ttl)
    q = query("x.trackcmp.net")
    fwd = p.answer(q.to_wire(), "127.0.0.1", False)
    assert isinstance(fwd, Forward) and fwd.rule is None  # not gated when it left
    p.install(old.with_lists(None), p.sinkhole, p.plain_ttl, p.gated_ttl)  # ActiveCampaign is back
    entry = p.admit(fwd, upstream_reply(q, TRACKER_A))
    assert isinstance(entry, Entry) and entry.rule is not None and entry.rule.vendor.id == "activecampaign"
    reply = dns.message.from_wire(p.complete(fwd, entry))
    assert reply.rcode() == dns.rcode.NXDOMAIN
    assert not reply.flags & dns.flags.AA
