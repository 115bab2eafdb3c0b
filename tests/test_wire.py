"""Wire-format parsing and reply building, on bytes."""

from __future__ import annotations

import struct

import dns.edns
import dns.message
import pytest

from dnsgate import wire


def make(name: str = "example.com", rdtype: str = "A", **kwargs: object) -> bytes:
    return dns.message.make_query(name, rdtype, **kwargs).to_wire()  # type: ignore[arg-type]


def header(flags: int = 0x0100, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0) -> bytes:
    return struct.pack(">HHHHHH", 0x1234, flags, qd, an, ns, ar)


QUESTION = b"\x07example\x03com\x00\x00\x01\x00\x01"


def test_parses_a_plain_query() -> None:
    q = wire.parse_query(header() + b"\x07ExAmPlE\x03com\x00\x00\x01\x00\x01")
    assert isinstance(q, wire.Query)
    assert q.id == 0x1234 and q.qtype == 1 and q.qclass == 1 and q.edns is None
    assert q.question == b"\x07ExAmPlE\x03com\x00\x00\x01\x00\x01"  # the client's case, for the echo
    assert q.name == b"\x07example\x03com\x00"
    assert q.key == QUESTION + b"\x00"
    assert q.text == "example.com."


def test_type_and_class_keep_their_bytes() -> None:
    q = wire.parse_query(header() + b"\x04HoSt\x00\x00\x41\x00\x01")  # type 65 (HTTPS) is the byte "A"
    assert isinstance(q, wire.Query)
    assert q.qtype == 65 and q.key == b"\x04host\x00\x00\x41\x00\x01\x00" and q.name == b"\x04host\x00"


def test_parses_edns() -> None:
    q = wire.parse_query(make(use_edns=0, payload=4096, want_dnssec=True,
                              options=[dns.edns.GenericOption(dns.edns.OptionType.make(65001), b"xx")]))
    assert isinstance(q, wire.Query)
    assert q.edns == wire.Edns(udp_size=4096, version=0, do=True)
    assert q.key == QUESTION + b"\x02"  # DO changes what upstream sends: part of the key


@pytest.mark.parametrize(
    ("packet", "rcode"),
    [
        (b"", None),
        (b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00", None),  # 11 bytes: shorter than a header
        (header(flags=0x8000) + QUESTION, None),  # a response: never answered
        (header(flags=0x2800) + QUESTION, wire.NOTIMP),  # opcode UPDATE
        (header(flags=0x1000) + QUESTION, wire.NOTIMP),  # opcode STATUS
        (header(qd=0), wire.FORMERR),
        (header(qd=2) + QUESTION + QUESTION, wire.FORMERR),
        (header(), wire.FORMERR),  # question missing
        (header() + b"\x07example\x03com\x00\x00\x01", wire.FORMERR),  # class missing
        (header() + b"\x07example\x03co", wire.FORMERR),  # name runs off the end
        (header() + b"\xc0\x0c\x00\x01\x00\x01", wire.FORMERR),  # compression pointer in the question
        (header() + b"\x50" + b"a" * 80 + b"\x00\x00\x01\x00\x01", wire.FORMERR),  # label > 63
        (header() + b"\x3fa" * 0 + (b"\x3f" + b"a" * 63) * 4 + b"\x00\x00\x01\x00\x01", wire.FORMERR),  # > 255
        (header(an=1) + QUESTION, wire.FORMERR),
        (header(ar=1) + QUESTION, wire.FORMERR),  # OPT promised, missing
        (header(ar=2) + QUESTION + wire.opt_record(1232, False) * 2, wire.FORMERR),  # two OPTs
        (header(ar=1) + QUESTION + b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x05\x00\x0a\x00", wire.FORMERR),
        (header(ar=1) + QUESTION + b"\x01a\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00", wire.FORMERR),
    ],
)
def test_rejections(packet: bytes, rcode: int | None) -> None:
    result = wire.parse_query(packet)
    assert isinstance(result, wire.Rejection)
    assert result.rcode == rcode
    reply = wire.rejection_reply(packet, result)
    if rcode is None:
        assert reply is None
    else:
        assert reply is not None and len(reply) == 12  # header only
        qid, flags, *counts = struct.unpack(">HHHHHH", reply)
        assert qid == 0x1234 and flags & wire.QR and flags & 0xF == rcode and counts == [0, 0, 0, 0]
        assert flags & wire.OPCODE_MASK == struct.unpack_from(">H", packet, 2)[0] & wire.OPCODE_MASK


def test_name_helpers() -> None:
    assert wire.name_to_wire("Example.COM.") == b"\x07example\x03com\x00"
    assert wire.name_to_wire(".") == b"\x00"
    assert wire.wire_to_text(b"\x07example\x03com\x00") == "example.com."
    assert wire.wire_to_text(b"\x03a.b\x00") == "a\\046b."
    assert wire.label_offsets(b"\x01a\x02bc\x00") == [0, 2]
    with pytest.raises(ValueError, match="bad label"):
        wire.name_to_wire("a..b")


def test_read_name_decompresses_and_refuses_loops() -> None:
    msg = header() + QUESTION + b"\x03www\xc0\x0c"
    name, end = wire.read_name(msg, 12 + len(QUESTION)) or (b"", 0)
    assert name == b"\x03www\x07example\x03com\x00" and end == len(msg)
    assert wire.read_name(header() + b"\xc0\x0c", 12) is None  # points at itself
    assert wire.read_name(header() + b"\x03abc", 12) is None


def test_opt_and_ede() -> None:
    opt = wire.opt_record(1232, True, wire.ede_option(wire.EDE_BLOCKED, "why"))
    msg = dns.message.from_wire(header(flags=0x8180, qd=1, ar=1) + QUESTION + opt)
    assert msg.edns == 0 and msg.payload == 1232 and msg.ednsflags & dns.flags.DO
    (ede,) = msg.options
    assert isinstance(ede, dns.edns.EDEOption) and ede.code == 15 and ede.text == "why"
