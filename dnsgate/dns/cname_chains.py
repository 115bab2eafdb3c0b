"""CNAME chains an upstream left unfinished, and the whole answer once the rest is known.

Authoritative servers, and some forwarders, answer `alias.example A` with the CNAME alone when its
target lies elsewhere. A stub resolver (glibc) finds no address in such an answer, so dnsgate asks
for the target itself, as a recursive resolver does, and joins the two answers into the one a
recursive upstream would have sent. `chain_target` says whether an answer stops short and where;
`joined_reply` builds the whole answer. The shell (dns/forwarding.py) does the asking. Pure: bytes only.
"""

from __future__ import annotations

from typing import Final

from dnsgate.wire import (
    CNAME,
    COUNTS,
    HEADER,
    NAME_FIELDS,
    NS,
    PTR,
    RR_FIXED,
    SOA,
    U16,
    expand_name,
    read_name,
    read_rr_header,
)

MX: Final = 15
# RDATA names a server may compress (RFC 3597 §4: the types of RFC 1035); any other name is written whole
COMPRESSIBLE: Final = frozenset({NS, CNAME, SOA, PTR, MX})

# owner (letter case as sent, uncompressed), type, class, TTL, and the RDATA in parts: raw bytes and
# names by turns (raw, name, raw, ...); a type without names has one raw part
Record = tuple[bytes, int, int, int, tuple[bytes, ...]]


class ChainLoop(ValueError):
    """The CNAMEs of an answer lead back to a name already on the chain."""


def chain_target(reply: bytes, offset: int, qname: bytes, qtype: int) -> bytes | None:
    """The name at which the CNAME chain of a NOERROR answer to (`qname`, `qtype`) stops without the
    records asked for (lower-case wire), or None when the answer is whole: no chain, the chain ends
    in records of `qtype`, or the authority section holds an SOA (the upstream followed the chain
    and says there is no data at its end). `offset` is where the answer section starts. Raises
    ChainLoop for a chain that loops within the answer; a record that cannot be read ends the check
    (the reply was checked before: records_well_formed)."""
    _qd, ancount, nscount, _ar = COUNTS.unpack_from(reply, 4)
    aliases: dict[bytes, bytes] = {}
    owners: set[bytes] = set()
    for _ in range(ancount):
        owner = read_name(reply, offset)
        if owner is None or owner[1] + 10 > len(reply):
            return None
        rtype, _rclass, _ttl, rdlen = RR_FIXED.unpack_from(reply, owner[1])
        rdata = owner[1] + 10
        if rtype == CNAME:
            target = read_name(reply, rdata)
            if target is None:
                return None
            aliases.setdefault(owner[0], target[0])
        elif rtype == qtype:
            owners.add(owner[0])
        offset = rdata + rdlen
    if not aliases:
        return None
    for _ in range(nscount):
        rr = read_rr_header(reply, offset)
        if rr is None or rr[1] == SOA:
            return None
        offset = rr[0] + 10 + rr[4]
    name = qname
    seen = {qname}
    while name not in owners and name in aliases:
        name = aliases[name]
        if name in seen:
            raise ChainLoop(f"the CNAME chain loops at {name!r}")
        seen.add(name)
    return None if name == qname or name in owners else name


def read_records(data: bytes, offset: int, count: int) -> tuple[list[Record], int]:
    """`count` records from `offset`, every name decompressed: (records, offset past them).
    Raises ValueError for a record that cannot be read."""
    records: list[Record] = []
    n = len(data)
    for _ in range(count):
        owner = expand_name(data, offset)
        if owner is None or owner[1] + 10 > n:
            raise ValueError("a record that cannot be read")
        rtype, rclass, ttl, rdlen = RR_FIXED.unpack_from(data, owner[1])
        rdata = owner[1] + 10
        end = rdata + rdlen
        if end > n:
            raise ValueError("a record that runs past the message")
        field = NAME_FIELDS.get(rtype)
        parts: tuple[bytes, ...]
        if field is not None:
            name = expand_name(data, rdata + field[0]) if field[0] < rdlen else None
            if name is None or name[1] > end:
                raise ValueError(f"a type {rtype} record whose name cannot be read")
            parts = (data[rdata : rdata + field[0]], name[0], data[name[1] : end])
        elif rtype == SOA:
            mname = expand_name(data, rdata)
            rname = expand_name(data, mname[1]) if mname is not None else None
            if mname is None or rname is None or rname[1] + 20 != end:
                raise ValueError("an SOA record that cannot be read")
            parts = (b"", mname[0], b"", rname[0], data[rname[1] : end])
        else:
            parts = (data[rdata:end],)
        records.append((owner[0], rtype, rclass, ttl & 0x7FFFFFFF, parts))
        offset = end
    return records, offset


class _Writer:
    """A message built record by record, with names compressed as RFC 1035 §4.1.4 allows."""

    __slots__ = ("names", "out")

    def __init__(self, head: bytes, question: bytes) -> None:
        self.out = bytearray(head)
        self.names: dict[bytes, int] = {}
        self.name(question[:-4], True)  # the question, its suffixes remembered for the records to point to
        self.out += question[-4:]

    def name(self, name: bytes, compress: bool) -> None:
        out = self.out
        i = 0
        while name[i]:
            if compress:
                suffix = name[i:].lower()
                at = self.names.get(suffix)
                if at is not None:
                    out += U16.pack(0xC000 | at)
                    return
                if len(out) < 0x4000:
                    self.names[suffix] = len(out)
            out += name[i : i + name[i] + 1]
            i += name[i] + 1
        out.append(0)

    def record(self, record: Record) -> None:
        owner, rtype, rclass, ttl, parts = record
        self.name(owner, True)
        out = self.out
        fixed = len(out)
        out += RR_FIXED.pack(rtype, rclass, ttl, 0)
        compress = rtype in COMPRESSIBLE
        for i, part in enumerate(parts):
            if i % 2:
                self.name(part, compress)
            else:
                out += part
        U16.pack_into(out, fixed + 8, len(out) - fixed - 10)


def joined_reply(question: bytes, chain: bytes, chain_age: int, target_question: bytes, target_body: bytes,
                 target_counts: tuple[int, int, int], flags: int) -> bytes:
    """The reply a recursive upstream would have sent to `question`: the answer section of `chain`
    (an upstream reply to `question` whose chain stops short), its TTLs less `chain_age` seconds,
    then every section of the answer to `target_question` (the name the chain stops at), whose
    records `target_body` holds as they followed that question, `target_counts` of them by section
    (a cache entry's body), all under `flags` (the target's RCODE: NXDOMAIN for a chain that
    dangles). Raises ValueError for a record that cannot be read."""
    ancount = COUNTS.unpack_from(chain, 4)[1]
    first, _ = read_records(chain, 12 + len(question), ancount)
    if chain_age > 0:
        first = [(o, t, c, ttl - chain_age if ttl > chain_age else 0, p) for o, t, c, ttl, p in first]
    an, ns, ar = target_counts
    # pointers in the body count from the start of the message it came in
    rest, _ = read_records(bytes(12) + target_question + target_body, 12 + len(target_question), an + ns + ar)
    writer = _Writer(HEADER.pack(0, flags, 1, len(first) + an, ns, ar), question)
    for record in first + rest:
        writer.record(record)
    return bytes(writer.out)
