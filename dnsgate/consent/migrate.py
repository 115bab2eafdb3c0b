"""`dnsgate store migrate`: copy consent from one store to another, SQLite to Redis when a
deployment grows to several instances, and back.

Everything is copied as it is: the event log with its ids (so `supersedes` and "choice #N" keep
pointing at the same events), the choices in force with their expiry, and the pairings. Stop every
dnsgate that uses either store first. The target must be empty. The copy is then checked: both
logs are exported and compared line for line, and both stores must load the same choices.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dnsgate.consent.backend import ConsentBackend
from dnsgate.consent.export import event_json
from dnsgate.consent.records import EventFilter, StoreError
from dnsgate.consent.sqlite_store import SqliteBackend
from dnsgate.data_files import Access

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


class MigrationError(Exception):
    """The copy cannot be made or does not match; the message names the culprit."""


class BadStore(MigrationError):
    """--from or --to is not a store dnsgate knows (bad input: exit status 2)."""


@dataclass(frozen=True, slots=True)
class Copied:
    events: int
    choices: int
    pairings: int


def open_store(spec: str, flag: str, *, prefix: str, timeout: float, must_exist: bool) -> ConsentBackend:
    """`sqlite:PATH` or a Redis URL."""
    if spec.startswith("sqlite:"):
        path = Path(spec.removeprefix("sqlite:"))
        if not path.name:
            raise BadStore(f"{flag}: sqlite: needs a file, e.g. sqlite:data/consent.sqlite3")
        if must_exist and not path.is_file():
            raise MigrationError(f"{flag}: {path} does not exist")
        try:
            if not must_exist:  # a new store is as private as dnsgate's own (data_files.py)
                path.parent.mkdir(parents=True, exist_ok=True)
                Access().database(path)
            return SqliteBackend.open(path)
        except OSError as exc:
            raise MigrationError(f"{flag}: {path}: {exc.strerror}") from None
        except StoreError as exc:
            raise MigrationError(f"{flag}: {exc}") from None
    if spec.startswith(REDIS_SCHEMES):
        from dnsgate.consent.redis_store import RedisBackend

        try:
            return RedisBackend(spec, prefix, timeout)
        except ValueError as exc:
            raise BadStore(f"{flag}: {exc}") from None
    raise BadStore(f"{flag}: expected sqlite:PATH or a Redis URL (redis://host:6379/0), got {spec!r}")


async def migrate(source: ConsentBackend, target: ConsentBackend) -> Copied:
    try:
        snapshot = await source.load()
        events = await target.restore(source.export(EventFilter()), snapshot)
        await _verify(source, target)
        copied = await target.load()
    except StoreError as exc:
        raise MigrationError(str(exc)) from None
    if copied.choices != snapshot.choices or sorted(copied.pairings) != sorted(snapshot.pairings):
        raise MigrationError(f"{target.name}: the copied choices differ from {source.name}'s")
    return Copied(events, len(snapshot.choices), len(snapshot.pairings))


async def _verify(source: ConsentBackend, target: ConsentBackend) -> None:
    theirs = target.export(EventFilter())
    n = 0
    async for event in source.export(EventFilter()):
        n += 1
        copy = await anext(theirs, None)
        if copy is None or event_json(copy) != event_json(event):
            raise MigrationError(f"{target.name}: event #{event.id} was not copied exactly "
                                 f"(export line {n} differs from {source.name}'s)")
    if await anext(theirs, None) is not None:
        raise MigrationError(f"{target.name}: has more events than {source.name}")
