"""What changed, as it happens: gated decisions and consent changes, for kiosks, dashboards and hooks.

`EventHub` fans events out to server-sent-event subscribers (GET /v1/events) and to an optional
webhook. Each subscriber has a bounded queue: one that stops reading loses events (counted), it
never slows DNS. `ConsentWatch` turns the consent log's events (grants, refusals, withdrawals,
expiries, resets, profile changes) into events and counts them for /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp

from dnsgate.consent.export import utc_stamp
from dnsgate.consent.records import Event as ConsentEvent

log = logging.getLogger(__name__)

Event = dict[str, Any]
SUBSCRIBER_QUEUE = 1000
WEBHOOK_QUEUE = 10_000
WEBHOOK_BATCH = 500


def iso(ts: float | None) -> str | None:
    """UNIX seconds -> `2026-12-01T10:00:00.123Z` (UTC)."""
    if ts is None:
        return None
    stamp, micro = utc_stamp(ts)
    return f"{stamp}.{micro // 1000:03d}Z"


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

    def publish_built(self, build: Callable[[], Event]) -> None:
        """`publish` for an event that takes work to build: built only if a subscriber or the webhook
        gets it (counted either way)."""
        if self._subscribers or self._outbox is not None:
            self.publish(build())
        else:
            self.published += 1

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


# One word per kind of event everywhere: the consent log's own (its export, this event stream, the
# webhook and dnsgate_consent_changes_total{action}). The stream's older verbs (refuse, withdraw,
# expire) name the same events; STREAM_ACTIONS reads them as the log's words.
CONSENT_ACTIONS = ("grant", "refusal", "withdrawal", "expiry", "reset", "profile_change")
STREAM_ACTIONS = {"refuse": "refusal", "withdraw": "withdrawal", "expire": "expiry"}


class ConsentWatch:
    """Counts and publishes consent changes: every event the consent log records (consent/service.py),
    expiries and kiosk resets included, once it is stored and in force."""

    def __init__(self, hub: EventHub, client_label: Callable[[str], str]) -> None:
        self.hub = hub
        self.client_label = client_label
        self.changes = dict.fromkeys(CONSENT_ACTIONS, 0)

    def changed(self, event: ConsentEvent) -> None:
        """ConsentService listener."""
        action = STREAM_ACTIONS.get(event.action, event.action)
        self.changes[action] = self.changes.get(action, 0) + 1

        def build() -> Event:
            s = event.subject
            categories = ([c for c, said in event.categories.items() if said] if action == "grant"
                          else list(event.categories))
            client = s.address or s.network or s.mac or ""
            return {"type": "consent", "at": iso(event.at), "client": self.client_label(client), "action": action,
                    "categories": categories, "vendors": dict(event.vendors), "profile": event.profile,
                    "expires_at": iso(event.expires_at), "source": event.source}

        self.hub.publish_built(build)
