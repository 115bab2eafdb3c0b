"""Wire-format parsing and reply building, on bytes."""

from __future__ import annotations

import random
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


OPT = wire.opt_record(1232, False)
OPT_DO = wire.opt_record(1232, True)
COOKIE = b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x0c" + b"\x00\x0a\x00\x08" + b"12345678"  # client cookie only


# (packet, RCODE, questions echoed, OPT in the reply (None: none; else its DO bit))
@pytest.mark.parametrize(
    ("packet", "rcode", "questions", "opt"),
    [
        (b"", None, 0, None),
        (b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00", None, 0, None),  # 11 bytes: shorter than a header
        (header(flags=0x8000) + QUESTION, None, 0, None),  # a response: never answered
        (header(flags=0x2800) + QUESTION, wire.NOTIMP, 1, None),  # opcode UPDATE
        (header(flags=0x1000) + QUESTION, wire.NOTIMP, 1, None),  # opcode STATUS
        (header(flags=0x1000, ar=1) + QUESTION + OPT_DO, wire.NOTIMP, 1, True),  # dig +opcode=status
        (header(flags=0x2000, ar=1) + QUESTION + OPT, wire.NOTIMP, 1, False),  # NOTIFY with EDNS
        (header(flags=0x2800, an=1, ns=1, ar=1) + QUESTION + b"\xc0\x0c\x00\x01\x00\xfe\x00\x00\x00\x00\x00\x00" * 2
         + OPT, wire.NOTIMP, 1, False),  # UPDATE with a prerequisite and an update before its OPT
        (header(qd=0), wire.FORMERR, 0, None),
        (header(qd=0, ar=1) + OPT, wire.FORMERR, 0, False),
        (header(qd=0, ar=1) + COOKIE, wire.FORMERR, 0, False),  # RFC 7873 §5.4: no server cookie here
        (header(qd=2) + QUESTION + QUESTION, wire.FORMERR, 2, None),
        (header(qd=2, ar=1) + QUESTION + QUESTION + OPT_DO, wire.FORMERR, 2, True),
        (header(qd=40) + QUESTION * 40, wire.FORMERR, 0, None),  # more than 512 bytes to echo: none
        (header(), wire.FORMERR, 0, None),  # question missing
        (header() + b"\x07example\x03com\x00\x00\x01", wire.FORMERR, 0, None),  # class missing
        (header() + b"\x07example\x03co", wire.FORMERR, 0, None),  # name runs off the end
        (header(ar=1) + b"\xc0\x0c\x00\x01\x00\x01" + OPT, wire.FORMERR, 0, None),  # a pointer in the question
        (header() + b"\x50" + b"a" * 80 + b"\x00\x00\x01\x00\x01", wire.FORMERR, 0, None),  # label > 63
        (header() + (b"\x3f" + b"a" * 63) * 4 + b"\x00\x00\x01\x00\x01", wire.FORMERR, 0, None),  # > 255
        (header(an=1) + QUESTION, wire.FORMERR, 1, None),
        (header(an=1, ar=1) + QUESTION + b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x00\x00\x00" + OPT, wire.FORMERR, 1,
         False),
        (header(ar=1) + QUESTION, wire.FORMERR, 1, None),  # OPT promised, missing
        (header(ar=2) + QUESTION + OPT * 2, wire.FORMERR, 1, None),  # two OPTs: no one EDNS to answer
        (header(ar=1) + QUESTION + b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x05\x00\x0a\x00", wire.FORMERR, 1,
         None),  # options malformed
        (header(ar=1) + QUESTION + b"\x01a\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00", wire.FORMERR, 1, None),
    ],
)
def test_rejections(packet: bytes, rcode: int | None, questions: int, opt: bool | None) -> None:
    result = wire.parse_query(packet)
    assert isinstance(result, wire.Rejection)
    assert result.rcode == rcode
    reply = wire.rejection_reply(packet, result, 1232)
    if rcode is None:
        assert reply is None
        return
    assert reply is not None
    qid, flags, qd, an, ns, ar = struct.unpack_from(">HHHHHH", reply)
    assert qid == 0x1234 and flags & wire.QR and flags & 0xF == rcode and (qd, an, ns) == (questions, 0, 0)
    assert flags & wire.OPCODE_MASK == struct.unpack_from(">H", packet, 2)[0] & wire.OPCODE_MASK
    assert not flags & wire.RA
    assert reply[12 : 12 + len(QUESTION) * questions] == QUESTION * questions  # as the client wrote it
    if opt is None:
        assert ar == 0 and len(reply) == 12 + len(QUESTION) * questions
    else:  # RFC 6891 §6.1.1: ours, DO echoed, and nothing else of the query's (no cookie)
        assert ar == 1 and reply[12 + len(QUESTION) * questions :] == (OPT_DO if opt else OPT)


def test_name_helpers() -> None:
    assert wire.name_to_wire("Example.COM.") == b"\x07example\x03com\x00"
    assert wire.name_to_wire(".") == b"\x00"
    assert wire.wire_to_text(b"\x07example\x03com\x00") == "example.com."
    assert wire.wire_to_text(b"\x03a.b\x00") == "a\\046b."
    assert wire.wire_to_text(b"\x03a\"b\x02\x00\x7f\x00") == "a\\034b.\\000\\127."
    assert wire.wire_to_text(b"\x00") == "."
    assert wire.label_offsets(b"\x01a\x02bc\x00") == [0, 2]


def test_wire_to_text_escapes_exactly_the_bytes_text_form_cannot_hold() -> None:
    """Labels with nothing to escape are decoded whole, the others byte by byte: both say the same
    as escaping every byte outside 33-126 and . \\ \" (random labels, every byte value)."""
    rnd = random.Random(20261207)

    def reference(name: bytes) -> str:
        labels, i = [], 0
        while name[i]:
            raw = name[i + 1 : i + 1 + name[i]]
            labels.append("".join(chr(b) if 33 <= b < 127 and b not in b'.\\"' else f"\\{b:03d}" for b in raw))
            i += name[i] + 1
        return ".".join(labels) + "."

    for _ in range(2000):
        labels = [bytes(rnd.choice((rnd.randrange(256), rnd.randrange(97, 123))) for _ in range(rnd.randint(1, 63)))
                  for _ in range(rnd.randint(1, 4))]
        name = b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"
        assert wire.wire_to_text(name) == reference(name)
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
