"""dns.workers > 1: the primary's side of its worker processes.

The primary (the process the user started: API, consent store, sweeper, query log, reloads,
metrics) answers DNS like every worker, and starts workers - 1 more processes (worker.py) that bind
the same addresses with SO_REUSEPORT; the kernel spreads clients over the processes by address and
port. Each worker has its own cache and upstream sockets, and a replica of the consent table
(replica.py) that receives every change of the primary's, in order:

- a consent change made through the API (or the sweeper, or a pairing) answers only once every
  worker has acknowledged it (`sync`), so it holds for the client's next query on every process; a
  worker that has not applied it within SYNC_TIMEOUT is killed (it is started again from a fresh
  copy) rather than left answering from an outdated table;
- reloads travel the same way, in order with consent changes;
- workers send back their query-log entries (every 0.1 s), their counts and kiosk activity (every
  second) and the pairing names they were asked; /metrics and the dashboard show the sum.

A worker that exits is started again after RESTART_DELAY (doubling while it keeps failing at
once); one that cannot start at all stops dnsgate's start with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import sys
import time
from collections.abc import Callable
from typing import Final

from .config import Config
from .dns_counts import DnsCounts
from .replica import INSTALL, JournaledTable, Start, merge_seen
from .ruleset import Ruleset
from .tally import LogEntry
from .worker_link import Link, LinkClosed

log = logging.getLogger(__name__)

SYNC_TIMEOUT: Final = 2.0  # for a running worker to apply a change
START_TIMEOUT: Final = 30.0  # for a worker to start and listen (imports, the ruleset, its sockets)
STOP_TIMEOUT: Final = 3.0
RESTART_DELAY: Final = 1.0
RESTART_DELAY_MAX: Final = 30.0
STEADY: Final = 10.0  # a worker that ran this long before exiting is restarted after RESTART_DELAY again


class WorkerError(Exception):
    """A worker could not start; the message names it and says why."""


@dataclasses.dataclass(slots=True, eq=False)
class Worker:
    number: int
    process: asyncio.subprocess.Process
    link: Link
    acked: int  # the last journal batch it applied
    ready: bool = False
    counts: DnsCounts | None = None
    started: float = dataclasses.field(default_factory=time.monotonic)


class Workers:
    def __init__(self, count: int, table: JournaledTable, start_state: Callable[[int], Start], *,
                 on_log: Callable[[list[LogEntry]], None], on_pair: Callable[[str, str], bool]) -> None:
        self.count = count  # processes besides the primary
        self.table = table
        self.start_state = start_state
        self.on_log = on_log
        self.on_pair = on_pair
        self.restarts = 0
        self._live: dict[int, Worker] = {}
        self._seq = 0  # journal batches sent
        self._changed = asyncio.Event()  # set whenever a worker acknowledges a batch or goes
        self._retired: DnsCounts | None = None  # what exited workers had counted
        self._closing = False
        self._stopping = asyncio.Event()  # set with _closing: cuts a restart's wait short
        self._flush_due = False
        self._tasks: list[asyncio.Task[None]] = []
        self._last: dict[int, Worker] = {}  # each number's latest process, live or not
        table.on_write = self._flush_soon

    # -- start and stop ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Start every worker; returns once each listens. Raises WorkerError if one cannot."""
        loop = asyncio.get_running_loop()
        first: list[asyncio.Future[None]] = []
        for number in range(1, self.count + 1):
            ready = loop.create_future()
            first.append(ready)
            self._tasks.append(loop.create_task(self._keep(number, ready)))
        try:
            await asyncio.wait_for(asyncio.gather(*first), START_TIMEOUT)
        except (TimeoutError, WorkerError) as exc:
            await self.close()
            raise WorkerError(str(exc) or f"workers did not listen within {START_TIMEOUT:g} s") from None

    async def close(self) -> None:
        """Ask every worker to stop (they send their last entries and counts), kill the slow ones."""
        self._closing = True
        self._stopping.set()
        self.flush()
        for worker in self._live.values():
            worker.link.send("stop")
        if self._tasks:
            _, late = await asyncio.wait(self._tasks, timeout=STOP_TIMEOUT)
            for worker in self._last.values():
                _kill(worker)
            for task in late:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    # -- the journal ------------------------------------------------------------------------------
    def install(self, rules: Ruleset, live: Config) -> None:
        """A reload: in the journal, before the consent table's own changes that come with it."""
        self.table.note(INSTALL, rules, live)

    def flush(self) -> None:
        """Send what the journal holds to every worker (one batch, numbered)."""
        self._flush_due = False
        ops = self.table.journal
        if not ops:
            return
        data = Link.pack("ops", self._seq + 1, ops)  # (before the journal is emptied: pickling may fail)
        self.table.journal = []
        self._seq += 1
        for worker in self._live.values():
            worker.link.write(data)

    def _flush_soon(self) -> None:
        if not self._flush_due:
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self.flush)

    async def sync(self) -> None:
        """Return once every worker has applied every change made so far, or was killed for not
        doing so in time (SYNC_TIMEOUT; START_TIMEOUT while it is still starting)."""
        self.flush()
        seq = self._seq

        def behind() -> list[Worker]:
            return [w for w in self._live.values() if w.acked < seq]

        lagging = behind()
        if not lagging:
            return
        loop = asyncio.get_running_loop()
        timeout = SYNC_TIMEOUT if all(w.ready for w in lagging) else START_TIMEOUT
        deadline = loop.time() + timeout
        while behind() and loop.time() < deadline:
            self._changed.clear()  # (no await since behind() was read: no acknowledgement missed)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), deadline - loop.time())
        late = behind()
        for worker in late:
            log.error("worker %d did not apply a consent change within %g s: killed (it starts again from a fresh "
                      "copy)", worker.number, timeout)
            self._drop(worker)
        if late:  # gone before the change is reported done: it answers nothing more
            await asyncio.wait([loop.create_task(w.process.wait()) for w in late], timeout=STOP_TIMEOUT)

    # -- what the metrics and health show ---------------------------------------------------------
    def counts(self) -> DnsCounts | None:
        """The sum of every worker's last counts (and of those that exited), or None before any came."""
        total = self._retired
        for worker in self._live.values():
            if worker.counts is not None:
                total = worker.counts if total is None else total.plus(worker.counts)
        return total

    def running(self) -> int:
        return sum(1 for w in self._live.values() if w.ready)

    def pids(self) -> list[int]:
        return [w.process.pid for w in self._live.values() if w.ready]

    # -- one worker's life ------------------------------------------------------------------------
    async def _keep(self, number: int, first_ready: asyncio.Future[None]) -> None:
        delay = RESTART_DELAY
        while not self._closing:
            try:
                worker = await self._spawn(number)
            except OSError as exc:
                if not first_ready.done():
                    first_ready.set_exception(WorkerError(f"worker {number}: cannot start: {exc}"))
                    return
                log.error("worker %d: cannot start: %s; trying again in %g s", number, exc, delay)
            else:
                try:
                    await self._serve(worker, first_ready)
                finally:
                    self._drop(worker)
                code = await worker.process.wait()
                if not first_ready.done():
                    first_ready.set_exception(WorkerError(f"worker {number} exited (code {code}) before it listened; "
                                                          "its reason is in the log above"))
                    return
                if self._closing:
                    return
                if time.monotonic() - worker.started >= STEADY:
                    delay = RESTART_DELAY
                log.error("worker %d exited (code %s); starting it again in %g s", number, code, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            if self._closing:
                return
            delay = min(delay * 2, RESTART_DELAY_MAX)
            self.restarts += 1

    async def _spawn(self, number: int) -> Worker:
        parent, child = socket.socketpair()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "dnsgate.worker", str(child.fileno()), pass_fds=(child.fileno(),),
                stdin=asyncio.subprocess.DEVNULL)
        except OSError:
            parent.close()
            raise
        finally:
            child.close()
        link = await Link.over(parent)
        # No await from here on: the copy and the journal's next batch leave in this order.
        self.flush()
        link.send("start", self.start_state(number))
        worker = self._live[number] = self._last[number] = Worker(number, process, link, acked=self._seq)
        return worker

    async def _serve(self, worker: Worker, first_ready: asyncio.Future[None]) -> None:
        """Read what the worker sends until its line closes."""
        with contextlib.suppress(LinkClosed):
            while True:
                message = await worker.link.receive()
                kind = message[0]
                if kind == "ack":
                    worker.acked = message[1]
                    self._changed.set()
                elif kind == "log":
                    self.on_log(message[1])
                elif kind == "counts":
                    worker.counts = message[1]
                    merge_seen(self.table.kiosk_seen, message[2])
                    worker.link.send("seen", self.table.kiosk_seen)
                elif kind == "pair":
                    self.on_pair(message[1], message[2])
                elif kind == "ready":
                    worker.ready = True
                    log.info("worker %d (pid %d) listening", worker.number, worker.process.pid)
                    if not first_ready.done():
                        first_ready.set_result(None)
                else:
                    log.error("worker %d sent an unknown message %r: killed", worker.number, kind)
                    return

    def _drop(self, worker: Worker) -> None:
        """No longer counted on: killed if still running (it must not answer from a table nobody updates)."""
        if self._live.get(worker.number) is not worker:
            return
        del self._live[worker.number]
        if not self._closing:  # (when closing, it is on its way out: close() kills it only if slow)
            _kill(worker)
        worker.link.close()
        if worker.counts is not None:  # its counters stay in the totals; its gauges go
            gone = dataclasses.replace(worker.counts, cache_entries=0, cache_bytes=0, in_flight=0, tcp_open=0)
            self._retired = gone if self._retired is None else self._retired.plus(gone)
        self._changed.set()


def _kill(worker: Worker) -> None:
    if worker.process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            worker.process.kill()
