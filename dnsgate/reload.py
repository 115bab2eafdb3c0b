"""Live reload: the rules dnsgate gates on, built off to the side and swapped in whole, at start,
on reload (SIGHUP, POST /v1/reload), and when a list download brings new content.

`Reloader` builds a complete `ruleset.Ruleset` (files read and lists parsed on a worker thread, so queries keep
flowing), validates it, and only then hands it to `install`, which swaps it into the pipeline in one
synchronous step on the event loop and empties the cache. Anything invalid -> nothing changes, the
error is logged and returned. Consent is never touched.

Which keys apply live: [gate], [cache], [local] and [lists]. The rest ([dns], [api], [upstream], [consent],
[storage]) are bound to sockets, threads or files at start; a reload reports them as needing a
restart and keeps running with the old values.
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

from .catalog import Catalog, CatalogError
from .config import Config, ConfigError, ListSource
from .list_sources import Fetched, ListError, ListStore
from .ruleset import ListCache, ListStatus, Ruleset, build_lists, read_catalog, ruleset_for

log = logging.getLogger(__name__)

LIVE_SECTIONS: Final = ("gate", "cache", "local", "lists")
RESTART_SECTIONS: Final = ("dns", "api", "upstream", "consent", "storage", "log", "querylog", "events")
RETRY_AFTER_FAILURE: Final = 300.0


@dataclass(frozen=True, slots=True)
class ReloadReport:
    ok: bool
    reason: str
    error: str | None = None
    action: str = "reloaded"  # or "refreshed" (lists only)
    applied: tuple[str, ...] = ()  # changed keys now in force
    restart_required: tuple[str, ...] = ()  # changed keys that keep their running value until a restart
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
            "catalog": {"version": self.catalog_version, "vendors": self.vendors, "domains": self.domains},
            "list_entries": self.list_entries, "lists": list(self.lists), "seconds": round(self.seconds, 3),
        }


def split_changes(running: Config, new: Config) -> tuple[Config, tuple[str, ...], tuple[str, ...]]:
    """(the config to run with, changed live keys, changed keys that need a restart)."""
    applied: list[str] = []
    restart: list[str] = []
    for section in fields(Config):
        old_part, new_part = getattr(running, section.name), getattr(new, section.name)
        changed = [f"{section.name}.{f.name}" for f in fields(old_part)
                   if getattr(old_part, f.name) != getattr(new_part, f.name)]
        (applied if section.name in LIVE_SECTIONS else restart).extend(changed)
    effective = replace(new, **{name: getattr(running, name) for name in RESTART_SECTIONS})
    return effective, tuple(applied), tuple(restart)


# --------------------------------------------------------------------------------------------
# The shell


class Reloader:
    """Builds rulesets and installs them; one build at a time (reload, refresh and start share a lock)."""

    def __init__(self, cfg: Config, reread: Callable[[], Config], store: ListStore,
                 install: Callable[[Ruleset], None], wall: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.reread = reread
        self.store = store
        self.install = install
        # Awaited after each install (dns.workers > 1: until every worker has the new rules too).
        self.settle: Callable[[], Awaitable[None]] | None = None
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
            try:
                new_cfg = self.reread()
                effective, applied, restart = split_changes(self.cfg, new_cfg)
                ruleset, fetched = await self._build(effective, strict=True)
            except (ConfigError, CatalogError, ListError, OSError) as exc:
                log.error("reload (%s) rejected, the running configuration stays: %s", reason, exc)
                return ReloadReport(ok=False, reason=reason, error=str(exc), seconds=time.monotonic() - started)
            await self._commit(fetched)
            self.cfg = effective
            self._install(ruleset)
            await self._settle()
            self.reloads += 1
        report = self._report(reason, applied, restart, time.monotonic() - started)
        log.info("reload (%s): %s; catalog %s (%d vendors, %d domains), %d list entries, %.2f s",
                 reason, f"applied {', '.join(applied)}" if applied else "no config key changed",
                 report.catalog_version, report.vendors, report.domains, report.list_entries, report.seconds)
        if restart:
            log.warning("reload (%s): changed keys that need a restart were not applied: %s",
                        reason, ", ".join(restart))
        return report

    async def refresh(self, *, force: bool = False, reason: str = "refresh") -> ReloadReport:
        """Check URL lists that are due (all of them with `force`) and swap in any new content."""
        started = time.monotonic()
        async with self._lock:
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
                except (CatalogError, ListError, OSError) as exc:
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
        return replace(self._report(reason, (), (), time.monotonic() - started), action="refreshed")

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
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
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
        self.statuses = statuses
        return ruleset_for(cfg, catalog), fetched

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

    def _report(self, reason: str, applied: tuple[str, ...], restart: tuple[str, ...], seconds: float) -> ReloadReport:
        assert self.ruleset is not None
        catalog = self.ruleset.catalog
        return ReloadReport(
            ok=True, reason=reason, applied=applied, restart_required=restart,
            catalog_version=catalog.version, vendors=len(catalog.vendors), domains=len(catalog.rules),
            list_entries=len(catalog.lists) if catalog.lists is not None else 0,
            lists=tuple(self.status()), seconds=seconds,
        )


ReloadFn = Callable[[str], Awaitable[ReloadReport]]
