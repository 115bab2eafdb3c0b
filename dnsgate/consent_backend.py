"""Where consent is kept: the protocol `ConsentService` works against, and its SQLite implementation.

Two implementations, chosen by `storage.store`: `SqliteBackend` here (the embedded default: one file
in the data dir, written on one worker thread) and `redis_store.RedisBackend` (several dnsgate
instances sharing consent). The service never knows which one it has:

- `load()`: every choice in force (or expired but not yet recorded as such) and the pairings;
- `commit(steps, based_on)`: one change (a list of `store.Step`s) stored atomically; returns each
  step's event id (`Recorded`), None where the step was skipped. `based_on` is the `position` the change was
  planned at: a shared store refuses (`Conflict`) a plan made before another instance's change, and
  the service catches up and plans again, so every change is decided on the latest state;
- `follow(sink)` runs for the instance's lifetime and hands `sink` every change recorded through
  another instance, in log order; `catch_up(sink)` does so at once. SQLite has nothing to follow;
- the event log (`events`, `export`), pairings, kiosk activity (`share_activity`: a kiosk is idle
  only when no instance has seen it), retention (`purge`), and `restore` (migration).

Storage that cannot be reached raises `store.StoreError` from every call (the API answers 503).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol, TypeVar

from .consent import Choice
from .store import ConsentStore, Event, EventFilter, Step, StoreError

T = TypeVar("T")
EXPORT_PAGE: Final = 500
SQLITE_FILE: Final = "consent.sqlite3"


class Conflict(Exception):
    """Another instance recorded a change since this one planned its own: catch up, plan again."""


@dataclass(frozen=True, slots=True)
class Recorded:
    """What `commit` did: each step's event id (None where the step was skipped)."""

    ids: list[int | None]
    # Ids up to this one are in force already: `follow` met them in the log (in order, before any
    # later change) while the commit's answer was on its way, and handed them to the sink.
    in_force_up_to: int = 0


@dataclass(frozen=True, slots=True)
class Snapshot:
    choices: list[Choice]  # oldest first
    pairings: list[tuple[str, str, float]]  # (HTTP subject key, DNS client key, when)


class ChangeSink(Protocol):
    """What a shared store tells the instance (ConsentService implements it)."""

    def apply_recorded(self, step: Step, event_id: int, own: bool) -> None:
        """A change from the log: put it in force here. `own`: this instance recorded it (its
        `commit` is about to return), so only the table changes; no log line, no listeners."""

    def replace_all(self, snapshot: Snapshot) -> None:
        """The whole state again (after the store lost track of what this instance has seen)."""

    def store_health(self, problem: str) -> None:
        """The store became unreachable ("why") or reachable again ("")."""


class ConsentBackend(Protocol):
    name: str  # for logs, health and errors; never carries a password
    shared: bool  # other instances change the same consent

    @property
    def position(self) -> int:
        """How far this instance has applied the store's changes (0 where nobody else changes it)."""

    async def load(self) -> Snapshot: ...
    async def commit(self, steps: Sequence[Step], based_on: int) -> Recorded: ...
    async def catch_up(self, sink: ChangeSink) -> None: ...
    async def follow(self, sink: ChangeSink) -> None: ...
    async def events(self, address: str | None, limit: int) -> list[Event]: ...
    def export(self, f: EventFilter) -> AsyncIterator[Event]:
        """Events matching `f` (except its network, which the caller checks), oldest first."""
    async def remember_pairing(self, http: str, dns: str, at: float) -> None: ...
    async def pairings_of(self, http: str) -> dict[str, float]: ...
    async def share_activity(self, seen: Mapping[str, float], forget_before: float) -> dict[str, float]:
        """Kiosk sessions: merge this instance's last DNS query time per client key into the store's
        and return the latest any instance saw (forgetting times older than `forget_before`)."""
    async def purge(self, before: float, now: float) -> int: ...
    async def restore(self, events: AsyncIterator[Event], snapshot: Snapshot) -> int:
        """Fill an empty store with `events` (ids kept) and `snapshot`'s choices; returns events copied."""
    async def close(self) -> None: ...


class SqliteBackend:
    """`store.ConsentStore` (synchronous SQLite) behind the protocol: every call runs on one worker
    thread, so SQLite is never touched from the event loop and writes are serialized."""

    shared = False
    position = 0

    def __init__(self, store: ConsentStore) -> None:
        self.store = store
        self.name = f"sqlite:{store.path}"
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dnsgate-store")

    @classmethod
    def open(cls, path: Path, synchronous: str = "full") -> SqliteBackend:
        return cls(ConsentStore(path, synchronous))

    async def _run(self, fn: functools.partial[T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def load(self) -> Snapshot:
        def read() -> Snapshot:
            return Snapshot(self.store.load(), self.store.load_pairings())
        return await self._run(functools.partial(read))

    async def commit(self, steps: Sequence[Step], based_on: int) -> Recorded:
        return Recorded(await self._run(functools.partial(self.store.commit, steps)))

    async def catch_up(self, sink: ChangeSink) -> None:
        return None

    async def follow(self, sink: ChangeSink) -> None:
        return None

    async def events(self, address: str | None, limit: int) -> list[Event]:
        return await self._run(functools.partial(self.store.events, address, limit))

    async def export(self, f: EventFilter) -> AsyncIterator[Event]:
        after = 0
        while True:
            page = await self._run(functools.partial(self.store.export_page, f, after, EXPORT_PAGE))
            for event in page:
                yield event
            if len(page) < EXPORT_PAGE:
                return
            after = page[-1].id or after

    async def remember_pairing(self, http: str, dns: str, at: float) -> None:
        await self._run(functools.partial(self.store.remember_pairing, http, dns, at))

    async def pairings_of(self, http: str) -> dict[str, float]:
        return await self._run(functools.partial(self.store.pairings_of, http))

    async def share_activity(self, seen: Mapping[str, float], forget_before: float) -> dict[str, float]:
        return dict(seen)  # one instance: its own clock is the only one

    async def purge(self, before: float, now: float) -> int:
        return await self._run(functools.partial(self.store.purge, before, now))

    async def restore(self, events: AsyncIterator[Event], snapshot: Snapshot) -> int:
        if await self._run(functools.partial(self.store.count_events)):
            raise StoreError(f"{self.name}: already holds consent events; migrate only into an empty store")
        copied = 0
        batch: list[Event] = []
        async for event in events:
            batch.append(event)
            if len(batch) >= EXPORT_PAGE:
                copied += await self._run(functools.partial(self.store.restore_events, list(batch)))
                batch.clear()
        copied += await self._run(functools.partial(self.store.restore_events, batch))
        await self._run(functools.partial(self.store.restore_state, snapshot.choices, snapshot.pairings))
        return copied

    async def close(self) -> None:
        try:
            await self._run(functools.partial(self.store.close))
        finally:
            self._executor.shutdown(wait=True)


def choices_in_order(choices: Iterable[Choice]) -> list[Choice]:
    """Oldest first, as both stores load them (a later choice of a subject wins in the table)."""
    return sorted(choices, key=lambda c: (c.made_at, c.id))


def stop_if_cancelled() -> None:
    """Re-raise a cancellation that a client library turned into an error (a Redis command cut off
    by shutdown), so a loop that retries on errors still stops when its task is cancelled."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
