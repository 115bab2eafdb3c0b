"""What a change writes to the SQLite file: the store's own short path (only the columns that hold a
value; the choice's row made from the event's) must leave exactly the rows that sqlite-utils' general
insert of the full rows leaves, NULLs included. Real SQLite files."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from dnsgate.consent.model import NoticeRef, Subject
from dnsgate.consent.records import Event, Step
from dnsgate.consent.sqlite_store import Abandon, ConsentStore, choice_row, event_row

NOTICE = NoticeRef("catalog-7", "text-3", "ab" * 32, "de")
ITEMS = {"vendor:b": "22", "vendor:a": "11", "list:ads": "33"}
OPERATOR = {"name": "Café Kiosk", "contact": "ops@example.org", "privacy_url": ""}


def events() -> list[Event]:
    """Events whose fields are set, unset and empty in every combination a change can have."""
    return [
        Event("grant", 1000.0, Subject("10.0.0.1"), "opt-in", {"marketing": True}, {}, 2000.0, None, "device"),
        Event("refusal", 1001.5, Subject("10.0.0.2", "aa:bb:cc:dd:ee:ff"), "opt-out", {"ads": False, "stats": True},
              {"vendor:a": False}, 3000.0, NOTICE, "portal", "Mozilla/5.0", "1", None, "", None, ITEMS, "f" * 64,
              "", OPERATOR, 1001.0),
        Event("grant", 1002.0, Subject(None, None, "10.1.0.0/24"), "opt-in", {"marketing": True}, {}, 4000.0,
              NOTICE, "admin", "", None, 7, "kiosk", None, ITEMS, "", "fr", None, None),
        Event("withdrawal", 1003.0, Subject(None, "00:11:22:33:44:55"), "opt-in", {"marketing": False}, {}, 5000.0,
              None, "device", "", "0", 3, "", None, {}, "e" * 64, "en", {}, None),
    ]


def rows(path: Path, table: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as db:
        return db.execute(f"SELECT * FROM {table} ORDER BY id").fetchall()


def test_a_changes_rows_are_those_of_the_general_insert(tmp_path: Path) -> None:
    short, general = ConsentStore(tmp_path / "short.sqlite3"), ConsentStore(tmp_path / "general.sqlite3")
    try:
        for e in events():
            ids = short.commit_group([([Step(e, makes_choice=True)], Abandon(time.monotonic() + 5))])[0]
            assert isinstance(ids, list) and ids[0] is not None, ids
            with general.db.atomic():
                event_id = general.db.table("events").insert(event_row(e)).last_pk
                assert isinstance(event_id, int)
                general.db.table("choices").insert(choice_row(e.as_choice(event_id)))
            assert event_id == ids[0]
    finally:
        short.close()
        general.close()
    for table in ("events", "choices"):
        written = rows(tmp_path / "short.sqlite3", table)
        assert len(written) == len(events())
        assert written == rows(tmp_path / "general.sqlite3", table), table
    # (the unset fields are NULL, not an empty string: the readers tell "not recorded" by it)
    assert rows(tmp_path / "short.sqlite3", "choices")[0][2] is None


@pytest.mark.parametrize("index", range(4))
def test_an_event_reads_back_as_it_was_committed(tmp_path: Path, index: int) -> None:
    e = events()[index]
    store = ConsentStore(tmp_path / "consent.sqlite3")
    try:
        [event_id] = store.commit([Step(e, makes_choice=True)])
        assert event_id is not None
        [back] = store.events()
        [choice] = store.load()
    finally:
        store.close()
    assert back.id == event_id and back.subject == e.subject
    # (one language column: an event's page language stands for its notice's, as before)
    assert (back.notice is None) == (e.notice is None)
    if back.notice and e.notice:
        assert (back.notice.catalog, back.notice.version, back.notice.sha256) == (
            e.notice.catalog, e.notice.version, e.notice.sha256)
    assert (back.action, back.at, back.profile, back.channel, back.user_agent, back.sec_gpc, back.supersedes) == (
        e.action, e.at, e.profile, e.channel, e.user_agent, e.sec_gpc, e.supersedes)
    assert (back.items, back.operator, back.terms, back.gpc_seen_at) == (e.items, e.operator, e.terms, e.gpc_seen_at)
    assert replace(choice, notice=None) == replace(e.as_choice(event_id), notice=None)
