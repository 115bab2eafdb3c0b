"""What must hold for any input, shared by the property tests (hypothesis), the coverage-guided
fuzzer (atheris, tests/fuzz/fuzz_dns.py) and the corpus replay: no exception escapes; every reply
parses; its ID is the query's; a packet with QR=1 is never answered; a hostile upstream reply never
crashes the answer path, and what it leaves in the cache renders as a reply that parses.

One input drives one of three targets, chosen by its first byte:
  0: wire.parse_query on the rest;
  1: Pipeline.answer on the rest (UDP, then TCP; from a client with consent and one without);
  2: a fixed query forwarded, the rest as the upstream's reply (admit, complete, then a cache hit);
and a first byte of 0xFF (kept apart so that the corpus keeps its targets) a DNS-over-HTTPS request:
the method, target and Content-Type as lines, then the body; what it decodes to is answered.
"""

from __future__ import annotations

import struct

import dns.exception
import dns.message

from dnsgate.config import DEFAULT_ALLOWED
from dnsgate.dns import message
from dnsgate.dns.admission import Admission
from dnsgate.dns.cache import AnswerCache, OptNotLast, TtlPolicy, UnusableReply
from dnsgate.dns.identity import QueryIdentity
from dnsgate.dns.pipeline import Chase, Forward, Pipeline
from dnsgate.dns.sinkhole import Sinkhole
from dnsgate.wire import Query, Rejection, parse_query, read_rr_header, scan_name
from tests.support import consent_fixtures

CLIENTS = ("127.0.0.1", "192.168.1.20", "8.8.8.8")  # no consent; consent (below); outside the ACL
QUESTIONS = (dns.message.make_query("host.example.test", "A"),
             dns.message.make_query("trackcmp.net", "AAAA", use_edns=0, want_dnssec=True),
             dns.message.make_query("www.example.test", "HTTPS", use_edns=0))
for _n, _q in enumerate(QUESTIONS):
    _q.id = 0x3C0C + _n  # fixed, so a reproducer replays the same way (a reply's pointer may land in the ID)


def pipeline() -> Pipeline:
    table = consent_fixtures.table()
    table.put(consent_fixtures.choice("192.168.1.20"))
    return Pipeline(consent_fixtures.CATALOG, table, AnswerCache(200, 10**6), Sinkhole("nxdomain", 5, 1232),
                    udp_max=1232, plain_ttl=TtlPolicy(0, 86400, None), gated_ttl=TtlPolicy(0, 86400, 10),
                    mono=lambda: 1000.0, wall=lambda: 1_700_000_000.0,
                    identity=QueryIdentity(table, ["192.168.1.53"], "consent.dnsgate.internal", lambda t, c: False),
                    admission=Admission(DEFAULT_ALLOWED))


def check_reply(reply: bytes, query: bytes, tcp: bool) -> None:
    assert query[2] & 0x80 == 0, "a packet with QR=1 was answered"
    assert reply[:2] == query[:2], "the reply's ID is not the query's"
    assert reply[2] & 0x80, "the reply has QR=0"
    if not tcp:
        assert len(reply) <= 65535
    wire = _opaque(reply)
    if len(wire) > 2 and wire[2] & 0x78:  # an UPDATE's zone section (NOTIMP) is the query's own, echoed:
        wire = wire[:2] + bytes([wire[2] & 0x87]) + wire[3:]  # judged as a question section, not as RFC 2136's
    try:
        dns.message.from_wire(wire)
    except dns.message.ShortHeader:
        raise AssertionError("a reply shorter than a header") from None
    except dns.exception.DNSException as exc:
        # dnspython refuses TSIG-less replies to TSIG queries etc.; only our own malformations count
        if not isinstance(exc, dns.message.UnknownTSIGKey):
            raise AssertionError(f"the reply does not parse: {exc!r}: {reply.hex()}") from None


VALIDATED = frozenset({1, 28, 2, 5, 12, 39, 15, 33, 6, 16, 41, 13})  # checked by wire.records_well_formed


def _opaque(reply: bytes) -> bytes:
    """The reply with every record of a type dnsgate relays as opaque data (RFC 3597) retyped as an
    unknown type, so dnspython judges the message's structure, not the contents it never looks at."""
    out = bytearray(reply)
    end = scan_name(reply, 12) if len(reply) > 12 and reply[5] else 7
    offset = end + 5 if end >= 12 else 12
    an, ns, ar = struct.unpack_from(">HHH", reply, 6) if len(reply) >= 12 else (0, 0, 0)
    for _ in range(an + ns + ar):
        rr = read_rr_header(reply, offset)
        if rr is None:
            break
        owner_end, rtype, _, _, rdlen = rr
        if rtype not in VALIDATED:
            out[owner_end : owner_end + 2] = b"\xff\x00"
        offset = owner_end + 10 + rdlen
    return bytes(out)


def check_parse(data: bytes) -> None:
    q = parse_query(data)
    assert isinstance(q, Query | Rejection)
    if isinstance(q, Query):
        assert data[12 : 12 + len(q.question)] == q.question


def check_answer(p: Pipeline, data: bytes) -> None:
    for client in CLIENTS:
        for tcp in (False, True):
            out = p.answer(data, client, tcp)
            if out is None:
                continue
            if isinstance(out, Forward):
                assert len(data) >= 12 and not data[2] & 0x80
                # the upstream failed: the SERVFAIL must be a proper reply too
                check_reply(p.servfail(out), data, tcp)
                continue
            check_reply(out, data, tcp)


def check_upstream(p: Pipeline, reply: bytes, which: int = 0) -> None:
    q = QUESTIONS[which % len(QUESTIONS)]
    wire = q.to_wire()
    for client in CLIENTS[:2]:
        fwd = p.answer(wire, client, False)
        if not isinstance(fwd, Forward):  # cached by an earlier input, or sinkholed
            assert isinstance(fwd, bytes)
            check_reply(fwd, wire, False)
            continue
        # As dns/upstreams.py accepts it: QR set, one question, ours; the input decides flags, counts, records.
        head = (reply + bytes(12))[:12]
        forged = (wire[:2] + bytes([head[2] | 0x80, head[3]]) + b"\x00\x01" + head[6:12]
                  + fwd.query.name + fwd.query.question[-4:] + reply[12:])
        try:
            try:
                admitted = p.admit(fwd, forged)
            except OptNotLast:  # dns/forwarding.py rebuilds such replies
                admitted = p.admit(fwd, message.opt_last(forged))
        except UnusableReply:
            continue
        # a chain that stops short: joined with itself as the target's answer, then as it stands
        entry = admitted.entry if isinstance(admitted, Chase) else admitted
        if isinstance(admitted, Chase):  # records that passed the checks can always be joined
            check_reply(p.complete(fwd, p.chained(fwd, admitted, entry, keep=False)), wire, False)
        check_reply(p.complete(fwd, entry), wire, False)
        again = p.answer(wire, client, True)  # a cache hit, if it was cached: it must render cleanly
        if isinstance(again, bytes):
            check_reply(again, wire, True)


def check_doh(p: Pipeline, data: bytes) -> None:
    from dnsgate.dns.https_listener import HttpError, decode_request, smallest_ttl
    from dnsgate.dns.tally import HTTPS
    from dnsgate.wire import pad_reply, padding_requested

    method, target, content_type, body = [*data.split(b"\n", 3), b"", b"", b""][:4]
    decoded = decode_request(method.decode("latin-1"), target.decode("latin-1"),
                             content_type.decode("latin-1") or None, body)
    if isinstance(decoded, HttpError):
        assert decoded.status in (400, 404, 405, 413, 414, 415) and decoded.reason
        return
    assert len(decoded) >= 12 and not decoded[2] & 0x80 and len(decoded) <= 65535
    out = p.answer(decoded, CLIENTS[0], HTTPS)
    if isinstance(out, Forward):
        out = p.servfail(out)
    if out is not None:
        if padding_requested(decoded):
            out = pad_reply(out)
        check_reply(out, decoded, True)
        assert 0 <= smallest_ttl(out) <= 2**31 - 1


def run_one(p: Pipeline, data: bytes) -> None:
    if not data:
        return
    if data[0] == 0xFF:
        check_doh(p, data[1:])
        return
    target, rest = data[0] % 3, data[1:]
    if target == 0:
        check_parse(rest)
    elif target == 1:
        check_answer(p, rest)
    else:
        check_upstream(p, rest, data[0] // 3)
