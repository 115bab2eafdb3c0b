"""DNS wire format on raw bytes: parse queries, walk records, build small replies.

This is the hot path's vocabulary, so it builds no DNS objects: a query becomes one `Query` value,
a reply is assembled from byte strings. Pure: no I/O, no clock. dnslib stays out of here (see
`dns/message.py` for the unusual packets that need it).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

HEADER: Final = struct.Struct(">HHHHHH")
COUNTS: Final = struct.Struct(">HHHH")
U16: Final = struct.Struct(">H")
U32: Final = struct.Struct(">I")
RR_FIXED: Final = struct.Struct(">HHIH")  # type, class, ttl, rdlength
OPTION_HEADER: Final = struct.Struct(">HH")  # an EDNS option's code and length

# Header flag bits
QR: Final = 0x8000
OPCODE_MASK: Final = 0x7800
AA: Final = 0x0400
TC: Final = 0x0200
RD: Final = 0x0100
RA: Final = 0x0080
Z: Final = 0x0040
AD: Final = 0x0020
CD: Final = 0x0010

# RCODEs
NOERROR: Final = 0
FORMERR: Final = 1
SERVFAIL: Final = 2
NXDOMAIN: Final = 3
NOTIMP: Final = 4
REFUSED: Final = 5
BADVERS: Final = 16  # extended: needs EDNS

# Types and classes
A: Final = 1
NS: Final = 2
CNAME: Final = 5
SOA: Final = 6
PTR: Final = 12
HINFO: Final = 13
TXT: Final = 16
AAAA: Final = 28
OPT: Final = 41
DNAME: Final = 39
RRSIG: Final = 46
IXFR: Final = 251
AXFR: Final = 252
ANY: Final = 255
IN: Final = 1

EDNS_DO: Final = 0x8000
EDE_OPTION: Final = 15  # RFC 8914 option code
EDE_BLOCKED: Final = 15  # RFC 8914 info code "Blocked"
EDE_STALE: Final = 3  # RFC 8914 info code "Stale Answer"
EDE_NOT_READY: Final = 14  # RFC 8914 info code "Not Ready" (we cannot ask upstream right now)
EDE_NOT_SUPPORTED: Final = 21  # RFC 8914 info code "Not Supported"

MAX_NAME: Final = 255
MIN_UDP: Final = 512
HEADER_SIZE: Final = 12


# Values built per query are plain slotted dataclasses, not frozen ones: a frozen dataclass costs
# about four times as much to create (13k instructions against 3k), and nothing mutates them.
@dataclass(slots=True)
class Edns:
    udp_size: int
    version: int
    do: bool


@dataclass(slots=True)
class Query:
    """A standard query that is well-formed enough to answer.

    `question` is the client's own bytes (name, type, class) so the reply echoes its letter case;
    `name` is the lower-cased wire name used for matching; `key` is the cache key.
    """

    id: int
    flags: int
    question: bytes
    name: bytes
    qtype: int
    qclass: int
    edns: Edns | None
    key: bytes

    @property
    def text(self) -> str:
        return wire_to_text(self.name)

    @property
    def udp_limit(self) -> int:
        """Largest UDP reply this client accepts (before our own cap)."""
        return MIN_UDP if self.edns is None else max(MIN_UDP, self.edns.udp_size)


@dataclass(frozen=True, slots=True)
class Rejection:
    """A packet that gets an error reply (`rcode`) or none at all (`rcode is None`)."""

    rcode: int | None
    reason: str


DROP_TOO_SHORT: Final = Rejection(None, "shorter than a DNS header")
DROP_RESPONSE: Final = Rejection(None, "QR=1: a response, never answered")

_KEY_SUFFIX: Final = (b"\x00", b"\x01", b"\x02", b"\x03")


def cache_key(question_lower: bytes, do: bool, cd: bool) -> bytes:
    """Name, type and class (lower case), plus one byte for the DO and CD bits that change what
    upstream sends.

    Since a valid wire name ends at its first zero length byte, no two different questions share a
    key. Every key has the byte, even without flags: Pipeline.answer looks up the raw question of
    a packet it has not parsed, and a question with one byte of junk after the class must not
    equal the key of a valid question with a flag byte (the fuzzer, tests/fuzz, found that).
    """
    return question_lower + _KEY_SUFFIX[(do << 1) | cd]


def parse_query(data: bytes) -> Query | Rejection:
    """Parse a DNS query, or say why it is not answered normally."""
    if len(data) < 12:
        return DROP_TOO_SHORT
    qid, flags, qdcount, ancount, nscount, arcount = HEADER.unpack_from(data)
    if flags & QR:
        return DROP_RESPONSE
    if flags & OPCODE_MASK:
        return Rejection(NOTIMP, f"opcode {(flags & OPCODE_MASK) >> 11} not implemented")
    if qdcount != 1:
        return Rejection(FORMERR, f"QDCOUNT is {qdcount}, must be 1 (RFC 9619)")
    if ancount or nscount:
        return Rejection(FORMERR, "answer or authority records in a query")
    end = scan_name(data, 12)
    if end < 0 or end + 5 > len(data):
        return Rejection(FORMERR, "question name or type/class malformed")
    question = data[12 : end + 5]
    qtype, qclass = struct.unpack_from(">HH", data, end + 1)
    edns = _edns_of(data, end + 5, arcount)
    if isinstance(edns, Rejection):
        return edns
    lower = question.lower()
    if qtype > 64 or qclass > 64:  # a type or class byte may be a letter (HTTPS is 65, b"A"): fold the name only
        lower = lower[:-4] + question[-4:]
    return Query(
        id=qid,
        flags=flags,
        question=question,
        name=lower[:-4],
        qtype=qtype,
        qclass=qclass,
        edns=edns,
        key=cache_key(lower, edns is not None and edns.do, bool(flags & CD)),
    )


def _edns_of(data: bytes, offset: int, arcount: int) -> Edns | Rejection | None:
    """The EDNS of the additional section at `offset` (None without an OPT record), or why it is malformed."""
    edns: Edns | None = None
    for _ in range(arcount):
        rr = read_rr_header(data, offset)
        if rr is None:
            return Rejection(FORMERR, "additional section malformed")
        owner_end, rtype, rclass, ttl, rdlen = rr
        if rtype == OPT:
            if edns is not None:
                return Rejection(FORMERR, "more than one OPT record (RFC 6891 §6.1.1)")
            if owner_end != offset + 1:
                return Rejection(FORMERR, "OPT owner is not the root")
            if not _options_well_formed(data, owner_end + 10, rdlen):
                return Rejection(FORMERR, "OPT options malformed")
            edns = Edns(udp_size=rclass, version=(ttl >> 16) & 0xFF, do=bool(ttl & EDNS_DO))
        offset = owner_end + 10 + rdlen
    return edns


def scan_name(data: bytes, offset: int) -> int:
    """Offset of the root label of an uncompressed name at `offset`, or -1 if malformed."""
    start = offset
    n = len(data)
    while offset < n:
        length = data[offset]
        if length == 0:
            return offset if offset - start < MAX_NAME else -1
        if length > 63:
            return -1  # a pointer or a reserved label type: never valid in a question
        offset += length + 1
    return -1


def skip_name(data: bytes, offset: int) -> int:
    """Offset just past a possibly compressed name, or -1 if it runs off the message."""
    n = len(data)
    while offset < n:
        length = data[offset]
        if length == 0:
            return offset + 1
        if length >= 0xC0:
            return offset + 2 if offset + 2 <= n else -1
        if length > 63:
            return -1
        offset += length + 1
    return -1


def read_name(data: bytes, offset: int) -> tuple[bytes, int] | None:
    """Decompress the name at `offset`: (lower-case wire name, offset past it), or None if malformed.

    Pointers must point strictly backwards, which also rules out loops.
    """
    found = expand_name(data, offset)
    return None if found is None else (found[0].lower(), found[1])


def expand_name(data: bytes, offset: int) -> tuple[bytes, int] | None:
    """`read_name` keeping the letter case as sent."""
    labels: list[bytes] = []
    total = 1
    end = -1
    limit = offset
    n = len(data)
    while True:
        if offset >= n:
            return None
        length = data[offset]
        if length == 0:
            if end < 0:
                end = offset + 1
            break
        if length >= 0xC0:
            if offset + 1 >= n:
                return None
            target = ((length & 0x3F) << 8) | data[offset + 1]
            if end < 0:
                end = offset + 2
            if target >= limit:
                return None
            offset = limit = target
            continue
        if length > 63 or offset + 1 + length > n:
            return None
        total += length + 1
        if total > MAX_NAME:
            return None
        labels.append(data[offset : offset + 1 + length])
        offset += length + 1
    return b"".join(labels) + b"\x00", end


# Types whose RDATA holds a domain name a client will decompress: (offset of the name, whether it
# must end the RDATA). A and AAAA have fixed sizes, SOA two names and 20 bytes, TXT framed strings.
NAME_FIELDS: Final = {2: (0, True), 5: (0, True), 12: (0, True), 39: (0, True), 15: (2, True), 33: (6, True),
                      64: (2, False), 65: (2, False)}
FIXED_SIZE: Final = {1: 4, 28: 16}


def name_end(data: bytes, offset: int, trusted: int = -1) -> int:
    """Offset just past the (possibly compressed) name at `offset` if it decompresses within 255
    bytes with every pointer strictly backwards (so no loop) and past the header, else -1. Builds nothing. A pointer
    to `trusted` (a name already checked: the question's, at 12) ends the walk there."""
    n = len(data)
    end = -1
    limit = offset
    total = 1
    while offset < n:
        length = data[offset]
        if length == 0:
            return offset + 1 if end < 0 else end
        if length >= 0xC0:
            if offset + 1 >= n:
                return -1
            target = ((length & 0x3F) << 8) | data[offset + 1]
            if end < 0:
                end = offset + 2
            if target == trusted and total == 1:
                return end
            if target >= limit or target < HEADER_SIZE:  # no names live in the header
                return -1
            offset = limit = target
            continue
        if length > 63:
            return -1
        total += length + 1
        if total > MAX_NAME:
            return -1
        offset += length + 1
    return -1


def records_well_formed(data: bytes, offset: int) -> bool:
    """Whether every record after the question (starting at `offset`) is one a client can read:
    its owner name decompresses (no pointer loop, no forward pointer, nothing past the end), and
    so do the names in its RDATA (NS, CNAME, PTR, DNAME, MX, SRV, SOA, SVCB/HTTPS); A, AAAA, SOA,
    TXT and HINFO have the size their format says. Upstream replies that fail this would reach clients,
    and the cache, as poison: they are treated as no reply at all. Other types are relayed as
    opaque data (RFC 3597)."""
    _qd, ancount, nscount, arcount = COUNTS.unpack_from(data, 4)
    n = len(data)
    unpack = RR_FIXED.unpack_from
    fixed = FIXED_SIZE
    for _ in range(ancount + nscount + arcount):
        # Nearly every owner is a pointer to the question's name, which was checked on arrival.
        owner_end = offset + 2 if data[offset : offset + 2] == b"\xc0\x0c" else name_end(data, offset, 12)
        if owner_end < 0 or owner_end + 10 > n:
            return False
        rtype, _rclass, _ttl, rdlen = unpack(data, owner_end)
        rdata = owner_end + 10
        end = rdata + rdlen
        if end > n:
            return False
        size = fixed.get(rtype)
        if size is not None:
            if rdlen != size:
                return False
        elif rtype in NAME_FIELDS:
            at, last = NAME_FIELDS[rtype]
            name = name_end(data, rdata + at) if at < rdlen else -1
            if name < 0 or name > end or (last and name != end):
                return False
        elif rtype == SOA:
            mname = name_end(data, rdata)
            rname = name_end(data, mname) if 0 <= mname < end else -1
            if rname < 0 or rname + 20 != end:
                return False
        elif rtype == TXT:
            at = rdata
            while at < end:
                at += data[at] + 1
            if at != end or not rdlen:
                return False
        elif rtype == HINFO:  # two character-strings, CPU and OS
            at = rdata + data[rdata] + 1 if rdata < end else end
            if at >= end or at + data[at] + 1 != end:
                return False
        offset = end
    return True


def read_rr_header(data: bytes, offset: int) -> tuple[int, int, int, int, int] | None:
    """(offset past the owner name, type, class, ttl, rdlength) if the record fits in `data`."""
    owner_end = skip_name(data, offset)
    if owner_end < 0 or owner_end + 10 > len(data):
        return None
    rtype, rclass, ttl, rdlen = RR_FIXED.unpack_from(data, owner_end)
    if owner_end + 10 + rdlen > len(data):
        return None
    return owner_end, rtype, rclass, ttl, rdlen


def _options_well_formed(data: bytes, offset: int, rdlen: int) -> bool:
    end = offset + rdlen
    while offset < end:
        if offset + 4 > end:
            return False
        offset += 4 + U16.unpack_from(data, offset + 2)[0]
    return offset == end


def name_to_wire(text: str) -> bytes:
    """`Example.COM.` -> b'\\x07example\\x03com\\x00' (lower case). Raises ValueError if invalid."""
    text = text.strip().rstrip(".").lower()
    if not text:
        return b"\x00"
    out = bytearray()
    for label in text.split("."):
        raw = label.encode("idna") if not label.isascii() else label.encode("ascii")
        if not 1 <= len(raw) <= 63:
            raise ValueError(f"bad label {label!r} in {text!r}")
        out.append(len(raw))
        out += raw
    out.append(0)
    if len(out) > MAX_NAME:
        raise ValueError(f"name too long: {text!r}")
    return bytes(out)


_PLAIN: Final = bytes(b for b in range(33, 127) if b not in b'.\\"')  # kept as they are in text form


def wire_to_text(wire: bytes) -> str:
    """b'\\x07example\\x03com\\x00' -> 'example.com.' (non-printable bytes escaped as \\DDD). A label
    with nothing to escape (nearly every one) is decoded whole: the query log's writer turns every
    gated query's name into text."""
    labels: list[str] = []
    i = 0
    n = len(wire)
    while i < n and wire[i]:
        raw = wire[i + 1 : i + 1 + wire[i]]
        if raw.translate(None, _PLAIN):  # a byte to escape
            labels.append("".join(chr(b) if b in _PLAIN else f"\\{b:03d}" for b in raw))
        else:
            labels.append(raw.decode("ascii"))
        i += wire[i] + 1
    return ".".join(labels) + "."


def label_offsets(name: bytes) -> list[int]:
    """Start offset of every label of a valid wire name (0 for the whole name)."""
    offsets: list[int] = []
    i = 0
    while name[i]:
        offsets.append(i)
        i += name[i] + 1
    return offsets


# --------------------------------------------------------------------------------------------
# Building replies


def opt_record(udp_size: int, do: bool, options: bytes = b"", ext_rcode: int = 0) -> bytes:
    """An OPT pseudo-record (root owner), EDNS version 0."""
    ttl = ((ext_rcode >> 4) << 24) | (EDNS_DO if do else 0)
    return b"\x00" + RR_FIXED.pack(OPT, udp_size, ttl, len(options)) + options


def ede_option(info_code: int, text: str) -> bytes:
    raw = text.encode("utf-8")
    return U16.pack(EDE_OPTION) + U16.pack(2 + len(raw)) + U16.pack(info_code) + raw


def soa_record(owner: bytes, ttl: int, mname: bytes, rname: bytes, minimum: int) -> bytes:
    rdata = mname + rname + struct.pack(">IIIII", 1, 3600, 600, 86400, minimum)
    return owner + RR_FIXED.pack(SOA, IN, ttl, len(rdata)) + rdata


def reply_flags(query_flags: int, rcode: int, extra: int = 0) -> int:
    """QR and RA set; RD and CD copied from the query; AA, TC and Z clear; `extra` may add AD/TC."""
    return QR | RA | (query_flags & (RD | CD)) | extra | (rcode & 0xF)


def error_reply(query: Query, rcode: int, our_udp: int, options: bytes = b"", ra: bool = True) -> bytes:
    """A reply with no records: the question echoed, an OPT if the query had one. Without `ra` for
    what no resolver would answer however it was asked (a zone transfer, a meta-type), as unbound."""
    flags = reply_flags(query.flags, rcode) & (0xFFFF if ra else ~RA)
    if query.edns is None:
        return HEADER.pack(query.id, flags, 1, 0, 0, 0) + query.question
    opt = opt_record(our_udp, query.edns.do, options, ext_rcode=rcode)
    return HEADER.pack(query.id, flags, 1, 0, 0, 1) + query.question + opt


def rejection_reply(data: bytes, rejection: Rejection, our_udp: int) -> bytes | None:
    """The reply to a rejected packet (None to drop it): ID, opcode and RD echoed; its question
    section if it can be read and fits 512 bytes; an OPT record if it had exactly one well-formed OPT
    (RFC 6891 §6.1.1: a query with OPT gets one back, even QDCOUNT 0 as in RFC 7873 §5.4's cookie
    probe). Header only when the question section cannot be read."""
    if rejection.rcode is None or len(data) < 12:
        return None
    qid, flags, qdcount, ancount, nscount, arcount = HEADER.unpack_from(data)
    flags = QR | (flags & (OPCODE_MASK | RD)) | rejection.rcode
    offset = 12
    for _ in range(qdcount):
        end = scan_name(data, offset)
        if end < 0 or end + 5 > len(data):
            return HEADER.pack(qid, flags, 0, 0, 0, 0)
        offset = end + 5
    questions = data[12:offset]
    for _ in range(ancount + nscount):  # an UPDATE's prerequisites and updates come before its OPT
        rr = read_rr_header(data, offset)
        if rr is None:
            arcount = 0
            break
        offset = rr[0] + 10 + rr[4]
    edns = _edns_of(data, offset, arcount)
    opt = opt_record(our_udp, edns.do) if isinstance(edns, Edns) else b""
    if 12 + len(questions) + len(opt) > MIN_UDP:
        questions, qdcount = b"", 0
    return HEADER.pack(qid, flags, qdcount, 0, 0, 1 if opt else 0) + questions + opt


# --------------------------------------------------------------------------------------------
# EDNS padding on encrypted transports (RFC 7830, RFC 8467)

PADDING_OPTION: Final = 12  # RFC 7830 option code
RESPONSE_PAD_BLOCK: Final = 468  # RFC 8467 §4.1: responses are padded to a multiple of 468 octets


def _opt_of(data: bytes) -> tuple[int, int] | None:
    """(offset of the OPT record's RDATA, its length) for the first OPT of the additional section,
    or None without one or when the message cannot be walked that far. Padding's two sides, the
    query asking and the reply carrying it, find the record the same way."""
    if len(data) < 12:
        return None
    _, _, qdcount, ancount, nscount, arcount = HEADER.unpack_from(data)
    offset = 12
    for _ in range(qdcount):
        end = scan_name(data, offset)
        if end < 0:
            return None
        offset = end + 5
    for i in range(ancount + nscount + arcount):
        rr = read_rr_header(data, offset)
        if rr is None:
            return None
        owner_end, rtype, _, _, rdlen = rr
        offset = owner_end + 10
        if rtype == OPT and i >= ancount + nscount:
            return offset, rdlen
        offset += rdlen
    return None


def padding_requested(data: bytes) -> bool:
    """Whether a query carries the EDNS Padding option: RFC 7830 §4 pads a response only then, so
    that a client that never asked is not sent bytes it did not expect."""
    opt = _opt_of(data)
    if opt is None:
        return False
    at, rdlen = opt
    end = at + rdlen
    while at + 4 <= end:
        code, length = OPTION_HEADER.unpack_from(data, at)
        if code == PADDING_OPTION:
            return True
        at += 4 + length
    return False


def pad_reply(reply: bytes, block: int = RESPONSE_PAD_BLOCK, limit: int = 65535) -> bytes:
    """`reply` with a Padding option added to its OPT record so that its length is a multiple of
    `block` (RFC 8467's Block-Length Padding). Unchanged if it has no OPT record to carry the
    option (a query with padding always gets one back), or if padding would pass `limit`."""
    opt = _opt_of(reply)
    if opt is None:
        return reply
    rdata, rdlen = opt
    size = (-(len(reply) + 4)) % block
    if len(reply) + 4 + size > limit:
        return reply
    end = rdata + rdlen
    return (reply[: rdata - 2] + U16.pack(rdlen + 4 + size) + reply[rdata:end]
            + OPTION_HEADER.pack(PADDING_OPTION, size) + bytes(size) + reply[end:])
