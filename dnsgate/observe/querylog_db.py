"""The query log's SQLite file (<data_dir>/querylog.sqlite3), through sqlite-utils.

Synchronous by design: `QueryLog` calls it from its own worker thread, never from the query path.
Separate from the consent store so that a busy log never delays a consent write, and so that
deleting it loses no consent. WAL with synchronous=NORMAL: a crash may lose the last batch, never
corrupt the file. `gaps` records batches dropped because the writer fell behind, so a report over
that time can say its evidence is incomplete.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from dnsgate.consent.sqlite_store import quick_check

SCHEMA_VERSION = 1
COLUMNS = ("id", "at", "client", "name", "type", "protocol", "outcome", "rcode", "vendor", "category",
           "granted_at", "grant_expires_at", "grant_source", "duration_ms")
# What the dashboard draws a query as: its outcome, with queries for gated names apart (a tracker
# blocked by the gate, or answered because the client consented).
KIND = ("CASE WHEN vendor IS NOT NULL AND outcome = 'sinkholed' THEN 'gated' "
        "WHEN vendor IS NOT NULL AND outcome IN ('cached', 'forwarded', 'stale') THEN 'allowed' "
        "WHEN outcome IN ('cached', 'stale') THEN 'cached' WHEN outcome = 'forwarded' THEN 'forwarded' "
        "WHEN outcome = 'sinkholed' THEN 'blocked' WHEN outcome = 'local' THEN 'local' ELSE 'failed' END")
KINDS = ("allowed", "gated", "cached", "forwarded", "blocked", "local", "failed")
INSERT = f"INSERT INTO queries ({', '.join(COLUMNS[1:])}) VALUES ({', '.join('?' * len(COLUMNS[1:]))})"


class QueryLogError(Exception):
    """The query log file cannot be opened, read or written."""


@dataclass(frozen=True, slots=True)
class Filters:
    client: str | None = None
    name: str | None = None  # exact name, or "*.example.com" for the name and its subdomains
    vendor: str | None = None
    outcome: str | None = None
    since: float | None = None
    until: float | None = None
    after_id: int | None = None  # for following: only entries newer than this one
    before_id: int | None = None  # for paging back: only entries older than this one
    gated: bool | None = None  # True: only queries for a gated name (a tracker); False: none of those


class QueryLogDb:
    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        """`read_only`: a second connection to a file the writer's has set up, for the admin
        dashboard's aggregates (WAL: it reads a snapshot while the writer goes on writing)."""
        self.path = path
        if read_only:
            try:
                conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, check_same_thread=False,
                                       isolation_level=None)
                conn.execute("PRAGMA query_only=1")
            except sqlite3.Error as exc:
                raise QueryLogError(f"{path}: {exc}") from exc
            self.db = sqlite_utils.Database(conn, execute_plugins=False)
            return
        try:
            conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self.db = sqlite_utils.Database(conn, execute_plugins=False)
            verdict = quick_check(conn)
            if verdict not in ("ok", ""):
                conn.close()
                raise QueryLogError(f"{path}: the database is damaged (quick_check: {verdict})")
            self.db.enable_wal()
            self.db.execute("PRAGMA synchronous=NORMAL")
            with self.db.atomic():
                self.db.table("queries").create(
                    {"id": int, "at": float, "client": str, "name": str, "type": str, "protocol": str,
                     "outcome": str, "rcode": int, "vendor": str, "category": str, "granted_at": float,
                     "grant_expires_at": float, "grant_source": str, "duration_ms": float},
                    pk="id", if_not_exists=True,
                )
                self.db.table("gaps").create({"at": float, "dropped": int}, if_not_exists=True)
                for index in ("at", "client, at", "vendor, at"):
                    name = "queries_" + index.replace(", ", "_")
                    self.db.execute(f"CREATE INDEX IF NOT EXISTS {name} ON queries({index})")
                self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except (sqlite3.Error, OSError) as exc:
            raise QueryLogError(f"{path}: {exc}") from exc

    def forget_grant_times(self) -> int:
        """Blank the grant times of every row (a log that becomes anonymous keeps none); returns how
        many rows had them."""
        try:
            with self.db.atomic():
                return self.db.execute("UPDATE queries SET granted_at = NULL, grant_expires_at = NULL "
                                       "WHERE granted_at IS NOT NULL OR grant_expires_at IS NOT NULL").rowcount
        except sqlite3.Error as exc:
            raise QueryLogError(f"{self.path}: {exc}") from exc

    def insert(self, rows: Sequence[Sequence[Any]], dropped: int, at: float) -> None:
        """Rows are tuples of the COLUMNS after "id". One prepared statement for the whole batch:
        sqlite-utils' insert_all inspects and converts every row, about 20 µs of CPU per entry,
        which a flood of blocked queries pays on the core that answers them. `at`: when the first
        of the `dropped` queries came, so a report whose window holds it says its evidence is incomplete."""
        try:
            with self.db.atomic():
                if rows:
                    self.db.conn.executemany(INSERT, rows)
                if dropped:
                    self.db.table("gaps").insert({"at": at, "dropped": dropped})
        except sqlite3.Error as exc:
            raise QueryLogError(f"{self.path}: {exc}") from exc

    def prune(self, before: float, max_rows: int) -> int:
        """Delete entries older than `before` and the oldest beyond `max_rows`; returns how many went."""
        with self.db.atomic():
            gone = self.db.execute("DELETE FROM queries WHERE at < ?", [before]).rowcount
            newest = self.db.execute("SELECT max(id) FROM queries").fetchone()[0]
            if newest is not None:
                gone += self.db.execute("DELETE FROM queries WHERE id <= ?", [newest - max_rows]).rowcount
            self.db.execute("DELETE FROM gaps WHERE at < ?", [before])
        return int(gone)

    def entries(self, f: Filters, limit: int, newest_first: bool = True) -> list[dict[str, Any]]:
        where, args = _where(f)
        order = "id desc" if newest_first else "id"
        rows: Iterable[dict[str, Any]] = self.db.table("queries").rows_where(
            where or None, args, order_by=order, limit=limit)
        return list(rows)

    def gated(self, since: float, until: float, client: str | None) -> list[dict[str, Any]]:
        """Every entry for a gated name in [since, until), oldest first."""
        where = "vendor IS NOT NULL AND at >= ? AND at < ?" + (" AND client = ?" if client else "")
        args: list[Any] = [since, until] + ([client] if client else [])
        return list(self.db.table("queries").rows_where(where, args, order_by="id"))

    def resolved_matching(self, since: float, until: float, client: str | None,
                          patterns: Sequence[tuple[str, bool]]) -> list[dict[str, Any]]:
        """Entries not tagged with a vendor whose name matches a catalog pattern and got a real answer:
        names the gate let through (a domain switched off, say). `patterns`: (apex text, subdomains only)."""
        if not patterns:
            return []
        matches: list[str] = []
        args: list[Any] = [since, until]
        for apex, subdomains_only in patterns:
            matches.append("name LIKE ? ESCAPE '\\'" if subdomains_only else "(name = ? OR name LIKE ? ESCAPE '\\')")
            args += [_like_suffix(apex)] if subdomains_only else [apex, _like_suffix(apex)]
        where = (f"vendor IS NULL AND outcome IN ('cached', 'forwarded') AND at >= ? AND at < ? "
                 f"AND ({' OR '.join(matches)})")
        if client:
            where += " AND client = ?"
            args.append(client)
        return list(self.db.table("queries").rows_where(where, args, order_by="id"))

    def dropped_between(self, since: float, until: float) -> int:
        row = self.db.execute("SELECT coalesce(sum(dropped), 0) FROM gaps WHERE at >= ? AND at < ?",
                              [since, until]).fetchone()
        return int(row[0])

    # The admin dashboard's aggregates: each one pass over the window (the `at` index), on the
    # writer's thread like every read, never on the query path.

    def top_names(self, since: float, until: float, limit: int) -> list[dict[str, Any]]:
        """The most queried names in [since, until)."""
        return self._rows("SELECT name, count(*) AS queries FROM queries WHERE at >= ? AND at < ? AND name IS NOT NULL "
                          "GROUP BY name ORDER BY queries DESC, name LIMIT ?", [since, until, limit])

    def top_gated(self, since: float, until: float, limit: int) -> list[dict[str, Any]]:
        """The most queried gated names, with how many were blocked and how many allowed by consent."""
        return self._rows(
            "SELECT name, vendor, count(*) AS queries, sum(outcome = 'sinkholed') AS blocked, "
            "sum(outcome IN ('cached', 'forwarded', 'stale')) AS allowed FROM queries "
            "WHERE vendor IS NOT NULL AND at >= ? AND at < ? GROUP BY name, vendor "
            "ORDER BY queries DESC, name LIMIT ?", [since, until, limit])

    def top_clients(self, since: float, until: float, limit: int) -> list[dict[str, Any]]:
        """The clients with the most queries, with their gated queries blocked and allowed."""
        return self._rows(
            "SELECT client, count(*) AS queries, sum(vendor IS NOT NULL) AS gated, "
            "sum(vendor IS NOT NULL AND outcome = 'sinkholed') AS blocked, "
            "sum(vendor IS NOT NULL AND outcome IN ('cached', 'forwarded', 'stale')) AS allowed, max(at) AS last_at "
            "FROM queries WHERE at >= ? AND at < ? GROUP BY client ORDER BY queries DESC, client LIMIT ?",
            [since, until, limit])

    def timeline(self, since: float, until: float, step: float) -> list[dict[str, Any]]:
        """Queries per `step` seconds from `since` by KIND and by query type: one row per bucket."""
        buckets: dict[int, dict[str, Any]] = {}
        for bucket, kind, qtype, n in self.db.execute(
                f"SELECT CAST((at - ?) / ? AS INTEGER) AS bucket, {KIND} AS kind, coalesce(type, 'NONE'), count(*) "
                "FROM queries WHERE at >= ? AND at < ? GROUP BY 1, 2, 3", [since, step, since, until]).fetchall():
            row = buckets.setdefault(int(bucket), {"t": since + int(bucket) * step, "kinds": {}, "types": {}})
            row["kinds"][kind] = row["kinds"].get(kind, 0) + int(n)
            row["types"][qtype] = row["types"].get(qtype, 0) + int(n)
        return [buckets[b] for b in sorted(buckets)]

    def _rows(self, sql: str, args: list[Any]) -> list[dict[str, Any]]:
        cursor = self.db.execute(sql, args)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def count(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM queries").fetchone()[0])

    def close(self) -> None:
        self.db.close()


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _like_suffix(apex: str) -> str:
    return "%." + _like_escape(apex)


def _where(f: Filters) -> tuple[str, list[Any]]:
    parts: list[str] = []
    args: list[Any] = []
    for column, value in (("client", f.client), ("vendor", f.vendor), ("outcome", f.outcome)):
        if value is not None:
            parts.append(f"{column} = ?")
            args.append(value)
    if f.name is not None:
        if f.name.startswith("*.") and "*" not in f.name[2:]:
            apex = f.name[2:]
            parts.append("(name = ? OR name LIKE ? ESCAPE '\\')")
            args += [apex, _like_suffix(apex)]
        elif "*" in f.name:  # a search: '*' stands for any run of characters
            parts.append("name LIKE ? ESCAPE '\\'")
            args.append(_like_escape(f.name).replace("*", "%"))
        else:
            parts.append("name = ?")
            args.append(f.name)
    for op, bound in ((">=", f.since), ("<", f.until)):
        if bound is not None:
            parts.append(f"at {op} ?")
            args.append(bound)
    if f.after_id is not None:
        parts.append("id > ?")
        args.append(f.after_id)
    if f.before_id is not None:
        parts.append("id < ?")
        args.append(f.before_id)
    if f.gated is not None:
        parts.append("vendor IS NOT NULL" if f.gated else "vendor IS NULL")
    return " AND ".join(parts), args
