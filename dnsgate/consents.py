"""Changing consent: persist first, then apply, so an acknowledged change is durable and in force.

Store calls run on one worker thread, in order; the in-memory table is updated on the event loop
right after the write commits, so a client's very next DNS query sees the change.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from .catalog import Catalog
from .config import ConsentConfig
from .consent import ConsentTable, Grant, Source
from .store import AuditEvent, ConsentStore

log = logging.getLogger(__name__)
T = TypeVar("T")
DAY = 86_400.0


@dataclass(frozen=True, slots=True)
class VendorState:
    id: str
    name: str
    category: str
    allowed: bool


@dataclass(frozen=True, slots=True)
class ClientView:
    client: str
    grants: Mapping[str, Grant]  # active grants only
    vendors: tuple[VendorState, ...]


class ConsentService:
    def __init__(self, store: ConsentStore, table: ConsentTable, catalog: Catalog, cfg: ConsentConfig,
                 wall: Callable[[], float] = time.time) -> None:
        self.store = store
        self.table = table
        self.catalog = catalog
        self.cfg = cfg
        self.wall = wall
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dnsgate-store")
        # Called with each change once it is stored and in force (metrics, events: events.py).
        self.listeners: list[Callable[[AuditEvent], None]] = []

    def load(self) -> int:
        """Fill the table from the store (at start, before DNS listens); returns the client count."""
        for client, grants in self.store.load().items():
            self.table.replace(client, grants)
        return len(self.table)

    async def _in_store(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def grant(self, client: str, categories: Iterable[str], source: Source, user_agent: str,
                    days: int | None = None) -> ClientView:
        """Make `categories` exactly the client's granted set (an empty set withdraws)."""
        wanted = tuple(dict.fromkeys(categories))
        if not wanted:
            return await self.withdraw(client, source, user_agent)
        now = self.wall()
        expires = now + min(days or self.cfg.default_days, self.cfg.max_days) * DAY
        grants = {c: Grant(category=c, granted_at=now, expires_at=expires, source=source) for c in wanted}
        event = AuditEvent(at=now, client=client, action="grant", categories=wanted, expires_at=expires,
                           source=source, user_agent=user_agent)
        await self._in_store(lambda: self.store.record(event, grants))
        self.table.replace(client, grants)
        log.info("consent granted: client=%s categories=%s source=%s", client, ",".join(wanted), source)
        self._notify(event)
        return self.view(client)

    async def withdraw(self, client: str, source: Source, user_agent: str) -> ClientView:
        previous = tuple(self.table.grants(client))
        event = AuditEvent(at=self.wall(), client=client, action="withdraw", categories=previous,
                           expires_at=None, source=source, user_agent=user_agent)
        await self._in_store(lambda: self.store.record(event, {}))
        self.table.replace(client, {})
        log.info("consent withdrawn: client=%s categories=%s source=%s", client, ",".join(previous) or "-", source)
        self._notify(event)
        return self.view(client)

    def _notify(self, event: AuditEvent) -> None:
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:  # a broken observer must not fail a change that is already stored
                log.exception("consent listener failed")

    def view(self, client: str) -> ClientView:
        now = self.wall()
        active = {c: g for c, g in self.table.grants(client).items() if g.active(now)}
        vendors = tuple(
            VendorState(v.id, v.name, v.category, self.table.allows(client, v, now)) for v in self.catalog.vendors
        )
        return ClientView(client, active, vendors)

    def views(self) -> list[ClientView]:
        return [self.view(client) for client, _ in self.table.clients()]

    async def events(self, client: str | None, limit: int) -> list[AuditEvent]:
        return await self._in_store(lambda: self.store.events(client, limit))

    async def close(self) -> None:
        await self._in_store(self.store.close)
        self._executor.shutdown(wait=True)
