"""Where consent is kept: the protocol `ConsentService` works against, and its SQLite implementation.

Two implementations, chosen by `storage.store`: `SqliteBackend` here (the embedded default: one file
in the data dir, written on one worker thread) and `redis_store.RedisBackend` (several dnsgate
instances sharing consent). The service never knows which one it has:

- `load()`: every choice in force (or expired but not yet recorded as such) and the pairings;
- `commit(steps, based_on, change, deadline)`: one change (a list of `store.Step`s) stored
  atomically; returns each step's event id (`Recorded`), None where the step was skipped.
  `based_on` is the `position` the change was planned at: a shared store refuses (`Conflict`) a
  plan made before another instance's change, and the service catches up and plans again, so every
  change is decided on the latest state. `change` names this attempt (an idempotency key) and
  `deadline` (time.monotonic) is when the caller answers: a commit that raises `StoreError` was not
  recorded and never will be; one that raises `InDoubt` may have been recorded before the deadline
  and can no longer be after it, and `resolve(change, based_on)` says which once the store answers;
- `follow(sink)` runs for the instance's lifetime and hands `sink` every change recorded through
  another instance, in log order; `catch_up(sink)` does so at once. SQLite has nothing to follow;
- the event log (`events`, `export`), pairings, kiosk activity (`share_activity`: a kiosk is idle
  only when no instance has seen it), retention (`purge`), and `restore` (migration).

Storage that cannot be reached raises `store.StoreError` from every call (the API answers 503);
every call has a deadline (`timeout`), so nothing waits on a stalled store for longer.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol, TypeVar

from dnsgate.consent.model import Choice
from dnsgate.consent.sqlite_store import BUSY_TIMEOUT, Abandon, ConsentStore, Event, EventFilter, Step, StoreError

T = TypeVar("T")
EXPORT_PAGE: Final = 500
SQLITE_FILE: Final = "consent.sqlite3"


class Conflict(Exception):
    """Another instance recorded a change since this one planned its own: catch up, plan again."""


class InDoubt(StoreError):
    """The store did not answer a change before its deadline: it may have recorded it before then,
    never after. `ConsentBackend.resolve` tells which once the store answers again."""


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
    # Not empty when the store no longer holds the history this instance had followed (a Redis
    # restarted empty, replaced, or rolled back): what is missing, in a sentence.
    lost: str = ""


class ChangeSink(Protocol):
    """What a shared store tells the instance (ConsentService implements it)."""

    def apply_recorded(self, step: Step, event_id: int, own: bool, change: str = "") -> None:
        """A change from the log: put it in force here. `own`: this instance recorded it (its
        `commit` is about to return), so only the table changes; no log line, no listeners.
        `change`: the change's idempotency key (one answered 503 here stays out of force)."""

    def replace_all(self, snapshot: Snapshot) -> None:
        """The whole state again (after the store lost track of what this instance has seen)."""

    def store_health(self, problem: str) -> None:
        """The store became unreachable ("why") or reachable again ("")."""

    def cut_off(self, problem: str) -> None:
        """Nothing was heard from the shared store for longer than its lease: changes made through
        other instances since then are unknown here. Hold closed until `replace_all`."""


class ConsentBackend(Protocol):
    name: str  # for logs, health and errors; never carries a password
    shared: bool  # other instances change the same consent
    timeout: float  # seconds a consent change may wait for the store, all included

    @property
    def position(self) -> int:
        """How far this instance has applied the store's changes (0 where nobody else changes it)."""

    async def load(self) -> Snapshot: ...
    async def commit(self, steps: Sequence[Step], based_on: int, change: str, deadline: float) -> Recorded: ...
    async def resolve(self, change: str, based_on: int) -> dict[int, int] | None:
        """After `InDoubt`: the event id of each step the change recorded (by the step's index), or
        None if it recorded nothing (and now never will). StoreError while the store cannot tell yet."""
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
    timeout = BUSY_TIMEOUT

    def __init__(self, store: ConsentStore) -> None:
        self.store = store
        self.name = f"sqlite:{store.path}"
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dnsgate-store")
        # Changes whose deadline passed while their transaction was committing: their outcome.
        self._doubtful: dict[str, Future[list[int | None]]] = {}

    @classmethod
    def open(cls, path: Path, synchronous: str = "full") -> SqliteBackend:
        return cls(ConsentStore(path, synchronous))

    async def _run(self, fn: functools.partial[T], timeout: float | None = None) -> T:
        """Run `fn` on the store's thread; with a `timeout` (reads only: a read given up on
        finishes in the background, harmlessly), StoreError if it has not finished by then."""
        future = asyncio.get_running_loop().run_in_executor(self._executor, fn)
        if timeout is None:
            return await future  # a write: SQLite's busy timeout bounds its wait for a lock
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise StoreError(f"{self.name}: no answer within {timeout:g} s") from None

    async def load(self) -> Snapshot:
        def read() -> Snapshot:
            return Snapshot(self.store.load(), self.store.load_pairings())
        return await self._run(functools.partial(read), timeout=max(self.timeout, 30.0))

    async def commit(self, steps: Sequence[Step], based_on: int, change: str, deadline: float) -> Recorded:
        abandon = Abandon(deadline)
        future = self._executor.submit(self.store.commit, steps, abandon)
        try:
            return Recorded(await asyncio.wait_for(asyncio.wrap_future(future), deadline - time.monotonic()))
        except TimeoutError:
            if abandon.now():  # the transaction rolls back (or never starts): nothing is recorded
                raise StoreError(f"{self.name}: no answer within {self.timeout:g} s") from None
            self._doubtful[change] = future  # it was committing: its outcome comes when the disk answers
            raise InDoubt(f"{self.name}: the write did not finish within {self.timeout:g} s") from None

    async def resolve(self, change: str, based_on: int) -> dict[int, int] | None:
        future = self._doubtful.get(change)
        if future is None:
            return None
        try:
            ids = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), self.timeout)
        except TimeoutError:
            raise StoreError(f"{self.name}: a write is still not finished") from None
        except StoreError:
            ids = []
        del self._doubtful[change]
        return {step: i for step, i in enumerate(ids) if i is not None} or None

    async def catch_up(self, sink: ChangeSink) -> None:
        return None

    async def follow(self, sink: ChangeSink) -> None:
        return None

    async def events(self, address: str | None, limit: int) -> list[Event]:
        return await self._run(functools.partial(self.store.events, address, limit), self.timeout)

    async def export(self, f: EventFilter) -> AsyncIterator[Event]:
        after = 0
        while True:
            page = await self._run(functools.partial(self.store.export_page, f, after, EXPORT_PAGE), self.timeout)
            for event in page:
                yield event
            if len(page) < EXPORT_PAGE:
                return
            after = page[-1].id or after

    async def remember_pairing(self, http: str, dns: str, at: float) -> None:
        await self._run(functools.partial(self.store.remember_pairing, http, dns, at))

    async def pairings_of(self, http: str) -> dict[str, float]:
        return await self._run(functools.partial(self.store.pairings_of, http), self.timeout)

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
