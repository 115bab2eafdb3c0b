"""Per-query counts as plain integers: what the hot path increments and /metrics reads at scrape time.

Every answered (or dropped) query adds one to a single slot of `Tally.counts`, a flat list indexed
by outcome, query type and transport (innermost, so `slot + transport` picks it: UDP 0, TCP 1, DNS
over TLS 2, DNS over HTTPS 3). A cache entry carries
the slot of its answers (`Entry.count_slot`), so a cache hit counts with one addition and one list
increment and builds no objects; the Prometheus collector (observe/metrics.py) turns the list into
labelled series only when scraped. Gated queries are counted per vendor from the query log's
stream (observe/querylog.py), off the hot path.
Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Final, TypeAlias

if TYPE_CHECKING:
    from dnsgate.consent.model import Grant

# Outcomes, in index order. "forwarded": answered from a fresh upstream reply; "local": answered
# by dnsgate itself (dns/local_answers.py, ANY); "stale": an expired answer when every upstream failed.
OUTCOMES: Final = ("forwarded", "cached", "sinkholed", "servfail", "formerr", "notimp", "refused", "dropped",
                   "local", "stale")
FORWARDED, CACHED, SINKHOLED, SERVFAIL, FORMERR, NOTIMP, REFUSED, DROPPED, LOCAL, STALE = range(len(OUTCOMES))
# The transports a query arrives on, by number: what the pipeline's `tcp` argument holds (any but
# UDP is a stream, whose replies are never truncated) and the query log's and metrics' label.
PROTOCOLS: Final = ("udp", "tcp", "tls", "https")
UDP, TCP, TLS, HTTPS = range(len(PROTOCOLS))
NPROTOCOLS: Final = len(PROTOCOLS)

# Query types with their own label (all below 256, so the fast path needs one byte and a zero
# test); every other type is OTHER. NONE: the packet had no readable question.
NAMED_TYPES: Final = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA",
                      33: "SRV", 43: "DS", 48: "DNSKEY", 64: "SVCB", 65: "HTTPS", 255: "ANY"}
TYPE_NAMES: Final = (*NAMED_TYPES.values(), "OTHER", "NONE")
OTHER: Final = len(NAMED_TYPES)
NONE: Final = OTHER + 1
NTYPES: Final = len(TYPE_NAMES)
# low byte of the QTYPE -> type slot, valid when the high byte is zero
TYPE_SLOT: Final = bytes(list(NAMED_TYPES).index(t) if t in NAMED_TYPES else OTHER for t in range(256))


# What the pipeline hands the query log per query, built only when the log wants it:
# (monotonic time, client, question bytes as sent or None, transport, outcome, rcode, the gated vendor's
#  `Vendor.logged` (id, category) or None, the grant that allowed it, seconds spent upstream).
LogEntry: TypeAlias = "tuple[float, str, bytes | None, int, int, int, tuple[str, str] | None, Grant | None, float]"


def type_slot(qtype: int) -> int:
    return TYPE_SLOT[qtype] if qtype < 256 else OTHER


def slot(outcome: int, type_slot: int) -> int:
    """Index of the UDP count of an outcome and type; those of the other transports follow it."""
    return (outcome * NTYPES + type_slot) * NPROTOCOLS


class Tally:
    """The counts the pipeline keeps. `counts[slot(outcome, type slot) + transport]`."""

    __slots__ = ("cache_misses", "counts", "prefetched", "truncated")

    def __init__(self) -> None:
        self.counts = [0] * (len(OUTCOMES) * NTYPES * NPROTOCOLS)
        self.cache_misses = 0
        self.truncated = 0
        self.prefetched = 0

    def count(self, outcome: int, qtype_slot: int, tcp: int) -> None:
        """For the slower paths; the fast path indexes `counts` itself."""
        self.counts[slot(outcome, qtype_slot) + tcp] += 1

    def outcome(self, outcome: int) -> int:
        """All queries with this outcome, over every transport and type."""
        start = slot(outcome, 0)
        return sum(self.counts[start : start + NPROTOCOLS * NTYPES])

    def series(self) -> Iterator[tuple[str, str, str, int]]:
        """(type, protocol, outcome, count) for every slot."""
        counts = self.counts
        for o, outcome in enumerate(OUTCOMES):
            for t, name in enumerate(TYPE_NAMES):
                start = slot(o, t)
                for p, protocol in enumerate(PROTOCOLS):
                    yield name, protocol, outcome, counts[start + p]

    def total(self) -> int:
        return sum(self.counts)

    # Totals per outcome, for readers of the earlier plain counters (health, tests).
    @property
    def forwarded(self) -> int:
        return self.outcome(FORWARDED)

    @property
    def cached(self) -> int:
        return self.outcome(CACHED)

    @property
    def sinkholed(self) -> int:
        return self.outcome(SINKHOLED)

    @property
    def servfail(self) -> int:
        return self.outcome(SERVFAIL)

    @property
    def formerr(self) -> int:
        return self.outcome(FORMERR)
