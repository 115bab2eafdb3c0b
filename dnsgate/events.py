"""What changed, as it happens: gated decisions and consent changes, for kiosks, dashboards and hooks.

`EventHub` fans events out to server-sent-event subscribers (GET /v1/events) and to an optional
webhook. Each subscriber has a bounded queue: one that stops reading loses events (counted), it
never slows DNS. `ConsentWatch` turns consent changes into events, counts them for /metrics, logs
one line each, and notices expiries (a grant that simply runs out changes nothing stored, so
nothing else would say so).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp

from .consent import ConsentTable, Grant
from .store import AuditEvent

log = logging.getLogger(__name__)

Event = dict[str, Any]
SUBSCRIBER_QUEUE = 1000
WEBHOOK_QUEUE = 10_000
WEBHOOK_BATCH = 500


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class EventHub:
    def __init__(self, webhook_url: str = "", webhook_timeout: float = 5.0) -> None:
        self._subscribers: set[asyncio.Queue[Event]] = set()
        self.webhook_url = webhook_url
        self.webhook_timeout = webhook_timeout
        self._outbox: asyncio.Queue[Event] | None = asyncio.Queue(WEBHOOK_QUEUE) if webhook_url else None
        self.published = 0
        self.lost = 0  # events a slow subscriber or a failing webhook did not get
        self.webhook_posts = 0
        self.webhook_failures = 0

    def publish(self, event: Event) -> None:
        """Hand `event` to every subscriber now; never blocks (called on the event loop)."""
        self.published += 1
        for queue in self._subscribers:
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                self.lost += 1
        if self._outbox is not None:
            try:
                self._outbox.put_nowait(event)
            except asyncio.QueueFull:
                self.lost += 1

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[Event]]:
        queue: asyncio.Queue[Event] = asyncio.Queue(SUBSCRIBER_QUEUE)
        self._subscribers.add(queue)
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    async def run_webhook(self) -> None:
        """POST batches of events to the webhook until cancelled. A failed POST is logged, counted, and
        its events are lost: a dead receiver must not grow memory."""
        if self._outbox is None:
            return
        outbox = self._outbox
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.webhook_timeout)) as session:
            while True:
                batch = [await outbox.get()]
                while len(batch) < WEBHOOK_BATCH and not outbox.empty():
                    batch.append(outbox.get_nowait())
                try:
                    async with session.post(self.webhook_url, json=batch) as response:
                        if response.status >= 300:
                            raise aiohttp.ClientResponseError(response.request_info, (), status=response.status)
                    self.webhook_posts += 1
                except (aiohttp.ClientError, TimeoutError) as exc:
                    self.webhook_failures += 1
                    self.lost += len(batch)
                    log.warning("webhook POST failed: url=%s events=%d error=%s", self.webhook_url, len(batch),
                                type(exc).__name__)


CONSENT_ACTIONS = ("grant", "refuse", "withdraw", "expire")


class ConsentWatch:
    """Counts, logs and publishes consent changes, and schedules an event for each grant's expiry."""

    def __init__(self, table: ConsentTable, hub: EventHub, client_label: Callable[[str], str],
                 wall: Callable[[], float] = time.time) -> None:
        self.table = table
        self.hub = hub
        self.client_label = client_label
        self.wall = wall
        self.changes = dict.fromkeys(CONSENT_ACTIONS, 0)
        self._timers: dict[str, dict[str, asyncio.TimerHandle]] = {}  # client -> category -> expiry timer

    def start(self) -> None:
        """Schedule the expiry of every grant already in force (call on the running loop)."""
        now = self.wall()
        for client, grants in self.table.clients():
            for grant in grants.values():
                if grant.expires_at > now:  # long-expired grants ran out while dnsgate was not looking
                    self._schedule(client, grant)

    def changed(self, event: AuditEvent) -> None:
        """ConsentService listener: `event` has just been stored and applied."""
        # A "no" from a client that had nothing to withdraw is a refusal.
        action = "refuse" if event.action == "withdraw" and not event.categories else event.action
        self._emit(action, event.client, list(event.categories), event.expires_at, event.source, event.at)
        for timer in self._timers.pop(event.client, {}).values():
            timer.cancel()
        for grant in self.table.grants(event.client).values():
            self._schedule(event.client, grant)

    def _schedule(self, client: str, grant: Grant) -> None:
        delay = max(0.0, grant.expires_at - self.wall())
        loop = asyncio.get_running_loop()
        self._timers.setdefault(client, {})[grant.category] = loop.call_later(delay, self._expired, client, grant)

    def _expired(self, client: str, grant: Grant) -> None:
        timers = self._timers.get(client, {})
        timers.pop(grant.category, None)
        if not timers:
            self._timers.pop(client, None)
        if self.table.grants(client).get(grant.category) is grant:  # still the grant in force
            self._emit("expire", client, [grant.category], grant.expires_at, grant.source, grant.expires_at)

    def _emit(self, action: str, client: str, categories: list[str], expires_at: float | None, source: str,
              at: float) -> None:
        self.changes[action] = self.changes.get(action, 0) + 1
        if action == "expire":  # the other changes are logged where they are made (consents.py)
            log.info("consent expired: client=%s categories=%s", client, ",".join(categories))
        self.hub.publish({"type": "consent", "at": iso(at), "client": self.client_label(client), "action": action,
                          "categories": categories, "expires_at": iso(expires_at), "source": source})

    def close(self) -> None:
        for timers in self._timers.values():
            for timer in timers.values():
                timer.cancel()
        self._timers.clear()
