"""The numbers behind the dashboard: counters sampled into a short in-memory history.

`Sampler` reads the same plain counters as /metrics every `interval` seconds and keeps the rates
of the last `keep` samples (30 minutes by default), so the page can draw queries by outcome and by
type, upstream latency and consent changes over time without Prometheus and without touching the
query path. `stats` is what GET /v1/stats returns: aggregates only, no client address and no name
(neither a client's nor a queried one), so the page needs no admin token.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from dnsgate.dns.tally import (
    CACHED,
    DROPPED,
    FORMERR,
    FORWARDED,
    LOCAL,
    NOTIMP,
    NPROTOCOLS,
    NTYPES,
    REFUSED,
    SERVFAIL,
    SINKHOLED,
    STALE,
    TYPE_NAMES,
    Tally,
    slot,
)
from dnsgate.histogram import quantile_of
from dnsgate.observe.metrics import Sources

RECENT_CLIENTS = 3600.0  # seconds: who counts as "seen" on the dashboard
FAILED = (SERVFAIL, FORMERR, NOTIMP, REFUSED, DROPPED)
# The outcomes the page draws, each a sum of the tally's (gated and allowed come from the query
# log's per-vendor counts: a tracker allowed by consent is also counted as cached or forwarded).
OUTCOME_SUMS: dict[str, tuple[int, ...]] = {"forwarded": (FORWARDED,), "cached": (CACHED, STALE),
                                            "sinkholed": (SINKHOLED,), "local": (LOCAL,), "failed": FAILED}


def by_type(tally: Tally) -> dict[str, int]:
    """Queries per query type (every outcome, every transport)."""
    counts = tally.counts
    out = dict.fromkeys(TYPE_NAMES, 0)
    for outcome in range(len(counts) // (NPROTOCOLS * NTYPES)):
        for t, name in enumerate(TYPE_NAMES):
            i = slot(outcome, t)
            out[name] += sum(counts[i : i + NPROTOCOLS])
    return out


@dataclass(frozen=True, slots=True)
class Totals:
    at: float
    queries: int
    sinkholed: int
    allowed: int
    upstream: dict[str, tuple[int, float]]  # server -> (replies, sum of latencies)
    outcomes: dict[str, int]  # OUTCOME_SUMS' names -> queries
    types: dict[str, int]
    consent: dict[str, int]  # consent changes by action


class Sampler:
    def __init__(self, sources: Sources, interval: float = 2.0, keep: int = 900,
                 mono: Callable[[], float] = time.monotonic) -> None:
        self.s = sources
        self.interval = interval
        self.mono = mono
        self.points: deque[dict[str, Any]] = deque(maxlen=keep)
        self._last: Totals | None = None

    def totals(self) -> Totals:
        s = self.s
        s.querylog.take()
        gated = s.querylog.gated
        dns = s.dns()
        return Totals(
            at=self.mono(),
            queries=dns.tally.total(),
            sinkholed=sum(n for (_, d), n in gated.items() if d == "sinkholed"),
            allowed=sum(n for (_, d), n in gated.items() if d == "allowed"),
            upstream={str(server): (st.latency.count, st.latency.sum) for server, st in dns.upstreams.items()},
            outcomes={name: sum(dns.tally.outcome(o) for o in parts) for name, parts in OUTCOME_SUMS.items()},
            types=by_type(dns.tally),
            consent=dict(s.consent_changes()),
        )

    def sample(self) -> None:
        now = self.totals()
        last, self._last = self._last, now
        if last is None:
            return
        span = max(now.at - last.at, 1e-9)
        latency: dict[str, float | None] = {}
        for server, (n, total) in now.upstream.items():
            n0, total0 = last.upstream.get(server, (0, 0.0))
            latency[server] = round((total - total0) / (n - n0) * 1000, 3) if n > n0 else None
        self.points.append({
            "t": self.s.wall(),
            "queries": round((now.queries - last.queries) / span, 3),
            "sinkholed": round((now.sinkholed - last.sinkholed) / span, 3),
            "allowed": round((now.allowed - last.allowed) / span, 3),
            "outcomes": _rates(now.outcomes, last.outcomes, span),
            "types": {k: v for k, v in _rates(now.types, last.types, span).items() if v},
            # changes within the interval (a few a minute at most: rates would read as zero)
            "consent": {k: n - last.consent.get(k, 0) for k, n in now.consent.items() if n - last.consent.get(k, 0)},
            "upstream_ms": latency,
        })

    async def run(self) -> None:
        self.sample()
        while True:
            await asyncio.sleep(self.interval)
            self.sample()

    def stats(self) -> dict[str, Any]:
        s = self.s
        dns = s.dns()
        tally = dns.tally
        now_totals = self.totals()
        gated = s.querylog.gated
        ranked = sorted(s.catalog.vendors,
                        key=lambda v: -(gated.get((v.id, "sinkholed"), 0) + gated.get((v.id, "allowed"), 0)))
        vendors = [{"id": v.id, "name": v.name, "category": v.category,
                    "sinkholed": gated.get((v.id, "sinkholed"), 0), "allowed": gated.get((v.id, "allowed"), 0)}
                   for v in ranked]
        wall = s.wall()
        seen, allowed = s.querylog.tracker_clients_since(self.mono() - RECENT_CLIENTS)
        upstreams = []
        asked = sum(st.queries for st in dns.upstreams.values())
        for server, st in dns.upstreams.items():
            h = st.latency
            upstreams.append({
                "server": str(server), "queries": st.queries, "errors": st.errors,
                "share": round(st.queries / asked, 4) if asked else None,
                "p50_ms": _ms(quantile_of(h.bounds, h.counts, 0.5)),
                "p90_ms": _ms(quantile_of(h.bounds, h.counts, 0.9)),
                "p99_ms": _ms(quantile_of(h.bounds, h.counts, 0.99)),
            })
        return {
            "now": wall,
            "interval": self.interval,
            "series": list(self.points),
            "totals": {"queries": now_totals.queries, "cached": tally.outcome(CACHED),
                       "forwarded": tally.outcome(FORWARDED), "sinkholed": tally.outcome(SINKHOLED),
                       "gated_sinkholed": now_totals.sinkholed, "gated_allowed": now_totals.allowed},
            "outcomes": now_totals.outcomes,
            "types": {k: n for k, n in now_totals.types.items() if n},
            "consent_changes": now_totals.consent,
            "vendors": vendors,
            # Counted over the last hour from what the gate answered, not from grants held now: a
            # client counts as allowed if one of its tracker queries got a real answer.
            "clients": {"window_seconds": RECENT_CLIENTS, "met_tracker": seen, "tracker_allowed": allowed,
                        "only_blocked": seen - allowed, "choices_granting": s.consent.granting_now(wall),
                        "by_category": s.clients_by_category()},
            "upstreams": upstreams,
        }


def _rates(now: Mapping[str, int], last: Mapping[str, int], span: float) -> dict[str, float]:
    return {k: round((n - last.get(k, 0)) / span, 3) for k, n in now.items()}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)
