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
from collections.abc import Callable, Coroutine, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from dnsgate import descriptors
from dnsgate.addresses import normalize_client
from dnsgate.app import dns_side as dns_stack
from dnsgate.app.dns_side import os_reason
from dnsgate.config import (
    Config,
    ConfigError,
    HostPort,
    UpstreamAddress,
    parse_upstream,
    points_at,
    resolv_conf_servers,
)
from dnsgate.consent.backend import SQLITE_FILE, ConsentBackend, SqliteBackend
from dnsgate.consent.export import iso
from dnsgate.consent.model import ConsentTable, ProfileMap
from dnsgate.consent.notice import NO_OPERATOR_WARNING, Notice, NoticeError
from dnsgate.consent.pairing import Pairings
from dnsgate.consent.service import ConsentService, Loss
from dnsgate.consent.sqlite_store import ConsentStore, StoreError, UnavailableStore
from dnsgate.data_files import Access, AccessError
from dnsgate.dns.counts import DnsCounts
from dnsgate.dns.listeners import TaskSet
from dnsgate.dns.portal_address import FAMILY_NAMES
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
from dnsgate.rules.catalog import CatalogError
from dnsgate.rules.list_sources import ListError, ListStore
from dnsgate.rules.reload import Reloader
from dnsgate.rules.ruleset import Ruleset, operator_of, read_catalog, read_notice
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


    def ready_line(self) -> str:
        token = f"; admin token in {self.token_file}" if self.token_file else ""
        processes = f", {self.workers} processes" if self.workers > 1 else ""
        store = f"; consent store {self.store}" if self.store else ""
        # The portal's name resolves only through dnsgate: on this host (whose resolver is usually
        # another) the API's loopback URL opens it, and the dashboard beside it.
        here, admin = _loopback_url(self.api), _loopback_url(self.admin or self.api)
        portal = f"; consent portal {self.portal} (on this host {here}/)" if self.portal else ""
        operator = "" if self.operator else f"; warning: {NO_OPERATOR_WARNING}"
        return (f"dnsgate ready: dns (udp+tcp{processes}) {', '.join(map(str, self.dns))}; api http://{self.api}; "
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


def background(stack: AsyncExitStack, coro: Coroutine[object, object, None]) -> None:
    """Run `coro` until the stack unwinds to this point, then cancel it."""
    task = asyncio.get_running_loop().create_task(coro)

    async def cancel() -> None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    stack.push_async_callback(cancel)


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
    `wall` (the clock consent runs on) and `neighbours` (the MAC table reader) are for tests."""
    async with AsyncExitStack() as stack:
        data_dir, token, token_file = prepare_data_dir(cfg)
        watched = watched_patterns(cfg)
        notice = load_notice(cfg)
        servers = upstream_servers(cfg)
        limit = descriptors.raise_limit()  # before anything opens; workers inherit it
        lists = ListStore(data_dir / "lists")
        stack.push_async_callback(lists.close)
        # `install` is defined below, once the pipeline exists; the reloader calls it only after start.
        reloader = Reloader(cfg, reread or (lambda: cfg), lists, install=lambda new: install(new), notice=notice)
        try:
            rules = await reloader.start()
        except (CatalogError, ListError) as exc:
            raise StartupError(str(exc)) from None
        catalog = rules.catalog
        store, problem = open_backend(cfg, data_dir)
        # With workers, every change of the table is journaled for them (workers/replica.py).
        table = (JournaledTable if cfg.dns.workers > 1 else ConsentTable)(
            catalog.vendors, ProfileMap(cfg.profiles.default, cfg.profiles.networks),  # type: ignore[arg-type]
            kiosk_idle=cfg.consent.kiosk_idle_minutes * 60)
        operator = operator_of(cfg)
        consents = ConsentService(store, table, catalog, notice, cfg.consent,
                                  Pairings(cfg.portal.host, cfg.identity.pairing_ttl), wall,
                                  (normalize_client(a) for a in cfg.identity.trusted_forwarders), operator)
        stack.push_async_callback(consents.close)
        clients = await load_consent(consents, store, problem)
        if store.shared:
            background(stack, consents.run_follower())
        background(stack, consents.run_reconciler())
        if neighbours is None and cfg.identity.neighbours:
            neighbours = KernelNeighbours()
        if neighbours is not None:
            # Read once before DNS listens, so MAC identity holds from the first query.
            table.set_neighbours(await asyncio.to_thread(neighbours))
            background(stack, _refresh_neighbours(table, neighbours, cfg.identity.neighbour_refresh))
        background(stack, consents.run_sweeper(cfg.consent.sweep_interval))

        hub = EventHub(cfg.events.webhook_url, cfg.events.webhook_timeout)
        querylog, querylog_problem = open_querylog(cfg, data_dir, hub)
        stack.push_async_callback(querylog.close)  # after the listeners close: the last entries are kept
        watch = ConsentWatch(hub, querylog.client_label)
        consents.listeners.append(watch.changed)

        try:
            dns = dns_stack.build(cfg, rules, table, servers, on_pair=consents.on_pair, wall=wall)
        except dns_stack.UpstreamError as exc:
            raise StartupError(str(exc)) from None
        pipeline, upstreams, tasks, listeners = dns.pipeline, dns.upstreams, dns.tasks, dns.listeners
        background(stack, dns.every_second())
        _shortage_on_accept(dns.shortage, stack)
        workers: Workers | None = None

        def install(new: Ruleset) -> None:
            # One synchronous step on the event loop: no query runs between these lines.
            if workers is not None:
                workers.install(new, reloader.cfg)  # journaled before the table's changes below
            dns_stack.install(dns, new, reloader.cfg)  # the reloaded configuration's live sections
            # a new catalog, text or operator is a new notice
            consents.use_notice(new.catalog, reloader.notice, operator_of(reloader.cfg))
            refreeze()  # the old catalog and lists out, the new ones out of the GC's full passes

        stack.push_async_callback(upstreams.close)
        querylog.attach(pipeline)
        background(stack, querylog.run())
        background(stack, hub.run_webhook())
        stack.push_async_callback(tasks.drain, 2.0)
        stack.push_async_callback(listeners.close)
        for address in cfg.dns_listen:
            try:
                await listeners.start(address)
            except OSError as exc:
                raise StartupError(f"dns.listen {address}: {os_reason(exc)}") from None
        if isinstance(table, JournaledTable):
            def start_state(number: int) -> Start:
                return Start(cfg, reloader.cfg, reloader.ruleset or rules, servers, tuple(listeners.bound),
                             table.copy(), pipeline.log_all is not None, number)

            workers = Workers(cfg.dns.workers - 1, table, start_state, on_log=querylog.pending.extend,
                              on_pair=consents.on_pair, record=data_dir / WORKER_RECORD)
            consents.replicated = workers.sync
            reloader.settle = workers.sync
            try:
                await workers.start()
            except WorkerError as exc:
                raise StartupError(f"dns.workers: {exc}") from None
            stack.push_async_callback(workers.close)  # before the listeners close: they keep answering

        def dns_counts() -> DnsCounts:
            own = dns.counts()
            theirs = workers.counts() if workers is not None else None
            return own if theirs is None else own.plus(theirs)

        def shortage(counts: DnsCounts) -> str:
            if dns.shortage.short or not counts.short_now:
                return dns.shortage.describe()
            return f"{counts.short_now} worker processes out of file descriptors or socket buffers"

        def health() -> Mapping[str, Any]:
            lists_in_force = pipeline.catalog.lists
            counts = dns_counts()
            return {"dns": [str(b) for b in listeners.bound], "clients_with_consent": len(table),
                    "cache_entries": counts.cache_entries, "in_flight": counts.in_flight,
                    "tasks": len(asyncio.all_tasks()),
                    "tcp_connections": counts.tcp_open,
                    **({"workers": {"configured": cfg.dns.workers - 1, "listening": workers.running(),
                                    "restarts": workers.restarts, "pids": workers.pids()}}
                       if workers is not None else {}),
                    "consent_store": consents.store_problem or _loss_line(consents.history_lost) or "ok",
                    **({"consent_store_history_lost": {"at": iso(consents.history_lost.at),
                                                       "what": consents.history_lost.what}}
                       if consents.history_lost is not None else {}),
                    "consent_withdrawals_held": consents.withdrawals_held,
                    "query_log": querylog_problem or querylog.mode,
                    "file_descriptors": {"open": descriptors.open_count(), "limit": descriptors.soft_limit(),
                                         "shortage": shortage(counts)},
                    "api_connections": len(api.table),
                    "list_entries": len(lists_in_force) if lists_in_force is not None else 0,
                    "reloads": reloader.reloads,
                    "upstreams": upstreams.describe(asyncio.get_running_loop().time())}

        a = cfg.api
        api = ApiListeners(ApiLimits(a.max_connections, a.max_connections_per_client, a.idle_timeout,
                                     a.header_timeout, a.body_timeout))
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
        running_workers = workers
        sources = Sources(dns=dns_counts, current_catalog=lambda: pipeline.catalog, consent=table,
                          consent_changes=lambda: dict(watch.changes), querylog=querylog, hub=hub,
                          consent_store=lambda: (consents.store_errors, not consents.store_problem),
                          consent_faults=lambda: StoreFaults(consents.history_losses, consents.withdrawals_held,
                                                             consents.undone),
                          consent_remote=lambda: consents.remote_changes if store.shared else None,
                          workers=(lambda: (running_workers.running(), running_workers.restarts))
                          if running_workers is not None else None, api=api.counts)
        sampler = Sampler(sources)
        background(stack, sampler.run())
        app = create_app(consents, lambda: pipeline.catalog, settings, health, reloader, deadlines=api.middleware())
        # The page's form token is signed with a key derived from the admin token: instances that share
        # consent and a token accept each other's pages; the token itself cannot be learnt from it.
        form_key = hashlib.sha256(b"dnsgate portal form\0" + token.encode()).digest()
        portal = PortalSettings(cfg.portal.host.lower(), portal_url(cfg.portal.host.lower(), cfg.portal.url, api_bound),
                                cfg.portal.captive, frozenset(cfg.portal.cors_origins), form_key, wall,
                                api_bound.port)
        add_portal_routes(app, portal)
        add_routes(app, Observability(build_registry(sources), querylog, hub, sampler, lambda: pipeline.catalog,
                                      watched))
        # aiohttp's keep-alive timeout is the idle timeout (a connection with no request is closed)
        runner = web.AppRunner(app, access_log=None, keepalive_timeout=api.limits.idle_timeout)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        assert runner.server is not None
        stack.callback(api.close)  # listening stops before the runner closes the connections
        await api.start(runner.server, api_socket)
        if admin_socket is not None:
            await api.start(runner.server, admin_socket)

        _reload_on_sighup(reloader, tasks, stack)
        schedule = asyncio.create_task(reloader.run_schedule())
        stack.push_async_callback(_cancel, schedule)

        routes = tuple(sorted({f"{r.method} {r.resource.canonical}" for r in app.router.routes()
                               if r.method != "HEAD" and r.resource is not None}))
        running = Running(tuple(listeners.bound), api_bound, data_dir, servers, token_file, routes, portal.url,
                          store=store.name if store.shared else "", admin=admin_bound, workers=cfg.dns.workers,
                          operator=operator.name)
        log.info(config_line(cfg))
        log.info("loaded %d consent choices, catalog %s (%d vendors, %d domains), %d list entries",
                 clients, catalog.version, len(catalog.vendors), len(catalog.rules),
                 len(catalog.lists) if catalog.lists is not None else 0)
        log.info("started: dns=%s api=%s upstreams=%s data=%s", ",".join(map(str, running.dns)), running.api,
                 ",".join(map(str, servers)), data_dir)
        descriptors.log_budget(cfg, len(servers) + sum(len(group) for _, group in cfg.upstream.domains),
                               SOCKETS_PER_FAMILY, *limit)
        if not operator.named:
            log.warning(NO_OPERATOR_WARNING)
        if on_ready is not None:
            on_ready(running)
        await stop.wait()
        log.info("stopping")
    log.info("stopped")


def api_boundaries(cfg: Config, api: HostPort, admin: HostPort | None) -> Boundaries:
    """The Host names and Origins that are dnsgate's own: the portal host, localhost, api.hosts and
    portal.addresses, every listener's address and port, and the configured portal URL."""
    names = {"localhost", cfg.portal.host, *(f"{family}.{cfg.portal.host}" for family in FAMILY_NAMES)}
    addresses = set(cfg.portal.addresses)
    for host in cfg.api.hosts:
        (addresses if _is_ip(host) else names).add(host)
    portal = urlsplit(cfg.portal.url) if cfg.portal.url else None
    if portal is not None and portal.hostname:
        names.add(portal.hostname)
    listeners = [(api.host, api.port)] + ([(admin.host, admin.port)] if admin is not None else [])
    extra = [f"{portal.scheme}://{portal.netloc}"] if portal is not None else []
    return Boundaries(names, addresses, listeners, cfg.api.allowed_origins, extra)


def _is_ip(text: str) -> bool:
    try:
        normalize_client(text)
    except ValueError:
        return False
    return True


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


def _reload_on_sighup(reloader: Reloader, tasks: TaskSet, stack: AsyncExitStack) -> None:
    """SIGHUP reloads (signal handlers can only be set from the main thread, and not on Windows)."""
    if not hasattr(signal, "SIGHUP") or threading.current_thread() is not threading.main_thread():
        return
    loop = asyncio.get_running_loop()

    async def reload() -> None:
        await reloader.reload("SIGHUP")  # the outcome is logged

    loop.add_signal_handler(signal.SIGHUP, lambda: tasks.spawn(reload()))
    stack.callback(loop.remove_signal_handler, signal.SIGHUP)


def _shortage_on_accept(shortage: descriptors.Shortage, stack: AsyncExitStack) -> None:
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
    stack.callback(loop.set_exception_handler, previous)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


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
