"""What the consent log is made of, whatever keeps it: an `Event` (one entry of the log), a `Step`
(an event and what it does to the choices in force, committed with its siblings in one
transaction), an `EventFilter` (which entries an export or audit reads), and `StoreError` with its
kinds (the store cannot be read or written).

Storage-neutral: the SQLite store (sqlite_store.py), the Redis store (redis_store.py), the consent
service, the API and the event stream all speak these; none of them needs a store's module for them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from dnsgate.consent.model import Choice, NoticeRef, Subject, built_plain, source_of


class StoreError(Exception):
    """The consent store cannot be read or written."""


class RefusalsHeld(StoreError):
    """A choice the store could not record, whose refusals (what it takes away from the choice in
    force, a GPC opt-out) are in force here all the same and recorded once the store answers
    (`held` says so); its grants changed nothing."""

    def __init__(self, message: str, held: str) -> None:
        super().__init__(message)
        self.held = held


@built_plain
@dataclass(frozen=True, slots=True)
class Event:
    """One entry of the consent log. `categories`/`vendors` map to True (granted) or False."""

    # grant | refusal | withdrawal | expiry | reset | profile_change | migration (version 1: withdraw)
    action: str
    at: float
    subject: Subject
    profile: str
    categories: Mapping[str, bool] = field(default_factory=dict)
    vendors: Mapping[str, bool] = field(default_factory=dict)
    expires_at: float | None = None
    notice: NoticeRef | None = None
    channel: str = "system"
    user_agent: str = ""
    sec_gpc: str | None = None
    supersedes: int | None = None
    reason: str = ""
    id: int | None = None
    items: Mapping[str, str] | None = None  # the items the choice covers (key -> fingerprint)
    terms: str = ""  # SHA-256 of the consent text and operator in force
    language: str = ""  # of the page or notice (a notice not shown still has a page language)
    operator: Mapping[str, str] | None = None  # who ran the network: name, contact, privacy_url
    gpc_seen_at: float | None = None  # a choice's: since when GPC has applied (consent.Choice)

    @property
    def source(self) -> str:
        return source_of(self.channel)

    def as_choice(self, event_id: int) -> Choice:
        assert self.expires_at is not None
        # (no copies of the mappings: a Choice keeps one shared copy of each content)
        return Choice(event_id, self.subject, self.categories, self.vendors, self.at, self.expires_at,
                      self.notice, self.channel, self.profile, self.sec_gpc,
                      self.language or (self.notice.language if self.notice else ""), self.items, self.terms,
                      self.gpc_seen_at)


@dataclass(frozen=True, slots=True)
class Step:
    """One event and what it does to the choices in force, committed together with its siblings."""

    event: Event
    makes_choice: bool = False  # the event's decisions become its subject's current choice
    ends: tuple[int, ...] = ()  # choices this event replaces or ends
    only_if_current: int | None = None  # skip the step if this choice is no longer in force
    pairing: tuple[str, str] | None = None  # (HTTP subject key, DNS client key) to remember
    sets_profile_of: int | None = None  # profile_change: the choice whose recorded profile (and expiry) changes
    sets_items_of: int | None = None  # migration: the choice that now names the items it covered


@dataclass(frozen=True, slots=True)
class EventFilter:
    since: float | None = None
    until: float | None = None
    address: str | None = None
    mac: str | None = None
    network: str | None = None  # CIDR; matched by the caller (SQLite knows no addresses)
