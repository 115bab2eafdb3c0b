"""Changing consent: persist first, then apply, so an acknowledged change is durable and in force.

Every change is a list of `records.Step`s committed in one transaction on one worker thread, then
applied to the in-memory `ConsentTable` on the event loop, so a client's very next DNS query sees
it. One lock serializes changes: what a new choice supersedes is read and replaced atomically.

What an answer promises, whatever the store does:
- a change answered (200) is recorded and in force; one refused for the store's sake (503) changed
  nothing. Each change has a deadline (the store's `timeout`, waiting for the lock included), and
  the store settles a change that got no answer before the deadline passes: recorded, or never to be.
  When even that cannot be known (the store stayed unreachable), the change is `InDoubt`: answered
  503 and, if it turns out to have been recorded, undone by a recorded event once the store answers;
- a refusal (a withdrawal, a "no", a GPC opt-out) is in force here at once, before the store is
  asked anything: it is `Held` in the table until the store has recorded it (answered 202 while
  held), and `run_reconciler` writes it as soon as the store answers again. A choice the same
  subject makes later (here or through another instance) replaces it;
- a shared store that lost its history (`Snapshot.lost`) is reported until an admin acknowledges
  it; the grants it no longer holds are dropped, the refusals held here are recorded again.

Rules that need time or context live here, not in the table:
- profiles: `deny`/`allow` networks take no choices; choice lifetimes differ per profile;
- lifetimes: a request may shorten the profile's, never lengthen it; opt-outs (refusals on an
  `opt-out` network) stand until the person changes them;
- GPC: on an `opt-out` network, a request with `Sec-GPC: 1` records an opt-out of every vendor that
  sells or shares data, carried into the subject's later choices until one grants that vendor
  (after the signal was seen: the later, specific word wins);
- kiosk: a session ends by an API call or after `kiosk_idle_minutes` without DNS queries; each
  reset is recorded;
- pairing: a grant applies only to the identity that made it (the HTTP caller, with its MAC). A
  link (a DNS source that looked up a caller's pairing name, or another address of the device
  that made the same choice naming the caller's token) carries refusals, withdrawals and session
  ends from the caller, never a grant: refusals into a target without a choice of its own, the rest
  into what pairing carried there and into the choice the target made naming the token, never into
  any other choice the target made itself; a trusted forwarder's own address is never reached (it
  speaks for every device behind it); a token links one address besides its owner's, the first
  that names it (its DNS name may be seen by anyone on the network);
- kiosk sessions reach every identity linked to the kiosk: a session end (the kiosk's, idleness, an
  admin's) resets each with an event and voids the pairing tokens given to them before it, queries
  from any of them keep the session in use, and a choice linked to a kiosk lasts no longer than a
  kiosk choice; an admin's end or withdrawal of an address or MAC is the device's own;
- the sweeper records expiries and idle kiosk resets, and applies the retention period.

Where consent is kept is the `consent_backend.ConsentBackend` the service is given: SQLite, or Redis
shared with other instances. With a shared store, the service also applies the changes other
instances record (`apply_recorded`, called by the store's follower), and a change planned before
another instance's change is planned again on the latest state (`_change`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Final, Self, TypeVar

from dnsgate.config import ConsentConfig
from dnsgate.consent.backend import Conflict, ConsentBackend, InDoubt, Snapshot, stop_if_cancelled, within
from dnsgate.consent.export import PAIRED_GRANT, iso
from dnsgate.consent.model import (
    KEY_SEPARATOR,
    UNTIL_CHANGED,
    Channel,
    Choice,
    ConsentTable,
    Decision,
    IPNetwork,
    NoticeRef,
    Profile,
    ProfileMap,
    Resolution,
    Subject,
    built_plain,
    decide,
    decide_category,
    grants_anything,
    grants_vendor,
)
from dnsgate.consent.notice import Item, Notice, NoticeInForce, Operator, notice_in_force, sha256_text
from dnsgate.consent.pairing import Offer, Pairings
from dnsgate.consent.records import Event, EventFilter, RefusalsHeld, Step, StoreError
from dnsgate.errors import ApiError
from dnsgate.rules.catalog import Catalog, DomainRule, Vendor
from dnsgate.tasks import TaskSet, background
from dnsgate.wire import name_to_wire

log = logging.getLogger(__name__)
T = TypeVar("T")
DAY: Final = 86_400.0
REASK_AFTER: Final = 365 * DAY  # CCPA: wait 12 months before asking again after an opt-out
RETENTION_EVERY: Final = 3600.0
NO_OPERATOR: Final = Operator()
PLAN_ATTEMPTS: Final = 20  # a change planned again after other instances' changes, at most this often
HELD_BATCH: Final = 100  # held refusals recorded per change when the store answers again
RETRY_MIN, RETRY_MAX = 0.2, 2.0  # seconds between attempts to record what is held


# Per record class: its fields' values in order and each field's position, to copy it through a
# positional call of its constructor (see `_replace`); None if a field is not a constructor parameter.
_COPYING: dict[type, tuple[Callable[[Any], tuple[Any, ...]], dict[str, int]] | None] = {}


def _replace(record: T, /, **changes: object) -> T:
    """`dataclasses.replace`, for the frozen records a consent change copies several times (Event,
    Step, Basis): the same constructor call, made with its arguments in order (read at once by an
    `attrgetter`) instead of one keyword per field, which took ~a tenth of the event loop's
    bytecodes per change. A class with a field outside `__init__`, or a change naming no field of
    it, goes through `dataclasses.replace` as before."""
    cls = type(record)
    if cls not in _COPYING:
        fields = dataclasses.fields(record)  # type: ignore[arg-type]
        names = [f.name for f in fields]
        _COPYING[cls] = None if len(names) < 2 or not all(f.init for f in fields) else (
            attrgetter(*names), {name: i for i, name in enumerate(names)})
    how = _COPYING[cls]
    if how is None or not how[1].keys() >= changes.keys():
        return dataclasses.replace(record, **changes)  # type: ignore[type-var]
    values_of, position = how
    values = list(values_of(record)) if changes else values_of(record)
    for name, value in changes.items():
        values[position[name]] = value  # type: ignore[index]
    return cls(*values)


@dataclass(frozen=True, slots=True)
class Caller:
    """Who makes a request, and how: the context every recorded event carries."""

    address: str | None
    mac: str | None
    channel: Channel
    user_agent: str = ""
    sec_gpc: str | None = None


@dataclass(frozen=True, slots=True)
class ChoiceRequest:
    categories: Mapping[str, bool]
    vendors: Mapping[str, bool] = dataclasses.field(default_factory=dict)
    days: int | None = None
    notice_sha256: str | None = None
    notice_version: str | None = None
    language: str | None = None
    # The pairing token another address of the same device was given: the portal page records the
    # choice through each address family, and this links the two (see `Link`).
    pairing: str | None = None


@dataclass(frozen=True, slots=True)
class Link:
    """A choice made naming another client's pairing token: that client (`owner`) reaches this one."""

    owner: Subject
    key: str  # this client's key in the owner's links
    kiosk: bool  # the owner is a kiosk: this choice belongs to its session


@dataclass(frozen=True, slots=True)
class Basis:
    """What a choice rests on: the notice the client presented (None: not shown), the items it
    covers (key -> fingerprint), the terms in force (SHA-256 of text and operator), the language."""

    notice: NoticeRef | None
    items: Mapping[str, str] | None
    terms: str
    language: str

    @classmethod
    def of(cls, c: Choice | Event) -> Basis:
        language = c.language if c.language else (c.notice.language if c.notice else "")
        return cls(c.notice, None if c.items is None else dict(c.items), c.terms, language)


@built_plain
@dataclass(frozen=True, slots=True)
class ClientView:
    """A client's (or a subject's) consent as the API shows it."""

    client: str
    subject: Subject
    address: str | None
    mac: str | None
    mac_source: str | None
    profile: Profile
    network: IPNetwork | None
    why_profile: str
    choice: Choice | None  # the choice that applies (for a subject: its own)
    notice_current: bool
    decisions: tuple[tuple[Vendor, Decision], ...]
    notes: tuple[str, ...]
    ask_again_after: float | None
    kiosk_idle_minutes: float | None
    kiosk_last_seen: float | None
    now: float
    # category -> what the choice says of it as a whole (granted, refused, or the profile's default)
    by_category: tuple[tuple[str, Decision], ...] = ()
    lists: tuple[tuple[Vendor, Decision], ...] = ()  # each block list in force and its decision
    new: tuple[Item, ...] = ()  # items in force the choice does not cover, or whose description changed
    held: str = ""  # a refusal in force here that the store has not recorded yet: why (API: 202)


@dataclass(frozen=True, slots=True)
class Explanation:
    name: str
    rule: DomainRule | None
    view: ClientView
    decision: Decision | None  # None: the name is not gated


@dataclass(frozen=True, slots=True)
class Paired:
    dns_key: str
    at: float


class Busy(StoreError):
    """Other changes kept the store busy until this one's deadline: it was not attempted."""


@dataclass(slots=True)
class Held:
    """A refusal in force here that the store has not recorded yet."""

    event: Event  # as it is to be recorded; what it supersedes and ends comes from `shadow` then
    choice: Choice  # in the table meanwhile, with a provisional (negative) id
    shadow: list[Choice]  # the recorded choices it replaces, as far as this instance knows, newest first
    derived_action: bool  # "withdrawal" or "refusal" follows from what it replaces
    prelude: list[Step] = dataclasses.field(default_factory=list)  # kiosk resets recorded before it
    pairing: tuple[str, str] | None = None  # the link it was made through, recorded with it
    attempt: tuple[str, int, list[Step]] | None = None  # a write in doubt: (change, based_on, its steps)
    # Answered (202) without being recorded. Until then its request is still writing it, and a choice
    # recorded meanwhile comes before it in the log, like any concurrent change.
    answered: bool = False

    def records(self, c: Choice) -> bool:
        """Whether recorded choice `c` is this refusal, recorded (here, or by a write in doubt)."""
        e = self.event
        return c.made_at == e.at and c.categories == e.categories and c.vendors == e.vendors

    def steps(self) -> list[Step]:
        event = self.event
        action = event.action
        if self.derived_action:
            action = "withdrawal" if any(c.active(event.at) and c.grants_anything for c in self.shadow) else "refusal"
        supersedes = self.shadow[0].id if self.shadow else None
        if action != event.action or supersedes != event.supersedes:  # (as planned, most often: no copy)
            event = _replace(event, action=action, supersedes=supersedes)
        return [*self.prelude, Step(event, makes_choice=True, ends=tuple(c.id for c in self.shadow),
                                    pairing=self.pairing)]


@dataclass(slots=True)
class Doubt:
    """A change answered 503 that the store may have recorded all the same. Until its undoing is
    recorded (or the store says it never ran), it is kept out of force here, and no other change is
    planned: one planned meanwhile would supersede what the store no longer holds."""

    change: str
    based_on: int
    steps: Sequence[Step]
    ended: Mapping[int, Choice]  # the choices its steps ended, as they were: what undoing it restores
    found: dict[int, int] | None = None  # recorded after all: step -> event id (None: not known yet)
    undo: tuple[str, int, list[Step]] | None = None  # its undoing, written but in doubt too

    def made(self, c: Choice) -> bool:
        """Whether recorded choice `c` is one this change made (it must not be in force here)."""
        return any(s.makes_choice and c.subject == s.event.subject and c.made_at == s.event.at
                   and c.categories == s.event.categories and c.vendors == s.event.vendors for s in self.steps)


@dataclass(frozen=True, slots=True)
class Loss:
    """The shared store lost the history this instance had followed."""

    at: float
    what: str


class ConsentService:
    def __init__(self, store: ConsentBackend, table: ConsentTable, catalog: Catalog, notice: Notice,
                 cfg: ConsentConfig, pairings: Pairings, wall: Callable[[], float] = time.time,
                 trusted_forwarders: Iterable[str] = (), operator: Operator = NO_OPERATOR, *,
                 listeners: Iterable[Callable[[Event], None]] = (),
                 replicated: Callable[[], Awaitable[None]] | None = None) -> None:
        self.store = store
        self.table = table
        self.catalog = catalog
        self.notice = notice
        self.operator = operator
        self.shown: NoticeInForce = notice_in_force(notice, operator, catalog)
        self.cfg = cfg
        self.pairings = pairings
        self.wall = wall
        self.trusted_forwarders = frozenset(trusted_forwarders)
        self.paired: dict[str, dict[str, float]] = {}  # HTTP subject key -> {DNS client key: when}
        self._lock = asyncio.Lock()
        self._waiting = 0  # changes waiting for the lock (`_acquire`): the lock's only waiters
        # Changes planned under the lock whose commit is under way without it (`_change_alongside`):
        # the identities (addresses, MACs) each one touches. Whoever takes the lock to change anything
        # else waits for them to be in force first (`_locked`).
        self._alongside: list[frozenset[str]] = []
        self._alongside_done = asyncio.Event()
        self._alongside_done.set()
        self._tasks = TaskSet()  # pairing binds, which outlive the request that started them
        self._last_purge = 0.0
        self._profiles = table.profiles  # the configured ones (see hold_closed)
        # The store's health, for /healthz and /metrics: failed operations, the problem while it
        # lasts ("" once the store answers again), changes applied from other instances.
        self.store_errors = 0
        self.store_problem = ""
        self._feed_problem = ""
        # Bumped as an outage is reported and as its end is: an operation's outcome says nothing
        # about the store's state if that state was reported changed while the operation was out.
        self._store_turn = 0
        self.remote_changes = 0
        self.timeout = store.timeout  # a change's deadline, from the moment it is asked for
        self._provisional = 0  # ids (negative) of refusals held in memory until the store records them
        self._held: dict[str, Held] = {}  # subject key -> its refusal not recorded yet
        self._doubts: list[Doubt] = []
        self._work = asyncio.Event()  # something held or in doubt to settle (run_reconciler)
        self.history_lost: Loss | None = None  # until an admin acknowledges it
        self.history_losses = 0
        self.undone = 0  # changes answered 503 that the store had recorded after all, undone since
        # Called with each recorded event once it is stored and in force (metrics, events: observe/events.py),
        # on every instance that shares the store.
        self.listeners = tuple(listeners)
        self._loading = False  # `load` runs: what it records is the start catching up, not heard by listeners
        # dns.workers > 1: awaited once a change is in force here, returns once every worker has it
        # too (workers/supervisor.py), so that a change the API reports done holds on every process.
        self.replicated = replicated
        table.set_notice(self.shown.current())

    # -- start -----------------------------------------------------------------------------------
    async def load(self) -> int:
        """Fill the table from the store (at start, before DNS listens); returns the choice count.

        Records a profile_change for every choice whose network now has another profile, and ends
        every grant that pairing once copied to another identity (see `_copied_grants`)."""
        self._loading = True
        try:
            return await self._load()
        finally:
            self._loading = False

    async def _load(self) -> int:
        now = self.wall()
        snapshot = await self._in_store(self.store.load())
        self.replace_all(snapshot)
        try:
            copied = await self._copied_grants()
        except StoreError:  # unconfirmed: none of them applies until a start that can tell (fail closed)
            for choice in self._copy_candidates():
                self.table.remove(choice.id)
            copied = []
        if copied:
            log.warning("consent: %d grants that pairing copied from another client no longer count: a grant "
                        "applies only to the device that made it ('dnsgate consent paired' lists them)", len(copied))

        def plan() -> list[Step]:
            steps: list[Step] = []
            for choice in copied:
                if self.table.find(choice.id) is choice:
                    steps.append(self._reset_step(
                        choice, now, self.profile_of(choice.subject)[0], Caller(None, None, "system"),
                        f"choice #{choice.id} was a grant copied by pairing from another client; a grant "
                        "applies only to the device that made it, so it no longer counts"))
            for choice in self.table.choices():
                if choice.id < 0 or (choice.subject.address is None and choice.subject.network is None):
                    continue  # a device's profile follows wherever it is; nothing to compare at start
                profile, why = self.profile_of(choice.subject)
                if choice.profile != profile:
                    expires_at, lifetime = choice.expires_at, ""
                    if profile in ("opt-in", "kiosk"):  # (no opt-out stands there: the profile's lifetime)
                        expires_at = min(choice.expires_at, now + self._days(profile) * DAY)
                    if expires_at != choice.expires_at:
                        lifetime = f"; it now lasts until {iso(expires_at)}, as one made now on a {profile} network"
                    event = Event("profile_change", now, choice.subject, profile, choice.categories,
                                  choice.vendors, expires_at, choice.notice, "system", supersedes=choice.id,
                                  reason=f"profile changed from {choice.profile} to {profile}: {why}{lifetime}",
                                  items=choice.items, terms=choice.terms, language=choice.language)
                    steps.append(Step(event, sets_profile_of=choice.id))
            ended = {c.id for c in copied}
            steps += [self._migration_step(c, now) for c in self.table.choices()
                      if c.items is None and c.id not in ended]
            return steps

        kiosks = [c.subject.address for c in self.table.choices()
                  if c.subject.address and self.table.profiles.of(c.subject.address)[0] == "kiosk"]
        kiosks += [k for address in kiosks for k in self._links_of_kiosk(address)]
        if not self.store.shared:
            for key in kiosks:
                self.table.set_seen(key, now)  # a restart starts the idle clock
        self._sync_kiosk_links()
        try:
            deadline = self._deadline(2)
            async with self._locked(deadline):
                await self._change(plan, deadline)
            if self.store.shared:  # the last query any instance saw from each kiosk
                await self._share_activity(self._deadline(), adopt=kiosks)
        except StoreError:
            # The choices are in force; the profile changes are recorded at the next start. The
            # copied grants are not: out of memory now, their end recorded at the next start.
            for choice in copied:
                self.table.remove(choice.id)
        return len(snapshot.choices)

    def _copy_candidates(self) -> list[Choice]:
        """Grants in force at an identity a pairing link reached, not an admin's (an older dnsgate
        copied the HTTP client's grant there: its event's reason starts with PAIRED_GRANT)."""
        found: dict[int, Choice] = {}
        for http, links in self.paired.items():
            for key in links:
                target = self._dns_subject(key)
                c = self.table.choice_of(target)
                if (c is not None and target.key != http and c.grants_anything
                        and c.channel not in ("admin", "system", "pairing")):
                    found[c.id] = c
        return list(found.values())

    async def _copied_grants(self) -> list[Choice]:
        """The candidates whose recording event says pairing copied them."""
        copied: list[Choice] = []
        for c in self._copy_candidates():
            events = await self._in_store(self.store.events(c.subject.address or c.subject.mac, 100))
            event = next((e for e in events if e.id == c.id), None)
            if event is not None and event.action == "grant" and event.reason.startswith(PAIRED_GRANT):
                copied.append(c)
        return copied

    def hold_closed(self, problem: str) -> None:
        """Start without the store: no choice is known, and no profile opens a gated name, until the
        store answers (its follower then calls `replace_all`, which restores the configured profiles)."""
        self.table.set_profiles(ProfileMap("opt-in", ()))
        self.store_errors += 1
        self.store_health(problem)  # until the follower has loaded everything

    # -- what a shared store tells this instance (consent_backend.ChangeSink) ----------------------
    def replace_all(self, snapshot: Snapshot) -> None:
        if snapshot.lost:
            self._lose_history(snapshot)
        self.table.reset(snapshot.choices)
        if self._doubts:
            self._keep_doubts_out()
        if self.table.profiles is not self._profiles:
            self.table.set_profiles(self._profiles)
        self.paired = {}
        for http, dns, at in snapshot.pairings:
            self.paired.setdefault(http, {})[dns] = at
        self._sync_kiosk_links()
        if self._held:
            for held in self._held.values():
                held.shadow = []
            self._settle_held()
            self._work.set()

    def apply_recorded(self, step: Step, event_id: int, own: bool, change: str = "") -> None:
        if change and any(d.change == change for d in self._doubts):
            return  # answered 503: out of force here until its undoing is recorded (_settle_doubts)
        self._put_in_force(step, event_id)
        if own or step.event.action == "history_lost":
            return  # _commit logs and announces it (a lost history is reported by each instance itself)
        self.remote_changes += 1
        event = dataclasses.replace(step.event, id=event_id)
        log.debug("consent change #%d recorded through another instance applied", event_id)
        self._notify(event)

    def store_health(self, problem: str) -> None:
        """The follower's word on a shared store: unreachable (why), or back and caught up ("")."""
        self._feed_problem = problem
        self._report(problem)
        if not problem:
            self._work.set()  # record what is held, settle what is in doubt

    def cut_off(self, problem: str) -> None:
        """Nothing heard from the shared store for its lease: another instance may have recorded
        withdrawals this one has not seen. Hold closed (refusals stay, grants and open profiles do
        not) until the follower has loaded the whole state again (`replace_all`)."""
        log.warning("consent store %s: %s; gated names are blocked for every client until it answers again",
                    self.store.name, problem)
        self.table.reset([c for c in self.table.choices() if not c.grants_anything])
        self.table.set_profiles(ProfileMap("opt-in", ()))
        self._feed_problem = problem
        self._report(problem)

    def _keep_doubts_out(self) -> None:
        """After a reload: what a change answered 503 made or ended, if the store has it, is not in
        force here; what it ended is, as before it (its undoing will record that)."""
        now = self.wall()
        for doubt in self._doubts:
            for c in [c for c in self.table.choices() if c.id > 0 and doubt.made(c)]:
                self.table.remove(c.id)
            for before in doubt.ended.values():
                current = self.table.choice_of(before.subject)
                if before.active(now) and (current is None or current.made_at < before.made_at):
                    self.table.put(before)

    def _lose_history(self, snapshot: Snapshot) -> None:
        """The store lost part or all of what this instance had followed, for every instance. A grant
        it no longer holds cannot be proven, so it goes; a refusal needs no proof and a person's "no"
        must hold, so each one in force here that the store lost is held and recorded again."""
        now = self.wall()
        kept = {c.id for c in snapshot.choices}
        dropped = [c for c in self.table.choices() if c.id > 0 and c.id not in kept]
        again = 0
        for c in dropped:
            if c.grants_anything or not c.active(now) or c.subject.key in self._held:
                continue
            event = Event("refusal", c.made_at, c.subject, c.profile, dict(c.categories), dict(c.vendors),
                          c.expires_at, c.notice, "system", sec_gpc=c.sec_gpc,
                          reason=f"recorded again: the consent store lost its history (choice #{c.id}, made "
                                 f"{iso(c.made_at)} via {c.channel})",
                          items=c.items, terms=c.terms, language=c.language, gpc_seen_at=c.gpc_seen_at)
            self._provisional -= 1
            self._held[c.subject.key] = Held(event, event.as_choice(self._provisional), [], derived_action=False,
                                             answered=True)
            again += 1
        grants = sum(1 for c in dropped if c.grants_anything)
        what = (f"{snapshot.lost}. {len(dropped)} choices in force here are not in it any more ({grants} grants, "
                f"dropped: they cannot be proven; {again} refusals, recorded again)")
        self.history_lost = Loss(now, what)
        self.history_losses += 1
        log.error("consent store %s lost its history: %s; acknowledge with POST /v1/store/acknowledge or "
                  "'dnsgate store acknowledge' once handled", self.store.name, what)

    def acknowledge_loss(self) -> Loss | None:
        """An admin has seen the loss (and kept the exports from before it): /healthz is ok again."""
        loss, self.history_lost = self.history_lost, None
        if loss is not None:
            log.info("consent store history loss of %s acknowledged", iso(loss.at))
        return loss

    @property
    def withdrawals_held(self) -> int:
        return len(self._held)

    def _report(self, problem: str) -> None:
        if problem and not self.store_problem:
            log.error("consent store unavailable: %s; DNS answers from the choices in memory (gated names "
                      "stay blocked for clients without a known grant), consent changes answer 503", problem)
            self._store_turn += 1
        elif not problem and self.store_problem:
            log.info("consent store %s reachable again; caught up with the changes made meanwhile", self.store.name)
            self._store_turn += 1
        self.store_problem = problem

    async def run_follower(self) -> None:
        """Apply the changes other instances record, for as long as dnsgate runs (shared stores only)."""
        await self.store.follow(self)

    def use_notice(self, catalog: Catalog, text: Notice, operator: Operator) -> None:
        """A reload swapped the catalog (or its lists), the consent text or the operator: the catalog's
        vendors are decided from now on, and the notice is built anew (a new or changed item is "no
        choice yet" for every earlier choice; a new text or operator, for every earlier grant)."""
        self.catalog, self.notice, self.operator = catalog, text, operator
        self.shown = notice_in_force(text, operator, catalog)
        self.table.set_vendors(catalog.vendors)
        self.table.set_notice(self.shown.current())

    # -- reading ---------------------------------------------------------------------------------
    def mac_of(self, address: str) -> str | None:
        return self.table.mac_of(address)

    def profile_of(self, subject: Subject) -> tuple[Profile, str]:
        profiles = self.table.profiles
        if subject.network is not None:
            net = ipaddress.ip_network(subject.network)
            return profiles.of(str(net.network_address))[0], profiles.why(str(net.network_address))
        address = subject.address or self._address_of_mac(subject.mac)
        if address is None:
            return profiles.default, f"device {subject.mac} is not in the neighbour table; " \
                                     f"profiles.default is {profiles.default}"
        return profiles.of(address)[0], profiles.why(address)

    def _address_of_mac(self, mac: str | None) -> str | None:
        if mac is None:
            return None
        return next((a for a, m in self.table.neighbours.items() if m == mac), None)

    def view(self, address: str, mac: str | None = None) -> ClientView:
        """A live client's consent, exactly as its DNS queries are decided."""
        now = self.wall()
        r = self.table.resolve(address, mac, now)
        return self._view(address, Subject(address, r.mac), r, now)

    def view_subject(self, subject: Subject) -> ClientView:
        """A subject's own choice (a device, an address or a network), as the admin API lists it."""
        now = self.wall()
        profile, why = self.profile_of(subject)
        own = self.table.choice_of(subject)
        applies = own.in_force(now) if own is not None else None
        decisions = tuple((v, decide(v, profile, applies, self.table.notice)) for v in self.catalog.vendors)
        network = ipaddress.ip_network(subject.network) if subject.network else None
        r = Resolution(subject.address or "", subject.mac, None, profile, network, why, own, (), decisions, 0.0,
                       applies)
        return self._view(subject.key, subject, r, now)

    def _view(self, client: str, subject: Subject, r: Resolution, now: float) -> ClientView:
        choice = r.choice
        notice = self.table.notice
        ask_again = None
        if choice is not None and choice.subject.network is None and choice.refuses_anything:
            # After an opt-out, 12 months (CCPA); after a refusal elsewhere, until it expires.
            ask_again = choice.made_at + REASK_AFTER if choice.standing else choice.expires_at
        kiosk = r.profile == "kiosk"
        last_seen = self.table.last_use(r.address) if kiosk else None
        current = notice is not None and choice is not None and notice.covers(choice.notice)
        applies = choice.in_force(now) if choice is not None else None
        by_category = tuple((c.id, decide_category(c.id, r.profile, applies, notice))
                            for c in self.catalog.categories)
        lists = tuple((v, decide(v, r.profile, applies, notice)) for v in self.catalog.listed)
        new: tuple[Item, ...] = ()
        if applies is not None and notice is not None:  # neither a grant that counts nor a refusal
            new = tuple(i for i in self.shown.items if not notice.holds(applies, i.key)
                        and not _refused(decide(i.vendor, "opt-in", applies, notice)))
        return ClientView(client, subject, r.address or None, r.mac, r.mac_source, r.profile, r.network,
                          r.why_profile, choice, current, r.decisions, r.notes, ask_again,
                          self.cfg.kiosk_idle_minutes if kiosk else None, last_seen, now, by_category, lists, new)

    def views(self) -> list[ClientView]:
        return [self.view_subject(c.subject) for c in self.table.choices()]

    def explain(self, name: str, address: str, mac: str | None) -> Explanation:
        """The decision for `name` asked by `address` (ValueError for a malformed name)."""
        rule = self.catalog.match(name_to_wire(name))
        view = self.view(address, mac)
        decision = None
        if rule is not None:
            decision = next(d for v, d in view.decisions if v is rule.vendor)
        return Explanation(name, rule, view, decision)

    def whoami(self, caller: Caller) -> tuple[ClientView, Paired | None]:
        assert caller.address is not None
        view = self.view(caller.address)
        links = self.paired.get(Subject(caller.address, caller.mac).key, {})
        latest = max(links.items(), key=lambda item: item[1], default=None)
        return view, Paired(*latest) if latest else None

    async def events(self, address: str | None, limit: int) -> list[Event]:
        return await self._in_store(self.store.events(address, limit))

    async def export(self, f: EventFilter) -> AsyncIterator[Event]:
        """Every event matching `f`, oldest first, read a page at a time."""
        network = ipaddress.ip_network(f.network) if f.network else None
        events = self.store.export(f)
        while True:
            try:
                event = await self._in_store(anext(events))
            except StopAsyncIteration:
                return
            if network is None or _in_network(event.subject, network):
                yield event

    # -- changing --------------------------------------------------------------------------------
    async def choose(self, subject: Subject, request: ChoiceRequest, caller: Caller) -> ClientView:
        """Record a choice by `subject`: it replaces the subject's previous one whole, but for an
        opt-out by GPC, which carries over (`_under_gpc`).

        A refusal (nothing granted) is in force at once, before the store is asked anything, and
        stays held until the store has recorded it (the view says so: `held`)."""
        deadline = self._deadline()
        now = self.wall()
        profile, why = self.profile_of(subject)
        if profile in ("deny", "allow"):
            raise ApiError(409, "profile_fixed", f"{why}: choices do not apply on a {profile} network")
        basis, categories, vendors = self._covered(request)
        action = "grant" if any(categories.values()) or any(vendors.values()) else None
        if action == "grant" and caller.channel != "admin" and subject.address in self.trusted_forwarders:
            raise ApiError(409, "forwarder_address",
                               f"{subject.address} is a forwarder (identity.trusted_forwarders): it speaks for "
                               "every device behind it, so a grant made from it would apply to all of them; "
                               "choose on the device itself")
        link = self._link(request.pairing, subject, caller, now)
        link_note = "" if link is None else (
            f"made through this address by the portal of {link.owner.describe()}, which it is linked to"
            + (" (a kiosk session: it lasts no longer than a kiosk choice)" if link.kiosk else ""))

        def plan() -> list[Step]:
            steps = self._kiosk_idle_resets(subject, caller, now)
            opted, gpc_seen_at, gpc_note = self._under_gpc(subject, categories, vendors, caller, profile, now)
            expires_at, days_note = self._expiry(profile, categories, opted, now, request.days)
            if link is not None and link.kiosk:  # it belongs to the kiosk's session
                expires_at = min(expires_at, now + self._days("kiosk") * DAY)
            reason = "; ".join(note for note in (link_note, gpc_note, days_note) if note)
            main = self._choice_step(subject, action, categories, opted, now, expires_at,
                                     self._covering(basis, opted), caller, profile, reason=reason,
                                     gpc_seen_at=gpc_seen_at)
            if link is not None:
                main = dataclasses.replace(main, pairing=(link.owner.key, link.key))
            steps.append(main)
            steps += self._carried(subject, main.event)
            return steps

        if action is None:
            await self._refuse(plan(), deadline, subject)
        else:
            # What the choice takes away (a category or vendor it refuses that the choice in force
            # allows, a GPC opt-out) holds at once, as a withdrawal does, whatever the store does;
            # the recorded choice replaces it (it was made at the same time: _settle_held).
            held = self._hold(self._refusal_part(subject, categories, vendors, caller, profile, now), narrowing=True)
            for key in held:
                self._held[key].answered = True
            if held:
                await self._replicate()
            try:
                if self.store.shared or link is not None or profile == "kiosk":
                    async with self._locked(deadline):
                        if self.store.shared:
                            await self._load_links(subject, deadline)
                        await self._change(plan, deadline)
                else:
                    await self._change_alongside(plan, deadline)
            except StoreError as exc:
                if not any(key in self._held for key in held):
                    raise
                self._work.set()  # (the reconciler records them once the store answers)
                raise RefusalsHeld(str(exc), self._held_note()) from exc
        if subject.address is not None and (profile == "kiosk" or (link is not None and link.kiosk)):
            # a new session (or an identity joining one): its idle clock starts now
            self.table.set_seen(subject.address, now)
            self._sync_kiosk_links()
            await self._replicate()  # (a worker's clock of the session before must not end this one)
            if self.store.shared and not self.store_problem:
                with contextlib.suppress(StoreError):  # the sweeper shares it later anyway
                    async with self._locked(deadline):
                        await self._share_activity(deadline)
        return self._after(subject)

    async def _refuse(self, steps: Sequence[Step], deadline: float, subject: Subject | None = None,
                      narrowing: bool = False) -> None:
        """Put refusals in force here now, then record them if the store answers before `deadline`;
        whatever it does, they hold (`Held`) until recorded. `subject`: whose choice `steps` make
        (what it carries to identities linked through other instances is added once they are known)."""
        keys = self._hold(steps, narrowing)
        await self._replicate()
        if not keys:
            return
        try:
            async with self._locked(deadline):
                main = next((s.event for s in steps if subject is not None and s.event.subject == subject), None)
                if main is not None and subject is not None and self.store.shared:
                    known = set(self.paired.get(subject.key, {}))
                    await self._load_links(subject, deadline)
                    if set(self.paired.get(subject.key, {})) - known:
                        more = [s for s in self._carried(subject, main) if s.event.subject.key not in self._held]
                        keys += self._hold(more)
                        await self._replicate()
                await self._write_held(keys, deadline)
        except StoreError:
            pass  # reported (once per outage); the refusals hold here, the reconciler records them
        for key in keys:
            if key in self._held:
                self._held[key].answered = True
                self._work.set()

    def _refusal_part(self, subject: Subject, categories: Mapping[str, bool], vendors: Mapping[str, bool],
                      caller: Caller, profile: Profile, now: float) -> list[Step]:
        """The refusals of a choice that also grants, as a choice of their own: the choice in force
        for `subject` with what the new one refuses (and the vendors GPC opts out) refused too; none
        if that takes nothing away."""
        superseded = self.table.superseded_by(subject)
        own = next((c for c in superseded if c.active(now)), None)
        if own is None and profile != "opt-out":
            return []  # (nothing resolves for it without a choice: nothing to take away)
        opted, gpc_seen_at, _ = self._under_gpc(subject, categories, vendors, caller, profile, now)
        narrowed = _narrowed(own, categories, opted)
        if narrowed is None:
            return []
        new_c, new_v = narrowed
        expires_at, _ = self._expiry(profile, new_c, new_v, now)
        if own is not None and own.grants_anything:
            expires_at = min(expires_at, own.expires_at)  # its grants keep their own expiry
        basis = self._covering(Basis(None, own.items if own else {}, own.terms if own else "",
                                     own.language if own else ""), new_v)
        refused = ", ".join([*(c for c, said in categories.items() if said is False),
                             *(v for v, said in opted.items() if said is False)])
        return [self._choice_step(subject, "refusal", new_c, new_v, now, expires_at, basis, caller, profile,
                                  reason=f"what a choice made at the same time refuses ({refused}), recorded on "
                                         "its own: the consent store could not record that choice, whose grants "
                                         "changed nothing",
                                  gpc_seen_at=gpc_seen_at)]

    def _held_note(self) -> str:
        others = " (other dnsgate instances apply it once it is recorded)" if self.store.shared else ""
        return (f"in force here now but not recorded yet: the consent store is unavailable "
                f"({self.store_problem or 'no answer in time'}); it is recorded as soon as the store answers"
                f"{others}, and a restart of dnsgate before then forgets it")

    def _hold(self, steps: Sequence[Step], narrowing: bool = False) -> list[str]:
        """Each refusal in `steps` in force now as a `Held` choice; returns their subjects' keys. The
        other steps (kiosk resets before a refusal) are recorded with it. `narrowing`: the choices
        only take away from what they replace (an opt-out keeps the grants it does not touch), and
        are recorded as planned; otherwise each is a withdrawal or a refusal by what it replaces."""
        keys: list[str] = []
        prelude: list[Step] = []
        for step in steps:
            e = step.event
            if not step.makes_choice:
                if step.only_if_current is None or step.only_if_current > 0:
                    prelude.append(step)
                continue
            if grants_anything(e.categories, e.vendors) and not narrowing:
                continue
            shadow: list[Choice] = []
            for ended in step.ends:
                c = self.table.find(ended)
                if c is None:
                    continue
                earlier = self._held.pop(c.subject.key, None) if c.id < 0 else None
                if earlier is not None:
                    shadow += earlier.shadow  # a refusal held before: what it replaces, this one does
                elif c.id > 0:
                    shadow.append(c)
            shadow.sort(key=lambda c: c.made_at, reverse=True)
            self._provisional -= 1
            choice = e.as_choice(self._provisional)
            for ended in step.ends:
                self.table.remove(ended)
            self.table.put(choice)
            self._held[e.subject.key] = Held(e, choice, shadow, not narrowing, prelude, step.pairing)
            prelude = []
            keys.append(e.subject.key)
        return keys

    async def _write_held(self, keys: Sequence[str], deadline: float) -> bool:
        """Record the held refusals of `keys` (under the lock); whether all of them are recorded now."""
        if self._doubts:  # (a refusal supersedes what the store holds, not a change in doubt)
            await self._settle_doubts(deadline)
        for _ in range(PLAN_ATTEMPTS):
            batch = [self._held[k] for k in keys if k in self._held]
            if not batch:
                return True
            if any(h.attempt is not None for h in batch):
                await self._settle_attempts(batch, deadline)
                continue
            based_on = self.store.position
            steps = [step for h in batch for step in h.steps()]
            try:
                await self._commit(steps, based_on, deadline, held=batch)
            except Conflict:
                await self._in_store(self.store.catch_up(self), deadline)
            except InDoubt:
                return False
        return all(k not in self._held for k in keys)

    async def _settle_attempts(self, batch: Sequence[Held], deadline: float) -> None:
        """Held refusals whose write is in doubt: recorded after all (they are in force as recorded
        choices now), or not (written again)."""
        for h in batch:
            if h.attempt is None:
                continue
            change, based_on, steps = h.attempt
            found = await self._in_store(self.store.resolve(change, based_on), deadline)
            for other in self._held.values():
                if other.attempt is not None and other.attempt[0] == change:
                    other.attempt = None
            if found:
                await self._recorded_after_all(steps, found, deadline)

    async def _recorded_after_all(self, steps: Sequence[Step], found: Mapping[int, int], deadline: float) -> None:
        """A change in doubt was recorded (`found`: step -> event id): in force here and announced."""
        if self.store.shared:
            await self._in_store(self.store.catch_up(self), deadline)  # in log order, with what came after it
        else:
            for i, step in enumerate(steps):
                if i in found:
                    self._put_in_force(step, found[i])
        await self._replicate()
        for i, step in enumerate(steps):
            if i in found:
                log_event(step.event)
                self._notify(dataclasses.replace(step.event, id=found[i]))

    def _settle_held(self, ended: Iterable[int] = (), near: Subject | None = None) -> None:
        """After recorded changes came into force: an answered held refusal whose subject has since
        made a choice (recorded at or after it) gives way to it; otherwise it stays on top of
        whatever recorded choices now occupy its slots, and will supersede them when written.
        `near`: only the held refusals whose slots a choice of this subject can take."""
        gone = set(ended)
        if near is None:
            keys = list(self._held)
        else:
            keys = [k for k in {near.mac, near.address, near.network} if k and k in self._held]
            if near.address is not None:  # (a device's refusal held at that address)
                keys += [k for k, h in self._held.items() if h.event.subject.address == near.address and k not in keys]
        for key in keys:
            h = self._held[key]
            if gone:
                h.shadow = [c for c in h.shadow if c.id not in gone]
            others = [c for c in self.table.superseded_by(h.event.subject) if c.id != h.choice.id]
            if any(c.subject.key == key and (h.records(c) or (h.answered and c.made_at >= h.event.at))
                   for c in others):
                del self._held[key]
                if self.table.find(h.choice.id) is not None:
                    self.table.remove(h.choice.id)
                continue
            known = {c.id for c in h.shadow}
            h.shadow = sorted([*h.shadow, *(c for c in others if c.id not in known)],
                              key=lambda c: c.made_at, reverse=True)
            if others or self.table.find(h.choice.id) is None:
                self.table.put(h.choice)

    async def withdraw(self, subject: Subject, caller: Caller, shown: ChoiceRequest | None = None) -> ClientView:
        """Withdraw everything granted, in one action: every category (and vendor) becomes refused.
        `shown`: the notice (and language) the page showed, if it says. An admin naming an address
        withdraws for the device there, as the device's own withdrawal would."""
        subject = self._device(subject) if caller.channel == "admin" else subject
        categories = {c.id: False for c in self.catalog.categories}
        vendors = {v: False for c in self.table.superseded_by(subject) for v in c.vendors}
        base = shown if shown is not None else ChoiceRequest({})
        return await self.choose(subject, dataclasses.replace(base, categories=categories, vendors=vendors), caller)

    def _device(self, subject: Subject) -> Subject:
        """The device an admin means by an address (with its MAC, where known) or by a MAC (at its
        address): the identity its own requests would have, so an admin's end reaches what its own does."""
        if subject.network is not None:
            return subject
        if subject.address is not None and subject.mac is None:
            return Subject(subject.address, self.table.mac_of(subject.address))
        if subject.address is None and subject.mac is not None:
            return Subject(self._address_of_mac(subject.mac), subject.mac)
        return subject

    async def honour_gpc(self, caller: Caller, wait: bool = True) -> bool:
        """`Sec-GPC: 1` on a request from a client on an opt-out network: record an opt-out of
        sale/sharing for every vendor that sells or shares data and may resolve for it, whatever else
        its choice grants, unless the person granted that very vendor after GPC was seen (the later,
        specific word wins). The client's other decisions stay as they were. The opt-out only takes
        away: it is in force at once and held until recorded. Returns whether it opted the client out.
        `wait=False`: the request has had its time with the store already (its change failed), so
        the opt-out is held and left to the reconciler instead of waiting for the store again."""
        if caller.address is None:
            return False
        address = caller.address
        subject = Subject(address, caller.mac)

        def plan() -> list[Step]:
            now = self.wall()
            r = self.table.resolve(address, None, now)  # the MAC, if any, from the neighbour table
            if r.profile != "opt-out":
                return []
            own = r.applied if r.choice is not None and r.choice.subject.network is None else None
            opting_out = [v for v, d in r.decisions if v.ccpa_sale_or_share and d.allowed
                          and not (own is not None and d.by_choice and own.granted_despite_gpc(v))]
            # The signal stands (for sellers added later too: consent.decide), so it is recorded the
            # first time it is seen even when nothing sells or shares data for the client now.
            if not opting_out and own is not None and own.gpc_seen_at is not None:
                return []
            categories = dict(own.categories) if own else {}
            vendors = {**(own.vendors if own else {}), **{v.id: False for v in opting_out}}
            expires_at, _ = self._expiry("opt-out", categories, vendors, now)
            if own is not None and own.grants_anything:
                expires_at = min(expires_at, own.expires_at)  # its grants keep their own expiry
            elif not opting_out:
                expires_at = UNTIL_CHANGED  # (refusing nothing new: it stands as the signal does)
            gpc_seen_at = own.gpc_seen_at if own is not None and own.gpc_seen_at is not None else now
            # No notice was shown: the signal covers the vendors it opts out of (and keeps the rest).
            basis = self._covering(Basis(None, own.items if own else {}, own.terms if own else "",
                                         own.language if own else ""), vendors)
            names = ", ".join(v.id for v in opting_out) or "no vendor that does resolves for it now"
            return [self._choice_step(subject, "refusal", categories, vendors, now, expires_at, basis,
                                      dataclasses.replace(caller, sec_gpc="1"), "opt-out",
                                      reason=f"opt-out of sale/sharing ({names}) signalled by Sec-GPC: 1; it "
                                             "stands for every vendor that sells or shares data, those listed "
                                             "later too, until the person grants that vendor",
                                      gpc_seen_at=gpc_seen_at)]

        steps = plan()  # (most requests carrying GPC have nothing left to opt out of)
        if not steps:
            return False
        if not wait:
            for key in self._hold(steps, narrowing=True):
                self._held[key].answered = True
                self._work.set()
            await self._replicate()
            return True
        await self._refuse(steps, self._deadline(), narrowing=True)
        return True

    async def end_session(self, subject: Subject, caller: Caller, reason: str) -> ClientView:
        """End a session: reset the choices that apply personally to `subject` and those of every
        identity linked to it (what pairing carried there, and the choice each made naming its token),
        with an event each. A device ends its own on a kiosk network only (the portal's kiosk layout
        on another network withdraws instead: a reset there would forget an opt-out); an admin ends
        any, reaching exactly what the device's own end would."""
        deadline = self._deadline()
        async with self._locked(deadline):
            now = self.wall()
            profile, why = self.profile_of(subject)
            admin = caller.channel == "admin"
            if not admin and profile != "kiosk":
                raise ApiError(409, "not_kiosk", f"session end applies to kiosk networks; {why}")
            named = subject
            subject = self._device(subject) if admin else subject
            personal = subject.network is None
            if personal and self.store.shared:
                await self._load_links(subject, deadline)
            reached = list(self.paired.get(subject.key, {})) if personal else []

            def plan() -> list[Step]:
                ended = {c.id: c for c in ([] if subject.address is None else
                                           self.table.personal_choices(subject.address, subject.mac))}
                for own in (self.table.choice_of(subject), self.table.choice_of(named)):
                    if own is not None:
                        ended.setdefault(own.id, own)
                steps = [self._reset_step(c, now, self.profile_of(c.subject)[0], caller, reason)
                         for c in self._recorded(ended.values())]
                if personal:
                    steps += self._session_resets(subject, set(ended), now, reason)
                return steps

            await self._change(plan, deadline)
            for key in [subject.address, *reached]:
                if key is not None:
                    self.table.set_seen(key, None)
            self._sync_kiosk_links()
            self._void_tokens(subject, reached, now)
            await self._replicate()
        return self._after(subject)

    def _void_tokens(self, subject: Subject, linked: Iterable[str], now: float) -> None:
        """A session ended: no pairing token given before to its identities links anything more."""
        identities: list[str | None] = [subject.address, subject.mac]
        for key in linked:
            address, _, mac = key.partition(KEY_SEPARATOR)
            identities += [address, mac or self.table.mac_of(address)]
        self.pairings.void(tuple(identities), now)

    # -- pairing ---------------------------------------------------------------------------------
    def offer_pairing(self, caller: Caller) -> Offer | None:
        assert caller.address is not None
        return self.pairings.offer(caller.address, caller.mac, self.wall())

    def on_pair(self, token: str, dns_client: str) -> bool:
        """Called by the pipeline for `<token>.pair.<portal host>`; binds in the background."""
        offer = self.pairings.claim(token, self.wall())
        if offer is None:
            return False
        self._tasks.spawn(self._bind(offer, dns_client))
        return True

    async def _bind(self, offer: Offer, dns_client: str) -> None:
        """Link the DNS source that looked up `offer`'s name to the HTTP caller it was given to. What
        the link carries now: the caller's refusals, into a target that has no choice of its own."""
        deadline = self._deadline(2)
        async with self._locked(deadline):
            now = self.wall()
            http = Subject(offer.address, offer.mac)
            dns = self._dns_subject(dns_client)
            if dns.key == http.key:
                self.paired.setdefault(http.key, {})[dns_client] = now
                return

            def plan() -> list[Step]:
                recorded = next(iter(self.table.personal_choices(offer.address, offer.mac)), None)
                source = recorded.in_force(now) if recorded is not None else None
                target = self._link_target(http, dns_client)
                if source is None or target is None:
                    return []
                current = self.table.choice_of(target)
                if current is not None and current.channel != "pairing":
                    return []  # the target's own choice: the link carries nothing into it now
                narrowed = _narrowed(current, source.categories, source.vendors)
                if narrowed is None:
                    return []
                categories, vendors = narrowed
                profile = self.profile_of(target)[0]
                lifetime, _ = self._expiry(profile, categories, vendors, now)
                step = self._choice_step(
                    target, "refusal", categories, vendors, now, min(source.expires_at, lifetime), Basis.of(source),
                    Caller(http.address, http.mac, "pairing"), profile,
                    reason=f"refusals of choice #{source.id} by {http.describe()}, carried by pairing: "
                           f"{target.describe()} looked up its pairing name (pairing carries refusals, "
                           "withdrawals and session ends, never a grant)")
                return [dataclasses.replace(step, pairing=(http.key, dns_client))]

            # (looked up again after each wait: a reload from the store replaces `paired` whole)
            if await self._change(plan, deadline):
                self.paired.setdefault(http.key, {})[dns_client] = now
            elif not self._made_here(http, dns_client):  # (that link keeps the time of the choice it made)
                await self._in_store(self.store.remember_pairing(http.key, dns_client, now), deadline)
                self.paired.setdefault(http.key, {})[dns_client] = now
            if self.profile_of(http)[0] == "kiosk":  # the kiosk's DNS source: its queries keep the session
                self.table.set_seen(dns_client, now)
                self._sync_kiosk_links()
                await self._replicate()
            log.info("consent paired: http=%s dns=%s", http.key, dns_client)

    def _made_here(self, http: Subject, key: str) -> bool:
        """Whether the identity `key` made its current choice naming `http`'s token."""
        linked_at = self.paired.get(http.key, {}).get(key)
        current = self.table.choice_of(self._dns_subject(key))
        return linked_at is not None and current is not None and _made_with_link(current, linked_at)

    def _link(self, token: str | None, subject: Subject, caller: Caller, now: float) -> Link | None:
        """The link a choice names (`ChoiceRequest.pairing`): the token's owner reaches `subject`."""
        if token is None:
            return None
        offer = self.pairings.lookup(token, now)
        if offer is None:
            raise ApiError(400, "invalid_field", "pairing: no such token, it expired (a token lives "
                               f"{self.pairings.ttl:g} s), or the session it was given in ended: choose again",
                               "pairing")
        owner = Subject(offer.address, offer.mac)
        if owner.key == subject.key or subject.address is None or caller.channel == "admin":
            return None
        if not self.pairings.bind(offer, subject.address, now):
            raise ApiError(400, "invalid_field", "pairing: this token links one other address of the device, "
                               "and another address used it already: choose again", "pairing")
        return Link(owner, subject.address, self.profile_of(owner)[0] == "kiosk")

    def _dns_subject(self, dns_client: str) -> Subject:
        """The subject a DNS client key names. A MAC sent by a trusted forwarder without a Client
        Subnet address belongs to a device behind it: the forwarder's own address is not the device's."""
        address, _, mac = dns_client.partition(KEY_SEPARATOR)
        if mac and address in self.trusted_forwarders:
            return Subject(None, mac)
        return Subject(address, mac or self.table.mac_of(address))

    def _link_target(self, http: Subject, key: str) -> Subject | None:
        """The subject a link from `http` reaches, if anything may be carried to it: not `http`
        itself, not a trusted forwarder's own address (it speaks for every device behind it), and
        not one on a fixed network."""
        address, _, mac = key.partition(KEY_SEPARATOR)
        if not mac and address in self.trusted_forwarders:
            return None
        target = self._dns_subject(key)
        if target.key == http.key or self.profile_of(target)[0] in ("deny", "allow"):
            return None
        return target

    def _carried(self, http: Subject, event: Event) -> list[Step]:
        """What a new choice by `http` carries to the identities linked to it: its refusals into a
        target without a choice of its own (or with one pairing carried), and a withdrawal into the
        choice the target made naming `http`'s token. Never a grant, nor into another own choice."""
        steps: list[Step] = []
        for key, linked_at in self.paired.get(http.key, {}).items():
            target = self._link_target(http, key)
            if target is None:
                continue
            current = self.table.choice_of(target)
            if current is None or current.channel == "pairing":
                narrowed = _narrowed(current, event.categories, event.vendors)
                if narrowed is None:
                    continue
                categories, vendors = narrowed
            elif event.action == "withdrawal" and _made_with_link(current, linked_at):
                categories = {c: False for c in {*current.categories, *event.categories}}  # (what exists)
                vendors = {**{v: False for v in current.vendors}, **{v: False for v, said in event.vendors.items()
                                                                     if said is False}}
            else:
                continue
            profile = self.profile_of(target)[0]
            lifetime, _ = self._expiry(profile, categories, vendors, event.at)
            steps.append(self._choice_step(
                target, None, categories, vendors, event.at, min(event.expires_at or event.at, lifetime),
                Basis.of(event), Caller(http.address, http.mac, "pairing"), profile,
                reason=f"{'withdrawal' if event.action == 'withdrawal' else 'refusals'} "
                       f"{'recorded by an admin for' if event.channel == 'admin' else 'by'} {http.describe()} "
                       f"carried by pairing to {target.describe()}, linked {iso(linked_at)} (pairing carries "
                       "refusals, withdrawals and session ends, never a grant)"))
        return steps

    def _session_resets(self, http: Subject, ending: set[int], now: float, reason: str) -> list[Step]:
        """A session of `http` ended: reset what it carried to every identity linked to it, and the
        choice each made naming its token; any other choice a target made itself stays."""
        steps: list[Step] = []
        whose = "the kiosk session" if self.profile_of(http)[0] == "kiosk" else "the choices"
        for key, linked_at in self.paired.get(http.key, {}).items():
            target = self._link_target(http, key)
            if target is None:
                continue
            choices = (self.table.personal_choices(target.address, target.mac) if target.address is not None
                       else [c for c in [self.table.choice_of(target)] if c is not None])
            for c in choices:
                if c.id in ending or not (c.channel == "pairing" or _made_with_link(c, linked_at)):
                    continue
                ending.add(c.id)
                steps.append(self._reset_step(
                    c, now, self.profile_of(c.subject)[0], Caller(http.address, http.mac, "pairing"),
                    f"{reason}: {whose} of {http.describe()} reached {c.subject.describe()} "
                    f"(linked {iso(linked_at)})"))
        return steps

    async def _load_links(self, subject: Subject, deadline: float) -> None:
        """Links recorded through any instance (a shared store): what a change by `subject` reaches."""
        links = await self._in_store(self.store.pairings_of(subject.key), deadline)
        self.paired[subject.key] = {**links, **self.paired.get(subject.key, {})}
        self._sync_kiosk_links()

    def _links_of_kiosk(self, key: str) -> list[str]:
        """The client keys linked to the session of the kiosk client `key` (none if not a kiosk)."""
        address, _, mac = key.partition(KEY_SEPARATOR)
        if self.table.profiles.of(address)[0] != "kiosk":
            return []
        return list(self.paired.get(Subject(address, mac or self.table.mac_of(address)).key, {}))

    def _sync_kiosk_links(self) -> None:
        """Give the table the identities linked to each tracked kiosk's session: a session is in use
        while any of them asks, and the table judges it so on every path (`ConsentTable.last_use`)."""
        links: dict[str, tuple[str, ...]] = {}
        for key in self.table.kiosk_seen:
            linked = self._links_of_kiosk(key)
            if linked:
                address, _, mac = key.partition(KEY_SEPARATOR)
                links[Subject(address, mac or self.table.mac_of(address)).key] = tuple(sorted(linked))
        if links != self.table.kiosk_links:
            self.table.set_kiosk_links(links)

    # -- sweeping --------------------------------------------------------------------------------
    async def sweep(self) -> int:
        """Record expiries and idle kiosk resets; purge events past retention. Returns events recorded."""
        deadline = self._deadline(2)
        async with self._locked(deadline):
            if self.store.shared and self.table.kiosk_seen:
                await self._share_activity(deadline)
            # (read after the wait: queries answered meanwhile are in the clocks already)
            now = self.wall()
            self._sync_kiosk_links()
            # A session is idle only when none of its identities asked for the idle time.
            idle_keys = [k for k, last in self.table.last_uses().items() if now - last > self.table.kiosk_idle]

            def plan() -> list[Step]:
                steps: list[Step] = []
                for choice in self._recorded(self.table.choices()):
                    if not choice.active(now):
                        profile, _ = self.profile_of(choice.subject)
                        steps.append(Step(
                            Event("expiry", now, choice.subject, profile, choice.categories, choice.vendors,
                                  choice.expires_at, choice.notice, "system", supersedes=choice.id,
                                  reason=f"choice #{choice.id} expired at {iso(choice.expires_at)}",
                                  items=choice.items, terms=choice.terms, language=choice.language),
                            ends=(choice.id,), only_if_current=choice.id))
                ending = {s.event.supersedes for s in steps if s.event.supersedes is not None}
                idle = f"kiosk session idle: no DNS queries for {self.cfg.kiosk_idle_minutes:g} minutes"
                for key in idle_keys:
                    address, _, mac = key.partition(KEY_SEPARATOR)
                    profile, _ = self.table.profiles.of(address)
                    if profile != "kiosk":
                        continue
                    device = mac or self.table.mac_of(address)
                    for choice in self._recorded(self.table.personal_choices(address, device)):
                        if choice.id not in ending:
                            ending.add(choice.id)
                            steps.append(self._reset_step(choice, now, profile, Caller(address, mac or None, "system"),
                                                          idle))
                    steps += self._session_resets(Subject(address, device), ending, now, idle)
                return steps

            recorded = await self._change(plan, deadline)
            for key in idle_keys:
                last = self.table.last_use(key)
                if last is not None and self.wall() - last > self.table.kiosk_idle:
                    self.table.set_seen(key, None)
                    address, _, mac = key.partition(KEY_SEPARATOR)
                    if self.table.profiles.of(address)[0] == "kiosk":
                        kiosk = Subject(address, mac or self.table.mac_of(address))
                        self._void_tokens(kiosk, self.paired.get(kiosk.key, {}), now)
            self._sync_kiosk_links()
            self.pairings.expire(now)
        if self.cfg.retention_days and now - self._last_purge >= RETENTION_EVERY:
            self._last_purge = now
            purged = await self._in_store(self.store.purge(now - self.cfg.retention_days * DAY, now))
            if purged:
                log.info("consent log: %d events older than %d days purged", purged, self.cfg.retention_days)
        return recorded

    async def run_sweeper(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            stop_if_cancelled()
            try:
                await self.sweep()
            except StoreError:
                pass  # store_health logged it; expired choices already stop counting in memory
            except Exception:
                stop_if_cancelled()
                log.exception("consent sweep failed; retrying in %.0f s", interval)

    # -- internals -------------------------------------------------------------------------------
    def _days(self, profile: Profile) -> int:
        days = {"opt-out": self.cfg.opt_out_days, "kiosk": self.cfg.kiosk_days}.get(profile, self.cfg.default_days)
        return min(days, self.cfg.max_days)

    def _expiry(self, profile: Profile, categories: Mapping[str, bool], vendors: Mapping[str, bool], now: float,
                days: int | None = None) -> tuple[float, str]:
        """When a choice made now on a `profile` network ends, and a note if the request asked for longer.

        A request may shorten the profile's lifetime, never lengthen it. On an opt-out network a
        choice that only refuses is an opt-out: it stands until the person changes it (one that
        also grants keeps its refusals after its grants expire: Choice.in_force)."""
        limit = self._days(profile)
        grants = True in categories.values() or True in vendors.values()
        if profile == "opt-out" and not grants and (False in categories.values() or False in vendors.values()):
            note = "an opt-out stands until the person changes it: days does not apply" if days else ""
            return UNTIL_CHANGED, note
        note = ""
        if days is not None and days > limit:
            note = f"{days} days asked for; a choice on a {profile} network lasts at most {limit}"
        return now + min(days or limit, limit) * DAY, note

    def _under_gpc(self, subject: Subject, categories: Mapping[str, bool], vendors: Mapping[str, bool],
                   caller: Caller, profile: Profile, now: float) -> tuple[dict[str, bool], float | None, str]:
        """A new choice's vendor decisions under Global Privacy Control, since when GPC applies to the
        subject, and what that did. On an opt-out network GPC applies once a request of the person
        carried Sec-GPC: 1, this one or an earlier one whose choice this replaces; then every vendor
        that sells or shares data and that this choice does not grant stays opted out."""
        decided = dict(vendors)
        if profile != "opt-out":
            return decided, None, ""
        previous = next(iter(self.table.superseded_by(subject)), None)
        seen = previous.gpc_seen_at if previous is not None and previous.active(now) else None
        if seen is None and caller.sec_gpc == "1" and caller.channel != "admin":
            seen = now
        if seen is None:
            return decided, None, ""
        opted_out: list[str] = []
        granted: list[str] = []
        for item in self.shown.items:
            v = item.vendor
            if item.kind != "vendor" or not v.ccpa_sale_or_share:
                continue
            if grants_vendor(categories, decided, v):
                granted.append(v.id)
            elif v.id not in decided:
                decided[v.id] = False
                opted_out.append(v.id)
        notes = []
        if opted_out:
            notes.append(f"{', '.join(opted_out)} stay opted out of sale/sharing: Global Privacy Control applies "
                         f"since {iso(seen)}")
        if granted:
            notes.append(f"grants {', '.join(granted)} after Global Privacy Control was seen ({iso(seen)}): "
                         "this later, specific grant wins over the signal")
        return decided, seen, "; ".join(notes)

    def _covering(self, basis: Basis, vendors: Mapping[str, bool]) -> Basis:
        """`basis` covering the vendors named in `vendors` too (an opt-out by GPC covers the sellers
        it names, though no notice listed them with the choice)."""
        items = dict(basis.items or {})
        for vendor_id in vendors:
            item = self.shown.item(f"vendor:{vendor_id}")
            if item is not None:
                items.setdefault(item.key, item.fingerprint)
        if items == basis.items:
            return basis  # (it names no vendor the basis does not cover: most choices)
        return _replace(basis, items=items)

    def _notice_ref(self, request: ChoiceRequest) -> NoticeRef | None:
        """The notice the client says it showed, checked against the one in force; None if it names none."""
        shown = self.shown
        language = self._language(request)
        if request.notice_version is None and request.notice_sha256 is None:
            return None
        sha = shown.hashes[language]
        if request.notice_version is not None and request.notice_version != shown.version:
            raise ApiError(409, "notice_changed", f"the notice is now version {shown.version}, not "
                               f"{request.notice_version!r}: show it again (GET /v1/notice)", "notice.version")
        if request.notice_sha256 is not None and request.notice_sha256.lower() != sha:
            raise ApiError(409, "notice_changed", f"the {language} notice now has SHA-256 {sha}: "
                               "show it again (GET /v1/notice)", "notice.sha256")
        return NoticeRef(self.catalog.version, shown.version, sha, language)

    def _language(self, request: ChoiceRequest) -> str:
        language = request.language or self.notice.default_language
        if language not in self.notice.texts:
            raise ApiError(400, "invalid_field", f"no notice text in language {language!r} "
                               f"(have: {', '.join(self.notice.texts)})", "language")
        return language

    def _covered(self, request: ChoiceRequest) -> tuple[Basis, dict[str, bool], dict[str, bool]]:
        """What a choice covers: the items in force of the categories it decides and the vendors it
        names, by fingerprint. A category with nothing in it is left out: a choice decides only what
        exists (the page listed nothing there)."""
        notice = self._notice_ref(request)
        language = self._language(request)
        shown = self.shown
        items: dict[str, str] = {}
        categories: dict[str, bool] = {}
        for category, said in request.categories.items():
            found = shown.in_categories([category])
            if found:
                categories[category] = said
                items.update((i.key, i.fingerprint_in(language)) for i in found)
        for vendor_id in request.vendors:
            item = shown.item(f"vendor:{vendor_id}")
            if item is not None:
                items[item.key] = item.fingerprint_in(language)
        vendors = {v: said for v, said in request.vendors.items() if f"vendor:{v}" in items}
        if not categories and not vendors and (any(request.categories.values()) or any(request.vendors.values())):
            raise ApiError(400, "nothing_listed", "nothing is listed in what this choice grants "
                               f"({', '.join(c for c, said in request.categories.items() if said)}): there is "
                               "nothing to consent to", "categories")
        return Basis(notice, items, shown.terms[language], language), categories, vendors

    def _migration_step(self, choice: Choice, now: float) -> Step:
        """A choice recorded before choices named their items: it covers what the catalog of its notice
        proves (the vendors of the files named in that catalog version, if that is still the version in
        force; block lists were never part of it), under the terms it was made under (if the consent
        text is unchanged and no operator is named, as none could be then). Anything else: nothing."""
        n = choice.notice
        catalog_same = n is not None and n.catalog == self.catalog.version
        items = {} if not catalog_same else {
            i.key: i.fingerprint for i in self.shown.items
            if i.kind == "vendor" and i.vendor.id in self.catalog.proven
            and (choice.categories.get(i.vendor.category) is not None or i.vendor.id in choice.vendors)}
        language = n.language if n is not None else ""
        text_same = (n is not None and language in self.notice.texts
                     and n.sha256 == sha256_text(self.notice.texts[language]))
        terms = self.shown.terms[language] if text_same and not self.operator.named else ""
        why = (f"catalog {n.catalog} is still in force: it proves {', '.join(sorted(items)) or 'no item'}"
               if catalog_same and n is not None else
               f"catalog {n.catalog if n else '(none recorded)'} is not the one in force ({self.catalog.version}): "
               "no item can be proven")
        event = Event("migration", now, choice.subject, choice.profile, choice.categories, choice.vendors,
                      choice.expires_at, choice.notice, "system", supersedes=choice.id, items=items, terms=terms,
                      language=choice.language,
                      reason=f"choice #{choice.id} recorded before choices named their items: {why}; terms "
                             f"{'unchanged' if terms else 'not proven (text or operator changed)'}")
        return Step(event, sets_items_of=choice.id)

    def _choice_step(self, subject: Subject, action: str | None, categories: Mapping[str, bool],
                     vendors: Mapping[str, bool], now: float, expires_at: float, basis: Basis,
                     caller: Caller, profile: Profile, reason: str, gpc_seen_at: float | None = None) -> Step:
        """A step making a new choice for `subject`, superseding what it replaces (a held refusal
        is not recorded: what it replaces is). Without an action: "withdrawal" if a grant was in
        force, else "refusal"."""
        superseded = self._replaces(self.table.superseded_by(subject))
        if action is None:
            own = self.table.choice_of(subject)
            previous = (own if own is not None and own.id > 0 else None) or next(iter(superseded), None)
            granted = previous is not None and previous.expires_at > now and previous.grants_anything
            action = "withdrawal" if granted else "refusal"
        event = Event(action, now, subject, profile, dict(categories), dict(vendors), expires_at, basis.notice,
                      caller.channel, caller.user_agent, caller.sec_gpc,
                      supersedes=superseded[0].id if superseded else None, reason=reason,
                      items=basis.items, terms=basis.terms, language=basis.language,
                      operator=self.operator.as_json(), gpc_seen_at=gpc_seen_at)
        return Step(event, makes_choice=True, ends=tuple(c.id for c in superseded))

    def _reset_step(self, choice: Choice, now: float, profile: Profile, caller: Caller, reason: str) -> Step:
        event = Event("reset", now, choice.subject, profile, choice.categories, choice.vendors, choice.expires_at,
                      choice.notice, caller.channel, caller.user_agent, caller.sec_gpc, supersedes=choice.id,
                      reason=reason, items=choice.items, terms=choice.terms, language=choice.language)
        return Step(event, ends=(choice.id,), only_if_current=choice.id)

    def _kiosk_idle_resets(self, subject: Subject, caller: Caller, now: float) -> list[Step]:
        """A new kiosk choice after an idle gap the sweeper has not yet seen: record the reset first."""
        address = subject.address
        last = self.table.last_use(address) if address is not None else None
        if address is None or last is None or now - last <= self.table.kiosk_idle:
            return []
        self._void_tokens(subject, self.paired.get(subject.key, {}), now)
        return [self._reset_step(c, now, "kiosk", Caller(address, subject.mac, "system"),
                                 f"kiosk session idle: no DNS queries for {self.cfg.kiosk_idle_minutes:g} minutes")
                for c in self._recorded(self.table.personal_choices(address, subject.mac))]

    def _replaces(self, choices: Iterable[Choice]) -> list[Choice]:
        """The recorded choices behind `choices`: a held refusal stands for what it replaces."""
        found: list[Choice] = []
        for c in choices:
            held = self._held.get(c.subject.key) if c.id < 0 else None
            for r in (held.shadow if held is not None else [c] if c.id > 0 else []):
                if r not in found:
                    found.append(r)
        return sorted(found, key=lambda c: c.made_at, reverse=True)

    @staticmethod
    def _recorded(choices: Iterable[Choice]) -> list[Choice]:
        """Without held refusals (the store knows nothing of them yet)."""
        return [c for c in choices if c.id > 0]

    async def _share_activity(self, deadline: float, adopt: Iterable[str] = ()) -> None:
        """Publish this instance's kiosk activity and take the latest any instance saw, so a kiosk is
        idle only when no instance has seen a query from it (`adopt`: keys to start tracking)."""
        seen = self.table.kiosk_seen  # the pipeline holds this dict: update it, never replace it
        forget = self.wall() - max(DAY, 2 * self.table.kiosk_idle)
        merged = await self._in_store(self.store.share_activity(dict(seen), forget), deadline)
        wanted = set(adopt)
        for key, last in merged.items():
            if key in seen or key in wanted:
                seen[key] = max(last, seen.get(key, last))

    def _deadline(self, factor: float = 1.0) -> float:
        """When a change asked for now must be answered (time.monotonic)."""
        return time.monotonic() + self.timeout * factor

    @contextlib.asynccontextmanager
    async def _locked(self, deadline: float) -> AsyncIterator[None]:
        """The change lock, if it comes before `deadline`: while the store stalls, changes fail
        fast (Busy: nothing was attempted) instead of queueing behind each other."""
        await self._acquire(deadline)
        try:
            if self._alongside:
                await self._drain(deadline)
            yield
        finally:
            self._lock.release()

    async def _acquire(self, deadline: float) -> None:
        if not self._lock.locked() and not self._waiting:
            await self._lock.acquire()  # (free and nobody waits for it: taken at once, no timer to set)
            return
        self._waiting += 1
        try:
            await self._wait_for_lock(deadline)
        finally:
            self._waiting -= 1

    async def _wait_for_lock(self, deadline: float) -> None:
        # Waited for in this task, not in asyncio.wait_for's: cancelled as the lock was handed over,
        # that took the lock and dropped the cancellation (Python 3.11), so a loop cancelled at
        # shutdown went on. Lock.acquire cancelled at that point passes the lock on.
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError
            async with asyncio.timeout(remaining):
                await self._lock.acquire()
        except TimeoutError:
            raise Busy(f"{self.store.name}: busy with other changes until this one's deadline "
                       f"({self.timeout:g} s)") from None

    async def _drain(self, deadline: float) -> None:
        """(Under the lock) until the changes committing alongside are in force (or have failed)."""
        while self._alongside:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise TimeoutError
                async with asyncio.timeout(remaining):  # (not wait_for: see _acquire)
                    await self._alongside_done.wait()
            except TimeoutError:
                raise Busy(f"{self.store.name}: busy with other changes until this one's deadline "
                           f"({self.timeout:g} s)") from None

    async def _change_alongside(self, plan: Callable[[], list[Step]], deadline: float) -> int:
        """`_change` for a client's own choice with a store that no other instance changes: planned
        under the lock, committed without it, so that the choices of other clients are planned
        meanwhile and their commits join the same transaction (the store groups what waits). Each is
        still answered only once recorded and in force.

        A plan stays valid while it commits because no change planned meanwhile touches the same
        identities: one that would (a shared address or MAC, a network's choice, a held refusal of
        one of them, a change in doubt to settle first) waits under the lock until the changes
        committing alongside are in force, then is planned again."""
        await self._acquire(deadline)
        try:
            while True:
                if self._doubts:
                    await self._drain(deadline)
                    return await self._change(plan, deadline)
                steps = plan()
                if not steps:
                    return 0
                touched = self._touched(steps)
                if touched is not None and not any(touched & other for other in self._alongside):
                    break
                if not self._alongside:
                    return await self._change(plan, deadline)
                await self._drain(deadline)
            self._alongside.append(touched)
            self._alongside_done.clear()
        finally:
            self._lock.release()
        try:
            return await self._commit(steps, self.store.position, deadline)
        finally:
            self._alongside.remove(touched)
            if not self._alongside:
                self._alongside_done.set()

    def _touched(self, steps: Sequence[Step]) -> frozenset[str] | None:
        """The addresses and MACs `steps` change choices of, or None if they reach further than
        that (a network's choice, a pairing, a profile or items set on a choice) or touch a refusal
        held here."""
        touched: set[str] = set()
        for step in steps:
            if step.pairing is not None or step.sets_profile_of is not None or step.sets_items_of is not None:
                return None
            subjects = [step.event.subject]
            for ended in step.ends:
                choice = self.table.find(ended)
                if choice is None:
                    return None
                subjects.append(choice.subject)
            for subject in subjects:
                if subject.network is not None or subject.key in self._held:
                    return None
                touched.update(x for x in (subject.address, subject.mac) if x)
        return frozenset(touched)

    async def _change(self, plan: Callable[[], list[Step]], deadline: float, undoing: Doubt | None = None) -> int:
        """Plan a change on the table, store it, put it in force; returns the steps recorded.

        A shared store refuses a plan made before another instance's change (`Conflict`): catch up
        with that change and plan again, so that what a change supersedes is always what is in force.
        Changes answered 503 that may have been recorded are settled first (`undoing`: this change
        is the undoing of one)."""
        if undoing is None:
            await self._settle_doubts(deadline)
        for _ in range(PLAN_ATTEMPTS):
            based_on = self.store.position
            steps = plan()
            if not steps:
                return 0
            try:
                return await self._commit(steps, based_on, deadline, undoing=undoing)
            except Conflict:
                await self._in_store(self.store.catch_up(self), deadline)
        raise StoreError(f"{self.store.name}: other instances kept changing consent meanwhile; try again")

    async def _commit(self, steps: Sequence[Step], based_on: int, deadline: float,
                      held: Sequence[Held] = (), undoing: Doubt | None = None) -> int:
        """Persist, then apply to the table; returns how many steps were recorded. `held`: the held
        refusals these steps record (a write of theirs in doubt is settled before they are written
        again); `undoing`: the change in doubt these steps undo (an undoing in doubt is asked about,
        never undone in turn); any other change in doubt is undone if it turns out to have been recorded."""
        change = secrets.token_hex(8)
        operator = self.operator.as_json()  # every record names who ran the network when it was made
        # (the steps of a client's choice name it from their plan: copied only if it changed since)
        steps = [s if s.event.operator == operator else _replace(s, event=_replace(s.event, operator=operator))
                 for s in steps]
        ended = {i: c for s in steps for i in s.ends if (c := self.table.find(i)) is not None}
        try:
            recorded = await self._in_store(self.store.commit(steps, based_on, change, deadline))
        except InDoubt:
            if held:
                for h in held:
                    h.attempt = (change, based_on, list(steps))
            elif undoing is not None:
                undoing.undo = (change, based_on, list(steps))
            else:
                self._doubts.append(Doubt(change, based_on, list(steps), ended))
            self._work.set()
            raise
        pairs = list(zip(steps, recorded.ids, strict=True))
        for step, event_id in pairs:
            if event_id is not None and event_id > recorded.in_force_up_to:
                self._put_in_force(step, event_id)
        await self._replicate()
        for step, event_id in pairs:
            if event_id is not None:  # once every step is in force
                log_event(step.event)
                self._notify(_replace(step.event, id=event_id))
        return sum(1 for _, event_id in pairs if event_id is not None)

    async def _replicate(self) -> None:
        if self.replicated is not None:
            await self.replicated()

    # -- what the store has not settled yet -------------------------------------------------------
    async def run_reconciler(self) -> None:
        """Record held refusals and settle changes in doubt as soon as the store answers, for as
        long as dnsgate runs."""
        wait = RETRY_MIN
        while True:
            await self._work.wait()
            self._work.clear()
            if not self._held and not self._doubts:
                continue
            try:
                await self.reconcile()
                wait = RETRY_MIN
            except StoreError:
                await asyncio.sleep(wait)
                wait = min(wait * 2, RETRY_MAX)
                self._work.set()
            except Exception:
                stop_if_cancelled()
                log.exception("consent: recording held refusals failed; retrying in %.0f s", RETRY_MAX)
                await asyncio.sleep(RETRY_MAX)
                self._work.set()

    async def reconcile(self) -> None:
        """Settle the changes in doubt, then record what is held. StoreError if the store does not
        let it finish (the reconciler tries again)."""
        deadline = self._deadline(2)
        async with self._locked(deadline):
            await self._settle_doubts(deadline)
            written = 0
            keys = [k for k, h in self._held.items() if h.answered]  # (the others: their request writes them)
            for start in range(0, len(keys), HELD_BATCH):
                batch = keys[start:start + HELD_BATCH]
                if not await self._write_held(batch, deadline):
                    raise StoreError(self.store_problem or f"{self.store.name}: held refusals not recorded yet")
                written += len(batch)
            if written:
                log.info("consent: %d refusals held while the store was unavailable are recorded now", written)

    async def _settle_doubts(self, deadline: float) -> None:
        """Settle the changes answered 503 that the store may have recorded (under the lock): each one
        stays out of force and pending until the store says it never ran, or its undoing is recorded,
        that is confirmed, not only sent. StoreError while the store cannot tell."""
        for doubt in list(self._doubts):
            if doubt.undo is not None:
                change, based_on, steps = doubt.undo
                found = await self._in_store(self.store.resolve(change, based_on), deadline)
                if found:  # (asked again if this fails: the log still says so)
                    await self._undone(doubt, steps, found, deadline)
                    continue
                doubt.undo = None  # not recorded, and now never will be: undo it again
            if doubt.found is None:
                found = await self._in_store(self.store.resolve(doubt.change, doubt.based_on), deadline)
                if not found:
                    self._doubts.remove(doubt)  # never recorded, and now never will be
                    continue
                doubt.found = dict(found)
            await self._undo(doubt, deadline)

    async def _undo(self, doubt: Doubt, deadline: float) -> None:
        """A change answered 503 had been recorded all the same: record its undoing, so that what
        was in force before it is in force again (unless a later change decided otherwise). It was
        never put in force here."""
        now = self.wall()
        reason = "answered 503 (the store did not answer in time) but recorded all the same: undone"
        found = doubt.found or {}
        if self.store.shared:  # planned on the latest state: the change itself is passed over, not applied
            await self._in_store(self.store.catch_up(self), deadline)

        def plan() -> list[Step]:
            steps: list[Step] = []
            for i, step in enumerate(doubt.steps):
                event_id = found.get(i)
                if event_id is None:
                    continue
                if step.makes_choice:  # (skipped by the store if a later change replaced it)
                    before = [doubt.ended[e] for e in step.ends if e in doubt.ended]
                    steps.append(self._restore(before, step.event.as_choice(event_id), event_id, now,
                                               f"change #{event_id} {reason}"))
                elif step.ends and step.event.action == "reset":
                    for e in step.ends:
                        before_reset = doubt.ended.get(e)
                        current = self.table.choice_of(before_reset.subject) if before_reset is not None else None
                        if before_reset is not None and (current is None or current.id == e):
                            steps.append(self._restore([before_reset], None, event_id, now,
                                                       f"reset #{event_id} {reason}"))
            return steps

        undone = await self._change(plan, deadline, undoing=doubt)
        self._doubts.remove(doubt)
        self.undone += undone
        if undone:
            log.warning("consent: a change answered 503 had been recorded all the same; %d events undo it", undone)

    async def _undone(self, doubt: Doubt, steps: Sequence[Step], found: Mapping[int, int], deadline: float) -> None:
        """The undoing of `doubt`, in doubt itself, turned out recorded: in force here, and `doubt` settled."""
        await self._recorded_after_all(steps, found, deadline)
        self._doubts.remove(doubt)
        self.undone += len(found)
        log.warning("consent: a change answered 503 had been recorded all the same; %d events undo it", len(found))

    def _restore(self, before: Sequence[Choice], made: Choice | None, event_id: int, now: float,
                 reason: str) -> Step:
        """A step that ends `made` (event `event_id`) and puts the newest of `before` back, or only
        ends it if nothing was in force before."""
        previous = next((c for c in sorted(before, key=lambda c: c.made_at, reverse=True) if c.active(now)), None)
        if previous is None:
            assert made is not None
            event = Event("reset", now, made.subject, made.profile, made.categories, made.vendors, made.expires_at,
                          made.notice, "system", supersedes=event_id, reason=reason, items=made.items,
                          terms=made.terms, language=made.language)
            return Step(event, ends=(event_id,), only_if_current=event_id)
        event = Event("grant" if previous.grants_anything else "refusal", now, previous.subject, previous.profile,
                      dict(previous.categories), dict(previous.vendors), previous.expires_at, previous.notice,
                      "system", sec_gpc=previous.sec_gpc, supersedes=event_id,
                      reason=f"{reason}; choice #{previous.id} is in force again", items=previous.items,
                      terms=previous.terms, language=previous.language, gpc_seen_at=previous.gpc_seen_at)
        ends = (event_id,) if made is not None else ()
        return Step(event, makes_choice=True, ends=ends, only_if_current=event_id if made is not None else None)

    def _put_in_force(self, step: Step, event_id: int) -> None:
        for ended in step.ends:
            self.table.remove(ended)
        if step.makes_choice:
            self.table.put(step.event.as_choice(event_id))
        if step.sets_profile_of is not None:
            changed = self.table.find(step.sets_profile_of)
            if changed is not None:
                expires_at = step.event.expires_at if step.event.expires_at is not None else changed.expires_at
                self.table.put(dataclasses.replace(changed, profile=step.event.profile, expires_at=expires_at))
        if step.sets_items_of is not None:
            changed = self.table.find(step.sets_items_of)
            if changed is not None:
                items = None if step.event.items is None else dict(step.event.items)
                self.table.put(dataclasses.replace(changed, items=items, terms=step.event.terms))
        if step.pairing is not None:
            http, dns = step.pairing
            self.paired.setdefault(http, {})[dns] = step.event.at
            self._sync_kiosk_links()
        if self._held:
            self._settle_held(step.ends, step.event.subject)

    def _after(self, subject: Subject) -> ClientView:
        if subject.address is not None and subject.network is None:
            known = subject.mac if subject.mac != self.table.mac_of(subject.address) else None
            view = self.view(subject.address, known)
        else:
            view = self.view_subject(subject)
        if subject.key in self._held:
            view = dataclasses.replace(view, held=self._held_note())
        return view

    async def _in_store(self, op: Awaitable[T], deadline: float | None = None) -> T:
        """Run one store operation (within `deadline`, if given: time.monotonic); its failure is
        reported once per outage, and its success ends the outage. Only if neither was reported while
        it was out: an answer sent before the outage began does not end it, and a failure from before
        the store was back does not start another. Nor does the failure of an operation given less
        than half a change's time (its change waited for others first): that says how busy this
        instance is, not that the store is gone; the next operation tells."""
        turn = self._store_turn
        given = self.timeout if deadline is None else deadline - time.monotonic()
        try:
            if deadline is None:
                result = await op
            else:
                try:
                    result = await within(deadline, op)  # (ends at the deadline even if op does not)
                except TimeoutError:
                    raise StoreError(f"{self.store.name}: no answer within {self.timeout:g} s") from None
        except StoreError as exc:
            self.store_errors += 1
            if self.store_problem or (turn == self._store_turn and given >= self.timeout / 2):
                self._report(str(exc))
            raise
        if self.store_problem and not self._feed_problem and turn == self._store_turn:
            self._report("")  # (while the follower is cut off, it says when the store is back, caught up)
        return result

    def _notify(self, event: Event) -> None:
        if self._loading:
            return
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:  # a broken observer must not fail a change that is already stored
                log.exception("consent listener failed")

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @asynccontextmanager
    async def running(self, sweep_interval: float) -> AsyncIterator[None]:
        """Its loops, for as long as the block runs: settling what was held or in doubt, sweeping
        expired choices, and (a shared store) applying the changes other instances record."""
        loops = [self.run_reconciler(), self.run_sweeper(sweep_interval)]
        if self.store.shared:
            loops.insert(0, self.run_follower())
        async with background(*loops):
            yield

    async def close(self) -> None:
        await self._tasks.drain(2.0)
        await self.store.close()


def _refused(d: Decision) -> bool:
    return d.by_choice and not d.allowed


def _made_with_link(choice: Choice, linked_at: float) -> bool:
    """Whether the target made `choice` itself through the portal, naming the token of the client
    the link is from (the link and the choice were recorded in one step, at one time). Any other
    choice of its own, earlier or later, is out of a link's reach."""
    return choice.made_at == linked_at


def _narrowed(current: Choice | None, categories: Mapping[str, bool],
              vendors: Mapping[str, bool]) -> tuple[dict[str, bool], dict[str, bool]] | None:
    """`current` (a choice pairing carried, or none) with the refusals among `categories` and
    `vendors` added; None if that refuses nothing new."""
    base_c = dict(current.categories) if current is not None else {}
    base_v = dict(current.vendors) if current is not None else {}
    new_c = {**base_c, **{c: False for c, said in categories.items() if said is False}}
    new_v = {**base_v, **{v: False for v, said in vendors.items() if said is False}}
    if (new_c, new_v) == (base_c, base_v):
        return None
    return new_c, new_v


def _in_network(subject: Subject, network: IPNetwork) -> bool:
    for text in (subject.address, subject.network):
        if text:
            try:
                if ipaddress.ip_network(text, strict=False).subnet_of(network):  # type: ignore[arg-type]
                    return True
            except (ValueError, TypeError):
                continue
    return False


PAST: Final = {"grant": "granted", "refusal": "refused", "withdrawal": "withdrawn", "expiry": "expired",
               "reset": "reset", "profile_change": "profile changed", "migration": "migrated"}


def log_event(e: Event) -> None:
    """One key=value line per recorded change (never per query)."""
    if not log.isEnabledFor(logging.INFO):
        return
    s = e.subject
    decided = ",".join(f"{k}={'granted' if v else 'refused'}" for k, v in {**e.categories, **e.vendors}.items())
    log.info("consent %s: client=%s mac=%s profile=%s decisions=%s source=%s channel=%s%s",
             PAST.get(e.action, e.action), s.address or s.network or "-", s.mac or "-", e.profile, decided or "-",
             e.source, e.channel, f" reason={e.reason!r}" if e.reason else "")
