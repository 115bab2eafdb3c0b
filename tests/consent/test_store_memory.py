"""The SQLite store's page cache is bounded below SQLite's 2 MiB default: it grew by ~200 bytes a
client with a choice up to that bound, in every serving process."""

from __future__ import annotations

from pathlib import Path

from dnsgate.consent.sqlite_store import CACHE_KIB, ConsentStore


def test_the_store_connection_keeps_a_small_page_cache(tmp_path: Path) -> None:
    store = ConsentStore(tmp_path / "consent.sqlite3")
    try:
        assert CACHE_KIB < 2000
        assert store.db.execute("PRAGMA cache_size").fetchone()[0] == -CACHE_KIB
    finally:
        store.close()
