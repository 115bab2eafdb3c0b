"""Fixed-bucket histograms as plain integers, for latencies measured off the hot path.

The Prometheus collector reads them at scrape time (cumulative buckets, sum, count); observing
is a bisect and two additions. Pure: the caller measures the time.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Final

# Seconds. Queries that go upstream: from a LAN resolver's 1 ms to the 3 s deadline.
QUERY_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
UPSTREAM_BUCKETS: Final = QUERY_BUCKETS


class Histogram:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last slot is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le = "less or equal")
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= bound), ending with (inf, count)."""
        out: list[tuple[float, int]] = []
        running = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out

    def quantile(self, q: float) -> float | None:
        """An estimate (linear within the bucket, as Prometheus's histogram_quantile), or None if empty."""
        return quantile_of(self.bounds, self.counts, q)


def quantile_of(bounds: tuple[float, ...], counts: list[int], q: float) -> float | None:
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    running = 0
    lower = 0.0
    for i, n in enumerate(counts):
        if running + n >= rank and n:
            if i == len(bounds):  # +Inf bucket: the best we can say is the largest bound
                return bounds[-1]
            return lower + (bounds[i] - lower) * (rank - running) / n
        running += n
        lower = bounds[i] if i < len(bounds) else lower
    return bounds[-1]
