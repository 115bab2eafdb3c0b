"""What keeps a worker's consent table equal to the primary's (dns.workers > 1). Pure: no I/O.

The primary's table is a `JournaledTable`: every change made to it (by the consent service, a
reload, the neighbour reader) is also appended to its journal, in order. workers/supervisor.py sends the
journal to every worker, which `apply`s it to its replica and acknowledges; an API change answers
only once every worker has acknowledged it, so a grant or withdrawal holds for the client's next
query whichever process the kernel hands it to.

Kiosk clocks: the consent service's own word on a session (started by a choice, ended by a reset)
is journaled like any change, and so are the identities linked to each kiosk's session; the
queries' activity goes both ways (`ConsentTable.merge_seen`): each process notes the last query of
the kiosk clients it serves, and the primary, whose sweeper ends idle sessions, keeps the latest any
process saw.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from dnsgate.config import Config, HostPort, UpstreamAddress
from dnsgate.consent.model import Choice, ConsentTable, CurrentNotice, ProfileMap, TableCopy
from dnsgate.rules.catalog import Vendor
from dnsgate.rules.ruleset import Ruleset

# The ConsentTable methods that change it, as the journal names them.
JOURNALED: Final = frozenset({"put", "remove", "reset", "set_neighbours", "set_profiles", "set_notice",
                              "set_vendors", "set_seen", "set_kiosk_links"})
INSTALL: Final = "install"  # a reload's ruleset (and live config), journaled in order with the table's changes

Op = tuple[str, tuple[Any, ...]]


@dataclass(frozen=True, slots=True)
class Start:
    """What a new worker is sent first: everything it needs to answer as the primary does."""

    cfg: Config  # as the primary started (restart-only sections)
    live: Config  # the reloaded configuration's live sections
    rules: Ruleset
    servers: tuple[UpstreamAddress, ...]
    bound: tuple[HostPort, ...]  # the primary's DNS addresses, with the ports it got
    table: TableCopy
    log_all: bool  # the query log keeps every query, not only gated ones
    worker: int  # 1..workers-1: its log lines and `id.server` answer say which


class JournaledTable(ConsentTable):
    """The primary's consent table: each change is also written to `journal` for the workers;
    `on_write` is called when the journal stops being empty (the sender then flushes it soon)."""

    __slots__ = ("_quiet", "journal", "on_write")

    def __init__(self, vendors: Iterable[Vendor] = (), profiles: ProfileMap | None = None,
                 notice: CurrentNotice | None = None, kiosk_idle: float = 900.0, *,
                 on_write: Callable[[], None] | None = None) -> None:
        super().__init__(vendors, profiles, notice, kiosk_idle)
        self.journal: list[Op] = []
        self.on_write = on_write
        self._quiet = False

    def note(self, op: str, *args: Any) -> None:
        if self._quiet:
            return
        self.journal.append((op, args))
        if len(self.journal) == 1 and self.on_write is not None:
            self.on_write()

    def put(self, choice: Choice) -> None:
        super().put(choice)
        self.note("put", choice)

    def remove(self, choice_id: int) -> Choice | None:
        found = super().remove(choice_id)
        if found is not None:
            self.note("remove", choice_id)
        return found

    def reset(self, choices: Iterable[Choice]) -> None:
        every = list(choices)
        self._quiet = True  # (reset puts each one: the journal says reset, once)
        try:
            super().reset(every)
        finally:
            self._quiet = False
        self.note("reset", every)

    def set_neighbours(self, table: Mapping[str, str]) -> bool:
        changed = super().set_neighbours(table)
        if changed:
            self.note("set_neighbours", self.neighbours)
        return changed

    def set_profiles(self, profiles: ProfileMap) -> None:
        super().set_profiles(profiles)
        self.note("set_profiles", profiles)

    def set_notice(self, notice: CurrentNotice) -> None:
        super().set_notice(notice)
        self.note("set_notice", notice)

    def set_vendors(self, vendors: Iterable[Vendor]) -> None:
        super().set_vendors(vendors)
        self.note("set_vendors", self.vendors)

    def set_seen(self, key: str, at: float | None) -> None:
        super().set_seen(key, at)
        self.note("set_seen", key, at)

    def set_kiosk_links(self, links: Mapping[str, tuple[str, ...]]) -> None:
        super().set_kiosk_links(links)
        self.note("set_kiosk_links", self.kiosk_links)


def apply(table: ConsentTable, ops: Iterable[Op], install: Callable[[Ruleset, Config], None]) -> None:
    """Replay the primary's journal on a replica, in order."""
    for op, args in ops:
        if op == INSTALL:
            install(*args)
        elif op in JOURNALED:
            getattr(table, op)(*args)
        else:
            raise ValueError(f"unknown journal entry {op!r}")
