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

from dnsgate.consent.backend import InDoubt
from dnsgate.consent.model import Subject
from dnsgate.consent.records import Event, Step
from dnsgate.consent.sqlite_store import Abandon, SqliteBackend

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
            with pytest.raises(InDoubt):
                await backend.commit([grant(f"10.0.0.{hops + 1}")], 0, change, time.monotonic() + 0.3)
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

