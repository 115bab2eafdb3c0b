"""Durable consent: current grants and an append-only audit trail, in SQLite through sqlite-utils.

Synchronous by design: `ConsentService` calls it from one worker thread, never from the query
path. Every change is one transaction (audit event + grants) with synchronous=FULL in WAL mode,
so an acknowledged change survives kill -9 and power loss, and a half-written one never exists.
Triggers make the audit table refuse UPDATE and DELETE.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from .consent import Grant, Source

SCHEMA_VERSION = 1


class StoreError(Exception):
    """The consent store cannot be read or written."""


@dataclass(frozen=True, slots=True)
class AuditEvent:
    at: float
    client: str
    action: str  # "grant" | "withdraw"
    categories: tuple[str, ...]
    expires_at: float | None
    source: Source
    user_agent: str
    id: int | None = None


class ConsentStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self.db = sqlite_utils.Database(conn)
            self.db.enable_wal()
            self.db.execute("PRAGMA synchronous=FULL")
            self._migrate()
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"{path}: {exc}") from exc

    def _migrate(self) -> None:
        with self.db.atomic():
            self.db.table("grants").create(
                {"client": str, "category": str, "granted_at": float, "expires_at": float,
                 "source": str, "event_id": int},
                pk=("client", "category"), if_not_exists=True,
            )
            self.db.table("events").create(
                {"id": int, "at": float, "client": str, "action": str, "categories": str,
                 "expires_at": float, "source": str, "user_agent": str},
                pk="id", if_not_exists=True,
            )
            self.db.execute("CREATE INDEX IF NOT EXISTS events_client ON events(client, at)")
            for op in ("UPDATE", "DELETE"):
                self.db.execute(
                    f"CREATE TRIGGER IF NOT EXISTS events_no_{op.lower()} BEFORE {op} ON events "
                    "BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END"
                )
            self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def load(self) -> dict[str, dict[str, Grant]]:
        """Every stored grant, by client."""
        clients: dict[str, dict[str, Grant]] = {}
        try:
            for row in self.db.table("grants").rows:
                clients.setdefault(row["client"], {})[row["category"]] = Grant(
                    category=row["category"], granted_at=row["granted_at"],
                    expires_at=row["expires_at"], source=row["source"])
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from exc
        return clients

    def record(self, event: AuditEvent, grants: Mapping[str, Grant]) -> int:
        """Append `event` and make `grants` the client's whole set, in one transaction."""
        try:
            with self.db.atomic():
                event_id = self.db.table("events").insert({
                    "at": event.at, "client": event.client, "action": event.action,
                    "categories": json.dumps(list(event.categories)), "expires_at": event.expires_at,
                    "source": event.source, "user_agent": event.user_agent,
                }).last_pk
                self.db.execute("DELETE FROM grants WHERE client = ?", [event.client])
                self.db.table("grants").insert_all(
                    {"client": event.client, "category": g.category, "granted_at": g.granted_at,
                     "expires_at": g.expires_at, "source": g.source, "event_id": event_id}
                    for g in grants.values()
                )
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from exc
        assert isinstance(event_id, int)
        return event_id

    def events(self, client: str | None = None, limit: int = 100) -> list[AuditEvent]:
        where, args = ("client = ?", [client]) if client else (None, [])
        rows: Iterable[dict[str, Any]] = self.db.table("events").rows_where(
            where, args, order_by="id desc", limit=limit)
        return [
            AuditEvent(at=r["at"], client=r["client"], action=r["action"],
                       categories=tuple(json.loads(r["categories"])), expires_at=r["expires_at"],
                       source=r["source"], user_agent=r["user_agent"], id=r["id"])
            for r in rows
        ]

    def close(self) -> None:
        self.db.close()
