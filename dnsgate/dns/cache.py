"""The answer cache: upstream replies kept as bytes, served with decremented TTLs, bounded with
CLOCK (second chance): a plain dict in insertion order, each entry marked `seen` when served.

An `Entry` holds everything after the question of an upstream reply (OPT removed), the offsets of
its TTL fields, and the catalog rule it is gated on. Rendering a hit is a concatenation; the TTLs
are rewritten at most once per second of age. With serve-stale on, an expired entry stays (unseen by
`get`) for `stale_window` seconds so `get_stale` can answer when every upstream fails (RFC 8767).

An entry not served since the cache's eviction last passed it (as most names asked once never
are) is kept packed: one bytes value, its numbers, where its TTLs are and the index of its kind
(flags, counts, rule) before the records (`AnswerCache.pack`). Its first hit unpacks it into an
`Entry` (`get`), kept until eviction passes it again and packs it back: hits read an object's
slots, and the many entries never hit cost two objects each (key and value) instead of five.
Pure: time is passed in.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from typing import Final

from dnsgate.gc_policy import untrack
from dnsgate.rules.catalog import DomainRule
from dnsgate.wire import AAAA, AD, CNAME, DNAME, NOERROR, NXDOMAIN, OPT, QR, RA, RR_FIXED, SOA, U32, A, skip_name

# Bytes per entry besides its key's and answer's own, as counted against `max_bytes`: an unpacked
# entry's (the Entry 128, its one float 24, the dict's slot ~52, two bytes headers 66), so the
# bound holds whichever form the entries are in. A packed entry takes ~140 (its value's header 33
# and numbers 26, the key's header 33, the dict's slot).
ENTRY_OVERHEAD: Final = 270
_FLAGS_COUNTS: Final = struct.Struct(">HHHHH")
# A packed entry: expiry, lifetime, prefetch time, the index of its kind (flags, counts, counter
# slot, rule) in the cache's `kinds`, how many TTLs it has; then where each TTL is (2 bytes each)
# and its records, TTLs as when it was filled. Where the TTLs are varies with the records' lengths,
# so it is kept in the value: the kinds stay few (a handful of forms for each rule answers meet).
_PACKED: Final = struct.Struct("<dddHH")
PACKED_HEAD: Final = _PACKED.size
KINDS_LIMIT: Final = 16_384  # kinds a cache indexes (past it, entries of new kinds stay unpacked)
Kind = tuple[int, tuple[int, int, int], int, DomainRule | None]


class Shape:
    """What entries of the same form share: the header tail (QDCOUNT..ARCOUNT, without and with our
    OPT), where each TTL is in the records, the flags, and the pipeline's counter slot. One object
    per form (most answers take a handful of forms) instead of six slots in every entry."""

    __slots__ = ("count_slot", "flags", "head", "head_edns", "offsets", "reply_flags")

    def __init__(self, flags: int, counts: tuple[int, int, int], offsets: tuple[int, ...], count_slot: int) -> None:
        self.flags = flags  # AD and RCODE as upstream sent them; RD/CD are copied from each query
        self.reply_flags = QR | RA | flags
        self.head, self.head_edns = _heads(*counts)
        self.offsets = offsets  # where each TTL is in the body
        self.count_slot = count_slot  # where the pipeline counts answers served from it (dns/tally.py)


def _shape(flags: int, counts: tuple[int, int, int], offsets: tuple[int, ...], count_slot: int) -> Shape:
    key = (flags, counts, offsets, count_slot)
    shape = _SHAPES.get(key)
    if shape is None:
        shape = Shape(flags, counts, offsets, count_slot)
        if len(_SHAPES) < 4096:  # bounded: past it, an entry of a new form keeps a shape of its own
            _SHAPES[key] = shape
    return shape


class Entry:
    """One cached answer. Compact on purpose (the cache holds 100k of them): the original TTLs are
    read back from `body0` when the age changes, `body` is `body0` until then (often a slice of the
    upstream reply, not a copy), and what entries of the same form have in common is one shared
    `Shape`. It holds bytes, numbers, a shape and a catalog rule, nothing refers back to it: it can
    never be part of a reference cycle, so the cache takes it out of the cycle collector's passes
    (gc_policy.untrack)."""

    __slots__ = ("age", "body", "body0", "body_until", "expires", "extra", "lifetime", "refresh_at", "rule", "seen",
                 "shape")

    def __init__(self, flags: int, counts: tuple[int, int, int], body0: bytes, offsets: tuple[int, ...], filled: float,
                 expires: float, rule: DomainRule | None) -> None:
        self.shape = _shape(flags, counts, offsets, 0)
        self.body0 = body0  # the records, TTLs as at `filled`
        self.body = body0  # the records, TTLs as at `filled + age`
        # One float per entry: `filled` is `expires - lifetime`, and lifetimes (whole seconds) are
        # shared ints, as `body_until` is -inf (one float less each) until the entry is first served.
        lifetime = expires - filled
        if math.isfinite(lifetime) and lifetime == int(lifetime) and len(_LIFETIMES) < 65_536:
            lifetime = _LIFETIMES.setdefault(int(lifetime), int(lifetime))
        self.lifetime: float = lifetime
        self.expires = expires  # monotonic time after which the entry is not served
        self.rule = rule  # gate on this rule's vendor before serving (the name's, or a cloaked one)
        self.age = 0
        self.body_until = _NOT_YET  # `body` is right (and no prefetch due) until then (then `body_at`)
        self.extra = len(body0)  # a reply is this much longer than the query it answers (EDNS or not)
        self.refresh_at = math.inf  # a hit from this time on asks for a prefetch (once)
        self.seen = False  # served since the cache's eviction last passed it (its second chance)

    # The shape's fields, for the paths other than the cache hit's (which reads `shape` once).
    @property
    def flags(self) -> int:
        return self.shape.flags

    @property
    def reply_flags(self) -> int:
        return self.shape.reply_flags

    @property
    def head(self) -> bytes:
        return self.shape.head

    @property
    def head_edns(self) -> bytes:
        return self.shape.head_edns

    @property
    def offsets(self) -> tuple[int, ...]:
        return self.shape.offsets

    @property
    def count_slot(self) -> int:
        return self.shape.count_slot

    @count_slot.setter
    def count_slot(self, slot: int) -> None:
        shape = self.shape
        self.shape = _shape(shape.flags, _COUNTS.unpack(shape.head)[1:], shape.offsets, slot)

    def body_at(self, now: float) -> bytes:
        """The records with each TTL reduced by the whole seconds since the entry was filled, and
        remembered to be right until the next whole second, or until the prefetch time if sooner:
        the cache hit checks both at once (`refresh_at` only once `body_until` has passed)."""
        body = self.body_now(now)
        until = self.filled + self.age + 1
        self.body_until = until if until < self.refresh_at else self.refresh_at
        return body

    def body_now(self, now: float) -> bytes:
        """`body_at` without remembering until when (no float kept for an entry that is never hit,
        as most names asked once are not)."""
        age = int(now - self.filled)
        if age != self.age:
            self.body = self._with_ttls(lambda ttl: ttl - age if ttl > age else 0)
            self.age = age
        return self.body

    def stale_body(self, ttl: int) -> bytes:
        """The records with every TTL set to `ttl` (RFC 8767 §4: 30 s recommended)."""
        return self._with_ttls(lambda _: ttl)

    def _with_ttls(self, new_ttl: Callable[[int], int]) -> bytes:
        body0 = self.body0
        buf = bytearray(body0)
        for offset in self.offsets:
            U32.pack_into(buf, offset, new_ttl(U32.unpack_from(body0, offset)[0]))
        return bytes(buf)

    @property
    def counts(self) -> bytes:
        return self.head[2:]

    @property
    def counts_edns(self) -> bytes:
        return self.head_edns[2:]

    @property
    def filled(self) -> float:
        """The monotonic time the entry was made."""
        return self.expires - self.lifetime

    @property
    def rcode(self) -> int:
        return self.flags & 0xF

    @property
    def size(self) -> int:
        return len(self.body0) + ENTRY_OVERHEAD


def entry_size(value: Entry | bytes) -> int:
    """What an entry counts against `max_bytes` (its key aside), packed or not: the same either way."""
    if isinstance(value, bytes):
        return len(value) - PACKED_HEAD - 2 * int(_PACKED.unpack_from(value)[4]) + ENTRY_OVERHEAD
    return value.size


def unpack(value: bytes, kinds: list[Kind]) -> Entry:
    """The Entry a packed value stands for (its records as filled: TTLs are rewritten on first use)."""
    expires, lifetime, refresh_at, kind, n = _PACKED.unpack_from(value)
    flags, counts, count_slot, rule = kinds[kind]
    start = PACKED_HEAD + 2 * n
    entry = Entry.__new__(Entry)
    entry.shape = _shape(flags, counts, _offsets(value, n), count_slot)
    entry.rule = rule
    entry.body0 = entry.body = body0 = value[start:]
    if lifetime.is_integer():
        lifetime = _LIFETIMES.get(int(lifetime), lifetime)
    entry.lifetime = lifetime
    entry.expires = expires
    entry.age = 0
    entry.body_until = _NOT_YET
    entry.extra = len(body0)
    entry.refresh_at = math.inf if refresh_at == math.inf else refresh_at  # (one shared float)
    entry.seen = False
    return entry


def _offsets(value: bytes, n: int) -> tuple[int, ...]:
    offsets: tuple[int, ...] = _u16s(n).unpack_from(value, PACKED_HEAD)
    return _OFFSETS.get(offsets, offsets)


def _u16s(n: int) -> struct.Struct:
    """The Struct for `n` little-endian 16-bit numbers (one per count met)."""
    u16s = _U16S.get(n)
    if u16s is None:
        u16s = struct.Struct(f"<{n}H")
        if len(_U16S) < 256:
            _U16S[n] = u16s
    return u16s


_HEADS: dict[tuple[int, int, int], tuple[bytes, bytes]] = {}
_SHAPES: dict[tuple[int, tuple[int, int, int], tuple[int, ...], int], Shape] = {}
_COUNTS: Final = struct.Struct(">HHHH")
_NOT_YET: Final = -math.inf
_LIFETIMES: dict[int, int] = {}  # one int object per lifetime (most answers share a few TTLs)
_OFFSETS: dict[tuple[int, ...], tuple[int, ...]] = {}
_U16S: dict[int, struct.Struct] = {}


def _heads(an: int, ns: int, ar: int) -> tuple[bytes, bytes]:
    """QDCOUNT..ARCOUNT without and with our OPT; shared between entries of the same shape."""
    heads = _HEADS.get((an, ns, ar))
    if heads is None:
        heads = (struct.pack(">HHHH", 1, an, ns, ar), struct.pack(">HHHH", 1, an, ns, ar + 1))
        if len(_HEADS) < 4096:
            _HEADS[(an, ns, ar)] = heads
    return heads


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


ALIASES: Final = 1  # the answer section has a CNAME, DNAME, SVCB or HTTPS record (targets to check)
ADDRESSES: Final = 2  # ... an A or AAAA record
_KIND_OF: Final = {CNAME: ALIASES, DNAME: ALIASES, 64: ALIASES, 65: ALIASES, A: ADDRESSES, AAAA: ADDRESSES}


def entry_from_reply(reply: bytes, question_len: int, now: float, ttl: TtlPolicy,
                     rule: DomainRule | None, keep_ad: bool = True) -> tuple[Entry, bool, int]:
    """Turn a verified upstream reply into an Entry; say whether it may be cached, and what kinds of
    records its answer section holds (ALIASES | ADDRESSES: what an answer check must look at).

    The OPT record is dropped (EDNS is hop by hop; we add our own). Positive answers live for their
    smallest TTL; negative ones for min(SOA TTL, SOA MINIMUM) per RFC 2308, or less if a record
    leading to them (a CNAME) expires first; anything else, or a negative answer without SOA, is
    served once and not cached. The AD bit is kept only with
    `keep_ad` (an upstream trusted to validate). One pass over the records with the names skipped
    inline: this runs for every cache miss.
    """
    flags, _qd, ancount, nscount, arcount = _FLAGS_COUNTS.unpack_from(reply, 2)
    start = offset = 12 + question_len
    n = len(reply)
    lo, hi = ttl.min_ttl, ttl.max_ttl
    if ttl.cap is not None and ttl.cap < hi:
        hi = ttl.cap
    answers_end = ancount + nscount
    positions: list[int] = []  # where each record's TTL is in the body
    changed: list[tuple[int, int]] = []  # (position, TTL) where the TTL had to be clamped or capped
    records_end = start  # the records before the OPT are contiguous from `start`
    opt_at = -1
    soa_ttl = -1
    lifetime = -1  # the smallest TTL of the answer and authority records, SOA aside
    kinds = 0
    for index in range(answers_end + arcount):
        i = offset  # skip the owner name, compressed or not
        while True:
            if i >= n:
                raise UnusableReply(f"record {index} malformed")
            length = reply[i]
            if length == 0:
                i += 1
                break
            if length >= 0xC0:
                i += 2
                break
            if length > 63:
                raise UnusableReply(f"record {index} malformed")
            i += length + 1
        if i + 10 > n:
            raise UnusableReply(f"record {index} malformed")
        rtype, _rclass, rttl, rdlen = RR_FIXED.unpack_from(reply, i)
        end = i + 10 + rdlen
        if end > n:
            raise UnusableReply(f"record {index} malformed")
        if rtype == OPT:
            if index < answers_end:
                raise UnusableReply("OPT outside the additional section")
            if opt_at >= 0:
                raise OptNotLast("two OPT records")
            opt_at = offset
        else:
            if opt_at >= 0:  # compression pointers may point across the OPT: message.opt_last rebuilds
                raise OptNotLast("a record follows the OPT record")
            new_ttl = rttl & 0x7FFFFFFF
            if new_ttl < lo:
                new_ttl = lo
            if new_ttl > hi:
                new_ttl = hi
            if index < ancount:
                kinds |= _KIND_OF.get(rtype, 0)
            if index < answers_end:
                if rtype == SOA and index >= ancount:
                    minimum = _soa_minimum(reply, i + 10, end)
                    if minimum is None:
                        raise UnusableReply("SOA record malformed")
                    new_ttl = soa_ttl = min(new_ttl, ttl.apply(minimum))
                elif lifetime < 0 or new_ttl < lifetime:
                    lifetime = new_ttl
            positions.append(i + 4 - start)
            if new_ttl != rttl:
                changed.append((i + 4 - start, new_ttl))
            records_end = end
        offset = end
    if changed:  # clamped or capped TTLs: written into a copy
        edited = bytearray(reply[start:records_end])
        for position, new_ttl in changed:
            U32.pack_into(edited, position, new_ttl)
        body = bytes(edited)
    else:
        body = reply[start:records_end]
    rcode = flags & 0xF
    if rcode == NOERROR and ancount:
        cache_for = max(lifetime, 0)
        if soa_ttl >= 0:  # a CNAME chain ending in no data: the negative part expires too (RFC 2308 §5)
            cache_for = min(cache_for, soa_ttl)
    elif rcode in (NOERROR, NXDOMAIN) and soa_ttl >= 0:
        cache_for = soa_ttl if lifetime < 0 else min(soa_ttl, lifetime)  # and the CNAMEs leading to it
    else:
        cache_for = 0
    counts = (ancount, nscount, arcount - (opt_at >= 0))
    offsets = tuple(positions)
    if len(_OFFSETS) < 4096:  # most answers share a handful of shapes: keep one tuple of each
        offsets = _OFFSETS.setdefault(offsets, offsets)
    entry = Entry(flags & ((AD if keep_ad else 0) | 0xF), counts, body, offsets, now, now + cache_for, rule)
    return entry, cache_for > 0, kinds


def _soa_minimum(reply: bytes, rdata: int, end: int) -> int | None:
    mname_end = skip_name(reply, rdata)
    rname_end = skip_name(reply, mname_end) if mname_end > 0 else -1
    if rname_end < 0 or rname_end + 20 != end:
        return None
    return int(U32.unpack_from(reply, rname_end + 16)[0])


class AnswerCache:
    """Entries bounded in count and in bytes; expired entries are dropped when met.

    Eviction is CLOCK (second chance) over the dict's insertion order rather than LRU: a hit only
    marks its entry `seen` (no reordering, and a plain dict holds an entry in ~52 bytes where an
    OrderedDict takes ~105), and eviction walks from the oldest end, moving a seen entry to the
    newest end with its mark cleared and evicting the first unseen one. Names served since the last
    pass stay; a flood of names asked once goes first. Eviction takes a batch (1/128 of the entries,
    at least one) from the oldest end at a time, so walking past the slots that earlier evictions
    left empty at the front of the dict costs little per evicted entry.

    A value in `entries` is packed (bytes) until its entry is served, an `Entry` from then on until
    eviction passes it (and packs it again): a packed entry is never `seen`. `kinds` holds the
    flags, counts, counter slots and rules packed values refer to, until `clear`."""

    __slots__ = ("_bytes", "_kind_of", "entries", "evictions", "kinds", "max_bytes", "max_entries", "stale_window")

    def __init__(self, max_entries: int, max_bytes: int, stale_window: float = 0.0) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.stale_window = stale_window  # seconds an expired entry is kept for serve-stale; 0: off
        self.entries: dict[bytes, Entry | bytes] = {}
        untrack(self.entries)  # holds only bytes and untracked entries: nothing for the GC to walk
        self.kinds: list[Kind] = []
        self._kind_of: dict[tuple[int, bytes, int, DomainRule | None], int] = {}
        self._bytes = 0
        self.evictions = 0

    def resize(self, max_entries: int, max_bytes: int, stale_window: float) -> None:
        """A reload's bounds (the reload empties the cache with its new rules: Pipeline.install)."""
        self.max_entries, self.max_bytes, self.stale_window = max_entries, max_bytes, stale_window

    def get(self, key: bytes, now: float) -> Entry | None:
        """A fresh entry, or None. A packed one is unpacked and kept so (it is being served)."""
        entry = self.entries.get(key)
        if entry is None:
            return None
        if isinstance(entry, bytes):
            entry = unpack(entry, self.kinds)
            if entry.expires > now:
                untrack(entry)
                self.entries[key] = entry  # (the same place in the dict's order)
                untrack(self.entries)
        if entry.expires <= now:
            if now >= entry.expires + self.stale_window:
                self._drop(key)
            return None
        entry.seen = True
        return entry

    def get_stale(self, key: bytes, now: float) -> Entry | None:
        """An expired entry still within the serve-stale window, or None."""
        entry = self.entries.get(key)
        if entry is not None and isinstance(entry, bytes):
            entry = unpack(entry, self.kinds)
        if entry is None or not entry.expires <= now < entry.expires + self.stale_window:
            return None
        return entry

    def put(self, key: bytes, entry: Entry) -> None:
        if key in self.entries:
            self._drop(key)
        size = entry.size + len(key)
        if self.max_entries == 0 or size > self.max_bytes:
            return
        value = self.entries[key] = self.pack(entry)
        if value is entry:
            untrack(entry)
            untrack(self.entries)  # (inserting an object of a GC type tracks a dict again)
        self._bytes += size
        if len(self.entries) > self.max_entries or self._bytes > self.max_bytes:
            self._evict(key)

    def pack(self, entry: Entry) -> Entry | bytes:
        """The entry as one bytes value; the entry itself if `kinds` is full."""
        shape, rule = entry.shape, entry.rule
        key = (shape.flags, shape.head, shape.count_slot, rule)
        kind = self._kind_of.get(key)
        if kind is None:
            kind = len(self.kinds)
            if kind >= KINDS_LIMIT:
                return entry
            self.kinds.append((shape.flags, _COUNTS.unpack(shape.head)[1:], shape.count_slot, rule))
            self._kind_of[key] = kind
        offsets = shape.offsets
        n = len(offsets)
        return (_PACKED.pack(entry.expires, entry.lifetime, entry.refresh_at, kind, n) + _u16s(n).pack(*offsets)
                + entry.body0)

    def _evict(self, new: bytes) -> None:
        """Evict until within bounds, never the entry just put (`new`): it has not had its chance."""
        entries = self.entries
        while len(entries) > self.max_entries or self._bytes > self.max_bytes:
            oldest = (item for item in entries.items() if item[0] is not new)
            for key, entry in list(islice(oldest, max(1, len(entries) >> 7))):
                del entries[key]
                if not isinstance(entry, bytes) and entry.seen:
                    entry.seen = False
                    entries[key] = self.pack(entry)  # to the newest end, packed
                else:
                    self._bytes -= entry_size(entry) + len(key)
                    self.evictions += 1
        untrack(entries)

    def _drop(self, key: bytes) -> None:
        old = self.entries.pop(key)
        self._bytes -= entry_size(old) + len(key)

    def clear(self) -> None:
        self.entries.clear()
        self.kinds.clear()
        self._kind_of.clear()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def bytes(self) -> int:
        return self._bytes
