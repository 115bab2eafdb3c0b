"""Background tasks, owned one way: every task dnsgate starts is held by a `TaskSet` or runs inside
`background`, so none is dropped unreferenced (the event loop keeps only weak references) and each
ends with the part that started it.

- `TaskSet`: tasks started one by one as work arrives (a forward that outlives its first attempt, a
  pairing bind, a SIGHUP reload); `drain` waits for them at shutdown, then cancels the rest.
- `background(*coroutines)`: loops that run as long as a part runs (a sweeper, a refresh schedule,
  a sampler); leaving the block cancels them and waits until they are gone.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any


class TaskSet:
    """Background tasks we own: kept referenced, awaited or cancelled at shutdown."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def __len__(self) -> int:
        return len(self._tasks)

    async def drain(self, timeout: float) -> int:
        """Wait up to `timeout` for running tasks, then cancel the rest; returns how many were cancelled."""
        if not self._tasks:
            return 0
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        return len(pending)


@asynccontextmanager
async def background(*coros: Coroutine[Any, Any, None]) -> AsyncIterator[None]:
    """Run each coroutine as a task while the block runs; on leaving it, cancel them and wait."""
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(coro) for coro in coros]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
