"""The primary's wait for its workers to apply a consent change, cancelled as a worker acknowledges.

The change that waits may be the consent reconciler's, cancelled at shutdown; on Python 3.11
`asyncio.wait_for` returns when the acknowledgement and the cancellation land together and drops the
cancellation, and the reconciler, waiting for more work afterwards, would hold shutdown for good."""

from __future__ import annotations

import asyncio
import socket

from dnsgate.consent.model import ProfileMap
from dnsgate.workers.link import Link
from dnsgate.workers.replica import JournaledTable, Start
from dnsgate.workers.supervisor import Worker, Workers
from tests.support.consent_fixtures import CATALOG, NOTICE

HOPS = 8  # event-loop iterations swept after the acknowledgement


def no_start(number: int) -> Start:
    raise AssertionError("no worker is started here")


async def test_a_sync_cancelled_as_a_worker_acknowledges_ends_cancelled() -> None:
    workers = Workers(1, JournaledTable(CATALOG.vendors, ProfileMap("opt-in"), NOTICE), no_start,
                      on_log=lambda entries: None, on_pair=lambda http, dns: False)
    # A listening worker that has not applied the latest batch: a process that only waits, on a link.
    process = await asyncio.create_subprocess_exec("sleep", "30")
    ours, theirs = socket.socketpair()
    link = await Link.over(ours)
    worker = Worker(1, process, link, acked=0, listen_from=0, ready=True)
    workers._live[1] = worker
    loop = asyncio.get_running_loop()
    try:
        for hops in range(HOPS):
            workers._seq += 1  # a consent change sent
            syncing = loop.create_task(workers.sync())
            await asyncio.sleep(0.01)  # (waiting for the worker now)
            assert not syncing.done()
            worker.acked = workers._seq  # its acknowledgement, as the link's reader records it
            workers._changed.set()
            for _ in range(hops):
                await asyncio.sleep(0)
            cancelled = syncing.cancel()
            (outcome,) = await asyncio.gather(syncing, return_exceptions=True)
            if cancelled:
                assert isinstance(outcome, asyncio.CancelledError), f"cancellation dropped after {hops} iterations"
            else:
                assert outcome is None
            assert process.returncode is None  # (not taken for a lagging worker and killed)
    finally:
        process.kill()
        await process.wait()
        link.writer.close()
        theirs.close()
