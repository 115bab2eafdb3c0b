"""Where consent is kept: the protocol `ConsentService` works against.

Two implementations, chosen by `storage.store`: `sqlite_store.SqliteBackend` (the embedded default:
one file in the data dir, written on one worker thread) and `redis_store.RedisBackend` (several dnsgate
instances sharing consent). The service never knows which one it has:

- `load()`: every choice in force (or expired but not yet recorded as such) and the pairings;
- `commit(steps, based_on, change, deadline)`: one change (a list of `records.Step`s) stored
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

Storage that cannot be reached raises `records.StoreError` from every call (the API answers 503);
every call has a deadline (`timeout`), so nothing waits on a stalled store for longer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeVar

from dnsgate.consent.model import Choice
from dnsgate.consent.records import Event, EventFilter, Step, StoreError

T = TypeVar("T")
EXPORT_PAGE: Final = 500


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


def choices_in_order(choices: Iterable[Choice]) -> list[Choice]:
    """Oldest first, as both stores load them (a later choice of a subject wins in the table)."""
    return sorted(choices, key=lambda c: (c.made_at, c.id))


_unwinding: set[asyncio.Future[Any]] = set()  # store operations given up at their deadline, still ending


async def within(deadline: float, op: Awaitable[T]) -> T:
    """`op`'s result if it comes before `deadline` (time.monotonic), else TimeoutError at the deadline.

    The wait ends at the deadline whatever `op` does meanwhile: it is cancelled and left to end on
    its own. Cancelling it and waiting for it to end is not enough: redis-py can swallow the
    cancellation (on Python 3.11 it sends a command inside `asyncio.wait_for`, which returns the
    send's result when the cancellation lands just as the send completes) and then waits for the
    reply up to its socket timeout, so a change answered at its deadline would be answered
    seconds later while the store is cut off."""
    task: asyncio.Future[T] = asyncio.ensure_future(op)
    try:
        await asyncio.wait((task,), timeout=max(0.0, deadline - time.monotonic()))
    except asyncio.CancelledError:
        task.cancel()
        raise
    if task.done():
        return task.result()
    task.cancel()
    _unwinding.add(task)
    task.add_done_callback(_ended)
    raise TimeoutError


def _ended(task: asyncio.Future[Any]) -> None:
    _unwinding.discard(task)
    if not task.cancelled():
        task.exception()  # (its failure was reported by the deadline already: not "never retrieved")


def stop_if_cancelled() -> None:
    """Re-raise a cancellation that a client library turned into an error (a Redis command cut off
    by shutdown), so a loop that retries on errors still stops when its task is cancelled."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
