"""What one process's DNS side has counted, and the sum over several (the primary and its workers).

/metrics and the dashboard read a DnsCounts; with `dns.workers` > 1 each worker sends its own every
second (workers/supervisor.py) and the primary adds them to its own. Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from dnsgate.config import UpstreamAddress
from dnsgate.dns.tally import Tally
from dnsgate.dns.upstreams import ServerStats
from dnsgate.histogram import Histogram


@dataclass(slots=True)
class DnsCounts:
    tally: Tally
    durations: Histogram  # arrival to reply of queries that went upstream
    cache_entries: int = 0
    cache_bytes: int = 0
    cache_evictions: int = 0
    coalesced: int = 0
    in_flight: int = 0
    upstreams: dict[UpstreamAddress, ServerStats] = field(default_factory=dict)
    acl_refused: int = 0
    rate_dropped: int = 0
    rate_slipped: int = 0
    tcp_open: int = 0
    tcp_closed: Counter[str] = field(default_factory=Counter)
    short_servfail: int = 0  # clients answered SERVFAIL because no upstream socket could be opened
    reaped: int = 0  # waiting forwards answered by the last-resort sweep (each one a bug)
    short_now: int = 0  # processes out of file descriptors right now
    short_episodes: int = 0

    def plus(self, other: DnsCounts) -> DnsCounts:
        """A new DnsCounts with both; neither is changed."""
        upstreams = dict(self.upstreams)
        for server, stats in other.upstreams.items():
            mine = upstreams.get(server)
            upstreams[server] = stats if mine is None else _server_sum(mine, stats)
        return DnsCounts(
            _tally_sum(self.tally, other.tally), _histogram_sum(self.durations, other.durations),
            self.cache_entries + other.cache_entries, self.cache_bytes + other.cache_bytes,
            self.cache_evictions + other.cache_evictions, self.coalesced + other.coalesced,
            self.in_flight + other.in_flight, upstreams, self.acl_refused + other.acl_refused,
            self.rate_dropped + other.rate_dropped, self.rate_slipped + other.rate_slipped,
            self.tcp_open + other.tcp_open, self.tcp_closed + other.tcp_closed,
            self.short_servfail + other.short_servfail, self.reaped + other.reaped, self.short_now + other.short_now,
            self.short_episodes + other.short_episodes)


def _tally_sum(a: Tally, b: Tally) -> Tally:
    out = Tally()
    out.counts = [x + y for x, y in zip(a.counts, b.counts, strict=True)]
    out.cache_misses = a.cache_misses + b.cache_misses
    out.truncated = a.truncated + b.truncated
    out.prefetched = a.prefetched + b.prefetched
    return out


def _histogram_sum(a: Histogram, b: Histogram) -> Histogram:
    out = Histogram(a.bounds)
    out.counts = [x + y for x, y in zip(a.counts, b.counts, strict=True)]
    out.sum = a.sum + b.sum
    return out


def _server_sum(a: ServerStats, b: ServerStats) -> ServerStats:
    out = ServerStats()
    out.queries, out.errors = a.queries + b.queries, a.errors + b.errors
    out.latency = _histogram_sum(a.latency, b.latency)
    return out
