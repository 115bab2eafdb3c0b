"""dns.workers > 1: the primary's side of its worker processes.

The primary (the process the user started: API, consent store, sweeper, query log, reloads,
metrics) answers DNS like every worker, and starts workers - 1 more processes (app/worker.py) that bind
the same addresses with SO_REUSEPORT; the kernel spreads clients over the processes by address and
port. Each worker has its own cache and upstream sockets, and a replica of the consent table
(workers/replica.py) that receives every change of the primary's, in order:

- a worker starts from a copy of the table, builds its DNS side, and binds only when told "listen",
  which follows every change sent before it: so it answers nothing it has not applied;
- a consent change made through the API (or the sweeper, or a pairing) answers only once every
  worker that may answer has acknowledged it (`sync`), so it holds for the client's next query on
  every process; one that has not applied it within SYNC_TIMEOUT is killed (and started again from a
  fresh copy) rather than left answering from an outdated table. A worker still starting is not
  waited for: it applies the change before it listens;
- reloads travel the same way, in order with consent changes;
- the primary pings every listening worker each HEARTBEAT; one that leaves a ping unanswered at
  the next is not counted as listening (/healthz, /metrics), and one that misses HUNG_BEATS in a row
  is killed and started again at once, whether or not consent changes;
- workers send back their query-log entries (every 0.1 s), their counts and kiosk activity (every
  second) and the pairing names they were asked; /metrics and the dashboard show the sum.

A worker that exits is started again after RESTART_DELAY (doubling while it keeps failing at
once); one that cannot start at all stops dnsgate's start with the reason. Workers die with the
primary (app/worker.py); the data dir's record of them (workers/record.py) lets the next start end any
that did not.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from dnsgate.config import Config
from dnsgate.dns.counts import DnsCounts
from dnsgate.dns.tally import LogEntry
from dnsgate.rules.ruleset import Ruleset
from dnsgate.workers import record as worker_record
from dnsgate.workers.link import Link, LinkClosed
from dnsgate.workers.replica import INSTALL, JournaledTable, Start

log = logging.getLogger(__name__)

SYNC_TIMEOUT: Final = 2.0  # for a worker that may answer to apply a change
START_TIMEOUT: Final = 30.0  # for a worker to start and listen (imports, the ruleset, its sockets)
STOP_TIMEOUT: Final = 3.0
HEARTBEAT: Final = 1.0  # seconds between the primary's pings
HUNG_BEATS: Final = 2  # pings missed in a row before a worker is replaced
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
    listen_from: int | None = None  # told to listen after this batch (it may answer from then on)
    ready: bool = False  # it said it listens
    pinged: bool = False  # a ping is unanswered
    missed: int = 0  # heartbeats missed in a row
    replaced: bool = False  # killed by the primary for being late: started again at once
    counts: DnsCounts | None = None
    started: float = dataclasses.field(default_factory=time.monotonic)

    def lags(self, seq: int) -> bool:
        """May it answer before it applies batch `seq`? (Batches up to `listen_from` it applies first.)"""
        return self.listen_from is not None and self.listen_from < seq and self.acked < seq

    @property
    def listening(self) -> bool:
        return self.ready and not self.missed


class Workers:
    def __init__(self, count: int, table: JournaledTable, start_state: Callable[[int], Start], *,
                 on_log: Callable[[list[LogEntry]], None], on_pair: Callable[[str, str], bool],
                 record: Path | None = None) -> None:
        self.count = count  # processes besides the primary
        self.table = table
        self.start_state = start_state
        self.on_log = on_log
        self.on_pair = on_pair
        self.record = record  # (workers/record.py) None: none kept
        self.restarts = 0
        self._live: dict[int, Worker] = {}
        self._seq = 0  # journal batches sent
        self._changed = asyncio.Event()  # set whenever a worker acknowledges a batch or goes
        self._retired: DnsCounts | None = None  # what exited workers had counted
        self._closing = False
        self._stopping = asyncio.Event()  # set with _closing: cuts a restart's wait short
        self._flush_due = False
        self._tasks: list[asyncio.Task[None]] = []
        self._heartbeat: asyncio.Task[None] | None = None
        self._last: dict[int, Worker] = {}  # each number's latest process, live or not
        self._record_failed = False

    # -- start and stop ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Start every worker; returns once each listens. Raises WorkerError if one cannot."""
        if self.record is not None:
            ended = await asyncio.to_thread(worker_record.end_leftovers, self.record)
            if ended:
                log.warning("ended %d worker process(es) an earlier dnsgate on this data dir left running "
                            "(pids %s)", len(ended), ", ".join(map(str, ended)))
        loop = asyncio.get_running_loop()
        first: list[asyncio.Future[None]] = []
        for number in range(1, self.count + 1):
            ready = loop.create_future()
            first.append(ready)
            self._tasks.append(loop.create_task(self._keep(number, ready)))
        self._heartbeat = loop.create_task(self._beat())
        try:
            await asyncio.wait_for(asyncio.gather(*first), START_TIMEOUT)
        except (TimeoutError, WorkerError) as exc:
            await self.close()
            raise WorkerError(str(exc) or f"workers did not listen within {START_TIMEOUT:g} s") from None

    async def close(self) -> None:
        """Ask every worker to stop (they send their last entries and counts), kill the slow ones."""
        self._closing = True
        self._stopping.set()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
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
        if self.record is not None:
            with contextlib.suppress(OSError):
                self.record.unlink(missing_ok=True)

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

    def flush_soon(self) -> None:
        if not self._flush_due:
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self.flush)

    async def sync(self) -> None:
        """Return once every worker that may answer has applied every change made so far, or is gone:
        one that has not within SYNC_TIMEOUT is killed. A worker still starting is not waited for (it
        applies them before it listens), so none holds a change longer than SYNC_TIMEOUT."""
        self.flush()
        seq = self._seq
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SYNC_TIMEOUT
        waited: set[Worker] = set()
        while True:
            lagging = [w for w in self._live.values() if w.lags(seq)]
            waited.update(lagging)
            if not lagging or loop.time() >= deadline:
                break
            self._changed.clear()  # (no await since lags() was read: no acknowledgement missed)
            # Waited for in this task, not in asyncio.wait_for's, which (Python 3.11) drops a
            # cancellation that lands with an acknowledgement: the change's task went on.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await self._changed.wait()
        for worker in lagging:
            log.error("worker %d did not apply a consent change within %g s: killed (it starts again from a fresh "
                      "copy)", worker.number, SYNC_TIMEOUT)
            self._replace(worker)
        # Gone before the change is reported done (killed here or by the heartbeat): it answers nothing more.
        exiting = [loop.create_task(w.process.wait()) for w in waited
                   if w.process.returncode is None and self._live.get(w.number) is not w]
        if exiting:
            await asyncio.wait(exiting, timeout=STOP_TIMEOUT)

    # -- what the metrics and health show ---------------------------------------------------------
    def counts(self) -> DnsCounts | None:
        """The sum of every worker's last counts (and of those that exited), or None before any came."""
        total = self._retired
        for worker in self._live.values():
            if worker.counts is not None:
                total = worker.counts if total is None else total.plus(worker.counts)
        return total

    def running(self) -> int:
        """Workers listening and answering the heartbeat."""
        return sum(1 for w in self._live.values() if w.listening)

    def pids(self) -> list[int]:
        return [w.process.pid for w in self._live.values() if w.listening]

    # -- the heartbeat ----------------------------------------------------------------------------
    async def _beat(self) -> None:
        """Ping every listening worker each HEARTBEAT; a ping still unanswered at the next is a missed
        beat, and HUNG_BEATS in a row get the worker replaced (a stopped or hung process answers no
        query either: the clients the kernel hands it would go unanswered)."""
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            due += HEARTBEAT
            await asyncio.sleep(due - loop.time())
            if loop.time() - due > HEARTBEAT / 2:  # this process did not run meanwhile: pongs may wait unread
                due = loop.time()
                continue
            for worker in list(self._live.values()):
                if not worker.ready:
                    continue  # still starting: START_TIMEOUT bounds it
                if worker.pinged:
                    worker.missed += 1
                    if worker.missed >= HUNG_BEATS:
                        log.error("worker %d (pid %d) missed %d heartbeats: killed (it starts again from a fresh "
                                  "copy)", worker.number, worker.process.pid, worker.missed)
                        self._replace(worker)
                    continue
                worker.pinged = True
                worker.link.send("ping")

    # -- one worker's life ------------------------------------------------------------------------
    async def _keep(self, number: int, first_ready: asyncio.Future[None]) -> None:
        delay = RESTART_DELAY
        while not self._closing:
            wait = delay
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
                self._write_record()
                if not first_ready.done():
                    first_ready.set_exception(WorkerError(f"worker {number} exited (code {code}) before it listened; "
                                                          "its reason is in the log above"))
                    return
                if self._closing:
                    return
                if worker.replaced:
                    wait = 0.0  # (its backoff stays as it was)
                else:
                    if time.monotonic() - worker.started >= STEADY:
                        delay = wait = RESTART_DELAY
                    log.error("worker %d exited (code %s); starting it again in %g s", number, code, delay)
            if wait:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), wait)
                delay = min(delay * 2, RESTART_DELAY_MAX)
            if self._closing:
                return
            self.restarts += 1

    async def _spawn(self, number: int) -> Worker:
        parent, child = socket.socketpair()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "dnsgate.app.worker", str(child.fileno()), str(os.getpid()),
                pass_fds=(child.fileno(),), stdin=asyncio.subprocess.DEVNULL)
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
        self._write_record()
        return worker

    async def _serve(self, worker: Worker, first_ready: asyncio.Future[None]) -> None:
        """Read what the worker sends until its line closes; kill it if it does not listen in time."""
        too_slow = asyncio.get_running_loop().call_later(START_TIMEOUT, self._not_started, worker)
        try:
            with contextlib.suppress(LinkClosed):
                while True:
                    message = await worker.link.receive()
                    kind = message[0]
                    if kind == "ack":
                        worker.acked = message[1]
                        self._changed.set()
                    elif kind == "pong":
                        worker.pinged = False
                        worker.missed = 0
                    elif kind == "log":
                        self.on_log(message[1])
                    elif kind == "counts":
                        worker.counts = message[1]
                        self.table.merge_seen(message[2])
                        worker.link.send("seen", self.table.kiosk_seen)
                    elif kind == "pair":
                        self.on_pair(message[1], message[2])
                    elif kind == "built":
                        # Every change so far goes before "listen": in force before its first answer.
                        self.flush()
                        worker.link.send("listen")
                        worker.listen_from = self._seq
                    elif kind == "ready":
                        worker.ready = True
                        too_slow.cancel()
                        log.info("worker %d (pid %d) listening", worker.number, worker.process.pid)
                        if not first_ready.done():
                            first_ready.set_result(None)
                    else:
                        log.error("worker %d sent an unknown message %r: killed", worker.number, kind)
                        return
        finally:
            too_slow.cancel()

    def _not_started(self, worker: Worker) -> None:
        if not worker.ready and self._live.get(worker.number) is worker:
            log.error("worker %d did not listen within %g s: killed", worker.number, START_TIMEOUT)
            self._drop(worker)

    def _replace(self, worker: Worker) -> None:
        worker.replaced = True
        self._drop(worker)

    def _drop(self, worker: Worker) -> None:
        """No longer counted on: killed if still running (it must not answer from a table nobody updates)."""
        if self._live.get(worker.number) is not worker:
            return
        del self._live[worker.number]
        if not self._closing:  # (when closing, it is on its way out: close() kills it only if slow)
            _kill(worker)
        worker.link.close()
        if worker.counts is not None:  # its counters stay in the totals; its gauges go
            gone = dataclasses.replace(worker.counts, cache_entries=0, cache_bytes=0, in_flight=0, tcp_open=0,
                                       short_now=0)
            self._retired = gone if self._retired is None else self._retired.plus(gone)
        self._changed.set()

    def _write_record(self) -> None:
        """The data dir's record of the worker processes alive (workers/record.py)."""
        if self.record is None:
            return
        processes = [worker_record.started(w.process.pid) for w in self._last.values() if w.process.returncode is None]
        primary = worker_record.started(os.getpid())
        if primary is None:
            return  # (no /proc: nothing to record a process by)
        try:
            worker_record.write(self.record, primary, [p for p in processes if p is not None])
        except OSError as exc:
            if not self._record_failed:
                self._record_failed = True
                log.warning("cannot record the worker processes in %s (%s): a later start cannot end any that "
                            "outlive this dnsgate", self.record, exc.strerror or exc)


def _kill(worker: Worker) -> None:
    if worker.process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            worker.process.kill()
