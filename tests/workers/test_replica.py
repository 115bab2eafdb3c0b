"""workers/replica.py: a worker's copy of the consent table, kept equal to the primary's through its journal."""

from __future__ import annotations

import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dnsgate.consent.model import Choice, ConsentTable, ProfileMap
from dnsgate.workers.replica import INSTALL, JournaledTable, apply
from tests.consent.test_model import ADDRESSES, CHANGES, CLIENTS, NOW, OTHER_NOTICE
from tests.support.consent_fixtures import CATALOG, NOTICE, choice

AC = CATALOG.vendors[0]
PROFILES = (ProfileMap("opt-in"), ProfileMap("opt-out"), ProfileMap("opt-in", (("10.0.0.0/24", "deny"),)),
            ProfileMap("kiosk"))
# The consent service's word on kiosk sessions: a start (a time; 2000 s ago is idle) or an end.
SEEN = st.lists(st.tuples(st.sampled_from(CLIENTS), st.one_of(st.none(), st.sampled_from((NOW - 2000, NOW - 10)))),
                max_size=6)


def journaled() -> JournaledTable:
    return JournaledTable(CATALOG.vendors, ProfileMap("opt-in"), NOTICE)


def decisions(t: ConsentTable) -> list[tuple[str, bool, object]]:
    return [(c, t.allows(c, AC, NOW), t.grant_for(c, AC, NOW)) for c in CLIENTS]


def through_the_wire(obj: object) -> object:
    return pickle.loads(pickle.dumps(obj, pickle.HIGHEST_PROTOCOL))


@settings(max_examples=300, deadline=None)
@given(CHANGES, st.integers(0, 25), st.lists(st.sampled_from(PROFILES), max_size=2), SEEN)
def test_a_replica_copied_at_any_point_and_fed_the_journal_decides_as_the_primary(
        changes: list[tuple[object, ...]], copy_at: int, profiles: list[ProfileMap],
        seen: list[tuple[str, float | None]]) -> None:
    primary = journaled()
    replica: ConsentTable | None = None
    made: list[Choice] = []
    steps = [*changes, *(("profiles", p) for p in profiles)]
    for i, (key, at) in enumerate(seen):  # spread among the other changes
        steps.insert(min(len(steps), 3 * i), ("seen", key, at))
    for step, change in enumerate(steps):
        if step == copy_at:  # a worker (re)starts: the copy, then only what the journal adds after it
            primary.journal.clear()
            replica = ConsentTable.from_copy(through_the_wire(primary.copy()))  # type: ignore[arg-type]
        kind = change[0]
        if kind == "put":
            subject, grant = change[1], change[2]
            c = choice(subject.address, mac=subject.mac, network=subject.network,  # type: ignore[attr-defined]
                       categories={"marketing": bool(grant)}, expires_at=NOW + len(made) - 4)
            made.append(c)
            primary.put(c)
        elif kind == "remove":
            index = change[1]
            assert isinstance(index, int)
            primary.remove(made[index].id if index < len(made) else -1)
        elif kind == "neighbours":
            primary.set_neighbours(change[1])  # type: ignore[arg-type]
        elif kind == "notice":
            primary.set_notice(change[1])  # type: ignore[arg-type]
        elif kind == "seen":
            primary.set_seen(change[1], change[2])  # type: ignore[arg-type]
        else:
            primary.set_profiles(change[1])  # type: ignore[arg-type]
    if replica is None:
        primary.journal.clear()
        replica = ConsentTable.from_copy(through_the_wire(primary.copy()))  # type: ignore[arg-type]
    apply(replica, through_the_wire(primary.journal), lambda rules, live: None)  # type: ignore[arg-type]
    assert replica.choices() == primary.choices()
    assert len(replica) == len(primary)
    assert replica.notice == primary.notice
    assert [replica.profiles.of(a) for a in ADDRESSES] == [primary.profiles.of(a) for a in ADDRESSES]
    assert replica.neighbours == primary.neighbours
    assert replica.kiosk_seen == primary.kiosk_seen
    assert decisions(replica) == decisions(primary)


def test_reset_is_journaled_once_and_a_reload_in_order_with_the_changes() -> None:
    primary = journaled()
    writes: list[int] = []
    primary.on_write = lambda: writes.append(len(primary.journal))
    a, b = choice("10.0.0.1"), choice("10.0.0.2")
    primary.reset([a, b])
    primary.note(INSTALL, "rules", "live")
    primary.set_notice(OTHER_NOTICE)
    assert [op for op, _ in primary.journal] == ["reset", INSTALL, "set_notice"]
    assert writes == [1]  # the sender is woken once, when the journal stops being empty
    installed: list[object] = []
    replica = ConsentTable(CATALOG.vendors, ProfileMap("opt-in"), NOTICE)
    apply(replica, primary.journal, lambda rules, live: installed.append((rules, live, replica.notice)))
    assert installed == [("rules", "live", NOTICE)]  # before the notice change that followed it
    assert replica.choices() == [a, b] and replica.notice == OTHER_NOTICE
    with pytest.raises(ValueError, match="unknown journal entry"):
        apply(replica, [("clear_everything", ())], lambda rules, live: None)


def test_kiosk_activity_keeps_the_latest_and_a_worker_forgets_idle_sessions() -> None:
    table = ConsentTable(CATALOG.vendors, ProfileMap("kiosk"), NOTICE, kiosk_idle=120.0)
    mine = table.kiosk_seen  # the dict the pipeline holds: changed in place, never replaced
    mine.update({"10.0.2.1": 100.0, "10.0.2.2": 500.0})
    table.merge_seen({"10.0.2.1": 400.0, "10.0.2.2": 300.0, "10.0.2.3": 450.0})
    assert table.kiosk_seen is mine and mine == {"10.0.2.1": 400.0, "10.0.2.2": 500.0, "10.0.2.3": 450.0}
    table.forget_idle(now=560.0)  # idle, but the primary's sweeper may not have ended it yet: kept
    assert mine == {"10.0.2.1": 400.0, "10.0.2.2": 500.0, "10.0.2.3": 450.0}
    table.touch("10.0.2.1", 560.0)  # a query after the idle time revives nothing
    assert mine["10.0.2.1"] == 400.0
    table.forget_idle(now=680.0)  # twice the idle time: the primary has ended it
    assert table.kiosk_seen is mine and mine == {"10.0.2.2": 500.0, "10.0.2.3": 450.0}
