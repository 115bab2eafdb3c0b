"""The numbers behind the dashboard: counters sampled into a short in-memory history.

`Sampler` reads the same plain counters as /metrics every `interval` seconds and keeps the rates
of the last `keep` samples (30 minutes by default), so the page can draw queries and gated blocks
over time without Prometheus. `stats` is what GET /v1/stats returns: aggregates only, no client
address and no name, so the page needs no admin token.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dnsgate.dns.tally import CACHED, FORWARDED, SINKHOLED
from dnsgate.histogram import quantile_of
from dnsgate.observe.metrics import Sources

RECENT_CLIENTS = 3600.0  # seconds: who counts as "seen" on the dashboard


@dataclass(frozen=True, slots=True)
class Totals:
    at: float
    queries: int
    sinkholed: int
    allowed: int
    upstream: dict[str, tuple[int, float]]  # server -> (replies, sum of latencies)


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
        seen = s.querylog.gated_clients_since(self.mono() - RECENT_CLIENTS)
        with_consent = sum(1 for c in seen if any(g.expires_at > wall for g in s.consent.grants(c).values()))
        upstreams = []
        for server, st in dns.upstreams.items():
            h = st.latency
            upstreams.append({
                "server": str(server), "queries": st.queries, "errors": st.errors,
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
            "vendors": vendors,
            "clients": {"with_consent": len(s.consent), "by_category": s.clients_by_category(),
                        "seen_recently": len(seen), "seen_with_consent": with_consent,
                        "seen_without_consent": len(seen) - with_consent},
            "upstreams": upstreams,
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)
