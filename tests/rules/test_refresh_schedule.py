"""The URL lists' refresh schedule ends when cancelled (at shutdown), even as a reload wakes it.

On Python 3.11 `asyncio.wait_for` returns when the wake-up and the cancellation land together and
drops the cancellation: the schedule went on to wait for the next refresh (hours), and shutdown
waited for it."""

from __future__ import annotations

import asyncio
from pathlib import Path

from dnsgate.config import Config, ListsConfig, ListSource
from dnsgate.consent.notice import Notice
from dnsgate.rules.list_sources import ListStore
from dnsgate.rules.reload import Reloader

HOPS = 8  # event-loop iterations swept after the wake-up


async def test_the_refresh_schedule_cancelled_as_a_reload_wakes_it_ends(tmp_path: Path) -> None:
    lists = ListsConfig(sources=(ListSource(id="remote", category="marketing", url="http://127.0.0.1:9/list.txt"),),
                        refresh_interval=3600.0)
    cfg = Config(lists=lists)
    store = ListStore(tmp_path / "lists")
    # Never checked, at time 0: the list is due in an hour, so the schedule waits (for an hour or a wake-up).
    reloader = Reloader(cfg, lambda: cfg, store, install=lambda new: None, notice=Notice("1", "en", {"en": "text"}),
                        wall=lambda: 0.0)
    loop = asyncio.get_running_loop()
    try:
        for hops in range(HOPS):
            schedule = loop.create_task(reloader.run_schedule())
            await asyncio.sleep(0.01)
            reloader._wake.set()  # what a reload does (the schedule may have changed)
            for _ in range(hops):
                await asyncio.sleep(0)
            cancelled = schedule.cancel()
            done, _ = await asyncio.wait({schedule}, timeout=2.0)
            assert schedule in done, f"still running 2 s after it was cancelled ({hops} iterations after the wake-up)"
            assert cancelled and schedule.cancelled()
    finally:
        if not schedule.done():
            schedule.cancel()
        await asyncio.gather(schedule, return_exceptions=True)
        await store.close()
