"""Prometheus exposition: a custom collector that reads dnsgate's plain counters at scrape time.

Nothing here runs per query: the pipeline, cache, upstreams, consent watch and query log keep
plain integers, and `DnsgateCollector.collect` turns them into metric families when /metrics is
scraped. Labels are bounded: query type (a fixed list, then OTHER), protocol, outcome, vendor
(the catalog), consent category, upstream server (the configuration). Never a client or a name.
The registry is dnsgate's own (no global state), with the process and platform collectors.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.registry import Collector

from dnsgate import __version__
from dnsgate.consent.model import ConsentTable
from dnsgate.dns.counts import DnsCounts
from dnsgate.dns.tally import CACHED
from dnsgate.histogram import Histogram
from dnsgate.observe.events import EventHub
from dnsgate.observe.querylog import QueryLog
from dnsgate.rules.catalog import Catalog

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True, slots=True)
class StoreFaults:
    history_lost: int  # times the shared store was found to have lost the history followed
    withdrawals_held: int  # refusals in force here that the store has not recorded yet
    undone: int  # changes answered 503 that the store had recorded after all, undone since


@dataclass(frozen=True, slots=True)
class Sources:
    """Everything whose counts /metrics and the dashboard show; app/primary.py fills it in."""

    # What every process answering DNS has counted (the primary's own, plus its workers'), and
    # the catalog in force (a reload swaps it).
    dns: Callable[[], DnsCounts]
    current_catalog: Callable[[], Catalog]
    consent: ConsentTable
    consent_changes: Callable[[], dict[str, int]]
    querylog: QueryLog
    hub: EventHub
    # (failed consent store operations, whether the store answers), and the changes other instances
    # recorded that this one applied (None: the store is not shared).
    consent_store: Callable[[], tuple[int, bool]] | None = None
    consent_faults: Callable[[], StoreFaults] | None = None
    consent_remote: Callable[[], int | None] | None = None
    # The SQLite store: (transactions that recorded changes, changes they recorded); fewer
    # transactions than changes where changes arriving together were committed as one.
    consent_commits: Callable[[], tuple[int, int]] | None = None
    # dns.workers > 1: (workers listening, restarts so far)
    workers: Callable[[], tuple[int, int]] | None = None
    # (open API connections, how many were refused or closed early, by reason)
    api: Callable[[], tuple[int, Mapping[str, int]]] | None = None
    wall: Callable[[], float] = time.time
    started: float = field(default_factory=time.time)

    @property
    def catalog(self) -> Catalog:
        return self.current_catalog()

    def clients_by_category(self) -> dict[str, int]:
        """Clients with a grant in force, per category (a client may count in several)."""
        return {**{c.id: 0 for c in self.catalog.categories}, **self.consent.granted_counts(self.wall())}


def _histogram(family: HistogramMetricFamily, labels: list[str], h: Histogram) -> None:
    buckets = [("+Inf" if b == float("inf") else repr(b), float(n)) for b, n in h.cumulative()]
    family.add_metric(labels, buckets, h.sum)


class DnsgateCollector(Collector):
    def __init__(self, sources: Sources) -> None:
        self.s = sources

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily
                                  | InfoMetricFamily]:
        s = self.s
        dns = s.dns()
        tally = dns.tally
        info = InfoMetricFamily("dnsgate_build", "dnsgate version and runtime")
        info.add_metric([], {"version": __version__, "python": platform.python_version(),
                             "catalog": s.catalog.version})
        yield info
        yield GaugeMetricFamily("dnsgate_start_time_seconds", "When this dnsgate started (UNIX time)",
                                value=s.started)

        queries = CounterMetricFamily("dnsgate_queries", "DNS queries by query type, protocol and outcome",
                                      labels=["type", "protocol", "outcome"])
        for qtype, protocol, outcome, n in tally.series():
            if n:  # an absent series reads as zero; hundreds of zero series would only add noise
                queries.add_metric([qtype, protocol, outcome], n)
        yield queries
        yield CounterMetricFamily("dnsgate_truncated_replies", "UDP replies sent with TC=1 (the client retries "
                                  "over TCP)", value=tally.truncated)
        duration = HistogramMetricFamily("dnsgate_query_duration_seconds", "Time from a query's arrival to its "
                                         "reply, for queries answered from upstream (answers from memory take "
                                         "microseconds and are not timed)")
        _histogram(duration, [], dns.durations)
        yield duration

        gated = CounterMetricFamily("dnsgate_gated_queries", "Queries for gated names, by vendor and decision "
                                    "(sinkholed: no consent; allowed: answered for real; servfail: upstream "
                                    "failed)", labels=["vendor", "decision"])
        s.querylog.take()  # count what the pipeline recorded up to this scrape
        for vendor in s.catalog.vendors:
            for decision in ("sinkholed", "allowed"):
                gated.add_metric([vendor.id, decision], s.querylog.gated.get((vendor.id, decision), 0))
        for (vendor_id, decision), n in s.querylog.gated.items():
            if decision not in ("sinkholed", "allowed") or s.catalog.vendor(vendor_id) is None:
                gated.add_metric([vendor_id, decision], n)
        yield gated

        yield CounterMetricFamily("dnsgate_cache_hits", "Answers served from the cache",
                                  value=tally.outcome(CACHED))
        yield CounterMetricFamily("dnsgate_cache_misses", "Queries the cache could not answer",
                                  value=tally.cache_misses)
        yield CounterMetricFamily("dnsgate_cache_evictions", "Entries evicted to stay within the cache bounds",
                                  value=dns.cache_evictions)
        yield GaugeMetricFamily("dnsgate_cache_entries", "Entries in the cache", value=dns.cache_entries)
        yield GaugeMetricFamily("dnsgate_cache_bytes", "Approximate bytes held by the cache", value=dns.cache_bytes)
        yield CounterMetricFamily("dnsgate_coalesced_queries", "Queries that shared an identical query "
                                  "already in flight upstream", value=dns.coalesced)
        yield GaugeMetricFamily("dnsgate_queries_in_flight", "Queries waiting for an upstream answer",
                                value=dns.in_flight)

        up_queries = CounterMetricFamily("dnsgate_upstream_queries", "Attempts sent to each upstream",
                                         labels=["upstream"])
        up_errors = CounterMetricFamily("dnsgate_upstream_errors", "Attempts that failed (timeout, socket error, "
                                        "unusable reply, SERVFAIL/REFUSED/FORMERR/NOTIMP)", labels=["upstream"])
        up_latency = HistogramMetricFamily("dnsgate_upstream_latency_seconds", "Time for an upstream to reply",
                                           labels=["upstream"])
        for server, stats in dns.upstreams.items():
            up_queries.add_metric([str(server)], stats.queries)
            up_errors.add_metric([str(server)], stats.errors)
            _histogram(up_latency, [str(server)], stats.latency)
        yield up_queries
        yield up_errors
        yield up_latency

        changes = CounterMetricFamily("dnsgate_consent_changes", "Consent changes: grants, refusals (a 'no' with "
                                      "nothing to withdraw), withdrawals, expiries", labels=["action"])
        for action, n in s.consent_changes().items():
            changes.add_metric([action], n)
        yield changes
        clients = GaugeMetricFamily("dnsgate_clients_with_consent", "Clients with a grant in force, by category",
                                    labels=["category"])
        for category, n in s.clients_by_category().items():
            clients.add_metric([category], n)
        yield clients
        if s.consent_store is not None:
            errors, up = s.consent_store()
            yield CounterMetricFamily("dnsgate_consent_store_errors", "Consent store operations that failed (the "
                                      "change was refused with 503)", value=errors)
            yield GaugeMetricFamily("dnsgate_consent_store_up", "1 if the consent store answers", value=int(up))
        if s.consent_faults is not None:
            faults = s.consent_faults()
            yield CounterMetricFamily("dnsgate_consent_store_history_lost", "Times the shared consent store was "
                                      "found to have lost the history this instance followed",
                                      value=faults.history_lost)
            yield GaugeMetricFamily("dnsgate_consent_withdrawals_held", "Refusals in force here that the consent "
                                    "store has not recorded yet", value=faults.withdrawals_held)
            yield CounterMetricFamily("dnsgate_consent_changes_undone", "Changes answered 503 that the store had "
                                      "recorded after all, undone by a recorded event", value=faults.undone)
        remote = s.consent_remote() if s.consent_remote is not None else None
        if remote is not None:
            yield CounterMetricFamily("dnsgate_consent_remote_changes", "Consent changes recorded through other "
                                      "instances sharing the store, applied here", value=remote)

        if s.consent_commits is not None:
            commits, committed = s.consent_commits()
            yield CounterMetricFamily("dnsgate_consent_commits", "Consent store transactions (one fsync each) that "
                                      "recorded changes", value=commits)
            yield CounterMetricFamily("dnsgate_consent_changes_committed", "Changes those transactions recorded "
                                      "(several in one where they arrived together)", value=committed)
        yield from _exposure(dns)
        if s.api is not None:
            yield from _api_connections(*s.api())
        yield from _descriptors(dns)
        if s.workers is not None:
            running, restarts = s.workers()
            yield GaugeMetricFamily("dnsgate_workers", "Worker processes answering DNS besides this one (dns.workers "
                                    "- 1 when all run)", value=running)
            yield CounterMetricFamily("dnsgate_worker_restarts", "Worker processes started again after one exited "
                                      "or was killed", value=restarts)

        ql = s.querylog
        yield CounterMetricFamily("dnsgate_querylog_written", "Query-log entries written", value=ql.written)
        yield CounterMetricFamily("dnsgate_querylog_dropped", "Query-log entries dropped because the writer fell "
                                  "behind (querylog.queue_size)", value=ql.dropped)
        yield CounterMetricFamily("dnsgate_querylog_write_errors", "Query-log batches that failed to write",
                                  value=ql.write_errors)
        yield GaugeMetricFamily("dnsgate_querylog_queued", "Query-log entries waiting for the writer",
                                value=ql.queued + len(ql.pending))
        yield CounterMetricFamily("dnsgate_events_published", "Events published (gated decisions, consent "
                                  "changes)", value=s.hub.published)
        yield CounterMetricFamily("dnsgate_events_lost", "Events a slow subscriber or a failing webhook missed",
                                  value=s.hub.lost)
        yield GaugeMetricFamily("dnsgate_event_subscribers", "Open GET /v1/events streams", value=s.hub.subscribers)


def _exposure(dns: DnsCounts) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
    """The client ACL, rate limiting and TCP limits."""
    yield CounterMetricFamily("dnsgate_acl_refused", "Queries refused because the client is outside dns.allow_clients",
                              value=dns.acl_refused)
    limited = CounterMetricFamily("dnsgate_rate_limited", "UDP replies held back by the per-prefix rate limit: "
                                  "dropped, or sent truncated (slipped)", labels=["action"])
    limited.add_metric(["dropped"], dns.rate_dropped)
    limited.add_metric(["slipped"], dns.rate_slipped)
    yield limited
    yield GaugeMetricFamily("dnsgate_tcp_connections", "Open DNS-over-TCP connections", value=dns.tcp_open)
    closed = CounterMetricFamily("dnsgate_tcp_closed_early", "TCP and TLS connections refused or closed by a limit "
                                 "(tls_handshake: not finished in time, or not TLS)",
                                 labels=["reason"])
    for reason in ("per_client_limit", "total_limit", "evicted", "slow", "tls_handshake"):
        closed.add_metric([reason], dns.tcp_closed[reason])
    yield closed
    refused = CounterMetricFamily("dnsgate_doh_errors", "DNS-over-HTTPS requests refused, by HTTP status "
                                  "(400 not a DNS query, 413 too large, 415 wrong type, ...)", labels=["status"])
    for reason, n in sorted(dns.tcp_closed.items()):
        if reason.startswith("http_"):
            refused.add_metric([reason[5:]], n)
    yield refused


def _api_connections(open_now: int, closed_early: Mapping[str, int]) -> Iterator[CounterMetricFamily
                                                                               | GaugeMetricFamily]:
    yield GaugeMetricFamily("dnsgate_api_connections", "Open API connections (both listeners)", value=open_now)
    closed = CounterMetricFamily("dnsgate_api_closed_early", "API connections refused or closed by a limit "
                                 "(api.max_connections*, header_timeout, body_timeout)", labels=["reason"])
    for reason in ("per_client_limit", "total_limit", "evicted", "slow_headers", "slow_body"):
        closed.add_metric([reason], closed_early.get(reason, 0))
    yield closed


def _descriptors(dns: DnsCounts) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
    """Running out of file descriptors (process_open_fds and process_max_fds give the levels)."""
    yield GaugeMetricFamily("dnsgate_descriptor_shortage", "Processes out of file descriptors (or socket "
                            "buffers) right now: queries that need a new upstream socket get SERVFAIL",
                            value=dns.short_now)
    yield CounterMetricFamily("dnsgate_descriptor_shortages", "Times a process ran out of file descriptors "
                              "(or socket buffers)", value=dns.short_episodes)
    yield CounterMetricFamily("dnsgate_descriptor_shortage_servfail", "Queries answered SERVFAIL (EDE Not "
                              "Ready) because no upstream socket could be opened", value=dns.short_servfail)
    yield CounterMetricFamily("dnsgate_forwards_reaped", "Queries answered by the last-resort sweep, left "
                              "waiting past the upstream deadline (each one a bug)", value=dns.reaped)


def build_registry(sources: Sources) -> CollectorRegistry:
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    registry.register(DnsgateCollector(sources))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
