"""Live reload: the rules dnsgate gates on, built off to the side and swapped in whole, at start,
on reload (SIGHUP, POST /v1/reload), and when a list download brings new content.

`Reloader` builds a complete `ruleset.Ruleset` (files read and lists parsed on a worker thread, so queries keep
flowing), validates it, and only then hands it to `install`, which swaps it into the pipeline in one
synchronous step on the event loop and empties the cache. The consent text and the operator are
read again with them: they are part of the notice a person is shown. Anything invalid -> nothing
changes, the error is logged and returned. Consent choices are never touched.

Which keys apply live: [gate], [cache], [local] and [lists], and of the notice consent.notice and
portal.operator, contact and privacy_url. The rest are bound to sockets, threads, files or the
tables of consent at start; a reload reports them as needing a restart and keeps running with the
old values.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Final

from dnsgate.config import Config, ConfigError, ListSource
from dnsgate.consent.notice import NO_OPERATOR_WARNING, Notice, NoticeError, changes_between, notice_in_force
from dnsgate.rules.catalog import Catalog, CatalogError, Vendor
from dnsgate.rules.list_sources import Fetched, ListError, ListStore
from dnsgate.rules.ruleset import (
    ListCache,
    ListStatus,
    Ruleset,
    build_lists,
    operator_of,
    read_catalog,
    read_local_records,
    read_notice,
    ruleset_for,
)

log = logging.getLogger(__name__)

LIVE_SECTIONS: Final = ("gate", "cache", "local", "lists")
# Keys of other sections that apply live: the notice's text and who runs the network.
LIVE_KEYS: Final = ("consent.notice", "portal.operator", "portal.contact", "portal.privacy_url")
RETRY_AFTER_FAILURE: Final = 300.0


@dataclass(frozen=True, slots=True)
class ReloadReport:
    ok: bool
    reason: str
    error: str | None = None
    action: str = "reloaded"  # or "refreshed" (lists only)
    applied: tuple[str, ...] = ()  # changed keys now in force
    restart_required: tuple[str, ...] = ()  # changed keys that keep their running value until a restart
    changed: tuple[str, ...] = ()  # what the notice and the gated names say differently now
    notice_version: str = ""
    previous_notice_version: str = ""
    catalog_version: str = ""
    vendors: int = 0
    domains: int = 0
    list_entries: int = 0
    lists: tuple[dict[str, Any], ...] = ()
    seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "status": self.action if self.ok else "rejected", "reason": self.reason, "error": self.error,
            "applied": list(self.applied), "restart_required": list(self.restart_required),
            "changed": list(self.changed),
            "notice": {"version": self.notice_version, "previous": self.previous_notice_version},
            "catalog": {"version": self.catalog_version, "vendors": self.vendors, "domains": self.domains},
            "list_entries": self.list_entries, "lists": list(self.lists), "seconds": round(self.seconds, 3),
        }


def split_changes(running: Config, new: Config) -> tuple[Config, tuple[str, ...], tuple[str, ...]]:
    """(the config to run with, changed live keys, changed keys that need a restart)."""
    applied: list[str] = []
    restart: list[str] = []
    effective: dict[str, Any] = {}
    for section in fields(Config):
        old_part, new_part = getattr(running, section.name), getattr(new, section.name)
        kept: dict[str, Any] = {}
        for f in fields(old_part):
            key, value = f"{section.name}.{f.name}", getattr(new_part, f.name)
            live = section.name in LIVE_SECTIONS or key in LIVE_KEYS
            if value != getattr(old_part, f.name):
                (applied if live else restart).append(key)
            if not live:
                kept[f.name] = getattr(old_part, f.name)
        effective[section.name] = replace(new_part, **kept)
    return replace(new, **effective), tuple(applied), tuple(restart)


def catalog_changes(old: Catalog, new: Catalog, old_entries: dict[str, int], new_entries: dict[str, int]) -> list[str]:
    """What gates differently without being described differently: a vendor's names, a list's entries."""
    said = []
    for vendor in old.vendors:
        same = new.vendor(vendor.id)
        if same is not None and _patterns(old, vendor) != _patterns(new, same):
            said.append(f"vendor {vendor.id} names changed")
    for list_id, entries in old_entries.items():
        now = new_entries.get(list_id)
        if now is not None and now != entries:
            said.append(f"list {list_id} entries {entries} → {now}")
    return said


def _patterns(catalog: Catalog, vendor: Vendor) -> list[str]:
    return sorted(r.pattern for r in catalog.domains_of(vendor))


# --------------------------------------------------------------------------------------------
# The shell


class Reloader:
    """Builds rulesets and installs them; one build at a time (reload, refresh and start share a lock)."""

    def __init__(self, cfg: Config, reread: Callable[[], Config], store: ListStore,
                 install: Callable[[Ruleset], None], notice: Notice, wall: Callable[[], float] = time.time, *,
                 settle: Callable[[], Awaitable[None]] | None = None) -> None:
        self.cfg = cfg
        self.notice = notice  # the consent text in force (install reads it, with the operator of `cfg`)
        self.reread = reread
        self.store = store
        self.install = install
        # Awaited after each install (dns.workers > 1: until every worker has the new rules too).
        self.settle = settle
        self.wall = wall
        self.ruleset: Ruleset | None = None
        self.statuses: dict[str, ListStatus] = {}
        self.reloads = 0
        self._cache = ListCache()
        self._lock = asyncio.Lock()
        self._checked: dict[str, tuple[float, bool]] = {}  # list id -> (last check, succeeded)
        self._wake = asyncio.Event()

    # -- entry points -------------------------------------------------------------------------

    async def start(self) -> Ruleset:
        """The first ruleset (the caller builds the pipeline around it). A URL list that cannot be
        fetched and has no copy is left out with a warning and retried later: a DNS server comes up
        even when a list's host is down."""
        async with self._lock:
            ruleset, fetched = await self._build(self.cfg, strict=False)
            await self._commit(fetched)
            self.ruleset = ruleset
            return ruleset

    async def reload(self, reason: str) -> ReloadReport:
        """Re-read config, catalog and lists; swap them in, or keep everything as it is."""
        started = time.monotonic()
        async with self._lock:
            before = self._before()
            try:
                new_cfg = self.reread()
                effective, applied, restart = split_changes(self.cfg, new_cfg)
                notice = await asyncio.to_thread(read_notice, effective)
                ruleset, fetched = await self._build(effective, strict=True)
            except (ConfigError, CatalogError, ListError, NoticeError, OSError) as exc:
                log.error("reload (%s) rejected, the running configuration stays: %s", reason, exc)
                return ReloadReport(ok=False, reason=reason, error=str(exc), seconds=time.monotonic() - started)
            await self._commit(fetched)
            self.cfg, self.notice = effective, notice
            self._install(ruleset)
            await self._settle()
            self.reloads += 1
            report = self._report(reason, applied, restart, time.monotonic() - started, before)
        log.info("reload (%s): %s; %s; catalog %s (%d vendors, %d domains), %d list entries, %.2f s",
                 reason, f"applied {', '.join(applied)}" if applied else "no config key changed",
                 f"changed: {', '.join(report.changed)}" if report.changed else "nothing shown or gated changed",
                 report.catalog_version, report.vendors, report.domains, report.list_entries, report.seconds)
        if restart:
            log.warning("reload (%s): changed keys that need a restart were not applied: %s",
                        reason, ", ".join(restart))
        if "portal.operator" in applied and not operator_of(self.cfg).named:
            log.warning(NO_OPERATOR_WARNING)
        return report

    async def refresh(self, *, force: bool = False, reason: str = "refresh") -> ReloadReport:
        """Check URL lists that are due (all of them with `force`) and swap in any new content."""
        started = time.monotonic()
        async with self._lock:
            before = self._before()
            now = self.wall()
            due = [(i, s) for i, s in enumerate(self.cfg.lists.sources) if s.url and (force or self._due(s, now))]
            fetched: list[Fetched] = []
            for i, src in due:
                try:
                    fetched.append(await self._fetch(self.cfg, src, i))
                    self._checked[src.id] = (now, True)
                except ListError as exc:
                    self._checked[src.id] = (now, False)
                    self.statuses[src.id].error = str(exc)
                    log.warning("list refresh: %s", exc)
            changed = [f for f in fetched if f.path is not None]
            if changed:
                try:
                    ruleset, _ = await self._build(self.cfg, strict=True, downloads=changed)
                except (CatalogError, ListError, ConfigError, OSError) as exc:  # ConfigError: local.hosts_file
                    for f in changed:
                        self.store.discard(f)
                        self.statuses[f.source.id].error = str(exc)
                        self._checked[f.source.id] = (now, False)  # try again sooner than a full interval
                    log.error("list refresh: new content rejected, the lists in use stay: %s", exc)
                    return ReloadReport(ok=False, reason=reason, error=str(exc), action="refreshed",
                                        seconds=time.monotonic() - started)
            await self._commit(fetched)
            if changed:
                self._install(ruleset)
                await self._settle()
                log.info("list refresh: new content for %s", ", ".join(f.source.id for f in changed))
            report = self._report(reason, (), (), time.monotonic() - started, before)
        return replace(report, action="refreshed")

    async def run_schedule(self) -> None:
        """Refresh URL lists when due, until cancelled."""
        while True:
            delay = self._next_due(self.wall())
            if delay is None:
                self._wake.clear()
                await self._wake.wait()  # nothing to schedule until a reload brings URL lists
                continue
            if delay > 0:
                self._wake.clear()
                # (not asyncio.wait_for: on Python 3.11 it drops a cancellation that lands with the
                # wake-up, and the schedule, cancelled at shutdown, waited on for the next refresh)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                continue
            try:
                await self.refresh(reason="schedule")
            except Exception:  # a bug must not end the schedule for good
                log.exception("list refresh failed")
                await asyncio.sleep(RETRY_AFTER_FAILURE)

    async def _fetch(self, cfg: Config, src: ListSource, index: int, *, conditional: bool = True) -> Fetched:
        return await self.store.fetch(src, index, timeout=cfg.lists.fetch_timeout,
                                      max_bytes=cfg.lists.max_download_bytes, conditional=conditional)

    def status(self) -> list[dict[str, Any]]:
        return [s.as_json() for s in self.statuses.values()]

    # -- internals ----------------------------------------------------------------------------

    def _due_at(self, src: ListSource) -> float:
        """When `src` should be checked next (only called with refresh_interval > 0)."""
        interval = self.cfg.lists.refresh_interval
        checked = self._checked.get(src.id)
        if checked is None:
            meta = self.store.meta(src)
            checked = (meta.checked_at, True) if meta is not None else (0.0, True)
            self._checked[src.id] = checked
        at, ok = checked
        return at + (interval if ok else min(interval, RETRY_AFTER_FAILURE))

    def _due(self, src: ListSource, now: float) -> bool:
        return self.cfg.lists.refresh_interval > 0 and now >= self._due_at(src)

    def _next_due(self, now: float) -> float | None:
        urls = [s for s in self.cfg.lists.sources if s.url]
        if self.cfg.lists.refresh_interval <= 0 or not urls:
            return None
        return max(0.0, min(self._due_at(s) for s in urls) - now)

    async def _build(self, cfg: Config, *, strict: bool,
                     downloads: Sequence[Fetched] = ()) -> tuple[Ruleset, list[Fetched]]:
        """A complete ruleset for `cfg`. Lists with no copy yet are fetched first; when that fails,
        `strict` (reload) rejects the whole build, otherwise (start) the list is left out."""
        statuses = {s.id: self._status_for(s) for s in cfg.lists.sources}
        paths = {f.source.id: f.path for f in downloads if f.path is not None}  # new content to try
        fetched: list[Fetched] = []
        for i, src in enumerate(cfg.lists.sources):
            if src.id in paths:
                continue
            local = self.store.local(src)
            if local is None:
                try:
                    got = await self._fetch(cfg, src, i, conditional=False)
                except ListError as exc:
                    if strict:
                        raise
                    statuses[src.id].error = str(exc)
                    self._checked[src.id] = (self.wall(), False)
                    log.warning("%s; starting without this list, retrying later", exc)
                    continue
                self._checked[src.id] = (self.wall(), True)
                fetched.append(got)
                local = got.path
            if local is not None:
                paths[src.id] = local
        try:
            catalog = await asyncio.to_thread(self._build_catalog, cfg, paths, statuses)
        except BaseException:
            for f in fetched:
                self.store.discard(f)
            raise
        records = await asyncio.to_thread(read_local_records, cfg)
        self.statuses = statuses
        return ruleset_for(cfg, catalog, records), fetched

    def _build_catalog(self, cfg: Config, paths: dict[str, Path], statuses: dict[str, ListStatus]) -> Catalog:
        catalog = read_catalog(cfg)
        lists = build_lists(cfg, catalog, paths, self._cache, statuses)
        for src in cfg.lists.sources:
            statuses[src.id].loaded = src.id in paths and statuses[src.id].entries > 0
        # The block lists in force, in configured order: each is an item of the notice.
        listed = tuple(self._cache.rules[s].vendor for s in cfg.lists.sources if s in self._cache.rules)
        return catalog.with_lists(lists, listed)

    async def _commit(self, fetched: Sequence[Fetched]) -> None:
        for f in fetched:
            try:
                await asyncio.to_thread(self.store.commit, f)
            except OSError as exc:  # the list is in force; only its copy for the next start is missing
                log.error("list %s: cannot keep the download in %s: %s", f.source.id, self.store.directory,
                          exc.strerror)
                continue
            status = self.statuses.get(f.source.id)
            if status is not None:
                status.fetched_at, status.checked_at = f.meta.fetched_at or None, f.meta.checked_at or None
                status.error = None

    def _status_for(self, src: ListSource) -> ListStatus:
        status = ListStatus(id=src.id, name=src.name or src.id, kind=src.kind, category=src.category,
                            source=src.url or src.file)
        meta = self.store.meta(src) if src.url else None
        if meta is not None:
            status.fetched_at, status.checked_at = meta.fetched_at or None, meta.checked_at or None
        return status

    async def _settle(self) -> None:
        if self.settle is not None:
            await self.settle()

    def _install(self, ruleset: Ruleset) -> None:
        self.ruleset = ruleset
        self.install(ruleset)
        self._wake.set()  # the schedule may have changed

    def _before(self) -> tuple[Catalog, Notice, Config, dict[str, int]]:
        assert self.ruleset is not None
        return self.ruleset.catalog, self.notice, self.cfg, self._entries()

    def _entries(self) -> dict[str, int]:
        return {list_id: status.entries for list_id, status in self.statuses.items()}

    def _report(self, reason: str, applied: tuple[str, ...], restart: tuple[str, ...], seconds: float,
                before: tuple[Catalog, Notice, Config, dict[str, int]]) -> ReloadReport:
        assert self.ruleset is not None
        catalog = self.ruleset.catalog
        old_catalog, old_text, old_cfg, old_entries = before
        was = notice_in_force(old_text, operator_of(old_cfg), old_catalog)
        now = notice_in_force(self.notice, operator_of(self.cfg), catalog)
        changed = changes_between(was, now) + catalog_changes(old_catalog, catalog, old_entries, self._entries())
        return ReloadReport(
            ok=True, reason=reason, applied=applied, restart_required=restart, changed=tuple(changed),
            notice_version=now.version, previous_notice_version=was.version,
            catalog_version=catalog.version, vendors=len(catalog.vendors), domains=len(catalog.rules),
            list_entries=len(catalog.lists) if catalog.lists is not None else 0,
            lists=tuple(self.status()), seconds=seconds,
        )


ReloadFn = Callable[[str], Awaitable[ReloadReport]]
