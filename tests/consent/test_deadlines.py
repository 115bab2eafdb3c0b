"""Store operations whose caller gives up (its deadline, its cancellation) at the moment they finish.

On Python 3.11, `asyncio.wait_for` returns the result of an operation that finishes just as the
waiting task is cancelled, and the cancellation is lost: code after the wait goes on as if it had
not been cancelled, while whoever cancelled it (`within`, at a change's deadline) has given up on
the result. Each test here cancels the waiting task at every point around the moment the operation
finishes, so the window is hit whatever the event loop's order of callbacks."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from dnsgate.config import ConsentConfig
from dnsgate.consent.backend import InDoubt
from dnsgate.consent.model import Subject
from dnsgate.consent.notice import Notice
from dnsgate.consent.pairing import Pairings
from dnsgate.consent.records import Event, Step
from dnsgate.consent.service import ConsentService
from dnsgate.consent.sqlite_store import LOCK_MARGIN, Abandon, SqliteBackend
from tests.support.consent_fixtures import CATALOG, table

HOPS = 8  # event-loop iterations swept after the operation finished


def grant(address: str) -> Step:
    now = time.time()
    return Step(Event("grant", now, Subject(address), "opt-in", {"marketing": True}, {}, now + 86_400, None,
                      "device"), makes_choice=True)


async def test_a_change_in_doubt_stays_resolvable_when_its_resolver_is_given_up_on_as_it_answers(
        tmp_path: Path) -> None:
    """A commit past its commit point when its deadline came (the disk slow to confirm) is in doubt;
    `resolve` later says whether it was recorded. Given up on (cancelled and left by `within` at the
    change's deadline) just as the write's outcome arrives, resolve must end cancelled and leave that
    outcome for the next attempt: it used to take it, swallowing the cancellation, for a caller that
    no longer listened, so the next attempt said "never recorded" of a change the store holds (a
    grant answered 503, neither absent nor undone)."""
    backend = SqliteBackend.open(tmp_path / "consent.sqlite3")
    real_commit = backend.store.commit
    disk = threading.Event()

    def slow_to_confirm(steps: Sequence[Step], abandon: Abandon | None = None) -> list[int | None]:
        ids = real_commit(steps, abandon)  # past its commit point: it is recorded, or will be
        disk.wait(10)
        return ids

    backend.store.commit = slow_to_confirm  # type: ignore[method-assign]
    loop = asyncio.get_running_loop()
    try:
        for hops in range(HOPS):
            disk.clear()
            change = f"c{hops}"
            # The store starts a change only with more than LOCK_MARGIN left (else "no time left", a
            # plain refusal): the deadline leaves the store thread half a second to get to it.
            with pytest.raises(InDoubt):
                await backend.commit([grant(f"10.0.0.{hops + 1}")], 0, change, time.monotonic() + LOCK_MARGIN + 0.5)
            resolving = loop.create_task(backend.resolve(change, 0))
            await asyncio.sleep(0.05)  # (waiting for the write now)
            disk.set()
            backend._doubtful[change].result(timeout=5)  # (the loop blocked: the outcome is on its way to it)
            for _ in range(hops):
                await asyncio.sleep(0)
            # What `within` does at the deadline: cancel the operation if it is not done, and leave it.
            given_up = resolving.cancel()
            (answered,) = await asyncio.gather(resolving, return_exceptions=True)
            if given_up:
                assert isinstance(answered, asyncio.CancelledError), f"cancellation dropped after {hops} iterations"
                assert await backend.resolve(change, 0) == {0: hops + 1}, f"outcome lost after {hops} iterations"
            else:
                assert answered == {0: hops + 1}
    finally:
        disk.set()
        await backend.close()


async def test_a_task_cancelled_as_the_change_lock_is_handed_to_it_ends_and_leaves_the_lock_free(
        tmp_path: Path) -> None:
    """The consent loops (sweeper, reconciler) are cancelled at shutdown, perhaps while waiting for
    the change lock. Cancelled as the lock is handed over, the wait took the lock and dropped the
    cancellation: the sweep ran on as if never cancelled, and a loop that then waited for more work
    kept shutdown waiting for it. It must end cancelled, with the lock free for the next change."""
    store = SqliteBackend.open(tmp_path / "consent.sqlite3")
    service = ConsentService(store, table(), CATALOG, Notice("1", "en", {"en": "the notice"}), ConsentConfig(),
                             Pairings("portal.test", 600.0))
    loop = asyncio.get_running_loop()
    try:
        for hops in range(HOPS):
            holder = asyncio.Event()
            release = asyncio.Event()

            async def hold(holder: asyncio.Event, release: asyncio.Event) -> None:
                async with service._locked(time.monotonic() + 10):
                    holder.set()
                    await release.wait()

            holding = loop.create_task(hold(holder, release))
            await holder.wait()
            sweeping = loop.create_task(service.sweep())
            await asyncio.sleep(0.01)  # (waiting for the lock now)
            release.set()
            for _ in range(hops):
                await asyncio.sleep(0)
            cancelled = sweeping.cancel()
            (outcome,) = await asyncio.gather(sweeping, return_exceptions=True)
            await holding
            if cancelled:
                assert isinstance(outcome, asyncio.CancelledError), f"cancellation dropped after {hops} iterations"
            async with asyncio.timeout(1):  # the lock is free: a change gets it at once
                async with service._locked(time.monotonic() + 1):
                    pass
    finally:
        await service.close()
