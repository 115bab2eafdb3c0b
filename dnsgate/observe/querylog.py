"""The query log: what the pipeline decided, kept off the hot path.

The pipeline appends one tuple per query it is told to record (`tally.LogEntry`) to `pending`, a
plain list on the event loop. Every 0.1 s the loop takes the list, counts gated queries per
vendor, publishes gated decisions to the event hub and queues the batch; every `flush_interval`
(and before any read through the API) it hands the queue to one worker thread, which turns tuples
into rows (names, wall-clock times, the privacy mode) and writes them to SQLite in one transaction.
If more than `queue_size` entries wait for the writer, the excess is dropped, counted, and marked
in the file so a report over that time says its evidence is incomplete.

Privacy modes: `full` keeps every query; `anonymous` every query with the client replaced by a
keyed hash (the key lives in the data dir, so the same client keeps one pseudonym and an admin
can still filter by address), and of the consent behind an answer only that there was one (its
source), never the grant's times: those equal the consent log's, which names the address, so one
join would undo the pseudonym; `gated-only` only queries for gated names; `off` writes nothing
(gated decisions still reach the event stream).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import os
import secrets
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from operator import countOf
from pathlib import Path
from typing import Any, Self, TypeVar

from dnsgate.config import QueryLogConfig
from dnsgate.dns.tally import CACHED, FORWARDED, NAMED_TYPES, OUTCOMES, PROTOCOLS, SINKHOLED, STALE, LogEntry
from dnsgate.observe.events import EventHub, iso
from dnsgate.observe.querylog_db import Filters, QueryLogDb
from dnsgate.wire import NOERROR, NXDOMAIN, wire_to_text

log = logging.getLogger(__name__)
T = TypeVar("T")
DAY = 86_400.0
PRUNE_EVERY = 60.0  # seconds between retention passes
# Seconds between takes: take() costs ~0.3 µs per entry on the event loop, so a flood's second of
# entries (70 000) taken at once held DNS for 23 ms; taken every 0.1 s, for ~2 ms at a time.
TAKE_EVERY = 0.1
MAX_GATED_CLIENTS = 10_000
Row = dict[str, Any]
TEXT_MEMO = 16_384  # questions and clients whose text forms the writer remembers (a flood of random
# subdomains, as the bench's blocked workload asks ~9 000 names, otherwise turns every row's name into text)


_ANSWERED = frozenset((CACHED, FORWARDED, STALE))  # a gated query with a real answer: allowed


def _decision(outcome: int) -> str:
    """What a gated query's outcome means for its vendor: sinkholed, allowed, or the outcome."""
    return ("sinkholed" if outcome == SINKHOLED else
            "allowed" if outcome in (CACHED, FORWARDED, STALE) else OUTCOMES[outcome])


def type_name(qtype: int) -> str:
    return NAMED_TYPES.get(qtype) or f"TYPE{qtype}"


def name_of(question: bytes) -> str:
    """'trackcmp.net' from a question's wire bytes (lower case, no trailing dot; '.' for the root)."""
    text = wire_to_text(question[:-4].lower())
    return text[:-1] if len(text) > 1 else text


def load_key(path: Path) -> bytes:
    """The anonymisation key, created (0600) on first use: without it pseudonyms cannot be reversed."""
    try:
        return bytes.fromhex(path.read_text(encoding="ascii").strip())
    except (FileNotFoundError, ValueError):
        pass
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(key.hex() + "\n")
    return key


@dataclass(frozen=True, slots=True)
class Batch:
    entries: list[LogEntry]
    wall_offset: float  # wall-clock time minus monotonic time when the batch was taken
    dropped: int
    dropped_at: float = 0.0  # wall-clock time of the first query dropped: when the evidence has a gap


class QueryLog:
    def __init__(self, cfg: QueryLogConfig, db: QueryLogDb | None, hub: EventHub, *, key: bytes,
                 sinkhole_rcode: int, mono: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.mode = cfg.mode
        self.db = db if cfg.mode != "off" else None
        self.hub = hub
        self.key = key
        self.sinkhole_rcode = sinkhole_rcode
        self.mono = mono
        self.wall = wall
        self.pending: list[LogEntry] = []
        self._queue: list[Batch] = []
        self.queued = 0  # entries taken but not yet written
        self.written = 0
        self.dropped = 0
        self.write_errors = 0
        # gated queries per vendor id, by decision: "sinkholed", "allowed", "servfail"
        self.gated: dict[tuple[str, str], int] = {}
        # client -> monotonic times it last asked for a gated name and last had one answered (the
        # dashboard's clients that met a tracker, and those whose tracker queries were allowed)
        self._gated_clients: dict[str, tuple[float, float]] = {}
        self._lock = asyncio.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dnsgate-querylog")
        # The admin dashboard's aggregates scan the window (seconds over a million rows): on a thread
        # and connection of their own, so the writer never waits for them (nor drops entries meanwhile).
        self._aggregates = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dnsgate-querylog-read")
        self._reader: QueryLogDb | None = None
        self._last_prune = 0.0
        # The writer thread's memos: question bytes -> (name, type), client -> its label in the log.
        self._names: dict[bytes | None, tuple[str | None, str | None]] = {}
        self._labels: dict[str, str] = {}

    def sinks(self) -> tuple[Callable[[LogEntry], None], Callable[[LogEntry], None] | None]:
        """What a pipeline records into (`log_gated`, `log_all`): gated names always, every query in
        full/anonymous mode."""
        return self.pending.append, self.pending.append if self.mode in ("full", "anonymous") else None

    def client_label(self, client: str) -> str:
        """How the log shows a client address in this mode."""
        if self.mode != "anonymous":
            return client
        return "anon-" + hmac.new(self.key, client.encode(), hashlib.sha256).hexdigest()[:16]

    # ----------------------------------------------------------------------------------------
    # On the event loop

    def take(self) -> None:
        """Move pending entries to the writer's queue; count and publish the gated ones."""
        if not self.pending:
            return
        entries = self.pending[:]
        self.pending.clear()  # the same list object: the pipeline holds its bound append
        offset = self.wall() - self.mono()
        # This runs on the event loop that answers DNS, so per entry it does as little as it can: a
        # flood repeats one (vendor, outcome) pair (counted with two identity scans of its columns),
        # and gated-only mode records nothing but gated entries (no filtering pass).
        vendors = [entry[6] for entry in entries]
        outcomes = [entry[4] for entry in entries]
        n = len(entries)
        if countOf(vendors, vendors[0]) == n and countOf(outcomes, outcomes[0]) == n:
            counted: dict[tuple[tuple[str, str] | None, int], int] = {(vendors[0], outcomes[0]): n}
        else:
            counted = Counter(zip(vendors, outcomes, strict=True))
        answered, every_gated = False, True
        for (vendor, outcome), count in counted.items():
            if vendor is None:
                every_gated = False
                continue
            key = (vendor[0], _decision(outcome))
            self.gated[key] = self.gated.get(key, 0) + count
            answered = answered or outcome in _ANSWERED
        gated = entries if every_gated else [entry for entry in entries if entry[6] is not None]
        if gated:
            # per client, the last time it asked (and had such a query answered), in the order clients
            # asked: a later entry of a client overwrites its time, where it first stood
            last_seen = {entry[1]: entry[0] for entry in gated}
            last_allowed = {entry[1]: entry[0] for entry in gated if entry[4] in _ANSWERED} if answered else {}
            clients = self._gated_clients
            for client, at in last_seen.items():
                before = clients.pop(client, None)  # re-insert: the dict stays in last-seen order
                clients[client] = (at, last_allowed.get(client, before[1] if before is not None else -math.inf))
        if self.hub.subscribers or self.hub.webhook_url:
            for entry in entries:
                if entry[6] is not None:
                    self.hub.publish(self._decision_event(entry, _decision(entry[4]), offset))
        while len(self._gated_clients) > MAX_GATED_CLIENTS:
            del self._gated_clients[next(iter(self._gated_clients))]
        if self.db is None:
            return
        room = max(0, self.cfg.queue_size - self.queued)
        dropped = max(0, len(entries) - room)
        dropped_at = 0.0
        if dropped:
            dropped_at = entries[room][0] + offset
            entries = entries[:room]
            self.dropped += dropped
            log.warning("query log writer behind: dropped %d entries (querylog.queue_size=%d)", dropped,
                        self.cfg.queue_size)
        self._queue.append(Batch(entries, offset, dropped, dropped_at))
        self.queued += len(entries)

    def tracker_clients_since(self, mono: float) -> tuple[int, int]:
        """(clients that asked for a gated name since monotonic time `mono`, those of them that had
        such a query answered since then: allowed by their consent)."""
        seen = allowed = 0
        for last_seen, last_allowed in self._gated_clients.values():
            if last_seen >= mono:
                seen += 1
                allowed += last_allowed >= mono
        return seen, allowed

    def _decision_event(self, entry: LogEntry, decision: str, offset: float) -> dict[str, Any]:
        at, client, question, tcp, _outcome, _rcode, vendor, grant, _elapsed = entry
        assert vendor is not None
        assert question is not None
        return {"type": "decision", "at": iso(at + offset), "client": self.client_label(client),
                "name": name_of(question), "qtype": type_name((question[-4] << 8) | question[-3]),
                "protocol": PROTOCOLS[tcp], "vendor": vendor[0], "category": vendor[1],
                "decision": decision,
                "grant_expires_at": iso(grant.expires_at) if grant and self.mode != "anonymous" else None}

    async def flush(self) -> None:
        """Write everything recorded so far; returns once it is in the file (reads see it)."""
        self.take()
        async with self._lock:
            batches, self._queue = self._queue, []
            if not batches or self.db is None:
                return
            now = self.wall()
            prune = now - self._last_prune >= PRUNE_EVERY
            if prune:
                self._last_prune = now
            try:
                written = await self._in_thread(lambda: self._write(batches, now, prune))
            except Exception:
                self.write_errors += 1
                log.exception("query log write failed; %d entries lost", sum(len(b.entries) for b in batches))
                written = 0
            finally:
                self.queued -= sum(len(b.entries) for b in batches)
            self.written += written

    async def run(self) -> None:
        """Take pending entries every TAKE_EVERY and flush every `flush_interval`, until cancelled."""
        loop = asyncio.get_running_loop()
        flush_at = loop.time() + self.cfg.flush_interval
        while True:
            await asyncio.sleep(min(TAKE_EVERY, max(0.0, flush_at - loop.time())))
            if loop.time() >= flush_at:
                await self.flush()
                flush_at = loop.time() + self.cfg.flush_interval
            else:
                self.take()

    async def read(self, fn: Callable[[QueryLogDb], T]) -> T:
        """Run a read against the file on the writer's thread, after flushing."""
        await self.flush()
        if self.db is None:
            raise RuntimeError("the query log is off")
        db = self.db
        return await self._in_thread(lambda: fn(db))

    async def aggregate(self, fn: Callable[[QueryLogDb], T]) -> T:
        """Run a long read (the admin dashboard's) after flushing, on the reading thread's own
        read-only connection: it sees everything written so far and holds up no write."""
        await self.flush()
        if self.db is None:
            raise RuntimeError("the query log is off")
        path = self.db.path

        def run() -> T:
            if self._reader is None:
                self._reader = QueryLogDb(path, read_only=True)
            return fn(self._reader)

        return await asyncio.get_running_loop().run_in_executor(self._aggregates, run)

    async def entries(self, filters: Filters, limit: int, newest_first: bool = True) -> list[Row]:
        if self.mode == "anonymous" and filters.client is not None:
            filters = replace(filters, client=self.client_label(filters.client))
        return await self.read(lambda db: db.entries(filters, limit, newest_first))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.flush()
        reader, self._reader = self._reader, None
        if reader is not None:  # first: the writer's connection, closed last, checkpoints the WAL
            await asyncio.get_running_loop().run_in_executor(self._aggregates, reader.close)
        self._aggregates.shutdown(wait=True)
        if self.db is not None:
            db = self.db
            await self._in_thread(db.close)
        self._executor.shutdown(wait=True)

    async def _in_thread(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    # ----------------------------------------------------------------------------------------
    # On the writer thread

    def _write(self, batches: list[Batch], now: float, prune: bool) -> int:
        assert self.db is not None
        written = 0
        for batch in batches:
            rows = [self._row(entry, batch.wall_offset) for entry in batch.entries]
            self.db.insert(rows, batch.dropped, batch.dropped_at)
            written += len(rows)
        if prune:
            self.db.prune(now - self.cfg.max_age_days * DAY, self.cfg.max_rows)
        return written

    def _row(self, entry: LogEntry, offset: float) -> tuple[Any, ...]:
        """The entry as a row of querylog_db.COLUMNS (after "id"). A flood repeats a few questions
        and clients, so their text forms are memoized (bounded)."""
        at, client, question, tcp, outcome, rcode, vendor, grant, elapsed = entry
        if rcode < 0:
            rcode = self.sinkhole_rcode
        names = self._names
        name_type = names.get(question)
        if name_type is None:
            if len(names) >= TEXT_MEMO:
                names.clear()
            name_type = names[question] = (name_of(question), type_name((question[-4] << 8) | question[-3])) \
                if question is not None else (None, None)
        labels = self._labels
        label = labels.get(client)
        if label is None:
            if len(labels) >= TEXT_MEMO:
                labels.clear()
            label = labels[client] = self.client_label(client)
        timed = grant is not None and self.mode != "anonymous"  # (see the module's docstring)
        return (at + offset, label, name_type[0], name_type[1], PROTOCOLS[tcp], OUTCOMES[outcome], rcode,
                vendor[0] if vendor is not None else None, vendor[1] if vendor is not None else None,
                grant.granted_at if timed and grant else None, grant.expires_at if timed and grant else None,
                grant.source if grant is not None else None, round(elapsed * 1000, 3) if elapsed else None)


def sinkhole_rcode(mode: str) -> int:
    return NXDOMAIN if mode == "nxdomain" else NOERROR
