"""Names dnsgate answers itself and never sends upstream: special-use names, canaries, health probe.

A `LocalTable` maps names to `LocalZone`s. The most specific registered name wins (memoized per
name, like the catalog); `exempt(domain)` hands a part of a local zone back to forwarding, so a
conditional forwarder for `168.192.in-addr.arpa` beats the RFC 6303 empty zone. Replies are built
from bytes (no dnslib): these names are not hot, but must stay cheap under a flood.

Registering another name is one line, e.g. the consent portal:
    table.add(addresses("consent.dnsgate.internal", "192.0.2.1"))
Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

from dnsgate.config import LocalConfig
from dnsgate.wire import (
    AA,
    AAAA,
    ANY,
    IN,
    NOERROR,
    NS,
    NXDOMAIN,
    PTR,
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

MEMO_LIMIT: Final = 65_536
CH: Final = 3  # the CHAOS class
# RFC 4892: "id.server" (and BIND's older "hostname.bind"), CH TXT, names the server instance that
# answered: with dns.workers, which process ("dnsgate", "dnsgate worker 2").
SERVER_ID_NAMES: Final = frozenset({name_to_wire("id.server"), name_to_wire("hostname.bind")})
ZONE_TTL: Final = 10_800  # RFC 6303 §2's SOA values (and unbound's) for special-use zones
POLICY_TTL: Final = 300  # canaries and DDR: long enough to spare queries, short enough to lift
NOBODY: Final = b"\x06nobody\x07invalid\x00"
_SOA_TAIL: Final = struct.Struct(">IIIII")

Below = Literal["nxdomain", "same", "none"]


@dataclass(frozen=True, slots=True, eq=False)
class LocalZone:
    """What dnsgate answers for `apex` and, depending on `below`, the names under it.

    At the apex: `rcode` NXDOMAIN, or NOERROR with `records` (rdata by type; other types get
    NODATA). Below it: "nxdomain", "same" (the apex's records, SOA and NS aside: a redirect, as for
    localhost), or "none" (not covered: the next zone up decides). Negative answers carry an SOA
    whose TTL and MINIMUM are `ttl`. `authoritative` zones (the special-use names every resolver
    serves itself: RFC 6761, RFC 6303) answer with AA set, as RFC 6303 §3 has it; policy answers
    (canaries, dnsgate's own names) do not claim it.
    """

    apex: bytes
    rcode: int
    records: Mapping[int, tuple[bytes, ...]]
    below: Below
    ttl: int
    why: str
    # Records that depend on the client asking (the consent portal's address facing it): used
    # instead of `records` when set.
    per_client: Callable[[str], Mapping[int, tuple[bytes, ...]]] | None = None
    authoritative: bool = False
    soa: bytes = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "soa", _SOA_TAIL.pack(1, 3600, 1200, 604800, self.ttl))


def nxdomain(name: str, why: str, ttl: int = POLICY_TTL, authoritative: bool = False) -> LocalZone:
    """The name and everything below it does not exist."""
    return LocalZone(name_to_wire(name), NXDOMAIN, {}, "nxdomain", ttl, why, authoritative=authoritative)


def nodata(name: str, why: str, ttl: int = POLICY_TTL) -> LocalZone:
    """The name exists with no records of any type; names below it do not exist."""
    return LocalZone(name_to_wire(name), NOERROR, {}, "nxdomain", ttl, why)


def addresses(name: str, *ips: str, why: str = "", ttl: int = 0, below: Below = "none",
              extra: Mapping[int, tuple[bytes, ...]] | None = None, authoritative: bool = False) -> LocalZone:
    """A and AAAA records for `name` (plus any `extra` rdata by type); other types get NODATA."""
    records: dict[int, tuple[bytes, ...]] = dict(extra or {})
    for ip in map(ipaddress.ip_address, ips):
        rtype = A if ip.version == 4 else AAAA
        records[rtype] = (*records.get(rtype, ()), ip.packed)
    return LocalZone(name_to_wire(name), NOERROR, records, below, ttl, why or f"{name} is answered locally",
                     authoritative=authoritative)


def empty_zone(name: str, why: str, extra: Mapping[int, tuple[bytes, ...]] | None = None) -> LocalZone:
    """An RFC 6303 locally served zone: SOA and NS at the apex, NXDOMAIN below."""
    apex = name_to_wire(name)
    soa = apex + NOBODY + _SOA_TAIL.pack(1, 3600, 1200, 604800, ZONE_TTL)
    return LocalZone(apex, NOERROR, {SOA: (soa,), NS: (apex,), **(extra or {})}, "nxdomain", ZONE_TTL, why,
                     authoritative=True)


class LocalTable:
    __slots__ = ("_by_tail", "_zones", "memo")

    def __init__(self, zones: Iterable[LocalZone] = ()) -> None:
        self._zones: dict[bytes, LocalZone | None] = {}
        # the apexes by their last four bytes ("com\x00", "rpa\x00", ...), for a cheap first test
        self._by_tail: dict[bytes, tuple[bytes, ...]] = {}
        self.memo: dict[bytes, LocalZone | None] = {}
        for zone in zones:
            self.add(zone)

    def add(self, zone: LocalZone) -> None:
        self._zones[zone.apex] = zone
        self._changed()

    def exempt(self, domain: str) -> None:
        """Forward `domain` and the names under it even if a local zone covers them."""
        self._zones[name_to_wire(domain)] = None
        self._changed()

    def _changed(self) -> None:
        by_tail: dict[bytes, tuple[bytes, ...]] = {}
        for apex, zone in self._zones.items():
            if zone is not None:
                by_tail[apex[-4:]] = (*by_tail.get(apex[-4:], ()), apex)
        self._by_tail = by_tail
        self.memo.clear()

    def match(self, name: bytes) -> LocalZone | None:
        """The zone that answers the lower-case wire `name`, or None to forward it."""
        apexes = self._by_tail.get(name[-4:])
        if apexes is None or not name.endswith(apexes):
            return None  # most names: two cheap tests, nothing memoized (a flood of new names costs no memory)
        try:
            return self.memo[name]
        except KeyError:
            pass
        found = self._lookup(name)
        if len(self.memo) >= MEMO_LIMIT:
            self.memo.clear()
        self.memo[name] = found
        return found

    def _lookup(self, name: bytes) -> LocalZone | None:
        zones = self._zones
        for i in label_offsets(name):
            suffix = name[i:]
            if suffix in zones:
                zone = zones[suffix]
                if zone is None or i == 0 or zone.below != "none":
                    return zone
        return None

    def __len__(self) -> int:
        return sum(1 for z in self._zones.values() if z is not None)


def local_reply(zone: LocalZone, q: Query, udp_max: int, client: str = "") -> bytes:
    """The reply to `q` from `zone`: records under a pointer to the question, else an SOA."""
    at_apex = len(q.name) == len(zone.apex)
    records = zone.records if zone.per_client is None else zone.per_client(client)
    rdatas: tuple[bytes, ...] = ()
    if at_apex:
        rcode = zone.rcode
        if rcode == NOERROR:
            rdatas = records.get(q.qtype, ())
    elif zone.below == "nxdomain":
        rcode = NXDOMAIN
    else:  # "same": a redirect of the apex's data
        rcode = NOERROR
        if q.qtype not in (SOA, NS):
            rdatas = records.get(q.qtype, ())
    apex_pointer = struct.pack(">H", 0xC000 | (12 + len(q.name) - len(zone.apex)))
    if rdatas:
        body = b"".join(b"\xc0\x0c" + RR_FIXED.pack(q.qtype, IN, zone.ttl, len(r)) + r for r in rdatas)
        counts = (len(rdatas), 0)
    else:
        rdata = apex_pointer + NOBODY + zone.soa
        body = apex_pointer + RR_FIXED.pack(SOA, IN, zone.ttl, len(rdata)) + rdata
        counts = (0, 1)
    flags = reply_flags(q.flags, rcode, AA if zone.authoritative else 0)
    if q.edns is None:
        return struct.pack(">HHHHHH", q.id, flags, 1, *counts, 0) + q.question + body
    return (struct.pack(">HHHHHH", q.id, flags, 1, *counts, 1) + q.question + body
            + opt_record(udp_max, q.edns.do))


# --------------------------------------------------------------------------------------------
# What dnsgate answers by default

# RFC 6303 §4 and the IANA locally-served zones registry (RFC 7793 adds 100.64.0.0/10)
PRIVATE_REVERSE_V4: Final = (
    "10", *(f"{n}.172" for n in range(16, 32)), "168.192", "0", "127", "254.169", "2.0.192", "100.51.198",
    "113.0.203", "255.255.255.255", *(f"{n}.100" for n in range(64, 128)),
)
LOOPBACK_V6: Final = "1." + "0." * 31 + "ip6.arpa"
PRIVATE_REVERSE_V6: Final = ("0." * 32 + "ip6.arpa", LOOPBACK_V6, "d.f.ip6.arpa", "8.e.f.ip6.arpa",
                             "9.e.f.ip6.arpa", "a.e.f.ip6.arpa", "b.e.f.ip6.arpa", "8.b.d.0.1.0.0.2.ip6.arpa")
LOCALHOST: Final = b"\x09localhost\x00"
DNSGATE_ZONE: Final = "dnsgate.internal"


def default_table(cfg: LocalConfig, forwarded_domains: Iterable[str] = ()) -> LocalTable:
    """The local names a configuration switches on; `forwarded_domains` (conditional forwarding)
    take precedence over the zones they fall in."""
    table = LocalTable()
    # dnsgate's own zone never leaves the network; app/primary.py adds the consent portal's name
    # (dns/portal_address.py).
    table.add(nxdomain(DNSGATE_ZONE, "dnsgate's own zone"))
    if cfg.healthcheck:
        table.add(addresses(cfg.healthcheck, "127.0.0.1", why="health probe", extra={TXT: (b"\x02ok",)}))
    if cfg.firefox_canary:
        table.add(nxdomain("use-application-dns.net", "Firefox canary: keep automatic DNS over HTTPS off"))
    if cfg.icloud_private_relay:
        for name in ("mask.icloud.com", "mask-h2.icloud.com"):
            table.add(nxdomain(name, "iCloud Private Relay: this network filters DNS"))
    if cfg.ddr:
        table.add(nodata("_dns.resolver.arpa", "no designated encrypted resolver (RFC 9462)"))
    if cfg.special_use:
        table.add(addresses("localhost", "127.0.0.1", "::1", why="RFC 6761 localhost", ttl=ZONE_TTL, below="same",
                            extra=empty_zone("localhost", "").records, authoritative=True))
        table.add(nxdomain("invalid", "RFC 6761 invalid", ttl=ZONE_TTL, authoritative=True))
        table.add(nxdomain("onion", "RFC 7686 onion", ttl=ZONE_TTL, authoritative=True))
    if cfg.private_reverse:
        for zone in (*(f"{z}.in-addr.arpa" for z in PRIVATE_REVERSE_V4), *PRIVATE_REVERSE_V6):
            extra = {PTR: (LOCALHOST,)} if zone == LOOPBACK_V6 else None
            table.add(empty_zone(zone, "RFC 6303 locally served zone", extra))
        table.add(LocalZone(name_to_wire("1.0.0.127.in-addr.arpa"), NOERROR, {PTR: (LOCALHOST,)}, "nxdomain",
                            ZONE_TTL, "loopback address", authoritative=True))
    for domain in forwarded_domains:
        table.exempt(domain)
    return table


def server_id_reply(q: Query, server_id: bytes, udp_max: int) -> bytes:
    """The CH TXT answer to id.server / hostname.bind (NOERROR without records for other types)."""
    flags = reply_flags(q.flags, NOERROR, AA)
    answers = b""
    if q.qtype in (TXT, ANY):
        text = server_id[:255]
        rdata = bytes((len(text),)) + text
        answers = b"\xc0\x0c" + RR_FIXED.pack(TXT, CH, 0, len(rdata)) + rdata
    count = 1 if answers else 0
    if q.edns is None:
        return struct.pack(">HHHHHH", q.id, flags, 1, count, 0, 0) + q.question + answers
    return struct.pack(">HHHHHH", q.id, flags, 1, count, 0, 1) + q.question + answers + opt_record(udp_max, q.edns.do)
