"""Hostile upstream data never crashes the answer path or poisons the cache: replies whose records
a client could not read are unusable (SERVFAIL, nothing cached); well-formed ones of every shape
still pass (wire.records_well_formed)."""

from __future__ import annotations

import struct

import dns.message
import dns.rcode
import dns.rrset
import pytest

from dnsgate.dns.cache import Entry, UnusableReply
from dnsgate.dns.pipeline import Forward
from dnsgate.wire import records_well_formed
from tests.dns.test_pipeline import add_records
from tests.fuzz import checks

pytestmark = pytest.mark.usefixtures("udp_io")  # every test runs on both UDP paths (dns.udp_io)

Q = dns.message.make_query("host.example.test", "A")
QEND = len(Q.to_wire())


def reply_with(*records: str, authority: str | None = None) -> bytes:
    r = dns.message.make_response(Q)
    add_records(r, records, authority)
    return r.to_wire()


def raw_answer(rtype: int, rdata: bytes, owner: bytes = b"\xc0\x0c") -> bytes:
    head = Q.to_wire()[:12]
    return (head[:2] + b"\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00" + Q.to_wire()[12:]
            + owner + struct.pack(">HHIH", rtype, 1, 60, len(rdata)) + rdata)


GOOD = [
    reply_with("host.example.test. 60 IN A 192.0.2.1"),
    reply_with("host.example.test. 60 IN CNAME x.example.test.", "x.example.test. 60 IN A 192.0.2.1"),
    reply_with("host.example.test. 60 IN MX 10 mail.example.test."),
    reply_with("host.example.test. 60 IN TXT \"a\" \"\" \"bc\""),
    reply_with("host.example.test. 60 IN HINFO \"x86\" \"Linux\""),
    reply_with("host.example.test. 60 IN HINFO \"\" \"\""),
    reply_with("host.example.test. 60 IN SRV 1 2 443 svc.example.test."),
    reply_with("host.example.test. 60 IN HTTPS 1 . alpn=h2 ipv4hint=192.0.2.1"),
    reply_with("host.example.test. 60 IN TYPE65280 \\# 3 010203"),
    reply_with(authority="example.test. 60 IN SOA ns.example.test. h.example.test. 1 2 3 4 5"),
]
BAD = {
    "owner points at itself": raw_answer(1, bytes([192, 0, 2, 1]), owner=struct.pack(">H", 0xC000 | QEND)),
    "owner points forward": raw_answer(1, bytes([192, 0, 2, 1]), owner=b"\xc0\xff"),
    # A name in the header decompresses to whatever the ID and flags spell, which differ in our reply.
    "owner points into the header": raw_answer(1, bytes([192, 0, 2, 1]), owner=b"\xc0\x00"),
    "CNAME target points into the header": raw_answer(5, b"\xc0\x04"),
    "A of 3 bytes": raw_answer(1, bytes([192, 0, 2])),
    "AAAA of 4 bytes": raw_answer(28, bytes(4)),
    "CNAME target loops": raw_answer(5, struct.pack(">H", 0xC000 | (QEND + 12))),
    "CNAME with bytes after the name": raw_answer(5, b"\x01x\x00junk"),
    "MX without a name": raw_answer(15, b"\x00\x0a"),
    "SOA too short": raw_answer(6, b"\x00\x00" + bytes(10)),
    "TXT string past its RDATA": raw_answer(16, b"\x09abc"),
    "HINFO without RDATA": raw_answer(13, b""),
    "HINFO with one string": raw_answer(13, b"\x03x86"),
    "HINFO with bytes after the strings": raw_answer(13, b"\x03x86\x05Linux!"),
    "RDLENGTH past the end": raw_answer(1, bytes(4))[:-2],
}


@pytest.mark.parametrize("reply", GOOD, ids=range(len(GOOD)))
def test_well_formed_replies_pass_and_are_cached(reply: bytes) -> None:
    assert records_well_formed(reply, QEND)
    p = checks.pipeline()
    fwd = p.answer(Q.to_wire(), "127.0.0.1", False)
    assert isinstance(fwd, Forward)
    entry = p.admit(fwd, reply)
    assert isinstance(entry, Entry)
    out = p.complete(fwd, entry)
    checks.check_reply(out, Q.to_wire(), False)


@pytest.mark.parametrize("reply", BAD.values(), ids=BAD.keys())
def test_hostile_replies_are_unusable_and_never_cached(reply: bytes) -> None:
    assert not records_well_formed(reply, QEND) or len(reply) < QEND
    p = checks.pipeline()
    fwd = p.answer(Q.to_wire(), "127.0.0.1", False)
    assert isinstance(fwd, Forward)
    with pytest.raises(UnusableReply):
        p.admit(fwd, reply)
    assert dns.message.from_wire(p.servfail(fwd)).rcode() == dns.rcode.SERVFAIL
    again = p.answer(Q.to_wire(), "127.0.0.1", False)
    assert isinstance(again, Forward)  # nothing was cached: the next query asks upstream again
    good = reply_with("host.example.test. 60 IN A 192.0.2.1")
    entry = p.admit(again, good)
    assert isinstance(entry, Entry)
    answer = dns.message.from_wire(p.complete(again, entry))
    assert [str(r) for rrset in answer.answer for r in rrset] == ["192.0.2.1"]
