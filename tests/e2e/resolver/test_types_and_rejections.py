"""Odd packets and query types over loopback, with the name cached or not: FORMERR for QDCOUNT != 1
and malformed queries (header only), NOTIMP for unknown opcodes, silence for responses and runts;
unknown types relayed (RFC 3597); ANY answered minimally (RFC 8482) without touching the cache;
DNSSEC passed through (DO, CD, RRSIGs; AD only from a trusted upstream)."""

from __future__ import annotations

import struct
from dataclasses import replace
from pathlib import Path

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import pytest

from dnsgate.config import DnsConfig, UpstreamConfig
from tests.conftest import Gate, make_config, running_gate
from tests.e2e.resolver.conftest import ask, on_path, query_wire, udp_raw
from tests.support.stub_upstream import StubUpstream

pytestmark = pytest.mark.usefixtures("udp_io")  # every test runs on both UDP paths (dns.udp_io)

QUESTION = b"\x04host\x07example\x04test\x00\x00\x01\x00\x01"


def header(flags: int = 0x0100, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0) -> bytes:
    return struct.pack(">HHHHHH", 0xBEEF, flags, qd, an, ns, ar)


OPT = b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00"  # EDNS 0, 1232 bytes, DO clear
OPT_DO = b"\x00\x00\x29\x04\xd0\x00\x00\x80\x00\x00\x00"
COOKIE_PROBE = b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x0c\x00\x0a\x00\x08" + b"12345678"  # RFC 7873 §5.4
SOA_QUESTION = QUESTION[:-4] + b"\x00\x06\x00\x01"


# (packet, RCODE, question section echoed, OPT in the reply: None, or the DO bit it echoes)
@pytest.mark.parametrize(("packet", "rcode", "questions", "opt"), [
    (header(qd=0), dns.rcode.FORMERR, b"", None),
    (header(qd=0, ar=1) + OPT, dns.rcode.FORMERR, b"", False),
    (header(qd=0, ar=1) + COOKIE_PROBE, dns.rcode.FORMERR, b"", False),  # no server cookies here: FORMERR
    (header(qd=2) + QUESTION + QUESTION, dns.rcode.FORMERR, QUESTION * 2, None),  # RFC 9619
    (header(qd=2, ar=1) + QUESTION + QUESTION + OPT_DO, dns.rcode.FORMERR, QUESTION * 2, True),
    (header() + QUESTION[:-3], dns.rcode.FORMERR, b"", None),  # type/class cut short
    (header(ar=1) + b"\xc0\x0c\x00\x01\x00\x01" + OPT, dns.rcode.FORMERR, b"", None),  # pointer in the question
    (header(ar=1) + QUESTION + b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x05", dns.rcode.FORMERR, QUESTION,
     None),  # OPT rdata missing: no EDNS to answer with
    (header(flags=0x2900) + QUESTION, dns.rcode.NOTIMP, QUESTION, None),  # opcode 5 (UPDATE)
    (header(flags=0x2800, ar=1) + SOA_QUESTION + OPT, dns.rcode.NOTIMP, SOA_QUESTION, False),  # UPDATE with EDNS
    (header(flags=0x2000, ar=1) + SOA_QUESTION + OPT, dns.rcode.NOTIMP, SOA_QUESTION, False),  # NOTIFY with EDNS
    (header(flags=0x1100) + QUESTION, dns.rcode.NOTIMP, QUESTION, None),  # opcode 2 (STATUS)
    (header(flags=0x1100, ar=1) + QUESTION + OPT_DO, dns.rcode.NOTIMP, QUESTION, True),  # dig +opcode=status
    (header(flags=0x7900) + QUESTION, dns.rcode.NOTIMP, QUESTION, None),  # opcode 15 (unassigned)
])
async def test_error_replies(gate: Gate, upstream: StubUpstream, path: str, packet: bytes, rcode: int,
                             questions: bytes, opt: bool | None) -> None:
    """The question section echoed when it can be read; an OPT whenever the query's OPT could be
    read (RFC 6891 §6.1.1); the header alone only for a question that cannot be read."""
    if path == "hit":
        await ask(gate, query_wire("host.example.test"))
    for tcp in (False, True):
        reply = await ask(gate, packet, tcp=tcp)
        qid, flags, qd, an, ns, ar = struct.unpack_from(">HHHHHH", reply)
        assert qid == 0xBEEF and flags & 0x8000 and flags & 0xF == rcode and (an, ns) == (0, 0)
        assert flags & 0x7800 == struct.unpack_from(">H", packet, 2)[0] & 0x7800  # opcode echoed
        assert qd == len(questions) // len(QUESTION) and reply[12 : 12 + len(questions)] == questions
        rest = reply[12 + len(questions):]
        if opt is None:
            assert ar == 0 and rest == b""
        else:  # dnsgate's own OPT: its size, DO as asked, no option of the query's (no cookie)
            assert ar == 1 and rest == (OPT_DO if opt else OPT)
    assert upstream.count("host.example.test") == (1 if path == "hit" else 0)


@pytest.mark.parametrize("packet", [header(flags=0x8180) + QUESTION, b"\xbe\xef\x01\x00\x00", b""],
                         ids=["response", "runt", "empty"])
async def test_responses_and_runts_get_no_reply(gate: Gate, upstream: StubUpstream, path: str, packet: bytes) -> None:
    if path == "hit":
        await ask(gate, query_wire("host.example.test"))
    assert await udp_raw(gate.dns_port, packet, timeout=0.3) is None
    assert (await gate.query("host.example.test")).answer  # still serving


async def test_unknown_type_relayed_transparently(gate: Gate, upstream: StubUpstream, path: str) -> None:
    upstream.add("odd.example.test", "odd.example.test. 300 IN TYPE65280 \\# 6 0102030405ff")
    reply = await on_path(gate, upstream, path, lambda: query_wire("odd.example.test", "TYPE65280", use_edns=0))
    (rrset,) = reply.answer
    assert rrset.rdtype == 65280 and rrset[0].to_text() == "\\# 6 0102030405ff"


async def test_https_records_reach_upstream_as_https(gate: Gate, upstream: StubUpstream, path: str) -> None:
    upstream.add("www.example.test", "www.example.test. 300 IN HTTPS 1 . alpn=h2")
    reply = await on_path(gate, upstream, path, lambda: query_wire("WWW.example.test", "HTTPS"))
    assert reply.answer[0].rdtype == dns.rdatatype.HTTPS and upstream.queries == [("www.example.test", "HTTPS", "udp")]


async def test_unknown_type_nodata_relayed(gate: Gate, upstream: StubUpstream, path: str) -> None:
    reply = await on_path(gate, upstream, path, lambda: query_wire("host.example.test", "TYPE65281"))
    assert reply.rcode() == dns.rcode.NOERROR and not reply.answer and reply.authority[0].rdtype == dns.rdatatype.SOA


async def test_any_gets_rfc8482_hinfo_and_leaves_the_cache_alone(gate: Gate, upstream: StubUpstream,
                                                                 path: str) -> None:
    if path == "hit":
        assert (await gate.query("host.example.test", "A")).answer  # A cached before ANY
    for edns in (False, 0):
        reply = dns.message.from_wire(await ask(gate, query_wire("Host.example.test", "ANY", use_edns=edns)))
        assert reply.rcode() == dns.rcode.NOERROR
        (rrset,) = reply.answer
        assert rrset.rdtype == dns.rdatatype.HINFO and rrset[0].cpu == b"RFC8482" and rrset[0].os == b""
        assert rrset.name.to_text().lower() == "host.example.test."
        assert reply.edns == (-1 if edns is False else 0)
    assert ("host.example.test", "ANY", "udp") not in upstream.queries  # ANY is never forwarded
    a = await gate.query("host.example.test", "A")  # and A is still the real A, from wherever
    aaaa = await gate.query("host.example.test", "AAAA")
    assert [r.to_text() for r in a.answer[0]] == ["192.0.2.10"]
    assert [r.to_text() for r in aaaa.answer[0]] == ["2001:db8::10"]


async def test_any_can_be_refused(upstream: StubUpstream, data_dir: Path) -> None:
    cfg = make_config(upstream, data_dir, dns=replace(DnsConfig(listen=("127.0.0.1:0",)), any_query="refused"))
    async with running_gate(cfg) as g:
        reply = await g.query("host.example.test", "ANY")
        assert reply.rcode() == dns.rcode.REFUSED and not reply.answer
        assert not upstream.queries


async def test_zone_transfers_refused(gate: Gate, upstream: StubUpstream) -> None:
    for rdtype, tcp in (("AXFR", True), ("IXFR", False), ("IXFR", True)):
        reply = dns.message.from_wire(await ask(gate, query_wire("example.test", rdtype, use_edns=0), tcp=tcp))
        assert reply.rcode() == dns.rcode.REFUSED and reply.question[0].rdtype == dns.rdatatype.from_text(rdtype)
        assert not reply.flags & dns.flags.RA  # no recursion for a transfer, as unbound says it
        assert reply.edns == 0
    assert not upstream.queries


META_TYPES = {"OPT": 41, "TKEY": 249, "TSIG": 250, "MAILB": 253, "MAILA": 254}


@pytest.mark.parametrize("rdtype", list(META_TYPES))
async def test_meta_types_get_formerr_and_are_never_forwarded(gate: Gate, upstream: StubUpstream,
                                                              rdtype: str) -> None:
    # what a real upstream says to them (its FORMERR used to become SERVFAIL, each upstream asked)
    upstream.rcode_for = lambda _name, qtype, _class: dns.rcode.FORMERR if qtype in META_TYPES.values() else None
    for name in ("Host.example.test", "trackcmp.net"):  # whatever the name, gated or not
        for edns, tcp in ((False, False), (0, False), (0, True)):
            reply = dns.message.from_wire(await ask(gate, query_wire(name, rdtype, use_edns=edns), tcp=tcp))
            assert reply.rcode() == dns.rcode.FORMERR and not reply.answer and not reply.authority
            assert reply.question[0].to_text() == f"{name}. IN {rdtype}" and not reply.flags & dns.flags.RA
            if edns is not False:  # the reason, as an Extended DNS Error "Not Supported"
                (ede,) = [o for o in reply.options if isinstance(o, dns.edns.EDEOption)]
                assert ede.code == dns.edns.EDECode.NOT_SUPPORTED and (ede.text or "").startswith(rdtype)
            else:
                assert reply.edns == -1
    assert not upstream.queries


@pytest.mark.parametrize("rdclass", ["CH", "HS", "NONE", "CLASS77"])
async def test_classes_other_than_in_are_refused_and_never_forwarded(gate: Gate, upstream: StubUpstream,
                                                                     rdclass: str) -> None:
    upstream.rcode_for = lambda _name, _type, qclass: dns.rcode.REFUSED if qclass != 1 else None  # as unbound does
    for edns, tcp in ((False, False), (0, False), (0, True)):
        reply = dns.message.from_wire(await ask(gate, query_wire("host.example.test", "TXT", rdclass=rdclass,
                                                                 use_edns=edns), tcp=tcp))
        assert reply.rcode() == dns.rcode.REFUSED and not reply.answer
        assert reply.question[0].to_text() == f"host.example.test. {rdclass} TXT"
        assert reply.edns == (-1 if edns is False else 0)
    assert not upstream.queries
    server_id = dns.message.from_wire(await ask(gate, query_wire("id.server", "TXT", rdclass="CH")))
    assert server_id.rcode() == dns.rcode.NOERROR and server_id.answer  # the CH names dnsgate answers itself


async def test_qclass_any_is_answered_as_in(gate: Gate, upstream: StubUpstream, path: str) -> None:
    # an upstream that fails QCLASS * (its SERVFAIL used to be relayed); CH and the rest it refuses
    upstream.rcode_for = lambda _name, _type, qclass: (dns.rcode.SERVFAIL if qclass == 255
                                                       else dns.rcode.REFUSED if qclass != 1 else None)
    reply = await on_path(gate, upstream, path, lambda: query_wire("Host.example.test", rdclass="ANY"))
    assert reply.rcode() == dns.rcode.NOERROR and reply.question[0].to_text() == "Host.example.test. ANY A"
    (rrset,) = reply.answer
    assert rrset.name.to_text().lower() == "host.example.test." and rrset.rdclass == dns.rdataclass.IN
    assert [r.to_text() for r in rrset] == ["192.0.2.10"]
    plain = await gate.query("host.example.test")  # the same entry as class IN
    assert plain.answer and upstream.count("host.example.test") == 1
    assert all(struct.unpack_from(">H", q, len(q) - 13)[0] == 1 for q in upstream.received)  # asked as IN
    gated = dns.message.from_wire(await ask(gate, query_wire("trackcmp.net", rdclass="ANY")))
    assert gated.rcode() == dns.rcode.NXDOMAIN and upstream.count("trackcmp.net") == 0  # gated as ever


def _signed(upstream: StubUpstream) -> None:
    upstream.add("signed.example.test", "signed.example.test. 300 IN A 192.0.2.30",
                 "signed.example.test. 300 IN RRSIG A 13 3 300 20300101000000 20200101000000 12345 example.test. "
                 "c2lnbmF0dXJlIGJ5dGVz")


async def test_dnssec_pass_through_do_and_rrsig(gate: Gate, upstream: StubUpstream, path: str) -> None:
    _signed(upstream)
    reply = await on_path(gate, upstream, path, lambda: query_wire("signed.example.test", use_edns=0,
                                                                   want_dnssec=True))
    assert reply.ednsflags & dns.flags.DO
    assert {r.rdtype for r in reply.answer} == {dns.rdatatype.A, dns.rdatatype.RRSIG}
    plain = await gate.query("signed.example.test", use_edns=0)  # without DO: its own cache entry, no RRSIG
    assert {r.rdtype for r in plain.answer} == {dns.rdatatype.A}
    assert all(struct.unpack_from(">H", q, len(q) - 7)[0] & dns.flags.DO for q in upstream.received[:1])


async def test_cd_is_relayed_and_kept_apart_in_the_cache(gate: Gate, upstream: StubUpstream, path: str) -> None:
    reply = await on_path(gate, upstream, path, lambda: query_wire("host.example.test", flags_set=0x0010))
    assert reply.flags & dns.flags.CD and reply.answer
    assert all(struct.unpack_from(">H", q, 2)[0] & 0x0010 for q in upstream.received)  # CD went upstream
    before = len(upstream.queries)
    await gate.query("host.example.test")  # CD clear: a different cache entry
    assert len(upstream.queries) == before + 1


async def test_ad_cleared_by_default(gate: Gate, upstream: StubUpstream, path: str) -> None:
    upstream.set_ad = True
    reply = await on_path(gate, upstream, path, lambda: query_wire("host.example.test", use_edns=0, want_dnssec=True))
    assert reply.answer and not reply.flags & dns.flags.AD  # dnsgate validates nothing, claims nothing


async def test_ad_relayed_from_a_trusted_upstream(upstream: StubUpstream, data_dir: Path, path: str) -> None:
    upstream.set_ad = True
    cfg = make_config(upstream, data_dir, upstream=UpstreamConfig(servers=(upstream.address,), timeout=1.5,
                                                                  attempt_timeout=0.5, trust_ad=True))
    async with running_gate(cfg) as g:
        reply = await on_path(g, upstream, path, lambda: query_wire("host.example.test", use_edns=0,
                                                                    want_dnssec=True))
        assert reply.flags & dns.flags.AD
        asked_ad = await on_path(g, upstream, "hit", lambda: query_wire("host.example.test", use_edns=0,
                                                                        want_dnssec=True, flags_set=0x0020))
        assert asked_ad.flags & dns.flags.AD
        # a client that shows no DNSSEC awareness (no DO, no AD) gets no AD (RFC 6840 §5.8)
        plain = await on_path(g, upstream, path, lambda: query_wire("other.example.test", flags_clear=0x0020))
        assert not plain.flags & dns.flags.AD
        assert all(struct.unpack_from(">H", q, 2)[0] & 0x0020 for q in upstream.received)  # AD asked upstream
    upstream.set_ad = False
    cfg2 = make_config(upstream, data_dir, upstream=UpstreamConfig(servers=(upstream.address,), timeout=1.5,
                                                                   attempt_timeout=0.5, trust_ad=True))
    async with running_gate(cfg2) as g:
        reply = dns.message.from_wire(await ask(g, query_wire("nottrackcmp.net", use_edns=0, want_dnssec=True)))
        assert reply.answer and not reply.flags & dns.flags.AD  # only as the upstream set it
