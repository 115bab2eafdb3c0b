"""CNAME chains that stop short, and the whole answer built from the parts (dns/cname_chains.py), on bytes
made by dnspython as an upstream would send them."""

from __future__ import annotations

import struct

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from dnsgate.dns.cache import TtlPolicy, entry_from_reply
from dnsgate.dns.cname_chains import ChainLoop, chain_target, joined_reply, read_records
from dnsgate.wire import name_to_wire


def reply(name: str, rdtype: str, answers: list[str], authority: list[str] | None = None,
          rcode: dns.rcode.Rcode = dns.rcode.NOERROR) -> tuple[bytes, int]:
    """An upstream reply (compressed by dnspython) and the offset of its answer section."""
    q = dns.message.make_query(name, rdtype)
    r = dns.message.make_response(q)
    r.set_rcode(rcode)
    for section, lines in ((r.answer, answers), (r.authority, authority or [])):
        for text in lines:
            owner, ttl, _, kind, rdata = text.split(None, 4)
            section.append(dns.rrset.from_text(owner, int(ttl), "IN", kind, rdata))
    wire = r.to_wire()
    return wire, 12 + len(name_to_wire(name)) + 4


def target(wire: bytes, offset: int, name: str, rdtype: str) -> bytes | None:
    return chain_target(wire, offset, name_to_wire(name), dns.rdatatype.from_text(rdtype))


SOA = "example.test. 60 IN SOA ns.example.test. host.example.test. 1 3600 600 86400 60"


@pytest.mark.parametrize(("answers", "authority", "rdtype", "stops_at"), [
    (["a.example.test. 300 IN A 192.0.2.1"], [], "A", None),  # no chain
    (["a.example.test. 300 IN CNAME b.example.test.", "b.example.test. 300 IN A 192.0.2.1"], [], "A", None),
    (["a.example.test. 300 IN CNAME b.example.test."], [], "A", "b.example.test"),  # the CNAME alone
    (["a.example.test. 300 IN CNAME b.example.test.", "b.example.test. 300 IN CNAME c.other.test."], [], "AAAA",
     "c.other.test"),
    (["a.example.test. 300 IN CNAME B.Example.TEST."], ["example.test. 300 IN NS ns.example.test."], "A",
     "b.example.test"),  # an authority's referral-ish NS says nothing about the target: still short
    (["a.example.test. 300 IN CNAME b.example.test."], [SOA], "MX", None),  # NODATA at the end, as recursion says it
    (["a.example.test. 300 IN CNAME b.example.test.", "b.example.test. 300 IN A 192.0.2.1"], [], "AAAA",
     "b.example.test"),  # records of another type at the end: not the ones asked for
    (["x.example.test. 300 IN CNAME y.example.test."], [], "A", None),  # a chain that is not the question's
])
def test_where_a_chain_stops(answers: list[str], authority: list[str], rdtype: str, stops_at: str | None) -> None:
    wire, offset = reply("a.example.test", rdtype, answers, authority)
    found = target(wire, offset, "a.example.test", rdtype)
    assert found == (None if stops_at is None else name_to_wire(stops_at))


def test_a_chain_that_loops_within_the_answer() -> None:
    wire, offset = reply("a.example.test", "A", ["a.example.test. 300 IN CNAME b.example.test.",
                                                  "b.example.test. 300 IN CNAME a.example.test."])
    with pytest.raises(ChainLoop):
        target(wire, offset, "a.example.test", "A")
    wire, offset = reply("a.example.test", "A", ["a.example.test. 300 IN CNAME a.example.test."])
    with pytest.raises(ChainLoop):
        target(wire, offset, "a.example.test", "A")


def body_of(wire: bytes, qlen: int) -> tuple[bytes, tuple[int, int, int]]:
    _qd, an, ns, ar = struct.unpack_from(">HHHH", wire, 4)
    return wire[12 + qlen :], (an, ns, ar)


def test_joined_reply_is_the_whole_chain_compressed() -> None:
    chain, offset = reply("a.example.test", "A", ["a.example.test. 300 IN CNAME b.example.test."])
    question = chain[12:offset].lower()
    rest, _ = reply("b.example.test", "A", ["b.example.test. 120 IN A 192.0.2.1", "b.example.test. 120 IN A 192.0.2.2"])
    tq = name_to_wire("b.example.test") + b"\x00\x01\x00\x01"
    body, counts = body_of(rest, len(tq))
    joined = joined_reply(question, chain, 7, tq, body, counts, 0x8000)
    r = dns.message.from_wire(joined)
    assert r.rcode() == dns.rcode.NOERROR and r.question[0].name.to_text() == "a.example.test."
    assert [(x.name.to_text(), x.ttl, sorted(map(str, x))) for x in r.answer] == [
        ("a.example.test.", 293, ["b.example.test."]),  # 300 less the 7 s the chain waited
        ("b.example.test.", 120, ["192.0.2.1", "192.0.2.2"])]
    assert len(joined) <= len(r.to_wire())  # compressed at least as well as dnspython does


def test_joined_reply_of_a_dangling_chain_has_the_targets_rcode_and_soa() -> None:
    chain, offset = reply("a.example.test", "A", ["a.example.test. 300 IN CNAME gone.example.test."])
    rest, _ = reply("gone.example.test", "A", [], [SOA], rcode=dns.rcode.NXDOMAIN)
    tq = name_to_wire("gone.example.test") + b"\x00\x01\x00\x01"
    body, counts = body_of(rest, len(tq))
    r = dns.message.from_wire(joined_reply(chain[12:offset], chain, 0, tq, body, counts, 0x8000 | dns.rcode.NXDOMAIN))
    assert r.rcode() == dns.rcode.NXDOMAIN
    assert [x.rdtype for x in r.answer] == [dns.rdatatype.CNAME] and r.authority[0].rdtype == dns.rdatatype.SOA
    assert r.authority[0][0].mname.to_text() == "ns.example.test."


def test_names_keep_their_case_and_only_rfc1035_types_are_compressed() -> None:
    chain, offset = reply("a.example.test", "SRV", ["a.example.test. 300 IN CNAME Svc.Other.ZONE."])
    rest, _ = reply("svc.other.zone", "SRV", ["svc.other.zone. 60 IN SRV 0 5 443 Host.Other.ZONE."])
    tq = name_to_wire("svc.other.zone") + b"\x00\x21\x00\x01"
    body, counts = body_of(rest, len(tq))
    joined = joined_reply(chain[12:offset], chain, 0, tq, body, counts, 0x8000)
    assert joined.endswith(b"\x04Host\x05Other\x04ZONE\x00")  # an SRV target is written whole (RFC 2782)
    records, end = read_records(joined, offset, 2)
    assert end == len(joined)
    assert records[0][4][1] == b"\x03Svc\x05Other\x04ZONE\x00"  # the CNAME target as the upstream wrote it
    assert dns.message.from_wire(joined).answer[1][0].target.to_text() == "Host.Other.ZONE."


def test_records_that_cannot_be_read_are_refused() -> None:
    chain, offset = reply("a.example.test", "A", ["a.example.test. 300 IN CNAME b.example.test."])
    with pytest.raises(ValueError, match=r"cannot be read|runs past"):
        read_records(chain[:-3], offset, 1)
    with pytest.raises(ValueError, match="cannot be read"):
        read_records(chain[:offset] + b"\xc0\xff" + chain[offset + 2 :], offset, 1)  # a pointer forwards


@pytest.mark.parametrize(("cname_ttl", "rcode", "lives"), [
    (300, dns.rcode.NXDOMAIN, 60),  # the negative answer's own TTL (RFC 2308)
    (5, dns.rcode.NXDOMAIN, 5),  # ... unless the CNAME leading to it expires first
    (300, dns.rcode.NOERROR, 60),  # NODATA at the end of a chain expires with its SOA (RFC 2308 §5)
    (5, dns.rcode.NOERROR, 5),
])
def test_a_chain_ending_in_no_data_lives_as_long_as_its_shortest_part(cname_ttl: int, rcode: dns.rcode.Rcode,
                                                                      lives: int) -> None:
    wire, _ = reply("a.example.test", "A", [f"a.example.test. {cname_ttl} IN CNAME gone.example.test."], [SOA],
                    rcode=rcode)
    entry, cacheable, _ = entry_from_reply(wire, len(name_to_wire("a.example.test")) + 4, 100.0,
                                           TtlPolicy(0, 86400, None), None)
    assert cacheable and entry.expires - entry.filled == lives
