"""The answer cache: upstream replies kept as bytes, served with decremented TTLs, bounded with LRU.

An `Entry` holds everything after the question of an upstream reply (OPT removed), the offsets of
its TTL fields, and the catalog rule it is gated on. Rendering a hit is a concatenation; the TTLs
are rewritten at most once per second of age. With serve-stale on, an expired entry stays (unseen by
`get`) for `stale_window` seconds so `get_stale` can answer when every upstream fails (RFC 8767).
Pure: time is passed in.
"""

from __future__ import annotations

import math
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Final

from .catalog import DomainRule
from .wire import AD, NOERROR, NXDOMAIN, OPT, SOA, U32, read_rr_header, scan_name, skip_name

ENTRY_OVERHEAD: Final = 240  # rough bytes per entry besides the answer itself (objects, dict slot)


@dataclass(slots=True)
class Entry:
    flags: int  # AD and RCODE as upstream sent them; QR/RA/RD/CD are set per reply
    counts: bytes  # ANCOUNT, NSCOUNT, ARCOUNT (no OPT)
    counts_edns: bytes  # the same with one more additional record (our OPT)
    body0: bytes  # the records, TTLs as at `filled`
    ttl_offsets: tuple[int, ...]
    ttls: tuple[int, ...]
    filled: float
    expires: float  # monotonic time after which the entry is not served
    rule: DomainRule | None  # gate on this rule's vendor before serving (the name's, or a cloaked one)
    age: int = 0
    body: bytes = field(default=b"")
    count_slot: int = 0  # where the pipeline counts answers served from this entry (tally.py)
    refresh_at: float = math.inf  # a hit from this time on asks for a prefetch (once)

    def body_at(self, now: float) -> bytes:
        """The records with each TTL reduced by the whole seconds since the entry was filled."""
        age = int(now - self.filled)
        if age != self.age or not self.body:
            buf = bytearray(self.body0)
            for offset, ttl in zip(self.ttl_offsets, self.ttls, strict=True):
                U32.pack_into(buf, offset, ttl - age if ttl > age else 0)
            self.body = bytes(buf)
            self.age = age
        return self.body

    def stale_body(self, ttl: int) -> bytes:
        """The records with every TTL set to `ttl` (RFC 8767 §4: 30 s recommended)."""
        buf = bytearray(self.body0)
        for offset in self.ttl_offsets:
            U32.pack_into(buf, offset, ttl)
        return bytes(buf)

    @property
    def lifetime(self) -> float:
        return self.expires - self.filled

    @property
    def rcode(self) -> int:
        return self.flags & 0xF

    @property
    def size(self) -> int:
        return len(self.body0) + ENTRY_OVERHEAD


@dataclass(frozen=True, slots=True)
class TtlPolicy:
    min_ttl: int
    max_ttl: int
    cap: int | None  # the gated-name cap, or None

    def apply(self, ttl: int) -> int:
        ttl = min(max(ttl, self.min_ttl), self.max_ttl)
        return ttl if self.cap is None else min(ttl, self.cap)


class UnusableReply(ValueError):
    """The upstream reply cannot be parsed into records (treated like a failed upstream)."""


class OptNotLast(UnusableReply):
    """A record follows the OPT record; `message.opt_last` rebuilds such a reply."""


def entry_from_reply(reply: bytes, question_len: int, now: float, ttl: TtlPolicy,
                     rule: DomainRule | None) -> tuple[Entry, bool]:
    """Turn a verified upstream reply into an Entry, and say whether it may be cached.

    The OPT record is dropped (EDNS is hop by hop; we add our own). Positive answers live for their
    smallest TTL; negative ones for min(SOA TTL, SOA MINIMUM) per RFC 2308; anything else, or a
    negative answer without SOA, is served once and not cached.
    """
    flags = struct.unpack_from(">H", reply, 2)[0]
    ancount, nscount, arcount = struct.unpack_from(">HHH", reply, 6)
    start = 12 + question_len
    offset = start
    kept: list[tuple[int, int, int, int]] = []  # (rr start, rr end, ttl offset, ttl) relative to reply
    soa_ttl: int | None = None
    positive_ttls: list[int] = []
    opt_count = 0
    for index in range(ancount + nscount + arcount):
        rr = read_rr_header(reply, offset)
        if rr is None:
            raise UnusableReply(f"record {index} malformed")
        owner_end, rtype, _rclass, rttl, rdlen = rr
        end = owner_end + 10 + rdlen
        if rtype == OPT:
            if index < ancount + nscount:
                raise UnusableReply("OPT outside the additional section")
            opt_count += 1
        else:
            new_ttl = ttl.apply(rttl & 0x7FFFFFFF)
            if rtype == SOA and ancount <= index < ancount + nscount:
                minimum = _soa_minimum(reply, owner_end + 10, end)
                if minimum is None:
                    raise UnusableReply("SOA record malformed")
                new_ttl = soa_ttl = min(new_ttl, ttl.apply(minimum))
            elif index < ancount + nscount:
                positive_ttls.append(new_ttl)
            kept.append((offset, end, owner_end + 4, new_ttl))
        offset = end
    rcode = flags & 0xF
    body, offsets = _body_without_opt(reply, start, kept)
    if rcode == NOERROR and ancount:
        lifetime = min(positive_ttls) if positive_ttls else 0
    elif rcode in (NOERROR, NXDOMAIN) and soa_ttl is not None:
        lifetime = soa_ttl
    else:
        lifetime = 0
    kept_ar = arcount - opt_count
    ttls = tuple(k[3] for k in kept)
    entry = Entry(
        flags=flags & (AD | 0xF),
        counts=struct.pack(">HHH", ancount, nscount, kept_ar),
        counts_edns=struct.pack(">HHH", ancount, nscount, kept_ar + 1),
        body0=_with_ttls(body, offsets, ttls),
        ttl_offsets=offsets,
        ttls=ttls,
        filled=now,
        expires=now + lifetime,
        rule=rule,
    )
    return entry, lifetime > 0


def _body_without_opt(reply: bytes, start: int,
                      kept: list[tuple[int, int, int, int]]) -> tuple[bytes, tuple[int, ...]]:
    """Join the kept records; TTL offsets become relative to the body.

    Cutting the OPT out is safe for compression pointers only if nothing after it points past
    it; OPT comes last in practice, and a reply where a kept record follows it is rebuilt.
    """
    if not kept:
        return b"", ()
    last_end = kept[-1][1]
    contiguous = all(kept[i][1] == kept[i + 1][0] for i in range(len(kept) - 1)) and kept[0][0] == start
    if not contiguous:
        raise OptNotLast("OPT record before other records")
    return reply[start:last_end], tuple(k[2] - start for k in kept)


def _with_ttls(body: bytes, offsets: tuple[int, ...], ttls: tuple[int, ...]) -> bytes:
    buf = bytearray(body)
    for offset, ttl in zip(offsets, ttls, strict=True):
        U32.pack_into(buf, offset, ttl)
    return bytes(buf)


def _soa_minimum(reply: bytes, rdata: int, end: int) -> int | None:
    mname_end = skip_name(reply, rdata)
    rname_end = skip_name(reply, mname_end) if mname_end > 0 else -1
    if rname_end < 0 or rname_end + 20 != end:
        return None
    return int(U32.unpack_from(reply, rname_end + 16)[0])


def question_length(reply: bytes) -> int:
    """Length of the (single) question of a reply, or -1 if malformed."""
    end = scan_name(reply, 12)
    return -1 if end < 0 or end + 5 > len(reply) else end + 5 - 12


class AnswerCache:
    """LRU over entries, bounded in count and in bytes; expired entries are dropped when met."""

    __slots__ = ("_bytes", "_entries", "evictions", "max_bytes", "max_entries", "stale_window")

    def __init__(self, max_entries: int, max_bytes: int, stale_window: float = 0.0) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.stale_window = stale_window  # seconds an expired entry is kept for serve-stale; 0: off
        self._entries: OrderedDict[bytes, Entry] = OrderedDict()
        self._bytes = 0
        self.evictions = 0

    def get(self, key: bytes, now: float) -> Entry | None:
        """A fresh entry, or None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires <= now:
            if now >= entry.expires + self.stale_window:
                self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry

    def get_stale(self, key: bytes, now: float) -> Entry | None:
        """An expired entry still within the serve-stale window, or None."""
        entry = self._entries.get(key)
        if entry is None or not entry.expires <= now < entry.expires + self.stale_window:
            return None
        return entry

    def put(self, key: bytes, entry: Entry) -> None:
        if key in self._entries:
            self._drop(key)
        size = entry.size + len(key)
        if self.max_entries == 0 or size > self.max_bytes:
            return
        self._entries[key] = entry
        self._bytes += size
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            old_key, old = self._entries.popitem(last=False)
            self._bytes -= old.size + len(old_key)
            self.evictions += 1

    def _drop(self, key: bytes) -> None:
        old = self._entries.pop(key)
        self._bytes -= old.size + len(key)

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return self._bytes
