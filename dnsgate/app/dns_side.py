"""The DNS side of one process: cache, pipeline, upstreams, resolver and listeners, built from a
Config, a Ruleset and a consent table. The primary (app/primary.py) and every worker (app/worker.py) build it
the same way, and swap reloaded rules into it the same way (`install`).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

from dnsgate.config import Config, ConfigError, HostPort, UpstreamAddress
from dnsgate.consent.model import ConsentTable
from dnsgate.descriptors import Shortage
from dnsgate.dns.admission import Admission
from dnsgate.dns.cache import AnswerCache
from dnsgate.dns.counts import DnsCounts
from dnsgate.dns.ddr import ddr_zones
from dnsgate.dns.forwarding import Resolver
from dnsgate.dns.identity import QueryIdentity
from dnsgate.dns.listeners import DnsListeners, TcpLimits
from dnsgate.dns.local_answers import LocalTable, default_table
from dnsgate.dns.pipeline import Pipeline
from dnsgate.dns.portal_address import PortalAddresses, family_zones, portal_zone
from dnsgate.dns.tally import LogEntry
from dnsgate.dns.udp_batch import UpstreamBatches
from dnsgate.dns.udp_batch import available as udp_available
from dnsgate.dns.upstreams import DohClient, Upstreams
from dnsgate.rules.ruleset import Ruleset
from dnsgate.tasks import TaskSet, background


class UpstreamError(ConfigError):
    """The upstream settings cannot be used (a TLS CA file that cannot be read, ...)."""


@dataclass(slots=True)
class DnsStack:
    cfg: Config  # as started (restart-only sections); `install` takes the live one of a reload
    cache: AnswerCache
    pipeline: Pipeline
    upstreams: Upstreams
    resolver: Resolver
    tasks: TaskSet
    listeners: DnsListeners
    shortage: Shortage  # this process running out of file descriptors (descriptors.py)

    def designate(self, tls: Sequence[HostPort], https: Sequence[HostPort], resolver_name: str,
                  live: Config) -> None:
        """The encrypted listeners as bound (port 0 picks one) and the resolver's name: what
        discovery (DDR) names, here and in the workers started after this."""
        self.cfg = replace(self.cfg, dns=replace(self.cfg.dns, tls_listen=tuple(map(str, tls)),
                                                 https_listen=tuple(map(str, https)), resolver_name=resolver_name))
        self.pipeline.local = local_names(self.cfg, live)

    def counts(self) -> DnsCounts:
        """What this process has counted so far (the live objects, not copies)."""
        a, tcp, r = self.pipeline.admission, self.listeners.tcp, self.resolver
        return DnsCounts(self.pipeline.counters, self.pipeline.durations, len(self.cache), self.cache.bytes,
                         self.cache.evictions, r.coalesced, len(self.tasks),
                         dict(self.upstreams.per_server), a.refused, a.dropped, a.slipped, len(tcp),
                         Counter(tcp.closed), r.short, r.reaped, int(self.shortage.short),
                         self.shortage.episodes)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The once-a-second upkeep while the block runs; on leaving it the listeners close, forwards
        in flight get two seconds to finish, and the upstream sockets close."""
        try:
            async with background(self.every_second()):
                try:
                    yield
                finally:
                    await self.listeners.close()
                    await self.tasks.drain(2.0)
        finally:
            await self.upstreams.close()

    async def every_second(self) -> None:
        """Refill the rate limit's buckets (a second's worth of replies per prefix), answer waiting
        entries a bug stranded, and see whether descriptors ran out or came back."""
        while True:
            await asyncio.sleep(1.0)
            self.pipeline.admission.tick()
            self.resolver.reap()
            self.shortage.check()


def build(cfg: Config, rules: Ruleset, table: ConsentTable, servers: tuple[UpstreamAddress, ...], *,
          on_pair: Callable[[str, str], bool] | None, wall: Callable[[], float],
          log_gated: Callable[[LogEntry], None] | None = None, log_all: Callable[[LogEntry], None] | None = None,
          server_id: bytes = b"dnsgate", may_answer: Callable[[], bool] | None = None, join: bool = False) -> DnsStack:
    """Everything but the listening sockets (`listen` opens them). `may_answer` (a worker's check of
    its line to the primary) is asked before each batch of queries is answered; `join`: a worker's
    listeners join the primary's sockets on the same addresses. `log_gated` and `log_all` are the query
    log's sinks (every gated query; every other one if the log keeps all), `server_id` what `id.server`
    answers."""
    cache = AnswerCache(rules.cache_max_entries, rules.cache_max_bytes,
                        stale_window=cfg.cache.stale_max_age if cfg.cache.serve_stale else 0)
    pipeline = Pipeline(
        rules.catalog, table, cache, rules.sinkhole, udp_max=cfg.dns.udp_max_size,
        plain_ttl=rules.plain_ttl, gated_ttl=rules.gated_ttl, wall=wall,
        identity=QueryIdentity(table, cfg.identity.trusted_forwarders, cfg.portal.host, on_pair, wall),
        local=local_names(cfg, cfg),
        records=rules.local,
        any_query=cfg.dns.any_query,
        trust_ad=cfg.upstream.trust_ad,
        prefetch=cfg.cache.prefetch,
        stale_ttl=cfg.cache.stale_ttl,
        admission=admission(cfg),
        log_gated=log_gated,
        log_all=log_all,
        # entries near expiry are refreshed by the forwarding shell, built below on this pipeline
        on_refresh=lambda fwd: resolver.refresh(fwd),
        server_id=server_id,
    )
    shortage = Shortage()
    upstreams = build_upstreams(cfg, servers, shortage)
    tasks = TaskSet()
    resolver = Resolver(pipeline, upstreams, tasks.spawn)
    d = cfg.dns
    listeners = DnsListeners(pipeline, resolver, tasks, TcpLimits(
        d.tcp_idle_timeout, d.tcp_query_timeout, d.tcp_max_connections, d.tcp_max_connections_per_client,
        d.tcp_max_queries_per_connection, d.tcp_max_pipelined), reuse_port=d.workers > 1, may_answer=may_answer,
        join=join, udp_io=d.udp_io)
    return DnsStack(cfg, cache, pipeline, upstreams, resolver, tasks, listeners, shortage)


def install(stack: DnsStack, new: Ruleset, live: Config) -> None:
    """Swap reloaded rules in: one synchronous step on the event loop, no query runs in between."""
    stack.cache.resize(new.cache_max_entries, new.cache_max_bytes,
                       live.cache.stale_max_age if live.cache.serve_stale else 0)
    stack.pipeline.install(new.catalog, new.sinkhole, new.plain_ttl, new.gated_ttl, local=local_names(stack.cfg, live),
                           prefetch=live.cache.prefetch, stale_ttl=live.cache.stale_ttl, records=new.local)


def local_names(cfg: Config, live: Config) -> LocalTable:
    """dnsgate's own names: `live`'s local section, the forwarded domains and the portal's zone."""
    table = default_table(live.local, (domain for domain, _ in cfg.upstream.domains))
    portal = PortalAddresses(cfg.api_listen.host, cfg.portal.addresses)
    for zone in (portal_zone(cfg.portal.host, portal), *family_zones(cfg.portal.host, portal)):
        table.add(zone)
    if live.local.ddr:  # (replacing the NODATA of _dns.resolver.arpa when encrypted listeners are on)
        for zone in ddr_zones(cfg.tls_listen, cfg.https_listen, cfg.dns.resolver_name.rstrip(".")):
            table.add(zone)
    return table


def admission(cfg: Config) -> Admission:
    d = cfg.dns
    return Admission(d.allow_clients, rate=d.rate_limit, slip=d.rate_limit_slip, v4_prefix=d.rate_limit_ipv4_prefix,
                     v6_prefix=d.rate_limit_ipv6_prefix, exempt=d.rate_limit_exempt)


def build_upstreams(cfg: Config, servers: Iterable[UpstreamAddress], shortage: Shortage | None = None) -> Upstreams:
    servers = tuple(servers)
    doh: DohClient | None = None
    if any(a.transport == "https" for a in (*servers, *(a for _, group in cfg.upstream_domains for a in group))):
        from dnsgate.dns.doh_upstream import DohStream  # HTTP/2 only in a process with an https:// upstream

        doh = DohStream
    try:
        return Upstreams(servers, timeout=cfg.upstream.timeout, attempt_timeout=cfg.upstream.attempt_timeout,
                         udp_size=cfg.dns.udp_max_size, strategy=cfg.upstream.strategy,
                         domains=cfg.upstream_domains, ask_ad=cfg.upstream.trust_ad,
                         tls_ca_file=cfg.upstream.tls_ca_file, shortage=shortage,
                         batches=UpstreamBatches() if cfg.dns.udp_io == "batched" and udp_available() else None,
                         doh=doh)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise UpstreamError(f"upstream.tls_ca_file: cannot use {cfg.upstream.tls_ca_file!r}: "
                            f"{exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}") from None


def os_reason(exc: OSError) -> str:
    """The system's words for an OSError; uvloop keeps them on the chained cause."""
    for error in (exc, exc.__cause__):
        if isinstance(error, OSError) and error.strerror:
            return error.strerror
    return str(exc)
