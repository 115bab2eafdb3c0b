"""The per-query decision, driven without sockets: parse, match, consent, sinkhole/cache/forward."""

from __future__ import annotations

import dataclasses

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from dnsgate.config import LocalConfig
from dnsgate.consent.notice import items_of
from dnsgate.dns.cache import AnswerCache, Entry, TtlPolicy
from dnsgate.dns.identity import QueryIdentity
from dnsgate.dns.local_answers import default_table
from dnsgate.dns.pipeline import Forward, Pipeline
from dnsgate.dns.sinkhole import Sinkhole
from dnsgate.dns.tally import LOCAL, REFUSED, STALE
from tests.support import consent_fixtures


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def build(clock: Clock, mode: str = "nxdomain", max_entries: int = 1000) -> Pipeline:
    table = consent_fixtures.table()
    return Pipeline(
        consent_fixtures.CATALOG, table, AnswerCache(max_entries, 10**7),
        Sinkhole(mode, 5, 1232), udp_max=1232,  # type: ignore[arg-type]
        plain_ttl=TtlPolicy(0, 86400, None), gated_ttl=TtlPolicy(0, 86400, 10),
        mono=clock, wall=lambda: 1_700_000_000.0,
        identity=QueryIdentity(table, ["127.0.0.53"], "consent.dnsgate.internal", lambda token, _: token == "t0k"),
    )


def query(name: str, rdtype: str = "A", **kwargs: object) -> dns.message.QueryMessage:
    q = dns.message.make_query(name, rdtype, **kwargs)  # type: ignore[arg-type]
    assert isinstance(q, dns.message.QueryMessage)
    return q


def upstream_reply(q: dns.message.Message, *records: str, rcode: int = 0, soa: str | None = None) -> bytes:
    """What an upstream would send for `q` (with its own ID and OPT)."""
    r = dns.message.make_response(q)
    r.set_rcode(dns.rcode.Rcode.make(rcode))
    r.flags |= dns.flags.AA  # must not reach the client
    add_records(r, records, soa)
    r.use_edns(0, payload=4096)
    return r.to_wire()


def add_records(r: dns.message.Message, answers: tuple[str, ...], authority: str | None = None) -> None:
    """Append records written as zone-file lines ("name ttl IN type rdata")."""
    for section, lines in ((r.answer, answers), (r.authority, (authority,) if authority else ())):
        for text in lines:
            name, ttl, _, rdtype, rdata = text.split(None, 4)
            section.append(dns.rrset.from_text(name, int(ttl), "IN", rdtype, rdata))


def answer(p: Pipeline, q: dns.message.Message, client: str = "127.0.0.1", tcp: bool = False) -> dns.message.Message:
    out = p.answer(q.to_wire(), client, tcp)
    assert isinstance(out, bytes), out
    return dns.message.from_wire(out)


def forward(p: Pipeline, q: dns.message.Message, *records: str, client: str = "127.0.0.1",
            **kw: object) -> dns.message.Message:
    out = p.answer(q.to_wire(), client, False)
    assert isinstance(out, Forward), out
    entry = p.admit(out, upstream_reply(q, *records, **kw))  # type: ignore[arg-type]
    assert isinstance(entry, Entry), "a chain that stops short: the resolver completes it (dns/cname_chains.py)"
    return dns.message.from_wire(p.complete(out, entry))


def grant(p: Pipeline, client: str, category: str = "marketing", expires: float = 2_000_000_000.0) -> None:
    """A choice granting `category` that covers every item of the pipeline's catalog (its vendors and
    lists), as a page listing them would have; the table's notice lists them too."""
    items = {i.key: i.fingerprint for i in items_of(p.catalog)}
    notice = p.consent.notice
    if notice is not None and any(notice.items.get(k) != v for k, v in items.items()):
        p.consent.set_notice(dataclasses.replace(notice, items={**notice.items, **items}))
    p.consent.put(consent_fixtures.choice(client, categories={category: True}, expires_at=expires, items=items))


@pytest.mark.parametrize("rdtype", ["A", "AAAA", "HTTPS", "MX", "TXT", "CNAME", "ANY", "TYPE65280"])
def test_sinkhole_every_type_nxdomain_with_short_soa(clock: Clock, rdtype: str) -> None:
    p = build(clock)
    r = answer(p, query("x.TrackCmp.net", rdtype))
    assert r.rcode() == dns.rcode.NXDOMAIN
    assert r.question[0].name.to_text() == "x.TrackCmp.net."  # the client's case echoed
    assert not r.answer
    (soa,) = r.authority
    assert soa.name.to_text() == "trackcmp.net." and soa.ttl == 5 and soa[0].minimum == 5
    assert r.flags & dns.flags.QR and r.flags & dns.flags.RA and r.flags & dns.flags.RD
    assert not r.flags & dns.flags.AA
    assert r.edns == -1  # no OPT asked, none given


def test_sinkhole_with_edns_carries_ede_naming_vendor_and_category(clock: Clock) -> None:
    r = answer(build(clock), query("prism.app-us1.com", use_edns=0, want_dnssec=True))
    assert r.edns == 0 and r.ednsflags & dns.flags.DO
    (ede,) = r.options
    assert isinstance(ede, dns.edns.EDEOption) and ede.code == dns.edns.EDECode.BLOCKED
    assert "ActiveCampaign" in (ede.text or "") and "marketing" in (ede.text or "")


@pytest.mark.parametrize(("rdtype", "rdata"), [("A", "0.0.0.0"), ("AAAA", "::")])
def test_null_mode_addresses(clock: Clock, rdtype: str, rdata: str) -> None:
    r = answer(build(clock, mode="null"), query("trackcmp.net", rdtype))
    assert r.rcode() == dns.rcode.NOERROR
    (rrset,) = r.answer
    assert rrset.ttl == 5 and [x.to_text() for x in rrset] == [rdata]


def test_null_mode_other_types_nodata_with_soa(clock: Clock) -> None:
    r = answer(build(clock, mode="null"), query("trackcmp.net", "HTTPS"))
    assert r.rcode() == dns.rcode.NOERROR and not r.answer and r.authority[0].ttl == 5


def test_gate_then_forward_then_gate_again(clock: Clock) -> None:
    p = build(clock)
    assert answer(p, query("trackcmp.net")).rcode() == dns.rcode.NXDOMAIN
    grant(p, "127.0.0.2")
    r = forward(p, query("trackcmp.net"), "trackcmp.net. 300 IN A 198.51.100.1", client="127.0.0.2")
    assert r.answer[0].ttl == 10  # gated names' real answers are capped
    # the cache now holds the real answer; another client still gets the sinkhole
    assert answer(p, query("trackcmp.net"), "127.0.0.3").rcode() == dns.rcode.NXDOMAIN
    assert answer(p, query("trackcmp.net"), "127.0.0.2").answer[0][0].to_text() == "198.51.100.1"
    for c in p.consent.choices():
        p.consent.remove(c.id)
    assert answer(p, query("trackcmp.net"), "127.0.0.2").rcode() == dns.rcode.NXDOMAIN


def test_expired_grant_no_longer_counts(clock: Clock) -> None:
    p = build(clock)
    grant(p, "127.0.0.2", expires=1_699_999_999.0)
    assert answer(p, query("trackcmp.net"), "127.0.0.2").rcode() == dns.rcode.NXDOMAIN


def test_a_kept_sinkhole_answer_follows_each_query_every_consent_change_and_reload(clock: Clock) -> None:
    """A client's sinkhole answer to a question is kept once made (the blocked workload asks the
    same names again and again), served with each query's own ID, case and EDNS form, and never
    after the decision behind it changed: a grant, a withdrawal, a reload."""
    wall = consent_fixtures.FakeClock(1_700_000_000.0)
    p = build(clock)
    p.wall = wall
    client = "127.0.0.2"
    asked = [query("x.trackcmp.net"), query("X.TrackCmp.NET"), query("x.trackcmp.net", use_edns=0),
             query("x.trackcmp.net", use_edns=0, want_dnssec=True), query("x.Trackcmp.net")]
    for q in asked:
        r = answer(p, q, client)
        assert r.rcode() == dns.rcode.NXDOMAIN and r.id == q.id
        assert r.question[0].name.to_text() == q.question[0].name.to_text()  # the case as asked
        assert r.edns == q.edns and (r.ednsflags & dns.flags.DO) == (q.ednsflags & dns.flags.DO)
        assert bool(r.options) == (q.edns >= 0)  # the Extended DNS Error, with EDNS only
    assert p.sunk > 0  # (kept again when the EDNS form changed)
    assert answer(p, query("x.trackcmp.net"), "127.0.0.3").rcode() == dns.rcode.NXDOMAIN  # another client's own
    grant(p, client, expires=wall.now + 60)
    assert isinstance(p.answer(query("x.trackcmp.net").to_wire(), client, False), Forward)
    assert answer(p, query("x.trackcmp.net"), "127.0.0.3").rcode() == dns.rcode.NXDOMAIN
    for c in p.consent.choices():
        p.consent.remove(c.id)
    assert answer(p, query("x.trackcmp.net"), client).rcode() == dns.rcode.NXDOMAIN
    assert answer(p, query("x.trackcmp.net"), client).rcode() == dns.rcode.NXDOMAIN  # kept again
    p.install(p.catalog, Sinkhole("null", 5, 1232), p.plain_ttl, p.gated_ttl)  # a reload: A 0.0.0.0 now
    r = answer(p, query("x.trackcmp.net"), client)
    assert r.rcode() == dns.rcode.NOERROR and r.answer[0][0].to_text() == "0.0.0.0"


def test_a_change_for_one_client_keeps_every_other_client_s_kept_sinkhole_answers(clock: Clock) -> None:
    """Consent changes come at any time (a hundred a second on a busy network): a client's change
    forgets that client's kept sinkhole answers, not those of every client on the network."""
    p = build(clock)
    grant(p, "127.0.0.9", category="analytics")  # (the notice now lists the catalog's items)
    for client in ("127.0.0.2", "127.0.0.3"):
        assert answer(p, query("x.trackcmp.net"), client).rcode() == dns.rcode.NXDOMAIN
    rendered = p.sunk
    grant(p, "127.0.0.2")
    assert answer(p, query("x.trackcmp.net"), "127.0.0.3").rcode() == dns.rcode.NXDOMAIN
    assert p.sunk == rendered  # the other client's answer served as kept
    assert isinstance(p.answer(query("x.trackcmp.net").to_wire(), "127.0.0.2", False), Forward)
    for c in p.consent.choices():
        if c.subject.address == "127.0.0.2":
            p.consent.remove(c.id)
    assert answer(p, query("x.trackcmp.net"), "127.0.0.2").rcode() == dns.rcode.NXDOMAIN
    assert p.sunk == rendered + 1  # decided again, and kept again
    assert answer(p, query("x.trackcmp.net"), "127.0.0.3").rcode() == dns.rcode.NXDOMAIN
    assert p.sunk == rendered + 1


class CountingClock(consent_fixtures.FakeClock):
    def __init__(self, now: float) -> None:
        super().__init__(now)
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now


def test_a_kept_sinkhole_answer_holds_until_its_decision_s_time_limit(clock: Clock) -> None:
    """A decision with no time limit (nobody chose) is served again without reading the wall clock;
    one with a limit (a refusal that expires) is kept until then and made again after it."""
    wall = CountingClock(1_700_000_000.0)
    p = build(clock)
    p.wall = wall
    q = query("y.trackcmp.net", use_edns=0)

    def ede(client: str) -> str:
        r = answer(p, q, client)
        assert r.rcode() == dns.rcode.NXDOMAIN
        return str(r.options[0].text)

    for _ in range(2):  # matched on the general path, then decided and kept on the fast one
        assert "no consent for category" in ede("127.0.0.4")
    reads = wall.reads
    for _ in range(3):
        assert "no consent for category" in ede("127.0.0.4")
    assert wall.reads == reads
    p.consent.put(consent_fixtures.choice("127.0.0.5", categories={"marketing": False}, expires_at=wall.now + 60))
    assert "refused" in ede("127.0.0.5")
    reads = wall.reads
    assert "refused" in ede("127.0.0.5")  # kept: the clock read once, against the refusal's expiry
    assert wall.reads == reads + 1
    wall.advance(61)
    assert "no consent for category" in ede("127.0.0.5")


def test_other_category_does_not_open_marketing(clock: Clock) -> None:
    p = build(clock)
    grant(p, "127.0.0.2", category="analytics")
    assert answer(p, query("trackcmp.net"), "127.0.0.2").rcode() == dns.rcode.NXDOMAIN


def test_cache_hit_decrements_ttl_and_echoes_case_and_id(clock: Clock) -> None:
    p = build(clock)
    q = query("host.example.test")
    r = forward(p, q, "host.example.test. 300 IN A 192.0.2.10")
    assert r.answer[0].ttl == 300 and not r.flags & dns.flags.AA and r.edns == -1
    clock.now += 42.7
    q2 = query("HOST.Example.TEST")
    r2 = answer(p, q2)
    assert r2.id == q2.id
    assert r2.question[0].name.to_text() == "HOST.Example.TEST."
    assert r2.answer[0].ttl == 258
    assert not r2.flags & dns.flags.AA
    clock.now += 300
    assert isinstance(p.answer(q2.to_wire(), "127.0.0.1", False), Forward)  # expired


def test_edns_on_hit_only_if_asked(clock: Clock) -> None:
    p = build(clock)
    forward(p, query("host.example.test"), "host.example.test. 300 IN A 192.0.2.10")
    assert answer(p, query("host.example.test")).edns == -1
    r = answer(p, query("host.example.test", use_edns=0, payload=4096))
    assert r.edns == 0 and r.payload == 1232 and not r.options  # the same entry serves both


def test_negative_answer_cached_for_soa_minimum(clock: Clock) -> None:
    p = build(clock)
    soa = "example.test. 3600 IN SOA ns.example.test. h.example.test. 1 3600 600 86400 60"
    r = forward(p, query("gone.example.test"), rcode=dns.rcode.NXDOMAIN, soa=soa)
    assert r.rcode() == dns.rcode.NXDOMAIN and r.authority[0].ttl == 60
    clock.now += 59
    assert answer(p, query("gone.example.test")).authority[0].ttl == 1
    clock.now += 1
    assert isinstance(p.answer(query("gone.example.test").to_wire(), "127.0.0.1", False), Forward)


def test_servfail_and_nodata_without_soa_are_not_cached(clock: Clock) -> None:
    p = build(clock)
    forward(p, query("sf.example.test"), rcode=dns.rcode.SERVFAIL)
    assert isinstance(p.answer(query("sf.example.test").to_wire(), "127.0.0.1", False), Forward)
    forward(p, query("nodata.example.test"))
    assert isinstance(p.answer(query("nodata.example.test").to_wire(), "127.0.0.1", False), Forward)


def test_udp_truncation_and_tcp_full(clock: Clock) -> None:
    p = build(clock)
    records = [f"big.example.test. 300 IN TXT \"{'x' * 200} {i}\"" for i in range(8)]
    q = query("big.example.test", "TXT", use_edns=0, payload=4096)
    out = p.answer(q.to_wire(), "127.0.0.1", True)
    assert isinstance(out, Forward)
    entry = p.admit(out, upstream_reply(q, *records))
    assert isinstance(entry, Entry)
    r = dns.message.from_wire(p.complete(out, entry))
    assert len(r.answer[0]) == 8
    udp = answer(p, query("big.example.test", "TXT"))  # 512 without EDNS
    assert udp.flags & dns.flags.TC and not udp.answer
    udp_edns = answer(p, query("big.example.test", "TXT", use_edns=0, payload=1232))
    assert udp_edns.flags & dns.flags.TC and udp_edns.edns == 0
    assert len(answer(p, query("big.example.test", "TXT"), tcp=True).answer[0]) == 8


def test_fast_path_and_general_path_agree(clock: Clock) -> None:
    """The inlined fast path must give byte-identical replies to the general path."""
    p = build(clock)
    grant(p, "127.0.0.2")
    forward(p, query("host.example.test"), "host.example.test. 300 IN A 192.0.2.10")
    forward(p, query("host.example.test", use_edns=0, want_dnssec=True), "host.example.test. 300 IN A 192.0.2.10")
    forward(p, query("trackcmp.net"), "trackcmp.net. 300 IN A 198.51.100.1", client="127.0.0.2")
    forward(p, query("host.example.test", "HTTPS"), 'host.example.test. 300 IN HTTPS 1 . alpn="h2"')
    cases = [
        (query("Host.example.test", "HTTPS"), "127.0.0.1"),  # type 65 is the byte "A": never case-folded
        (query("host.example.test"), "127.0.0.1"),
        (query("HOST.example.test", use_edns=0, want_dnssec=True), "127.0.0.1"),
        (query("trackcmp.net"), "127.0.0.1"),
        (query("trackcmp.net"), "127.0.0.2"),
        (query("x.trackcmp.net", "AAAA", use_edns=0), "127.0.0.1"),
    ]
    for q, client in cases:
        wire_q = q.to_wire()
        fast = p.answer(wire_q, client, False)
        general = p._answer_general(wire_q, client, False)
        assert isinstance(fast, bytes) and fast == general, q.question


def test_type_and_class_bytes_are_not_case_folded(clock: Clock) -> None:
    p = build(clock)
    forward(p, query("host.example.test", "HTTPS"), 'host.example.test. 300 IN HTTPS 1 . alpn="h2"')
    assert isinstance(p.answer(query("host.example.test", "TYPE97").to_wire(), "127.0.0.1", False), Forward)
    assert answer(p, query("HOST.example.test", "HTTPS")).answer[0].rdtype == dns.rdatatype.HTTPS


def test_fast_path_serves_common_hits_without_the_parser(clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path's cache keys must be the general path's: else its hits turn into slow-path
    work, or worse, find another key's entry (DO queries once found the CD entry)."""
    p = build(clock)
    cd = query("host.example.test")
    cd.flags |= dns.flags.CD
    shapes = [  # each cached with its own address, so a hit on the wrong entry shows
        (query("host.example.test"), "192.0.2.10"),
        (query("host.example.test", use_edns=0, want_dnssec=True), "192.0.2.11"),
        (cd, "192.0.2.12"),
        (query("host.example.test", "HTTPS"), "1 . alpn=\"h2\""),
    ]
    for q, rdata in shapes:
        rdtype = dns.rdatatype.to_text(q.question[0].rdtype)
        forward(p, q, f"host.example.test. 300 IN {rdtype} {rdata}")
    shapes.append((query("host.example.test", use_edns=0), "192.0.2.10"))  # EDNS without DO: the plain entry
    blocked = [query("x.trackcmp.net"), query("x.trackcmp.net", use_edns=0, want_dnssec=True)]
    for q in blocked:  # a gated question's first sight (general path) lets the fast path sinkhole it after
        p.answer(q.to_wire(), "127.0.0.1", False)

    def no_parsing(data: bytes) -> object:
        raise AssertionError("the general path parsed a query the fast path should answer")

    monkeypatch.setattr("dnsgate.dns.pipeline.parse_query", no_parsing)
    for q, rdata in shapes:
        assert [r.to_text() for r in answer(p, q).answer[0]] == [rdata], q.question
    for q in blocked:
        assert answer(p, q).rcode() == dns.rcode.NXDOMAIN


def test_local_any_and_stale_answers_are_counted(clock: Clock) -> None:
    p = Pipeline(
        consent_fixtures.CATALOG, consent_fixtures.table(), AnswerCache(1000, 10**7, stale_window=60),
        Sinkhole("nxdomain", 5, 1232), udp_max=1232, plain_ttl=TtlPolicy(0, 86400, None),
        gated_ttl=TtlPolicy(0, 86400, 10), mono=clock, wall=lambda: 1_700_000_000.0,
        local=default_table(LocalConfig()),
    )
    assert answer(p, query("localhost")).answer
    assert answer(p, query("host.example.test", "ANY")).answer[0].rdtype == dns.rdatatype.HINFO
    assert answer(p, query("example.test", "AXFR"), tcp=True).rcode() == dns.rcode.REFUSED
    forward(p, query("host.example.test"), "host.example.test. 60 IN A 192.0.2.10")
    clock.now += 61
    out = p.answer(query("host.example.test").to_wire(), "127.0.0.1", False)
    assert isinstance(out, Forward)
    stale = p.stale(out)
    assert stale is not None and dns.message.from_wire(stale).answer[0].ttl == 30
    assert (p.counters.outcome(LOCAL), p.counters.outcome(REFUSED), p.counters.outcome(STALE)) == (2, 1, 1)


def test_cd_bit_is_part_of_the_key(clock: Clock) -> None:
    p = build(clock)
    forward(p, query("host.example.test"), "host.example.test. 300 IN A 192.0.2.10")
    q = query("host.example.test")
    q.flags |= dns.flags.CD
    assert isinstance(p.answer(q.to_wire(), "127.0.0.1", False), Forward)


def test_garbage_and_responses(clock: Clock) -> None:
    p = build(clock)
    assert p.answer(b"", "127.0.0.1", False) is None
    assert p.answer(b"\x00" * 11, "127.0.0.1", False) is None
    r = query("host.example.test")
    r.flags |= dns.flags.QR
    assert p.answer(r.to_wire(), "127.0.0.1", False) is None
    out = p.answer(b"\xab\xcd" + b"\x01\x00\x00\x01" + b"\xff" * 20, "127.0.0.1", False)
    assert isinstance(out, bytes) and len(out) == 12 and out[:2] == b"\xab\xcd" and out[3] & 0xF == 1


def test_badvers(clock: Clock) -> None:
    r = answer(build(clock), query("host.example.test", use_edns=1))
    assert r.rcode() == dns.rcode.BADVERS and r.edns == 0 and not r.answer


def test_cache_bound(clock: Clock) -> None:
    p = build(clock, max_entries=3)
    for i in range(10):
        forward(p, query(f"n{i}.example.test"), f"n{i}.example.test. 300 IN A 192.0.2.1")
    assert len(p.cache) == 3 and p.cache.evictions == 7


def test_pairing_names_are_answered_here_and_never_forwarded(clock: Clock) -> None:
    p = build(clock)
    assert answer(p, query("T0K.pair.consent.dnsgate.internal")).rcode() == dns.rcode.NOERROR
    r = answer(p, query("nope.pair.consent.dnsgate.internal", "AAAA", use_edns=0))
    assert r.rcode() == dns.rcode.NXDOMAIN and not r.authority  # no SOA: nobody caches it
    # not a pairing name: one label too many, or a label that merely ends in "pair"
    assert isinstance(p.answer(query("a.t0k.pair.consent.dnsgate.internal").to_wire(), "127.0.0.1", False), Forward)
    assert isinstance(p.answer(query("t0k.xpair.consent.dnsgate.internal").to_wire(), "127.0.0.1", False), Forward)


def test_only_a_trusted_forwarder_speaks_for_its_clients(clock: Clock) -> None:
    p = build(clock)
    p.consent.put(consent_fixtures.choice(mac="02:00:00:00:00:01"))
    mac = [consent_fixtures.edns_option(65001, bytes.fromhex("020000000001"))]
    trusted = p.answer(query("trackcmp.net", use_edns=0, options=mac).to_wire(), "127.0.0.53", False)
    assert isinstance(trusted, Forward) and trusted.client == "127.0.0.53|02:00:00:00:00:01"
    assert answer(p, query("trackcmp.net", use_edns=0, options=mac), "127.0.0.54").rcode() == dns.rcode.NXDOMAIN
