"""The network's own names: records the operator gives (`[local] records`, `local.hosts_file`),
answered authoritatively, as Pi-hole's local DNS records, AdGuard Home's rewrites and Blocky's
customDNS do.

`parse_records` and `parse_hosts` turn the configuration's text into records (errors name the key
and the entry); `LocalRecords` holds them and `resolve` decides what a question gets, following
RFC 1034/2308 for data dnsgate is the authority for:
  - a configured name: its records of the type asked (AA); another type: NODATA with an SOA;
  - a name below a configured name that holds nothing: NXDOMAIN (the subtree is dnsgate's), except
    empty non-terminals (a name between two configured ones), which exist: NODATA (RFC 8020);
  - a CNAME: the alias and, while its targets are local, theirs (a chain ending at a local name that
    does not exist is NXDOMAIN, RFC 6604); a target outside the local data is left for the resolver
    to ask upstream, the answer joined as for an upstream's unfinished chain (cname_chains.py);
  - any other name: not ours, the next step decides (the built-in local zones, then upstream).
PTR records are made for every A and AAAA (`local.generate_ptr`), the first name given for an
address winning, unless the operator gives that PTR. Gating is the pipeline's: every name of a
chain is matched against the catalog there. Pure: no I/O (the hosts file is read by the caller).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from dnsgate.config import ConfigError
from dnsgate.wire import (
    AA,
    AAAA,
    ANY,
    CNAME,
    HEADER,
    IN,
    NOERROR,
    NXDOMAIN,
    PTR,
    RD,
    RR_FIXED,
    SOA,
    TXT,
    A,
    Query,
    label_offsets,
    name_to_wire,
    opt_record,
    reply_flags,
)

MX: Final = 15
SRV: Final = 33
TYPES: Final = {"A": A, "AAAA": AAAA, "CNAME": CNAME, "PTR": PTR, "TXT": TXT, "MX": MX, "SRV": SRV}
MAX_TTL: Final = 86_400 * 7
MAX_CHAIN: Final = 8  # CNAMEs followed within the local data (as the resolver's chains)
NOBODY: Final = b"\x06nobody\x07invalid\x00"
_SOA_TAIL: Final = struct.Struct(">IIIII")


class RecordError(ConfigError):
    """A record that cannot be used; the message names the key and the entry."""


@dataclass(frozen=True, slots=True)
class Record:
    owner: bytes  # lower-case wire name
    rtype: int
    ttl: int
    rdata: bytes  # names in it uncompressed

    @property
    def target(self) -> bytes:
        """The name a CNAME points to."""
        return self.rdata


def _name(text: str, where: str) -> bytes:
    try:
        wire = name_to_wire(text)
    except (ValueError, UnicodeError) as exc:
        raise RecordError(f"{where}: bad name {text!r}: {exc}") from None
    if wire == b"\x00":
        raise RecordError(f"{where}: the root cannot be a local name")
    return wire


def _uint(text: str, bits: int, what: str, where: str) -> int:
    if not text.isdigit() or int(text) >= 1 << bits:
        raise RecordError(f"{where}: {what} must be a whole number 0..{(1 << bits) - 1}, got {text!r}")
    return int(text)


def _txt(text: str, where: str) -> bytes:
    """TXT data: "quoted strings" (\\" and \\\\ escaped) one after another, or bare words as one string;
    a string longer than 255 bytes is split (RFC 7208 §3.3 joins them again)."""
    strings: list[bytes] = []
    text = text.strip()
    if text.startswith('"'):
        i = 0
        while i < len(text):
            if text[i].isspace():
                i += 1
                continue
            if text[i] != '"':
                raise RecordError(f"{where}: TXT data mixes quoted and bare text: {text!r}")
            out = []
            i += 1
            while i < len(text) and text[i] != '"':
                if text[i] == "\\" and i + 1 < len(text):
                    i += 1
                out.append(text[i])
                i += 1
            if i >= len(text):
                raise RecordError(f"{where}: TXT data has an unclosed quote: {text!r}")
            i += 1
            strings.append("".join(out).encode("utf-8"))
    else:
        strings.append(text.encode("utf-8"))
    rdata = b""
    for s in strings:
        chunks = [s[j:j + 255] for j in range(0, len(s), 255)] or [b""]
        rdata += b"".join(bytes((len(c),)) + c for c in chunks)
    if len(rdata) > 65535:
        raise RecordError(f"{where}: TXT data too long")
    return rdata


def parse_record(text: str, default_ttl: int, where: str) -> Record:
    """One record in zone-file form, `NAME [TTL] [IN] TYPE DATA`, names absolute with or without the
    final dot: `nas.home A 192.168.1.10`, `www.home 600 CNAME nas.home`, `home MX 10 mail.home`,
    `_http._tcp.home SRV 0 5 80 nas.home`, `home TXT "v=spf1 -all"`."""
    parts = text.split(None, 1)
    if len(parts) < 2:
        raise RecordError(f"{where}: expected 'NAME [TTL] TYPE DATA', got {text!r}")
    owner = _name(parts[0], where)
    rest = parts[1]
    ttl = default_ttl
    head, _, tail = rest.partition(" ")
    if head.isdigit():
        ttl = int(head)
        if ttl > MAX_TTL:
            raise RecordError(f"{where}: TTL must be 0..{MAX_TTL}, got {ttl}")
        rest = tail.strip()
        head, _, tail = rest.partition(" ")
    if head.upper() == "IN":
        rest = tail.strip()
        head, _, tail = rest.partition(" ")
    rtype = TYPES.get(head.upper())
    if rtype is None:
        raise RecordError(f"{where}: type must be one of {', '.join(TYPES)}, got {head!r} in {text!r}")
    data = tail.strip()
    if not data:
        raise RecordError(f"{where}: {head.upper()} needs data, got {text!r}")
    fields = data.split()
    if rtype in (A, AAAA):
        try:
            ip = ipaddress.ip_address(data)
        except ValueError:
            raise RecordError(f"{where}: not an IP address: {data!r}") from None
        if (ip.version == 4) != (rtype == A):
            raise RecordError(f"{where}: {head.upper()} needs an IPv{6 if rtype == AAAA else 4} address, got {data!r}")
        rdata = ip.packed
    elif rtype in (CNAME, PTR):
        if len(fields) != 1:
            raise RecordError(f"{where}: {head.upper()} takes one name, got {data!r}")
        rdata = _name(fields[0], where)
    elif rtype == MX:
        if len(fields) != 2:
            raise RecordError(f"{where}: MX takes 'PREFERENCE NAME', got {data!r}")
        rdata = struct.pack(">H", _uint(fields[0], 16, "the preference", where)) + _name(fields[1], where)
    elif rtype == SRV:
        if len(fields) != 4:
            raise RecordError(f"{where}: SRV takes 'PRIORITY WEIGHT PORT TARGET', got {data!r}")
        numbers = [_uint(f, 16, what, where) for f, what in zip(fields[:3], ("the priority", "the weight", "the port"),
                                                                 strict=True)]
        rdata = struct.pack(">HHH", *numbers) + _name(fields[3], where)
    else:
        rdata = _txt(data, where)
    return Record(owner, rtype, ttl, rdata)


def parse_records(lines: Iterable[str], default_ttl: int, key: str = "local.records") -> list[Record]:
    return [parse_record(line, default_ttl, f"{key}[{i}]") for i, line in enumerate(lines)]


def parse_hosts(text: str, default_ttl: int, source: str) -> list[Record]:
    """A hosts file (`ADDRESS NAME [ALIAS...]`, `#` comments): an A or AAAA record for each name.
    Scoped IPv6 addresses (fe80::1%eth0) are skipped: no DNS record can carry the scope."""
    records: list[Record] = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        where = f"{source} line {number}"
        if "%" in fields[0]:
            continue
        try:
            ip = ipaddress.ip_address(fields[0])
        except ValueError:
            raise RecordError(f"{where}: not an IP address: {fields[0]!r}") from None
        if len(fields) < 2:
            raise RecordError(f"{where}: an address without a name")
        for name in fields[1:]:
            records.append(Record(_name(name, where), A if ip.version == 4 else AAAA, default_ttl, ip.packed))
    return records


def reverse_name(packed: bytes) -> bytes:
    """The in-addr.arpa or ip6.arpa name of an address (wire)."""
    if len(packed) == 4:
        labels = [str(b).encode() for b in reversed(packed)] + [b"in-addr", b"arpa"]
    else:
        labels = [f"{n:x}".encode() for b in reversed(packed) for n in (b & 0xF, b >> 4)] + [b"ip6", b"arpa"]
    return b"".join(bytes((len(label),)) + label for label in labels) + b"\x00"


def _text(wire: bytes) -> str:
    labels = []
    i = 0
    while wire[i]:
        labels.append(wire[i + 1:i + 1 + wire[i]].decode("ascii", "replace"))
        i += wire[i] + 1
    return ".".join(labels) or "."


@dataclass(slots=True)
class Resolved:
    """What the local data says to a question: the answer records (owner, type, TTL, rdata) in
    order, the rcode, every name of the chain (the question's first: the pipeline gates on them),
    the owner of the SOA of a negative answer, and the name outside the local data the chain leads
    to, if it does (the resolver asks it upstream)."""

    rcode: int
    answers: list[Record]
    names: list[bytes]
    authority: bytes | None = None
    external: bytes | None = None


@dataclass(frozen=True, slots=True, eq=False)
class LocalRecords:
    """The operator's records by owner (lower-case wire), checked and with PTRs added. Picklable:
    workers get it with the ruleset."""

    owners: dict[bytes, dict[int, tuple[Record, ...]]]
    empty: frozenset[bytes]  # empty non-terminals: names between two configured names
    negative_ttl: int
    tails: frozenset[bytes] = field(init=False)  # owners' last four bytes: a cheap first test
    short: bool = field(init=False)  # an owner of fewer than four bytes ("a."): the first test is off

    def __post_init__(self) -> None:
        object.__setattr__(self, "tails", frozenset(o[-4:] for o in self.owners))
        object.__setattr__(self, "short", any(len(o) < 4 for o in self.owners))

    def __len__(self) -> int:
        return sum(len(rs) for by_type in self.owners.values() for rs in by_type.values())

    def covers(self, name: bytes) -> bytes | None:
        """The configured name at or above `name` that makes it ours (the nearest), or None."""
        owners = self.owners
        if not self.short and name[-4:] not in self.tails:
            return None
        if name in owners:
            return name
        for i in label_offsets(name)[1:]:
            if name[i:] in owners:
                return name[i:]
        return None

    def resolve(self, name: bytes, qtype: int) -> Resolved | None:
        """The answer to (`name`, `qtype`) from the local data, or None when `name` is not ours."""
        apex = self.covers(name)
        if apex is None:
            return None
        result = Resolved(NOERROR, [], [name])
        for _ in range(MAX_CHAIN + 1):
            by_type = self.owners.get(name)
            if by_type is None:  # below a configured name: an empty non-terminal, or nothing
                if name not in self.empty:
                    result.rcode = NXDOMAIN
                result.authority = apex
                return result
            alias = by_type.get(CNAME)
            if alias is None or qtype == CNAME:
                records = [r for rs in by_type.values() for r in rs] if qtype == ANY else list(by_type.get(qtype, ()))
                result.answers += records
                if not records:
                    result.authority = name
                return result
            result.answers.append(alias[0])
            name = alias[0].target
            result.names.append(name)
            found = self.covers(name)
            if found is None:
                result.external = name
                return result
            apex = found
        raise AssertionError("CNAME chains are checked when the records are built")  # pragma: no cover

    def reply(self, q: Query, result: Resolved, udp_max: int) -> bytes:
        """The authoritative reply (AA) for a `result` whose chain stays within the local data."""
        body = b"".join(self._record(r, q) for r in result.answers)
        nscount = 0
        if result.authority is not None:
            soa = result.authority + NOBODY + _SOA_TAIL.pack(1, 3600, 1200, 604800, self.negative_ttl)
            body += self._owner(result.authority, q) + RR_FIXED.pack(SOA, IN, self.negative_ttl, len(soa)) + soa
            nscount = 1
        flags = reply_flags(q.flags, result.rcode, AA)
        counts = (1, len(result.answers), nscount)
        if q.edns is None:
            return HEADER.pack(q.id, flags, *counts, 0) + q.question + body
        return HEADER.pack(q.id, flags, *counts, 1) + q.question + body + opt_record(udp_max, q.edns.do)

    def partial(self, q: Query, result: Resolved) -> bytes:
        """The aliases of a chain that leaves the local data, as an upstream would answer them
        (no AA, no OPT): the resolver completes it like any unfinished chain."""
        body = b"".join(self._record(r, q) for r in result.answers)
        return HEADER.pack(0, reply_flags(RD, NOERROR), 1, len(result.answers), 0, 0) + q.question + body

    @staticmethod
    def _owner(owner: bytes, q: Query) -> bytes:
        return b"\xc0\x0c" if owner == q.name else owner

    def _record(self, r: Record, q: Query) -> bytes:
        return self._owner(r.owner, q) + RR_FIXED.pack(r.rtype, IN, r.ttl, len(r.rdata)) + r.rdata


def build(records: Iterable[Record], generate_ptr: bool, negative_ttl: int,
          reserved: Iterable[str] = ()) -> LocalRecords:
    """The table of `records` (in the order given: the first name of an address gets its PTR).
    Raises RecordError for names under `reserved` (dnsgate's own zone, the portal's name), a CNAME
    beside other data or a second CNAME (RFC 1034 §3.6.2), and a chain that loops or runs longer
    than MAX_CHAIN within the local data."""
    records = list(records)
    owners: dict[bytes, dict[int, list[Record]]] = {}
    kept = [name_to_wire(r) for r in reserved]
    for r in records:
        for zone in kept:
            if _is_below(r.owner, zone):
                raise RecordError(f"local.records: {_text(r.owner)} is in dnsgate's own names ({_text(zone)})")
        same = owners.setdefault(r.owner, {}).setdefault(r.rtype, [])
        if r.rdata not in (s.rdata for s in same):
            same.append(r)
    if generate_ptr:
        for r in records:
            if r.rtype in (A, AAAA) and not ipaddress.ip_address(r.rdata).is_unspecified:
                reverse = reverse_name(r.rdata)
                if PTR not in owners.get(reverse, {}):
                    owners.setdefault(reverse, {})[PTR] = [Record(reverse, PTR, r.ttl, r.owner)]
    for owner, by_type in owners.items():
        if CNAME in by_type and (len(by_type) > 1 or len(by_type[CNAME]) > 1):
            others = ", ".join(sorted(k for k, v in TYPES.items() if v in by_type and v != CNAME)) or "another CNAME"
            raise RecordError(f"local.records: {_text(owner)} has a CNAME and {others}: a CNAME stands alone")
    table = LocalRecords({o: {t: tuple(rs) for t, rs in by_type.items()} for o, by_type in owners.items()},
                         _empty_non_terminals(owners), negative_ttl)
    for owner, by_type in owners.items():
        if CNAME in by_type:
            _check_chain(table, owner)
    return table


def _is_below(name: bytes, zone: bytes) -> bool:
    return name == zone or (name.endswith(zone) and any(name[i:] == zone for i in label_offsets(name)))


def _empty_non_terminals(owners: dict[bytes, dict[int, list[Record]]]) -> frozenset[bytes]:
    """Names that hold nothing but lie between a configured name and a configured name above it."""
    empty: set[bytes] = set()
    for owner in owners:
        between: list[bytes] = []
        for i in label_offsets(owner)[1:]:
            above = owner[i:]
            if above in owners:
                empty.update(between)
                break
            between.append(above)
    return frozenset(empty)


def _check_chain(table: LocalRecords, owner: bytes) -> None:
    seen = [owner]
    name = owner
    while True:
        alias = table.owners.get(name, {}).get(CNAME)
        if alias is None:
            return
        name = alias[0].target
        if name in seen:
            raise RecordError(f"local.records: the CNAMEs of {_text(owner)} loop at {_text(name)}")
        seen.append(name)
        if len(seen) > MAX_CHAIN:
            raise RecordError(f"local.records: the CNAME chain of {_text(owner)} is longer than {MAX_CHAIN} names")
        if table.covers(name) is None:
            return
