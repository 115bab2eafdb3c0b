"""A consent change copies its records (events, steps, what a choice rests on) several times; the
service copies them field by field (`_replace`) instead of through `dataclasses.replace`. A copy
must be that of `dataclasses.replace`, every field included, and a record whose constructor does
more than store its fields must still go through it."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from dnsgate.consent.model import Choice, NoticeRef, Subject
from dnsgate.consent.records import Event, Step
from dnsgate.consent.service import Basis, _replace

NOTICE = NoticeRef("catalog-7", "v3", "ab" * 32, "fr")
# every field away from its default, so that a field the copy left out or took from the wrong place shows
EVENT = Event("grant", 1_000.5, Subject("192.0.2.7", "02:00:00:00:00:07", None), "opt-in", {"marketing": True},
              {"activecampaign": False}, 9_000.25, NOTICE, "portal", "Firefox", "1", 41, "a reason", 42,
              {"vendor:activecampaign": "f" * 8}, "cd" * 32, "fr", {"name": "Cafe"}, 999.5)


def fields_of(record: Any) -> dict[str, Any]:
    return {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}


@pytest.mark.parametrize(("record", "changes"), [
    (EVENT, {"operator": {"name": "Library", "contact": "desk@example.org"}}),
    (EVENT, {"id": 43}),
    (EVENT, {"action": "withdrawal", "supersedes": None}),
    (EVENT, {}),
    (Step(EVENT, makes_choice=True, ends=(3, 4), only_if_current=3, pairing=("a", "b"), sets_profile_of=5,
          sets_items_of=6), {"event": dataclasses.replace(EVENT, id=7)}),
    (Basis(NOTICE, {"vendor:x": "1"}, "ef" * 32, "de"), {"items": {"vendor:y": "2"}}),
])
def test_a_copy_is_the_one_dataclasses_replace_makes(record: Any, changes: dict[str, Any]) -> None:
    copy = _replace(record, **changes)
    expected = dataclasses.replace(record, **changes)
    assert type(copy) is type(record)
    assert fields_of(copy) == fields_of(expected)
    assert copy is not record
    assert fields_of(record) == fields_of(dataclasses.replace(record))  # the original is left as it was


def test_a_record_with_a_post_init_is_copied_through_its_constructor() -> None:
    choice = Choice(42, Subject("192.0.2.7", None, None), {"marketing": True}, {}, 1_000.0, 9_000.0, NOTICE,
                    "device", "opt-in")
    copy = _replace(choice, categories={"marketing": False})
    assert fields_of(copy) == fields_of(dataclasses.replace(choice, categories={"marketing": False}))
    # the constructor ran: equal mappings are shared, as Choice.__post_init__ makes them
    assert copy.categories is dataclasses.replace(choice, categories={"marketing": False}).categories


def test_a_change_naming_no_field_is_refused_as_dataclasses_replace_refuses_it() -> None:
    with pytest.raises(TypeError):
        _replace(EVENT, colour="blue")
