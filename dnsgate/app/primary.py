"""The composition root: builds every part from a Config, runs them, and takes them down in reverse.

Start order: data dir and store (choices loaded before DNS listens, so gated names are decided
from the first packet; a shared store that cannot be reached starts fail-closed and is followed
until it answers), rules (catalog and lists: rules/reload.py), upstreams, pipeline, DNS listeners, API,
then SIGHUP reloads and the list refresh schedule. Stop order is the reverse: listeners close,
in-flight queries get a moment to finish, then the store closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from dnsgate import descriptors
from dnsgate.addresses import is_ip, normalize_client
from dnsgate.app import dns_side
from dnsgate.app.dns_side import DnsStack, os_reason
from dnsgate.config import (
    Config,
    ConfigError,
    HostPort,
    UpstreamAddress,
    parse_upstream,
    points_at,
    resolv_conf_servers,
)
from dnsgate.consent.backend import ConsentBackend
from dnsgate.consent.export import iso
from dnsgate.consent.model import ConsentTable, ProfileMap
from dnsgate.consent.notice import NO_OPERATOR_WARNING, Notice, NoticeError, Operator
from dnsgate.consent.pairing import Pairings
from dnsgate.consent.records import StoreError
from dnsgate.consent.service import ConsentService, Loss
from dnsgate.consent.sqlite_store import SQLITE_FILE, ConsentStore, SqliteBackend, UnavailableStore
from dnsgate.data_files import Access, AccessError
from dnsgate.dns.counts import DnsCounts
from dnsgate.dns.local_records import RecordError
from dnsgate.dns.portal_address import FAMILY_NAMES
from dnsgate.dns.tally import LogEntry
from dnsgate.dns.tls import TlsFiles, TlsFilesError
from dnsgate.dns.upstreams import SOCKETS_PER_FAMILY
from dnsgate.gc_policy import refreeze
from dnsgate.http.consent_api import ApiSettings, create_app
from dnsgate.http.guard import Boundaries
from dnsgate.http.listener import ApiLimits, ApiListeners
from dnsgate.http.observe_api import Observability, add_routes
from dnsgate.http.portal import PortalSettings, portal_url
from dnsgate.http.portal import add_routes as add_portal_routes
from dnsgate.neighbours import KernelNeighbours, NeighbourReader
from dnsgate.observe.dashboard import Sampler
from dnsgate.observe.events import ConsentWatch, EventHub
from dnsgate.observe.metrics import Sources, StoreFaults, build_registry
from dnsgate.observe.querylog import QueryLog, load_key, sinkhole_rcode
from dnsgate.observe.querylog_db import QueryLogDb, QueryLogError
from dnsgate.observe.report import Watched
from dnsgate.rules.catalog import Catalog, CatalogError
from dnsgate.rules.list_sources import ListError, ListStore
from dnsgate.rules.reload import Reloader
from dnsgate.rules.ruleset import Ruleset, operator_of, read_catalog, read_notice
from dnsgate.tasks import TaskSet, background
from dnsgate.workers.record import RECORD as WORKER_RECORD
from dnsgate.workers.replica import JournaledTable, Start
from dnsgate.workers.supervisor import WorkerError, Workers

log = logging.getLogger(__name__)

RESOLV_CONF = Path("/etc/resolv.conf")
QUERYLOG_FILE = "querylog.sqlite3"
QUERYLOG_KEY = "querylog.key"


class StartupError(Exception):
    """dnsgate cannot start; the message is one line that names the culprit."""


@dataclass(frozen=True, slots=True)
class Running:
    dns: tuple[HostPort, ...]
    api: HostPort
    data_dir: Path
    upstreams: tuple[UpstreamAddress, ...]
    token_file: Path | None
    routes: tuple[str, ...] = ()  # "METHOD /path" of every API route (/openapi.json lists exactly these)
    portal: str = ""  # the consent portal's URL
    store: str = ""  # where consent is kept, if not in the data dir (a Redis URL without password)
    admin: HostPort | None = None  # the admin listener, if separate
    workers: int = 1  # processes answering DNS (dns.workers)
    operator: str = ""  # who runs the network ([portal] operator); empty: the ready line warns
    tls: tuple[HostPort, ...] = ()  # DNS over TLS listeners
    https: tuple[HostPort, ...] = ()  # DNS over HTTPS listeners

    def ready_line(self) -> str:
        token = f"; admin token in {self.token_file}" if self.token_file else ""
        processes = f", {self.workers} processes" if self.workers > 1 else ""
        store = f"; consent store {self.store}" if self.store else ""
        # The portal's name resolves only through dnsgate: on this host (whose resolver is usually
        # another) the API's loopback URL opens it, and the dashboard beside it.
        here, admin = _loopback_url(self.api), _loopback_url(self.admin or self.api)
        portal = f"; consent portal {self.portal} (on this host {here}/)" if self.portal else ""
        operator = "" if self.operator else f"; warning: {NO_OPERATOR_WARNING}"
        encrypted = "".join(f"; dns over tls {address}" for address in self.tls) + \
            "".join(f"; dns over https https://{address}/dns-query" for address in self.https)
        return (f"dnsgate ready: dns (udp+tcp{processes}) {', '.join(map(str, self.dns))}{encrypted}; "
                f"api http://{self.api}; "
                f"upstreams {', '.join(map(str, self.upstreams))}; data {self.data_dir}{store}{token}{portal}"
                f"; dashboard {here}/dashboard (admin {admin}/dashboard/admin){operator}")


def _loopback_url(address: HostPort) -> str:
    """A listener's URL from this host: a wildcard address (0.0.0.0, ::) is reached on loopback."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(address.host, address.host)
    return f"http://{HostPort(host, address.port)}"


def load_notice(cfg: Config) -> Notice:
    try:
        return read_notice(cfg)
    except NoticeError as exc:
        raise StartupError(str(exc)) from None


def upstream_servers(cfg: Config, resolv_conf: Path = RESOLV_CONF) -> tuple[UpstreamAddress, ...]:
    if cfg.upstream.servers:
        return cfg.upstream_servers
    try:
        found = resolv_conf_servers(resolv_conf.read_text(encoding="utf-8"))
    except OSError:
        found = ()
    candidates: list[UpstreamAddress] = []
    for address in found:
        with contextlib.suppress(ConfigError):
            candidates.append(parse_upstream(address))
    servers = tuple(s for s in candidates if not points_at(s, cfg.dns_listen))
    if not servers:
        raise StartupError(f"upstream.servers: none configured and {resolv_conf} lists no usable nameserver; "
                           "pass --upstream HOST[:PORT]")
    return servers


def admin_token(cfg: Config, data_dir: Path) -> tuple[str, Path | None]:
    """The configured token, or the one kept in <data_dir>/admin-token (created 0600 if missing)."""
    if cfg.api.admin_token:
        return cfg.api.admin_token, None
    path = data_dir / "admin-token"
    try:
        existing = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        existing = ""
    if existing:
        return existing, path
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(token + "\n")
    return token, path


def prepare_data_dir(cfg: Config) -> tuple[Path, str, Path | None]:
    """Create the data dir (private to dnsgate's user, or its storage.group: data_files.py) and
    bring its databases to the same; return it with the admin token and the file that holds it."""
    data_dir = Path(cfg.storage.data_dir).resolve()
    try:
        access = Access.for_group(cfg.storage.group)
    except AccessError as exc:
        raise StartupError(str(exc)) from None
    try:
        access.directory(data_dir)
        used = {SQLITE_FILE: cfg.storage.store == "sqlite", QUERYLOG_FILE: cfg.querylog.mode != "off"}
        for name, wanted in used.items():
            if wanted or (data_dir / name).exists():
                access.database(data_dir / name)
        for secret in ("admin-token", QUERYLOG_KEY):
            if (data_dir / secret).exists():
                os.chmod(data_dir / secret, 0o600)
    except OSError as exc:
        if exc.errno != errno.EROFS or not data_dir.is_dir():
            raise StartupError(f"storage.data_dir: {data_dir}: {exc.strerror}") from None
        # A read-only mount: nothing can be written (nor a mode changed), but DNS can still be
        # answered, fail-closed, from what can be read; each part says what it cannot do.
        log.warning("storage.data_dir: %s is on a read-only file system: consent changes cannot be recorded "
                    "and the query log is off until it is writable again (then restart)", data_dir)
    try:
        token, token_file = admin_token(cfg, data_dir)
    except OSError as exc:
        raise StartupError(f"storage.data_dir: {data_dir}: {exc.strerror}") from None
    return data_dir, token, token_file


def watched_patterns(cfg: Config) -> tuple[Watched, ...]:
    """Every domain pattern of the catalog, switched off or not: the evidence report checks them all."""
    try:
        full = read_catalog(replace(cfg, gate=replace(cfg.gate, disabled_domains=(), disabled_vendors=())))
    except CatalogError as exc:
        raise StartupError(str(exc)) from None
    return tuple(Watched(r.pattern, r.vendor.id, r.vendor.category) for r in full.rules
                 if r.apex and r.vendor.kind == "vendor")


def open_querylog(cfg: Config, data_dir: Path, hub: EventHub) -> tuple[QueryLog, str]:
    """The query log, and why it is off if it cannot be opened (damaged, read-only, no space): DNS
    and consent do not depend on it, so dnsgate runs on without it and says so."""
    mode = cfg.querylog.mode
    try:
        db = QueryLogDb(data_dir / QUERYLOG_FILE) if mode != "off" else None
        key = load_key(data_dir / QUERYLOG_KEY) if mode == "anonymous" else b""
        if db is not None and mode == "anonymous":
            blanked = db.forget_grant_times()  # rows written before the log was anonymous
            if blanked:
                log.info("query log: grant times blanked in %d rows (anonymous mode keeps none)", blanked)
    except (QueryLogError, OSError) as exc:
        problem = f"disabled: {exc}"
        log.warning("query log %s; DNS and consent run on without it (fix the data dir and restart)", problem)
        return QueryLog(replace(cfg.querylog, mode="off"), None, hub, key=b"",
                        sinkhole_rcode=sinkhole_rcode(cfg.gate.mode)), problem
    return QueryLog(cfg.querylog, db, hub, key=key, sinkhole_rcode=sinkhole_rcode(cfg.gate.mode)), ""


def config_line(cfg: Config) -> str:
    return (f"config: gate.mode={cfg.gate.mode} sinkhole_ttl={cfg.gate.sinkhole_ttl} "
            f"allowed_ttl_cap={cfg.gate.allowed_ttl_cap} disabled_domains={','.join(cfg.gate.disabled_domains) or '-'} "
            f"cache.max_entries={cfg.cache.max_entries} upstream.timeout={cfg.upstream.timeout} "
            f"querylog.mode={cfg.querylog.mode} log.format={cfg.log.format} "
            f"events.webhook={'on' if cfg.events.webhook_url else 'off'}")


async def run(cfg: Config, stop: asyncio.Event, on_ready: Callable[[Running], None] | None = None,
              reread: Callable[[], Config] | None = None, *, wall: Callable[[], float] = time.time,
              neighbours: NeighbourReader | None = None) -> None:
    """Serve until `stop` is set. Raises StartupError if something cannot start.

    `reread` gives the configuration a reload should apply (the CLI re-reads the file, flags and
    environment); by default a reload keeps `cfg` and re-reads the catalog and lists only.
    `wall` (the clock consent runs on) and `neighbours` (the MAC table reader) are for tests.

    Every hook between parts is passed here, where the parts are built; each part entered on the
    stack stops when the stack unwinds, in reverse order."""
    async with AsyncExitStack() as stack:
        data_dir, token, token_file = prepare_data_dir(cfg)
        watched = watched_patterns(cfg)
        notice = load_notice(cfg)
        servers = upstream_servers(cfg)
        limit = descriptors.raise_limit()  # before anything opens; workers inherit it
        workers: Workers | None = None  # dns.workers > 1: started once DNS listens here

        async def replicated() -> None:  # a change (or reload) in force here holds on every worker too
            if workers is not None:
                await workers.sync()

        def journal_written() -> None:  # the table journals each change for the workers: send it soon
            if workers is not None:
                workers.flush_soon()

        def install(new: Ruleset) -> None:  # a reload; called only once everything below is built
            # One synchronous step on the event loop: no query runs between these lines.
            if workers is not None:
                workers.install(new, reloader.cfg)  # journaled before the table's changes below
            dns_side.install(dns, new, reloader.cfg)  # the reloaded configuration's live sections
            # a new catalog, text or operator is a new notice
            consents.use_notice(new.catalog, reloader.notice, operator_of(reloader.cfg))
            refreeze()  # the old catalog and lists out, the new ones out of the GC's full passes

        lists = await stack.enter_async_context(ListStore(data_dir / "lists"))
        reloader = Reloader(cfg, reread or (lambda: cfg), lists, install=install, notice=notice, settle=replicated)
        rules = await start_rules(reloader)
        store, problem = open_backend(cfg, data_dir)
        table = consent_table(cfg, rules.catalog, on_write=journal_written)
        operator = operator_of(cfg)
        hub = EventHub(cfg.events.webhook_url, cfg.events.webhook_timeout)
        querylog, querylog_problem = open_querylog(cfg, data_dir, hub)
        await stack.enter_async_context(querylog)  # closed after the listeners: the last entries are kept
        watch = ConsentWatch(hub, querylog.client_label)
        consents = await stack.enter_async_context(ConsentService(
            store, table, rules.catalog, notice, cfg.consent, Pairings(cfg.portal.host, cfg.identity.pairing_ttl),
            wall, (normalize_client(a) for a in cfg.identity.trusted_forwarders), operator,
            listeners=(watch.changed,), replicated=replicated))
        clients = await load_consent(consents, store, problem)
        await stack.enter_async_context(neighbour_table(cfg, table, neighbours))
        await stack.enter_async_context(consents.running(cfg.consent.sweep_interval))
        log_gated, log_all = querylog.sinks()
        dns = build_dns(cfg, rules, table, servers, on_pair=consents.on_pair, wall=wall, log_gated=log_gated,
                        log_all=log_all)
        await stack.enter_async_context(background(querylog.run(), hub.run_webhook()))
        await stack.enter_async_context(shortage_on_accept(dns.shortage))
        await stack.enter_async_context(dns.running())  # on leaving: listeners, forwards, upstreams close
        await listen_dns(dns, cfg.dns_listen)
        tls = await stack.enter_async_context(encrypted_dns(cfg, dns, reloader))
        if isinstance(table, JournaledTable):  # (stopped before the listeners close: they keep answering)
            workers = await stack.enter_async_context(worker_processes(
                cfg, reloader, rules, servers, dns, table, on_log=querylog.pending.extend, on_pair=consents.on_pair,
                record=data_dir / WORKER_RECORD))
        counts = dns_counts_of(dns, workers)
        api = ApiListeners(api_limits(cfg))
        health = health_of(cfg, dns, counts, workers, table, consents, querylog_problem or querylog.mode, api,
                           reloader, tls)
        sources = sources_of(counts, dns, table, watch, querylog, hub, consents, store, workers, api)
        served = await stack.enter_async_context(serve_api(
            cfg, token, api, consents, lambda: dns.pipeline.catalog, health, reloader, sources, querylog, hub,
            watched, wall))
        await stack.enter_async_context(reloads(reloader, dns.tasks, tls))
        running = Running(tuple(dns.listeners.bound), served.api, data_dir, servers, token_file, served.routes,
                          served.portal, store=store.name if store.shared else "", admin=served.admin,
                          workers=cfg.dns.workers, operator=operator.name, tls=tuple(dns.listeners.bound_tls),
                          https=tuple(dns.listeners.bound_https))
        announce(cfg, running, clients, rules, limit, operator)
        if on_ready is not None:
            on_ready(running)
        await stop.wait()
        log.info("stopping")
    log.info("stopped")


async def start_rules(reloader: Reloader) -> Ruleset:
    """The first ruleset (catalog, lists, notice), built before anything that gates on it."""
    try:
        return await reloader.start()
    except (CatalogError, ListError, RecordError) as exc:
        raise StartupError(str(exc)) from None


def consent_table(cfg: Config, catalog: Catalog, *, on_write: Callable[[], None]) -> ConsentTable:
    """The consent table the DNS side reads. With workers, every change of it is journaled for them
    (workers/replica.py) and `on_write` hears when the journal has something to send."""
    profiles = ProfileMap(cfg.profiles.default, cfg.profiles.networks)  # type: ignore[arg-type]
    kiosk_idle = cfg.consent.kiosk_idle_minutes * 60
    if cfg.dns.workers > 1:
        return JournaledTable(catalog.vendors, profiles, kiosk_idle=kiosk_idle, on_write=on_write)
    return ConsentTable(catalog.vendors, profiles, kiosk_idle=kiosk_idle)


@asynccontextmanager
async def neighbour_table(cfg: Config, table: ConsentTable, read: NeighbourReader | None) -> AsyncIterator[None]:
    """The kernel's neighbour table (MACs of on-link clients), read once before DNS listens so MAC
    identity holds from the first query, then every identity.neighbour_refresh seconds."""
    if read is None and cfg.identity.neighbours:
        read = KernelNeighbours()
    if read is None:
        yield
        return
    table.set_neighbours(await asyncio.to_thread(read))
    async with background(_refresh_neighbours(table, read, cfg.identity.neighbour_refresh)):
        yield


def build_dns(cfg: Config, rules: Ruleset, table: ConsentTable, servers: tuple[UpstreamAddress, ...], *,
              on_pair: Callable[[str, str], bool], wall: Callable[[], float],
              log_gated: Callable[[LogEntry], None], log_all: Callable[[LogEntry], None] | None) -> DnsStack:
    try:
        return dns_side.build(cfg, rules, table, servers, on_pair=on_pair, wall=wall, log_gated=log_gated,
                              log_all=log_all)
    except dns_side.UpstreamError as exc:
        raise StartupError(str(exc)) from None


async def listen_dns(dns: DnsStack, addresses: Iterable[HostPort]) -> None:
    for address in addresses:
        try:
            await dns.listeners.start(address)
        except OSError as exc:
            raise StartupError(f"dns.listen {address}: {os_reason(exc)}") from None


def load_tls(cfg: Config) -> TlsFiles | None:
    """The certificate of the encrypted listeners, if any is on; dnsgate does not start without it."""
    if not cfg.dns.tls_listen and not cfg.dns.https_listen:
        return None
    tls = TlsFiles(Path(cfg.dns.tls_cert), Path(cfg.dns.tls_key))
    try:
        tls.load()
    except TlsFilesError as exc:
        raise StartupError(f"dns.tls_cert / dns.tls_key: {exc}") from None
    return tls


@asynccontextmanager
async def encrypted_dns(cfg: Config, dns: DnsStack, reloader: Reloader) -> AsyncIterator[TlsFiles | None]:
    """DNS over TLS and over HTTPS (this process only), their certificate watched for changes, and
    discovery (DDR) naming them; their connections close with the other listeners'."""
    tls = load_tls(cfg)
    if tls is None:
        yield None
        return
    for address in cfg.tls_listen:
        try:
            await dns.listeners.start_tls(address, tls)
        except OSError as exc:
            raise StartupError(f"dns.tls_listen {address}: {os_reason(exc)}") from None
    if cfg.https_listen:  # the DoH listener (~0.35 MiB; HTTP/2 itself at its first HTTP/2 client)
        from dnsgate.dns.https_listener import HttpsConnection, proxies

        doh = partial(HttpsConnection, dns.pipeline, dns.resolver, dns.tasks, dns.listeners.tcp, tls,
                      proxies(cfg.dns.trusted_proxies))
    for address in cfg.https_listen:
        try:
            dns.listeners.bound_https.append(await dns.listeners.serve_stream(address, doh))
        except OSError as exc:
            raise StartupError(f"dns.https_listen {address}: {os_reason(exc)}") from None
    dns.designate(dns.listeners.bound_tls, dns.listeners.bound_https, cfg.dns.resolver_name.rstrip(".")
                  or tls.first_name, reloader.cfg)
    async with background(tls.watch()):
        yield tls


@asynccontextmanager
async def worker_processes(cfg: Config, reloader: Reloader, rules: Ruleset, servers: tuple[UpstreamAddress, ...],
                           dns: DnsStack, table: JournaledTable, *, on_log: Callable[[list[LogEntry]], None],
                           on_pair: Callable[[str, str], bool], record: Path) -> AsyncIterator[Workers]:
    """dns.workers - 1 more processes answering DNS on the addresses this one listens on."""
    def start_state(number: int) -> Start:
        return Start(dns.cfg, reloader.cfg, reloader.ruleset or rules, servers, tuple(dns.listeners.bound),
                     table.copy(), dns.pipeline.log_all is not None, number)

    workers = Workers(cfg.dns.workers - 1, table, start_state, on_log=on_log, on_pair=on_pair, record=record)
    try:
        await workers.start()
    except WorkerError as exc:
        raise StartupError(f"dns.workers: {exc}") from None
    try:
        yield workers
    finally:
        await workers.close()


def dns_counts_of(dns: DnsStack, workers: Workers | None) -> Callable[[], DnsCounts]:
    """What every process answering DNS has counted: this one's own, plus its workers'."""
    def counts() -> DnsCounts:
        own = dns.counts()
        theirs = workers.counts() if workers is not None else None
        return own if theirs is None else own.plus(theirs)

    return counts


def health_of(cfg: Config, dns: DnsStack, dns_counts: Callable[[], DnsCounts], workers: Workers | None,
              table: ConsentTable, consents: ConsentService, querylog_state: str, api: ApiListeners,
              reloader: Reloader, tls: TlsFiles | None = None) -> Callable[[], Mapping[str, Any]]:
    """What GET /healthz reports."""
    def shortage(counts: DnsCounts) -> str:
        if dns.shortage.short or not counts.short_now:
            return dns.shortage.describe()
        return f"{counts.short_now} worker processes out of file descriptors or socket buffers"

    def health() -> Mapping[str, Any]:
        lists_in_force = dns.pipeline.catalog.lists
        counts = dns_counts()
        return {"dns": [str(b) for b in dns.listeners.bound], "clients_with_consent": len(table),
                "cache_entries": counts.cache_entries, "in_flight": counts.in_flight,
                "tasks": len(asyncio.all_tasks()),
                "tcp_connections": counts.tcp_open,
                **({"tls_certificate": {"file": str(tls.cert), "loads": tls.loads, "problem": tls.problem or None}}
                   if tls is not None else {}),
                **({"workers": {"configured": cfg.dns.workers - 1, "listening": workers.running(),
                                "restarts": workers.restarts, "pids": workers.pids()}}
                   if workers is not None else {}),
                "consent_store": consents.store_problem or _loss_line(consents.history_lost) or "ok",
                **({"consent_store_history_lost": {"at": iso(consents.history_lost.at),
                                                   "what": consents.history_lost.what}}
                   if consents.history_lost is not None else {}),
                "consent_withdrawals_held": consents.withdrawals_held,
                "query_log": querylog_state,
                "file_descriptors": {"open": descriptors.open_count(), "limit": descriptors.soft_limit(),
                                     "shortage": shortage(counts)},
                "api_connections": len(api.table),
                "list_entries": len(lists_in_force) if lists_in_force is not None else 0,
                "reloads": reloader.reloads,
                "upstreams": dns.upstreams.describe(asyncio.get_running_loop().time())}

    return health


def sources_of(dns_counts: Callable[[], DnsCounts], dns: DnsStack, table: ConsentTable, watch: ConsentWatch,
               querylog: QueryLog, hub: EventHub, consents: ConsentService, store: ConsentBackend,
               workers: Workers | None, api: ApiListeners) -> Sources:
    """Where /metrics and the dashboard read their numbers."""
    return Sources(dns=dns_counts, current_catalog=lambda: dns.pipeline.catalog, consent=table,
                   consent_changes=lambda: dict(watch.changes), querylog=querylog, hub=hub,
                   consent_store=lambda: (consents.store_errors, not consents.store_problem),
                   consent_faults=lambda: StoreFaults(consents.history_losses, consents.withdrawals_held,
                                                      consents.undone),
                   consent_remote=lambda: consents.remote_changes if store.shared else None,
                   consent_commits=(lambda: store.commits) if isinstance(store, SqliteBackend) else None,
                   workers=(lambda: (workers.running(), workers.restarts)) if workers is not None else None,
                   api=api.counts)


def api_limits(cfg: Config) -> ApiLimits:
    a = cfg.api
    return ApiLimits(a.max_connections, a.max_connections_per_client, a.idle_timeout, a.header_timeout,
                     a.body_timeout)


@dataclass(frozen=True, slots=True)
class ApiServed:
    api: HostPort
    admin: HostPort | None
    portal: str  # the consent portal's URL
    routes: tuple[str, ...]  # "METHOD /path" of every route


@asynccontextmanager
async def serve_api(cfg: Config, token: str, api: ApiListeners, consents: ConsentService,
                    catalog: Callable[[], Catalog], health: Callable[[], Mapping[str, Any]], reloader: Reloader,
                    sources: Sources, querylog: QueryLog, hub: EventHub, watched: tuple[Watched, ...],
                    wall: Callable[[], float]) -> AsyncIterator[ApiServed]:
    """The HTTP server: the consent API, the portal and the observe routes, on api.listen (and
    api.admin_listen), with the dashboard's sampler running while it serves."""
    api_address = cfg.api_listen
    api_socket = _listen_tcp(api_address)
    api_bound = HostPort(api_address.host, api_socket.getsockname()[1])
    admin_address = cfg.admin_listen
    admin_socket = _listen_tcp(admin_address, "api.admin_listen") if admin_address is not None else None
    admin_bound = HostPort(admin_address.host, admin_socket.getsockname()[1]) \
        if admin_address is not None and admin_socket is not None else None
    settings = ApiSettings(
        admin_token=token,
        boundaries=api_boundaries(cfg, api_bound, admin_bound),
        max_days=cfg.consent.max_days,
        max_body=cfg.api.max_body_bytes,
        consent_changes_per_minute=cfg.api.consent_changes_per_minute,
        admin=(admin_bound.host, admin_bound.port) if admin_bound is not None else None,
    )
    sampler = Sampler(sources)
    async with background(sampler.run()):
        app = create_app(consents, catalog, settings, health, reloader, deadlines=api.middleware())
        # The page's form token is signed with a key derived from the admin token: instances that share
        # consent and a token accept each other's pages; the token itself cannot be learnt from it.
        form_key = hashlib.sha256(b"dnsgate portal form\0" + token.encode()).digest()
        portal = PortalSettings(cfg.portal.host.lower(), portal_url(cfg.portal.host.lower(), cfg.portal.url, api_bound),
                                cfg.portal.captive, frozenset(cfg.portal.cors_origins), form_key, wall,
                                api_bound.port)
        add_portal_routes(app, portal)
        add_routes(app, Observability(build_registry(sources), querylog, hub, sampler, catalog, watched))
        # aiohttp's keep-alive timeout is the idle timeout (a connection with no request is closed)
        runner = web.AppRunner(app, access_log=None, keepalive_timeout=api.limits.idle_timeout)
        await runner.setup()
        try:
            assert runner.server is not None
            try:  # listening stops before the runner closes the connections
                await api.start(runner.server, api_socket)
                if admin_socket is not None:
                    await api.start(runner.server, admin_socket)
                routes = tuple(sorted({f"{r.method} {r.resource.canonical}" for r in app.router.routes()
                                       if r.method != "HEAD" and r.resource is not None}))
                yield ApiServed(api_bound, admin_bound, portal.url, routes)
            finally:
                api.close()
        finally:
            await runner.cleanup()


@asynccontextmanager
async def reloads(reloader: Reloader, tasks: TaskSet, tls: TlsFiles | None = None) -> AsyncIterator[None]:
    """Reloads on SIGHUP (where signal handlers can be set: the main thread, not Windows), the TLS
    certificate's too, and on the lists' refresh schedule."""
    loop = asyncio.get_running_loop()
    sighup = hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread()

    async def reload() -> None:
        if tls is not None:
            tls.reload("SIGHUP")
        await reloader.reload("SIGHUP")  # the outcome is logged

    if sighup:
        loop.add_signal_handler(signal.SIGHUP, lambda: tasks.spawn(reload()))
    try:
        async with background(reloader.run_schedule()):
            yield
    finally:
        if sighup:
            loop.remove_signal_handler(signal.SIGHUP)


def announce(cfg: Config, running: Running, clients: int, rules: Ruleset, limit: tuple[int, int],
             operator: Operator) -> None:
    """The start's log lines: configuration, what was loaded, where dnsgate listens, its descriptor budget."""
    catalog = rules.catalog
    log.info(config_line(cfg))
    log.info("loaded %d consent choices, catalog %s (%d vendors, %d domains), %d list entries",
             clients, catalog.version, len(catalog.vendors), len(catalog.rules),
             len(catalog.lists) if catalog.lists is not None else 0)
    log.info("started: dns=%s api=%s upstreams=%s data=%s", ",".join(map(str, running.dns)), running.api,
             ",".join(map(str, running.upstreams)), running.data_dir)
    descriptors.log_budget(cfg, len(running.upstreams) + sum(len(group) for _, group in cfg.upstream.domains),
                           SOCKETS_PER_FAMILY, *limit)
    if not operator.named:
        log.warning(NO_OPERATOR_WARNING)


def api_boundaries(cfg: Config, api: HostPort, admin: HostPort | None) -> Boundaries:
    """The Host names and Origins that are dnsgate's own: the portal host, localhost, api.hosts and
    portal.addresses, every listener's address and port, and the configured portal URL."""
    names = {"localhost", cfg.portal.host, *(f"{family}.{cfg.portal.host}" for family in FAMILY_NAMES)}
    addresses = set(cfg.portal.addresses)
    for host in cfg.api.hosts:
        (addresses if is_ip(host) else names).add(host)
    portal = urlsplit(cfg.portal.url) if cfg.portal.url else None
    if portal is not None and portal.hostname:
        names.add(portal.hostname)
    listeners = [(api.host, api.port)] + ([(admin.host, admin.port)] if admin is not None else [])
    extra = [f"{portal.scheme}://{portal.netloc}"] if portal is not None else []
    return Boundaries(names, addresses, listeners, cfg.api.allowed_origins, extra)


def open_backend(cfg: Config, data_dir: Path) -> tuple[ConsentBackend, str]:
    """SQLite in the data dir, or Redis (storage.store); and why it cannot be used, if so."""
    if cfg.storage.store == "sqlite":
        store, problem = open_store(data_dir / SQLITE_FILE, cfg.storage.synchronous)
        return SqliteBackend(store), problem
    from dnsgate.consent.redis_store import RedisBackend  # only a shared deployment needs the Redis client

    try:
        return RedisBackend(cfg.storage.store, cfg.storage.redis_prefix, cfg.storage.redis_timeout,
                            memory=data_dir / "redis-history.json"), ""
    except ValueError as exc:
        raise StartupError(f"storage.store: {exc}") from None


def open_store(path: Path, synchronous: str = "full") -> tuple[ConsentStore, str]:
    """The SQLite consent store, or (if it cannot be opened) a stand-in that fails every call, with
    the reason: dnsgate then answers DNS fail-closed and the consent API 503."""
    try:
        return ConsentStore(path, synchronous), ""
    except StoreError as exc:
        return UnavailableStore(path, str(exc)), str(exc)


async def load_consent(consents: ConsentService, store: ConsentBackend, problem: str) -> int:
    """Every choice into the table before DNS listens. A store that cannot be opened or reached does
    not stop dnsgate: it starts fail-closed (no grant known, no profile opens a gated name); Redis is
    then followed until it answers, SQLite needs the file fixed and a restart."""
    if not problem:
        try:
            clients = await consents.load()  # nothing is applied unless every choice was read
        except StoreError as exc:
            problem = str(exc)
    if problem:
        consents.hold_closed(problem if store.shared else f"{problem}; fix or move the file and restart")
        return 0
    if store.shared:
        from dnsgate.consent.redis_store import RedisBackend  # imported only when used: the client adds to start-up

        if isinstance(store, RedisBackend):
            warning = await store.durability_warning()
            if warning:
                log.warning("consent store %s: %s", store.name, warning)
    return clients


def _loss_line(loss: Loss | None) -> str:
    if loss is None:
        return ""
    return f"history lost at {iso(loss.at)}: {loss.what} (POST /v1/store/acknowledge once handled)"


async def _refresh_neighbours(table: ConsentTable, read: NeighbourReader, interval: float) -> None:
    """Re-read the neighbour tables every `interval` seconds, on a worker thread."""
    while True:
        await asyncio.sleep(interval)
        try:
            table.set_neighbours(await asyncio.to_thread(read))
        except Exception:
            log.exception("neighbour table refresh failed; retrying in %.0f s", interval)


@asynccontextmanager
async def shortage_on_accept(shortage: descriptors.Shortage) -> AsyncIterator[None]:
    """asyncio's own loop reports an accept that fails for lack of a descriptor to the loop's
    exception handler, with a traceback every second while it lasts: it is an episode of the
    shortage instead, logged once. (uvloop sheds such connections itself, without a report.)"""
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and descriptors.is_shortage(exc):
            shortage.hit(exc, "accepting a connection")
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
    try:
        yield
    finally:
        loop.set_exception_handler(previous)


def _listen_tcp(address: HostPort, key: str = "api.listen") -> socket.socket:
    """Bind the API socket ourselves, so its real port is known before the app is built."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address.host, address.port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise StartupError(f"{key} {address}: {os_reason(exc)}") from None
    sock.setblocking(False)
    return sock
