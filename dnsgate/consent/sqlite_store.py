"""Durable consent: the choices in force and the append-only event log, in SQLite via sqlite-utils.

`ConsentStore` is synchronous by design; `SqliteBackend` puts it behind the storage protocol
(backend.py) and calls it from one worker thread, never from the event loop or the query path.
Every change is one transaction (events + the choices they make or end) in WAL mode, so an
acknowledged change survives kill -9 (and with storage.synchronous = "full", the default, a power
cut too), and a half-written one never exists.

The event log is the proof of consent (GDPR Art. 7(1)): triggers refuse any UPDATE, and any
DELETE except retention's purge of events older than its cut-off that no choice in force rests on.

Schema history: version 1 (the first consent store) had `grants` (client, category) and a smaller `events` table;
opening such a file migrates it in place, in one transaction: new event columns are added (old
rows keep what they recorded), each client's grants become one choice that points at the grant
event it came from, and `grants` is dropped.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor, Future
from pathlib import Path
from queue import SimpleQueue
from typing import Any, Final, TypeVar

import sqlite_utils

from dnsgate.consent.backend import EXPORT_PAGE, ChangeSink, InDoubt, Recorded, Snapshot, within
from dnsgate.consent.model import Choice, NoticeRef, Subject
from dnsgate.consent.records import Event, EventFilter, Step, StoreError

T = TypeVar("T")
log = logging.getLogger(__name__)
SQLITE_FILE: Final = "consent.sqlite3"  # in the data dir
SCHEMA_VERSION: Final = 3
BUSY_TIMEOUT: Final = 2.0
# A change's wait for a lock is rounded down to this (ms), so that the changes of the same few
# moments ask SQLite for the same busy_timeout and the PRAGMA is run only when it changes
LOCK_WAIT_STEP: Final = 100
CACHE_KIB: Final = 512  # the store connection's page cache
LOCK_MARGIN: Final = 0.25
CHECK_WITHIN: Final = 10.0  # seconds PRAGMA quick_check may take at start before it is given up

EVENT_COLUMNS: Final[dict[str, type]] = {
    # version 1
    "id": int, "at": float, "client": str, "action": str, "categories": str, "expires_at": float,
    "source": str, "user_agent": str,
    # version 2
    "mac": str, "network": str, "profile": str, "decisions": str, "notice_catalog": str,
    "notice_version": str, "notice_sha256": str, "language": str, "channel": str, "sec_gpc": str,
    "supersedes": int, "reason": str,
    # version 3: the items covered (JSON: item key -> fingerprint), the terms' SHA-256, the operator (JSON),
    # since when Global Privacy Control applies (a column added where a file lacks it)
    "items": str, "terms": str, "operator": str, "gpc_seen_at": float,
}
NEW_EVENT_COLUMNS: Final = tuple(list(EVENT_COLUMNS)[8:])
CHOICE_COLUMNS: Final[dict[str, type]] = {
    "id": int, "address": str, "mac": str, "network": str, "categories": str, "vendors": str,
    "made_at": float, "expires_at": float, "notice_catalog": str, "notice_version": str,
    "notice_sha256": str, "language": str, "channel": str, "profile": str, "sec_gpc": str,
    # version 3
    "items": str, "terms": str, "gpc_seen_at": float,
}
NEW_CHOICE_COLUMNS: Final = ("items", "terms", "gpc_seen_at")
NO_UPDATE: Final = ("CREATE TRIGGER IF NOT EXISTS events_no_update BEFORE UPDATE ON events "
                    "BEGIN SELECT RAISE(ABORT, 'the consent log is append-only'); END")
NO_DELETE: Final = (
    "CREATE TRIGGER events_no_delete BEFORE DELETE ON events "
    "WHEN OLD.at >= (SELECT COALESCE(MAX(purge_before), 0) FROM retention_runs) "
    "OR OLD.id IN (SELECT id FROM choices) "
    "BEGIN SELECT RAISE(ABORT, 'the consent log is append-only (only retention purges old events)'); END"
)


class Abandon:
    """A change's deadline, shared by the thread that writes it and the caller waiting for it. The
    caller gives up (`now`) only while the transaction has not begun to commit, and the writer checks
    (`commit_point`) before it commits: a change given up on is rolled back, never recorded after
    its answer."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline  # time.monotonic()
        self._lock = threading.Lock()
        self._given_up = False
        self._committing = False

    def now(self) -> bool:
        """Give up; False if it is too late (the transaction is committing)."""
        with self._lock:
            if self._committing:
                return False
            self._given_up = True
            return True

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def commit_point(self) -> None:
        with self._lock:
            if self._given_up or self.remaining() <= 0:
                raise _GivenUp
            self._committing = True


class _GivenUp(Exception):
    pass


def quick_check(conn: sqlite3.Connection, within: float = CHECK_WITHIN) -> str:
    """PRAGMA quick_check: "ok", what it found wrong (its first lines), or "" if it could not finish
    within `within` seconds (a very large file: nothing is known either way)."""
    limit = time.monotonic() + within
    conn.set_progress_handler(lambda: int(time.monotonic() > limit), 10_000)
    try:
        rows = [str(r[0]) for r in conn.execute("PRAGMA quick_check(5)").fetchall()]
    except sqlite3.OperationalError as exc:  # (locked, unreadable: not a verdict on the pages)
        if "interrupt" in str(exc):
            return ""
        raise
    except sqlite3.DatabaseError as exc:  # so damaged that the check itself stops
        return str(exc)
    finally:
        conn.set_progress_handler(None, 0)
    return "ok" if rows == ["ok"] else "; ".join(rows)


class ConsentStore:
    def __init__(self, path: Path, synchronous: str = "full") -> None:
        self.path = path
        self._inserts: dict[tuple[str, tuple[str, ...]], str] = {}
        # Transactions that recorded changes, and the changes they recorded (several per transaction
        # where changes arrive together: `commit_group`); groups that failed whole and were retried.
        self.commits = 0
        self.changes_committed = 0
        self.groups_broken = 0
        self.checked = ""  # quick_check's verdict at open: "ok", or "" if it did not finish in time
        self._busy_ms = int(BUSY_TIMEOUT * 1000)  # the connection's busy_timeout now
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # A lock held elsewhere is waited for BUSY_TIMEOUT, then the change fails (503), unapplied.
            conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=BUSY_TIMEOUT)
            # execute_plugins=False: no scan of every installed package for sqlite-utils plugins at
            # open (none is wanted on the consent log, and the scan's metadata stays in memory)
            self.db = sqlite_utils.Database(conn, execute_plugins=False)
            # A damaged page (the evidence log's, retention's) must not pass for a store that works
            # until the first write reaches it: the file is checked before anything is loaded.
            verdict = quick_check(conn)
            if verdict not in ("ok", ""):
                conn.close()
                raise StoreError(f"{path}: the database is damaged (quick_check: {verdict})")
            self.checked = verdict
            self.db.enable_wal()
            self.db.execute(f"PRAGMA synchronous={'NORMAL' if synchronous == 'normal' else 'FULL'}")
            # SQLite's page cache holds up to 2 MiB by default (~200 bytes a client at 10 000 choices):
            # a change touches a few pages and the start reads the file once, so 512 KiB serves them
            self.db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
            self._migrate()
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"{path}: {exc}") from exc

    # -- schema ------------------------------------------------------------------------------------
    def _migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(f"schema version {version} is newer than this dnsgate ({SCHEMA_VERSION}); upgrade dnsgate")
        with self.db.atomic():
            self._table("events", EVENT_COLUMNS, NEW_EVENT_COLUMNS)
            self.db.execute("CREATE INDEX IF NOT EXISTS events_client ON events(client, at)")
            self.db.execute("CREATE INDEX IF NOT EXISTS events_at ON events(at)")
            # (a version 2 file: its choices name no items until the service migrates them)
            self._table("choices", CHOICE_COLUMNS, NEW_CHOICE_COLUMNS)
            self.db.table("pairings").create({"http": str, "dns": str, "at": float}, pk=("http", "dns"),
                                             if_not_exists=True)
            self.db.table("retention_runs").create(
                {"id": int, "at": float, "purge_before": float, "deleted": int}, pk="id", if_not_exists=True)
            if self.db.table("grants").exists():
                self._grants_to_choices()
            self.db.execute(NO_UPDATE)
            self.db.execute("DROP TRIGGER IF EXISTS events_no_delete")
            self.db.execute(NO_DELETE)
            self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _table(self, name: str, columns: Mapping[str, type], added_later: Iterable[str]) -> None:
        """Create the table, or add the columns a file from an earlier dnsgate lacks (its rows keep NULL)."""
        table = self.db.table(name)
        if not table.exists():
            table.create(dict(columns), pk="id")
            return
        for column in added_later:
            if column not in table.columns_dict:
                table.add_column(column, columns[column])

    def _grants_to_choices(self) -> None:
        """Version 1's grants become choices (granted categories, no notice recorded), then go."""
        clients: dict[str, list[dict[str, Any]]] = {}
        for row in self.db.table("grants").rows:
            clients.setdefault(row["client"], []).append(row)
        for client, rows in clients.items():
            self.db.table("choices").insert({
                "id": max(r["event_id"] for r in rows), "address": client,
                "categories": json.dumps({r["category"]: True for r in rows}), "vendors": "{}",
                "made_at": max(r["granted_at"] for r in rows), "expires_at": max(r["expires_at"] for r in rows),
                "channel": "admin" if rows[0]["source"] == "admin" else "device", "profile": "opt-in",
            }, replace=True)
        self.db.table("grants").drop()

    # -- reading -----------------------------------------------------------------------------------
    def load(self) -> list[Choice]:
        """Every choice in force, oldest first."""
        try:
            return [_choice(row) for row in self.db.table("choices").rows_where(order_by="made_at, id")]
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from exc

    def load_pairings(self) -> list[tuple[str, str, float]]:
        """(HTTP subject key, DNS client key, when) of every pairing."""
        try:
            return [(r["http"], r["dns"], r["at"]) for r in self.db.table("pairings").rows]
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from exc

    def pairings_of(self, http: str) -> dict[str, float]:
        """The DNS client keys paired with one HTTP subject, and when."""
        try:
            return {r["dns"]: r["at"] for r in self.db.table("pairings").rows_where("http = ?", [http])}
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from exc

    def events(self, address: str | None = None, limit: int = 100) -> list[Event]:
        where, args = ("client = ? OR mac = ?", [address, address]) if address else (None, [])
        try:
            rows: Iterable[dict[str, Any]] = self.db.table("events").rows_where(where, args, order_by="id desc",
                                                                               limit=limit)
            return [_event(r) for r in rows]
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from exc

    def export_page(self, f: EventFilter, after_id: int, limit: int) -> list[Event]:
        """Events with id > after_id matching `f` (except its network), oldest first."""
        clauses, args = ["id > ?"], [after_id]
        if f.since is not None:
            clauses.append("at >= ?")
            args.append(f.since)  # type: ignore[arg-type]
        if f.until is not None:
            clauses.append("at < ?")
            args.append(f.until)  # type: ignore[arg-type]
        if f.address is not None:
            clauses.append("client = ?")
            args.append(f.address)  # type: ignore[arg-type]
        if f.mac is not None:
            clauses.append("mac = ?")
            args.append(f.mac)  # type: ignore[arg-type]
        try:
            rows = self.db.table("events").rows_where(" AND ".join(clauses), args, order_by="id", limit=limit)
            return [_event(r) for r in rows]
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from exc

    def count_events(self) -> int:
        return self.db.table("events").count

    # -- writing -----------------------------------------------------------------------------------
    def commit(self, steps: Sequence[Step], abandon: Abandon | None = None) -> list[int | None]:
        """Apply `steps` in one transaction; each step's event id, or None where it was skipped.

        With `abandon`, the wait for a lock ends at its deadline, and the transaction commits only
        if the caller has not given up by then (else it rolls back: StoreError)."""
        ids: list[int | None] = []
        conn = self.db.conn  # plain sqlite3 on the change's path: sqlite-utils' wrappers cost it Python, not safety
        if abandon is not None:
            # A lock held elsewhere is waited for until shortly before the deadline, so that SQLite
            # itself says why ("database is locked") and the caller is answered in time.
            wait = abandon.remaining() - LOCK_MARGIN
            if wait <= 0:
                raise StoreError(f"{self.path}: no time left for the change")
            self.wait_for_locks(wait)
        try:
            conn.execute("BEGIN")
            try:
                for step in steps:
                    ids.append(self._apply(step))
                if abandon is not None:
                    abandon.commit_point()
                conn.commit()  # (the COMMIT in one call: no cursor, one release of the GIL instead of five)
            except BaseException:
                if conn.in_transaction:  # (a trigger's RAISE(ROLLBACK) or a failed COMMIT may have ended it)
                    conn.execute("ROLLBACK")
                raise
        except _GivenUp:
            raise StoreError(f"{self.path}: the change was not written in time; rolled back") from None
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from exc
        self.commits += 1
        self.changes_committed += 1
        return ids

    def commit_group(self, changes: Sequence[tuple[Sequence[Step], Abandon]]) -> list[list[int | None] | StoreError]:
        """Several changes in one transaction, so one fsync makes them all durable; what `commit`
        returns or raises for each, in order.

        Each change is applied in a savepoint of its own: one whose steps fail (a constraint) or
        whose caller gave up is rolled back alone and the others commit. If the transaction as a
        whole fails (the lock not had in time: every change would wait for it; a full disk or an
        I/O error at the commit), nothing of it is stored, and each change is tried again in a
        transaction of its own, so that a change that cannot be written fails only itself."""
        if len(changes) == 1:
            try:
                return [self.commit(*changes[0])]
            except StoreError as exc:
                return [exc]
        results: list[list[int | None] | StoreError | None] = [None] * len(changes)
        live: list[int] = []
        for i, (_, abandon) in enumerate(changes):
            if abandon.remaining() - LOCK_MARGIN <= 0:
                results[i] = StoreError(f"{self.path}: no time left for the change")
            else:
                live.append(i)
        if live:
            # As in `commit`: a lock held elsewhere is waited for until shortly before the first deadline.
            wait = min(changes[i][1].remaining() for i in live) - LOCK_MARGIN
            conn = self.db.conn
            self.wait_for_locks(wait)
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                for i in live:
                    results[i] = StoreError(f"{self.path}: {exc}")
                live = []
            broken = False
            applied: list[int] = []
            for i in live:
                steps, abandon = changes[i]
                conn.execute(f"SAVEPOINT change_{i}")
                try:
                    ids = [self._apply(step) for step in steps]
                    abandon.commit_point()
                except (_GivenUp, sqlite3.Error) as exc:
                    if not conn.in_transaction:  # (SQLite rolled the whole transaction back)
                        broken = True
                        break
                    conn.execute(f"ROLLBACK TO change_{i}")
                    conn.execute(f"RELEASE change_{i}")
                    results[i] = StoreError(f"{self.path}: the change was not written in time; rolled back"
                                            if isinstance(exc, _GivenUp) else f"{self.path}: {exc}")
                    continue
                conn.execute(f"RELEASE change_{i}")
                results[i] = ids
                applied.append(i)
            if live and not broken:
                try:
                    conn.commit()
                    self.commits += 1
                    self.changes_committed += len(applied)
                except sqlite3.Error:
                    broken = True
            if broken:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                self.groups_broken += 1
                for i in live:
                    if i in applied or results[i] is None:
                        try:
                            results[i] = self.commit(*changes[i])
                        except StoreError as exc:
                            results[i] = exc
        return [r if r is not None else StoreError(f"{self.path}: not attempted") for r in results]

    def wait_for_locks(self, seconds: float) -> None:
        """How long SQLite waits for a lock held elsewhere (busy_timeout), at most `seconds`. Set only
        when it changes: every statement is a wait for the GIL on the store's thread, which shares the
        event loop's core; changes ask for their deadline, everything else for BUSY_TIMEOUT."""
        ms = max(1, int(seconds * 1000))
        if ms > LOCK_WAIT_STEP:
            ms -= ms % LOCK_WAIT_STEP
        if ms != self._busy_ms:
            self.db.conn.execute(f"PRAGMA busy_timeout={ms}")
            self._busy_ms = ms

    def _apply(self, step: Step) -> int | None:
        if step.only_if_current is not None and not self._current(step.only_if_current):
            return None
        e = step.event
        row = _event_row(e)
        event_id = self._insert("events", row)
        for ended in step.ends:
            self.db.conn.execute("DELETE FROM choices WHERE id = ?", [ended])
        if step.makes_choice:
            self._insert("choices", _choice_row_of(e, event_id, row))
        if step.pairing is not None:
            self.db.table("pairings").insert({"http": step.pairing[0], "dns": step.pairing[1], "at": e.at},
                                             replace=True)
        if step.sets_profile_of is not None:  # (and the lifetime under it: an opt-out may stand no more)
            self.db.execute("UPDATE choices SET profile = ?, expires_at = COALESCE(?, expires_at) WHERE id = ?",
                            [e.profile, e.expires_at, step.sets_profile_of])
        if step.sets_items_of is not None:
            self.db.execute("UPDATE choices SET items = ?, terms = ? WHERE id = ?",
                            [_json_or_none(e.items), e.terms, step.sets_items_of])
        return event_id

    def _insert(self, table: str, row: dict[str, Any]) -> int:
        """INSERT one row; the rowid. sqlite-utils' Table.insert inspects the schema on every call
        (about a dozen statements, 4x the CPU of the insert itself), too much for every consent
        change; the columns here are the schema's own (migrations own the schema).

        Columns that are None are left out (the table has no defaults: they are NULL all the same):
        sqlite3 binds a None only after looking for an adapter, two failed attribute lookups that
        each format an AttributeError, a seventh of a change's instructions on the store's thread."""
        values = [v for v in row.values() if v is not None]
        key = (table, tuple(c for c, v in row.items() if v is not None))
        sql = self._inserts.get(key)
        if sql is None:
            columns = ", ".join(f"[{c}]" for c in key[1])
            sql = self._inserts[key] = f"INSERT INTO [{table}] ({columns}) VALUES ({', '.join('?' * len(values))})"
        rowid = self.db.conn.execute(sql, values).lastrowid
        assert isinstance(rowid, int)
        return rowid

    def remember_pairing(self, http: str, dns: str, at: float) -> None:
        try:
            with self.db.atomic():
                self.db.table("pairings").insert({"http": http, "dns": dns, "at": at}, replace=True)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from exc

    def restore_events(self, events: Sequence[Event]) -> int:
        """Migration: append events that keep their ids (another store's log, oldest first)."""
        try:
            with self.db.atomic():
                self.db.table("events").insert_all(({**_event_row(e), "id": e.id} for e in events), pk="id")
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from exc
        return len(events)

    def restore_state(self, choices: Sequence[Choice], pairings: Sequence[tuple[str, str, float]]) -> None:
        """Migration: the choices in force and the pairings of another store."""
        try:
            with self.db.atomic():
                self.db.table("choices").insert_all((_choice_row(c) for c in choices), pk="id")
                self.db.table("pairings").insert_all(({"http": h, "dns": d, "at": at} for h, d, at in pairings),
                                                     pk=("http", "dns"), replace=True)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from exc

    def _current(self, choice_id: int) -> bool:
        return self.db.conn.execute("SELECT 1 FROM choices WHERE id = ?", [choice_id]).fetchone() is not None

    def purge(self, before: float, now: float) -> int:
        """Retention: delete events older than `before` that no choice in force rests on."""
        try:
            with self.db.atomic():
                doomed = self.db.execute(
                    "SELECT COUNT(*) FROM events WHERE at < ? AND id NOT IN (SELECT id FROM choices)", [before]
                ).fetchone()[0]
                if not doomed:
                    return 0
                self.db.table("retention_runs").insert({"at": now, "purge_before": before, "deleted": doomed})
                self.db.execute("DELETE FROM events WHERE at < ? AND id NOT IN (SELECT id FROM choices)", [before])
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from exc
        return int(doomed)

    def close(self) -> None:
        self.db.close()


class UnavailableStore(ConsentStore):
    """Stands in for a store that could not be opened (locked, corrupt, unreadable): dnsgate keeps
    answering DNS, fail-closed, and every consent read or change raises StoreError (API: 503)."""

    def __init__(self, path: Path, reason: str) -> None:  # no super().__init__(): it would open the file
        self.path = path
        self.reason = reason
        self.commits = self.changes_committed = self.groups_broken = 0

    def wait_for_locks(self, seconds: float) -> None:
        pass

    def _fail(self) -> StoreError:
        return StoreError(f"{self.path}: {self.reason}")

    def load(self) -> list[Choice]:
        raise self._fail()

    def load_pairings(self) -> list[tuple[str, str, float]]:
        raise self._fail()

    def events(self, address: str | None = None, limit: int = 100) -> list[Event]:
        raise self._fail()

    def export_page(self, f: EventFilter, after_id: int, limit: int) -> list[Event]:
        raise self._fail()

    def count_events(self) -> int:
        raise self._fail()

    def commit(self, steps: Sequence[Step], abandon: Abandon | None = None) -> list[int | None]:
        raise self._fail()

    def commit_group(self, changes: Sequence[tuple[Sequence[Step], Abandon]]) -> list[list[int | None] | StoreError]:
        return [self._fail() for _ in changes]

    def remember_pairing(self, http: str, dns: str, at: float) -> None:
        raise self._fail()

    def pairings_of(self, http: str) -> dict[str, float]:
        raise self._fail()

    def purge(self, before: float, now: float) -> int:
        raise self._fail()

    def restore_events(self, events: Sequence[Event]) -> int:
        raise self._fail()

    def restore_state(self, choices: Sequence[Choice], pairings: Sequence[tuple[str, str, float]]) -> None:
        raise self._fail()

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------------------------
# Rows


def _event_row(e: Event) -> dict[str, Any]:
    s = e.subject
    n = e.notice
    row = {
        "at": e.at, "client": s.address or s.network or s.mac or "", "action": e.action,
        # readers of version 1's column: the categories granted
        "categories": json.dumps([c for c, granted in e.categories.items() if granted]),
        "expires_at": e.expires_at, "source": e.source, "user_agent": e.user_agent,
        "mac": s.mac, "network": s.network, "profile": e.profile,
        "decisions": json.dumps({"categories": dict(e.categories), "vendors": dict(e.vendors)}),
        "notice_catalog": n.catalog if n else None, "notice_version": n.version if n else None,
        "notice_sha256": n.sha256 if n else None, "language": n.language if n else None,
        "channel": e.channel, "sec_gpc": e.sec_gpc, "supersedes": e.supersedes, "reason": e.reason,
        "items": _json_or_none(e.items), "terms": e.terms or None,
        "operator": _json_or_none(e.operator), "gpc_seen_at": e.gpc_seen_at,
    }
    if e.language:
        row["language"] = e.language
    return row


_COMPACT: Final = json.JSONEncoder(sort_keys=True, separators=(",", ":"))  # (json.dumps would make one a call)


def _json_or_none(value: Mapping[str, str] | None) -> str | None:
    return None if value is None else _COMPACT.encode(dict(value))


def _json_map(raw: str | None) -> dict[str, str] | None:
    return None if not raw else json.loads(raw)


def _event(r: Mapping[str, Any]) -> Event:
    if r.get("decisions"):
        decisions = json.loads(r["decisions"])
        categories, vendors = decisions.get("categories", {}), decisions.get("vendors", {})
        action = r["action"]
    else:  # a version 1 row: a list of categories granted, or withdrawn
        withdrawn = r["action"] == "withdraw"
        categories, vendors = {c: not withdrawn for c in json.loads(r["categories"] or "[]")}, {}
        action = "withdrawal" if withdrawn else r["action"]
    network = r.get("network")
    mac = r.get("mac")
    address = None if network or (mac and r["client"] == mac) else r["client"]
    return Event(
        action=action, at=r["at"], subject=Subject(address or None, mac, network), profile=r.get("profile") or "",
        categories=categories, vendors=vendors, expires_at=r["expires_at"], notice=_notice(r),
        channel=r.get("channel") or ("admin" if r["source"] == "admin" else "device"),
        user_agent=r["user_agent"] or "", sec_gpc=r.get("sec_gpc"), supersedes=r.get("supersedes"),
        reason=r.get("reason") or "", id=r["id"], items=_json_map(r.get("items")), terms=r.get("terms") or "",
        language=r.get("language") or "", operator=_json_map(r.get("operator")), gpc_seen_at=r.get("gpc_seen_at"),
    )


def _notice(r: Mapping[str, Any]) -> NoticeRef | None:
    if not r.get("notice_catalog"):
        return None
    return NoticeRef(r["notice_catalog"], r["notice_version"] or "", r["notice_sha256"] or "", r["language"] or "")


def _choice_row(c: Choice) -> dict[str, Any]:
    n = c.notice
    return {
        "id": c.id, "address": c.subject.address, "mac": c.subject.mac, "network": c.subject.network,
        "categories": json.dumps(dict(c.categories)), "vendors": json.dumps(dict(c.vendors)),
        "made_at": c.made_at, "expires_at": c.expires_at,
        "notice_catalog": n.catalog if n else None, "notice_version": n.version if n else None,
        "notice_sha256": n.sha256 if n else None, "language": c.language or None,
        "channel": c.channel, "profile": c.profile, "sec_gpc": c.sec_gpc,
        "items": _json_or_none(c.items), "terms": c.terms or None, "gpc_seen_at": c.gpc_seen_at,
    }


def _choice_row_of(e: Event, event_id: int, event_row: Mapping[str, Any]) -> dict[str, Any]:
    """`_choice_row(e.as_choice(event_id))`, taking what the event's row has encoded already."""
    assert e.expires_at is not None
    s = e.subject
    return {
        "id": event_id, "address": s.address, "mac": s.mac, "network": s.network,
        "categories": json.dumps(dict(e.categories)), "vendors": json.dumps(dict(e.vendors)),
        "made_at": e.at, "expires_at": e.expires_at, "notice_catalog": event_row["notice_catalog"],
        "notice_version": event_row["notice_version"], "notice_sha256": event_row["notice_sha256"],
        "language": e.language or (e.notice.language if e.notice else "") or None,
        "channel": e.channel, "profile": e.profile, "sec_gpc": e.sec_gpc,
        "items": event_row["items"], "terms": e.terms or None, "gpc_seen_at": e.gpc_seen_at,
    }


def _choice(r: Mapping[str, Any]) -> Choice:
    return Choice(
        id=r["id"], subject=Subject(r["address"], r["mac"], r["network"]),
        categories=json.loads(r["categories"]), vendors=json.loads(r["vendors"] or "{}"),
        made_at=r["made_at"], expires_at=r["expires_at"], notice=_notice(r), channel=r["channel"],
        profile=r["profile"], sec_gpc=r["sec_gpc"], language=r["language"] or "",
        items=_json_map(r.get("items")), terms=r.get("terms") or "", gpc_seen_at=r.get("gpc_seen_at"),
    )


# The same rows for another store (consent/redis_store.py keeps them as stream entries and hashes), so
# both stores record, export and migrate exactly the same fields.
event_row, event_from_row, choice_row, choice_from_row = _event_row, _event, _choice_row, _choice


class StoreThread(Executor):
    """The store's one thread: runs what it is handed, in order. A change's flush is handed over bare
    (`post`); ThreadPoolExecutor would wrap it in a Future nobody waits for and count its idle
    threads, bookkeeping that runs for every change on the core the DNS loop shares."""

    def __init__(self, name: str) -> None:
        self._jobs: SimpleQueue[Callable[[], object] | None] = SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def post(self, job: Callable[[], object]) -> None:
        """Run `job` on the thread; what it raises is its own business (it answers its callers)."""
        self._jobs.put(job)

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        if self._closed:
            raise RuntimeError("the store's thread is shut down")
        future: Future[T] = Future()

        def job() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(result)

        self._jobs.put(job)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """After the jobs handed over before it."""
        if not self._closed:
            self._closed = True
            self._jobs.put(None)
        if wait:
            self._thread.join()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except Exception:  # (a bug: its callers have heard of it already; the thread serves on)
                log.exception("consent store: a job failed")


class SqliteBackend:
    """`ConsentStore` (synchronous SQLite) behind the protocol: every call runs on one worker
    thread, so SQLite is never touched from the event loop and writes are serialized.

    Group commit: changes wait in a queue, and the thread records all those waiting in one
    transaction (`ConsentStore.commit_group`), so the changes that arrive while a commit is under
    way share the next one's fsync. A lone change is written at once; each caller is answered only
    once its own change is committed (or has failed, alone)."""

    shared = False
    position = 0
    timeout = BUSY_TIMEOUT

    def __init__(self, store: ConsentStore) -> None:
        self.store = store
        self.name = f"sqlite:{store.path}"
        self._executor = StoreThread("dnsgate-store")
        # Changes whose deadline passed while their transaction was committing: their outcome.
        self._doubtful: dict[str, Future[list[int | None]]] = {}
        self._queue: list[tuple[Sequence[Step], Abandon, Future[list[int | None]]]] = []
        self._queue_lock = threading.Lock()
        self._flush_due = False  # a flush is submitted and has not taken the queue yet

    @classmethod
    def open(cls, path: Path, synchronous: str = "full") -> SqliteBackend:
        return cls(ConsentStore(path, synchronous))

    async def _run(self, fn: functools.partial[T], timeout: float | None = None) -> T:
        """Run `fn` on the store's thread; with a `timeout` (reads only: a read given up on
        finishes in the background, harmlessly), StoreError if it has not finished by then."""
        def call() -> T:
            self.store.wait_for_locks(BUSY_TIMEOUT)  # (a change before may have shortened it to its deadline)
            return fn()

        future = asyncio.get_running_loop().run_in_executor(self._executor, call)
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
        future: Future[list[int | None]] = Future()
        with self._queue_lock:
            self._queue.append((steps, abandon, future))
            submit, self._flush_due = not self._flush_due, True
        if submit:
            self._executor.post(self._flush)
        try:
            return Recorded(await asyncio.wait_for(asyncio.wrap_future(future), deadline - time.monotonic()))
        except TimeoutError:
            if abandon.now():  # the transaction rolls back (or never starts): nothing is recorded
                raise StoreError(f"{self.name}: no answer within {self.timeout:g} s") from None
            self._doubtful[change] = future  # it was committing: its outcome comes when the disk answers
            raise InDoubt(f"{self.name}: the write did not finish within {self.timeout:g} s") from None

    def _flush(self) -> None:
        """On the store's thread: record every change queued, in one transaction."""
        with self._queue_lock:
            queued, self._queue, self._flush_due = self._queue, [], False
        # (a change whose caller gave up before this took it is not attempted: its future is cancelled)
        group = [(steps, abandon, future) for steps, abandon, future in queued if future.set_running_or_notify_cancel()]
        if not group:
            return
        try:
            outcomes = self.store.commit_group([(steps, abandon) for steps, abandon, _ in group])
        except BaseException as exc:  # (not a StoreError: a bug; every caller hears of it)
            for _, _, future in group:
                future.set_exception(exc)
            raise
        for (_, _, future), outcome in zip(group, outcomes, strict=True):
            if isinstance(outcome, StoreError):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    @property
    def commits(self) -> tuple[int, int]:
        """Transactions that recorded changes, and the changes they recorded."""
        return self.store.commits, self.store.changes_committed

    async def resolve(self, change: str, based_on: int) -> dict[int, int] | None:
        future = self._doubtful.get(change)
        if future is None:
            return None
        try:
            # (not asyncio.wait_for: cancelled as the write's outcome arrives, it would return it and
            # drop the cancellation, and the outcome, taken off `_doubtful` below, would be lost to a
            # caller that gave up at its deadline; the next attempt would say "never recorded")
            ids = await within(time.monotonic() + self.timeout, asyncio.shield(asyncio.wrap_future(future)))
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
