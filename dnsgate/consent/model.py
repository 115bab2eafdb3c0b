"""Consent state in memory: who chose what, which network profile applies, and the per-query answer.

A `Choice` is one recorded decision (per category, optionally per vendor) by one subject: a device
(MAC), an address, or a network (CIDR, admin only). `decide` turns a vendor, a profile and the
choice that applies into allowed/blocked and the reason why; `ConsentTable.resolve` finds which
profile and which choice apply to a client. Both are pure and explain themselves (`dnsgate
explain`, `GET /v1/consent`).

The resolver asks `ConsentTable.blocked` on every gated query. It must stay a couple of dict
lookups: each client key's effective state (per vendor: allowed, or why not; and until when that
holds) is computed once and memoized. A choice's change forgets only the memo of the clients it
can apply to (its address's, its device's; a network's choice, the notice, profiles and the catalog
clear it all), so a change costs the same on a network with thousands of clients as with one.
Kiosk idle tracking keeps a last-seen time only for kiosk clients that have a choice, and for the
identities linked to a kiosk's session (`kiosk_links`): a session is idle only when none of them has
asked for the idle time, and every path (a query, a view, the sweeper) judges it by `last_use`.
The table changes only through `ConsentService` (consent/service.py), which persists first.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal, TypeVar

from dnsgate.rules.catalog import Vendor

Profile = Literal["opt-in", "opt-out", "kiosk", "deny", "allow"]
PROFILES: Final[tuple[Profile, ...]] = ("opt-in", "opt-out", "kiosk", "deny", "allow")
# "pairing": carried from the HTTP client a link reached this subject from (refusals, withdrawals and
# session ends only; the event's reason names that client).
Channel = Literal["portal", "device", "admin", "system", "pairing"]
CHANNELS: Final = ("portal", "device", "admin", "system", "pairing")
Source = Literal["self", "admin", "paired"]


def source_of(channel: str) -> Source:
    """Who made a choice: the subject itself, an admin, or another client through pairing."""
    return "admin" if channel == "admin" else "paired" if channel == "pairing" else "self"


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MEMO_LIMIT: Final = 65_536
NEIGHBOUR_CHANGES_FORGOTTEN_ONE_BY_ONE: Final = 256  # more addresses changed MAC at once: forget the whole memo
FOREVER: Final = math.inf
KEY_SEPARATOR: Final = "|"  # "address|mac": a client key carrying a MAC from a trusted forwarder
_UNKNOWN: Final = object()


def client_key(address: str, mac: str | None) -> str:
    return f"{address}{KEY_SEPARATOR}{mac}" if mac else address


R = TypeVar("R")
_set_class: Final = object.__dict__["__class__"].__set__


def built_plain(cls: type[R]) -> type[R]:
    """A frozen dataclass (slots=True) whose instances are built at the cost of a plain one's.

    A frozen dataclass's `__init__` sets each field through `object.__setattr__`, ~1.3 k
    instructions a field (a 20-field Event ~30 k, and a consent change builds several records).
    Here an instance is switched to a plain twin of its class (same fields and slots, same
    `__post_init__`), filled by the twin's `__init__` with plain assignments, and switched back:
    ~15 k for the Event. Once built it is frozen as before (an assignment raises); a subclass is
    built as before. Each twin holds ~9 KB: for the records a change builds with many fields only."""
    post_init = getattr(cls, "__post_init__", None)
    twin: type[Any] = dataclasses.make_dataclass(
        cls.__name__, [(f.name, f.type, field(default=f.default, default_factory=f.default_factory, init=f.init,
                                              kw_only=f.kw_only))
                       for f in dataclasses.fields(cls)],  # type: ignore[arg-type]
        namespace={} if post_init is None else {"__post_init__": post_init}, slots=True, repr=False, eq=False,
        match_args=False)
    if twin.__slots__ != getattr(cls, "__slots__", None):
        raise TypeError(f"{cls.__name__}: its slots are not a dataclass's own")
    del twin.__dataclass_fields__, twin.__annotations__  # (only its __init__ is used: ~3 KB less held)
    frozen_init = cls.__init__
    plain_init = twin.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if type(self) is not cls:
            frozen_init(self, *args, **kwargs)
            return
        _set_class(self, twin)
        plain_init(self, *args, **kwargs)
        _set_class(self, cls)

    __init__.__qualname__ = frozen_init.__qualname__
    setattr(cls, "__init__", __init__)  # noqa: B010 (mypy refuses an assignment to a method)
    return cls


# ------------------------------------------------------------------------------------------------
# What was chosen


@dataclass(frozen=True, slots=True)
class Subject:
    """Whom a choice is about: a device (MAC, with the address it had), an address, or a network."""

    address: str | None = None
    mac: str | None = None
    network: str | None = None  # CIDR text; admin consent for a whole network (a kiosk VLAN)

    @property
    def key(self) -> str:
        """One text naming the subject: the MAC if known (it follows the device), else address/CIDR."""
        return self.mac or self.address or self.network or "?"

    def describe(self) -> str:
        if self.network:
            return f"network {self.network}"
        if self.mac and self.address:
            return f"device {self.mac} (at {self.address})"
        if self.mac:
            return f"device {self.mac}"
        return f"address {self.address}"


@dataclass(frozen=True, slots=True)
class NoticeRef:
    """The notice a person saw: catalog version, consent-text version and SHA-256, language."""

    catalog: str
    version: str
    sha256: str
    language: str


def item_key(vendor: Vendor) -> str:
    """How a choice names an item it covers: "vendor:<id>" or "list:<id>" (ids of the two may coincide)."""
    return f"{vendor.kind}:{vendor.id}"


@dataclass(frozen=True, slots=True)
class CurrentNotice:
    """What counts as "the notice" now (notice.NoticeInForce): a grant counts for an item only while
    the terms it was made under (text and operator) and the item's fingerprint are unchanged."""

    catalog: str
    version: str
    hashes: Mapping[str, str]  # language -> SHA-256 of the whole notice
    terms: frozenset[str] = frozenset()  # SHA-256 of text + operator, one per language
    items: Mapping[str, str] = field(default_factory=dict)  # item key -> fingerprint (the catalog's own words)
    # item key -> its fingerprints as shown in other languages (where the catalog translates it)
    translated: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def covers(self, ref: NoticeRef | None) -> bool:
        """The choice was made under exactly this notice (what `notice.current` says)."""
        return ref is not None and ref.version == self.version and ref.sha256 in self.hashes.values()

    def holds(self, choice: Choice, key: str) -> bool:
        """A grant of the item `key` by `choice` still counts: same terms, same item as shown (in
        the language it was shown in)."""
        shown = choice.items.get(key) if choice.items is not None else None
        return shown is not None and choice.terms in self.terms and (
            self.items.get(key) == shown or shown in self.translated.get(key, ()))


UNTIL_CHANGED: Final = 253_402_300_799.0  # 9999-12-31T23:59:59Z: the expiry of what stands until changed


def grants_anything(categories: Mapping[str, bool], vendors: Mapping[str, bool]) -> bool:
    return any(categories.values()) or any(vendors.values())


def grants_vendor(categories: Mapping[str, bool], vendors: Mapping[str, bool], vendor: Vendor) -> bool:
    """Whether these decisions grant `vendor`: by name, or by its category unless it is refused by name."""
    said = vendors.get(vendor.id)
    return said is True or (said is None and categories.get(vendor.category) is True)


_SHARED: dict[tuple[tuple[str, Any], ...], Mapping[str, Any]] = {}
SHARED_LIMIT: Final = 4096
_GRANTED: dict[tuple[str, ...], tuple[str, ...]] = {}  # the granted categories of choices, one tuple per set
M = TypeVar("M", bound=Mapping[str, Any])


def shared(mapping: M) -> M:
    """One read-only mapping per content (what choices hold is never changed in place)."""
    key = tuple(sorted(mapping.items()))
    found = _SHARED.get(key)
    if found is None:
        if len(_SHARED) >= SHARED_LIMIT:
            _SHARED.clear()
        found = _SHARED[key] = dict(mapping)
    return found  # type: ignore[return-value]


@built_plain
@dataclass(frozen=True, slots=True)
class Choice:
    """One recorded choice; `id` is the event that recorded it. Categories and vendors map to
    True (granted) or False (refused); anything not named is undecided.

    `expires_at` ends its grants. On an opt-out network its refusals are opt-outs, which stand until
    the person changes them (`standing`): a choice that only refuses expires UNTIL_CHANGED, and one
    that also grants keeps its refusals in force after its grants expired (`in_force`).
    `gpc_seen_at`: since when Global Privacy Control has applied to the subject's choices on an
    opt-out network: an opt-out of sale/sharing by every vendor that sells or shares data and that
    the choice does not grant, those added to the catalog later included; it stands like a refusal."""

    id: int
    subject: Subject
    categories: Mapping[str, bool]
    vendors: Mapping[str, bool]
    made_at: float
    expires_at: float
    notice: NoticeRef | None  # the notice the client presented; None: not shown (or a choice migrated)
    channel: str
    profile: str
    sec_gpc: str | None = None
    language: str = ""
    # item key -> fingerprint of every vendor and list the choice covers; None: recorded before
    # choices named their items (the service migrates it at start)
    items: Mapping[str, str] | None = None
    terms: str = ""  # SHA-256 of the consent text and operator in force when it was made ("" : none proven)
    gpc_seen_at: float | None = None

    def __post_init__(self) -> None:
        # Most choices say the same (a network's devices accept or refuse the same page): one mapping
        # per content, shared, instead of three of its own per choice (~400 bytes a client).
        object.__setattr__(self, "categories", shared(self.categories))
        object.__setattr__(self, "vendors", shared(self.vendors))
        if self.items is not None:
            object.__setattr__(self, "items", shared(self.items))

    def covers(self, vendor: Vendor) -> bool:
        return self.items is not None and item_key(vendor) in self.items

    def active(self, now: float) -> bool:
        """Whether any of it is in force: its grants have not expired, or its refusals stand."""
        return self.expires_at > now or self.standing

    @property
    def refuses_anything(self) -> bool:
        return False in self.categories.values() or False in self.vendors.values()

    @property
    def standing(self) -> bool:
        """Its refusals, or the GPC signal it carries, are opt-outs (made on an opt-out network): they
        stand until changed."""
        return self.profile == "opt-out" and (self.refuses_anything or self.gpc_seen_at is not None)

    def in_force(self, now: float) -> Choice | None:
        """What of it applies now: all of it, its standing refusals alone once its grants expired, or nothing."""
        if self.expires_at > now:
            return self
        if not self.standing:
            return None
        return replace(self, categories={k: v for k, v in self.categories.items() if not v},
                       vendors={k: v for k, v in self.vendors.items() if not v}, expires_at=UNTIL_CHANGED)

    @property
    def source(self) -> Source:
        return source_of(self.channel)

    @property
    def grants_anything(self) -> bool:
        return grants_anything(self.categories, self.vendors)

    def gpc_opt_out(self, vendor: Vendor) -> bool:
        """Whether this choice's refusal of `vendor` is an opt-out of sale/sharing under GPC."""
        return self.gpc_seen_at is not None and vendor.ccpa_sale_or_share and self.vendors.get(vendor.id) is False

    def granted_despite_gpc(self, vendor: Vendor) -> bool:
        """Whether it grants `vendor`, a seller, although GPC was seen before: the person's later, specific word."""
        return (self.gpc_seen_at is not None and vendor.ccpa_sale_or_share
                and grants_vendor(self.categories, self.vendors, vendor))


@dataclass(frozen=True, slots=True)
class Grant:
    """What allowed a client to resolve a vendor, as the query log records it (observe/querylog.py): a
    grant of a choice, or (source "profile:opt-out", "profile:allow") the network's profile."""

    category: str
    granted_at: float
    expires_at: float
    source: str

    def active(self, now: float) -> bool:
        return self.expires_at > now


PROFILE_GRANT_EXPIRY: Final = 253_402_300_799.0  # 9999-12-31: a profile's permission does not run out


# ------------------------------------------------------------------------------------------------
# Deciding


# Why a gated name is blocked, as its Extended DNS Error says (dns/sinkhole.py): nothing decides it
# yet, an item listed after the client's choice (which does not cover it), a grant under an older
# notice, a refusal, an opt-out of sale/sharing by Global Privacy Control, the network's fixed
# policy. Only the first three are for a consent to lift.
BlockCause = Literal["undecided", "unlisted", "stale", "refused", "gpc", "policy"]
BLOCK_CAUSES: Final[tuple[BlockCause, ...]] = ("undecided", "unlisted", "stale", "refused", "gpc", "policy")
Verdict = Literal["", "undecided", "unlisted", "stale", "refused", "gpc", "policy"]  # "": allowed, else why blocked


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str
    by_choice: bool = False  # decided by a choice's grant or refusal (else by the profile)
    cause: BlockCause = "undecided"  # why it is blocked (for an allowed one: meaningless)

    @property
    def verdict(self) -> Verdict:
        return "" if self.allowed else self.cause


def decide(vendor: Vendor, profile: Profile, choice: Choice | None, notice: CurrentNotice | None) -> Decision:
    """Allowed or blocked, and why, for one vendor (or block list) under `profile` and the choice that applies.

    Order: fixed profiles; an item the choice does not cover (it appeared later) is "no choice yet";
    a vendor-level decision (a refusal beats a category grant; a grant opens only that vendor); the
    category decision; the profile's default. A grant made under other terms, or of an item whose
    description changed since, is skipped as if it did not exist; refusals of covered items count.
    """
    if profile == "deny":
        return Decision(False, "profile deny: trackers never resolve on this network", cause="policy")
    if profile == "allow":
        return Decision(True, "profile allow: trackers always resolve on this network")
    stale: list[str] = []
    what = f"{'list' if vendor.kind == 'list' else 'vendor'} {vendor.id}"
    uncovered = choice is not None and not choice.covers(vendor)
    if choice is None:
        prefix = "no choice recorded; "
    elif uncovered:
        prefix = f"no choice yet for {what}: choice #{choice.id} does not cover it (it was not listed then); "
    else:
        holds = notice is not None and notice.holds(choice, item_key(vendor))
        said = choice.vendors.get(vendor.id) if vendor.kind == "vendor" else None
        if said is False:
            if choice.gpc_opt_out(vendor):
                return Decision(False, f"vendor {vendor.id}: opted out of sale/sharing by Global Privacy Control "
                                f"(Sec-GPC) in choice #{choice.id}", True, "gpc")
            return Decision(False, f"vendor {vendor.id} refused in choice #{choice.id}", True, "refused")
        despite = " after Global Privacy Control was seen (this later grant wins over it)" \
            if choice.granted_despite_gpc(vendor) else ""
        if said is True:
            if holds:
                return Decision(True, f"vendor {vendor.id} granted in choice #{choice.id}{despite}", True)
            stale.append(f"vendor {vendor.id}")
        said = choice.categories.get(vendor.category)
        if said is False:
            return Decision(False, f"category {vendor.category} refused in choice #{choice.id}", True, "refused")
        if said is True:
            if holds:
                return Decision(True, f"category {vendor.category} granted in choice #{choice.id}{despite}", True)
            stale.append(f"category {vendor.category}")
        if stale:
            prefix = (f"the grant of {' and '.join(stale)} in choice #{choice.id} was made under terms or a "
                      f"description of {what} that changed since, and no longer counts; ")
        else:
            prefix = f"choice #{choice.id} does not decide vendor {vendor.id} or category {vendor.category}; "
    if profile == "opt-out":
        if choice is not None and choice.gpc_seen_at is not None and vendor.kind == "vendor" \
                and vendor.ccpa_sale_or_share:  # GPC stands for the sellers the choice does not grant
            return Decision(False, prefix + f"vendor {vendor.id} sells or shares data: opted out of sale/sharing by "
                            f"Global Privacy Control (Sec-GPC), which applies to choice #{choice.id}", True, "gpc")
        return Decision(True, prefix + "profile opt-out: allowed until the client opts out")
    return Decision(False, prefix + f"profile {profile}: blocked until granted",
                    cause="stale" if stale else "unlisted" if uncovered else "undecided")


def decide_category(category: str, profile: Profile, choice: Choice | None, notice: CurrentNotice | None) -> Decision:
    """What the choice says of a category as a whole: granted (under the terms in force), refused, or
    the profile's default. Items of the category may still differ (one added later, one changed)."""
    if profile in ("deny", "allow"):
        return Decision(profile == "allow", f"profile {profile}: fixed for this network", cause="policy")
    said = choice.categories.get(category) if choice is not None else None
    if choice is not None and said is False:
        return Decision(False, f"category {category} refused in choice #{choice.id}", True, "refused")
    if choice is not None and said is True and notice is not None and choice.terms in notice.terms:
        return Decision(True, f"category {category} granted in choice #{choice.id}", True)
    return Decision(profile == "opt-out", f"no choice in force for category {category}; profile {profile}")


# ------------------------------------------------------------------------------------------------
# Profiles by network


class ProfileMap:
    """The profile of an address: the most specific configured network containing it, else the default."""

    __slots__ = ("_memo", "_outside", "default", "networks")

    def __init__(self, default: Profile = "opt-in", networks: Iterable[tuple[str, Profile]] = ()) -> None:
        self.default = default
        parsed = [(ipaddress.ip_network(cidr), profile) for cidr, profile in networks]
        self.networks: tuple[tuple[IPNetwork, Profile], ...] = tuple(
            sorted(parsed, key=lambda item: item[0].prefixlen, reverse=True))
        self._memo: dict[str, tuple[Profile, IPNetwork | None]] = {}
        self._outside: tuple[Profile, IPNetwork | None] = (default, None)  # one tuple for every such address

    def of(self, address: str) -> tuple[Profile, IPNetwork | None]:
        if not self.networks:  # every address has the default: nothing to look up or remember
            return self._outside
        found = self._memo.get(address)
        if found is None:
            found = self._lookup(address)
            if len(self._memo) >= MEMO_LIMIT:
                self._memo.clear()
            self._memo[address] = found
        return found

    def _lookup(self, address: str) -> tuple[Profile, IPNetwork | None]:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return self._outside
        for network, profile in self.networks:
            if ip.version == network.version and ip in network:
                return profile, network
        return self._outside

    def why(self, address: str) -> str:
        profile, network = self.of(address)
        if network is None:
            return f"{address} is in no network listed in profiles.networks; profiles.default is {profile}"
        return f"{address} is in {network}, listed as {profile} in profiles.networks"


# ------------------------------------------------------------------------------------------------
# The table


class ClientState:
    """What the resolver keeps per client key: every decision made so far (vendor -> "" if allowed,
    else why it is blocked), the profile and choice they come from, and until when all of that holds."""

    __slots__ = ("choice", "grants", "profile", "until", "verdicts")

    def __init__(self, verdicts: dict[Vendor, Verdict], until: float, profile: Profile, choice: Choice | None) -> None:
        self.verdicts = verdicts
        self.until = until
        self.profile = profile
        self.choice = choice
        self.grants: dict[Vendor, Grant | None] = {}  # what allowed each vendor, for the query log


@dataclass(frozen=True, slots=True)
class Resolution:
    """Which profile and which choice apply to one client, and the notes of how they were found."""

    address: str
    mac: str | None
    mac_source: str | None  # "neighbour table" | "trusted forwarder (EDNS)"
    profile: Profile
    network: IPNetwork | None
    why_profile: str
    choice: Choice | None  # as recorded
    notes: tuple[str, ...]
    decisions: tuple[tuple[Vendor, Decision], ...]
    until: float
    applied: Choice | None = None  # what of `choice` is in force (Choice.in_force): the decisions' basis

    @property
    def allowed(self) -> frozenset[Vendor]:
        return frozenset(v for v, d in self.decisions if d.allowed)


@dataclass(slots=True)
class _Index:
    by_mac: dict[str, Choice] = field(default_factory=dict)
    by_address: dict[str, Choice] = field(default_factory=dict)
    by_network: dict[str, Choice] = field(default_factory=dict)
    networks: list[tuple[IPNetwork, Choice]] = field(default_factory=list)  # most specific first
    by_id: dict[int, Choice] = field(default_factory=dict)  # every choice one of the above holds
    # choice id -> the categories it grants under the current notice (if any; one shared tuple per
    # set, its expiry read from `by_id`): what /healthz and /metrics count, kept up to date so that
    # counting never walks every choice
    granting: dict[int, tuple[str, ...]] = field(default_factory=dict)

    def slots(self, choice: Choice) -> Iterator[tuple[dict[str, Choice], str]]:
        """Where `choice` is filed (if it still is): under its subject's network, or MAC and address."""
        s = choice.subject
        if s.network is not None:
            yield self.by_network, s.network
            return
        if s.mac is not None:
            yield self.by_mac, s.mac
        if s.address is not None:
            yield self.by_address, s.address

    def holds(self, choice: Choice) -> bool:
        return any((c := table.get(key)) is not None and c.id == choice.id for table, key in self.slots(choice))

    def sort_networks(self) -> None:
        self.networks = sorted(((ipaddress.ip_network(n), c) for n, c in self.by_network.items()),
                               key=lambda item: item[0].prefixlen, reverse=True)


@dataclass(frozen=True, slots=True)
class TableCopy:
    vendors: tuple[Vendor, ...]
    profiles: ProfileMap
    notice: CurrentNotice | None
    kiosk_idle: float
    neighbours: Mapping[str, str]
    index: _Index
    kiosk_seen: dict[str, float]
    kiosk_links: dict[str, tuple[str, ...]]


class ConsentTable:
    """Every choice in force, indexed by device, address and network, and the per-client memo."""

    __slots__ = ("_index", "_kiosk_owners", "_memo_by_address", "_memo_by_mac", "_viewed", "kiosk_idle",
                 "kiosk_links", "kiosk_seen", "neighbours", "notice", "profiles", "states", "vendors")

    def __init__(self, vendors: Iterable[Vendor] = (), profiles: ProfileMap | None = None,
                 notice: CurrentNotice | None = None, kiosk_idle: float = 900.0) -> None:
        self.vendors = tuple(vendors)
        self.profiles = profiles or ProfileMap()
        self.notice = notice
        self.kiosk_idle = kiosk_idle
        self.neighbours: Mapping[str, str] = {}
        self._index = _Index()
        # client key -> its profile and choice, until when they hold, and the decisions made so far.
        # A change forgets exactly the states it can alter (`_forget`), so a decision remembered
        # elsewhere with the state it was made from (the pipeline's rendered sinkhole answers) holds
        # while that state is still the one here and the clock is before its `until`: a change for
        # one client leaves every other client's remembered answers in place.
        self.states: dict[str, ClientState] = {}
        # address (MAC) -> the memo's keys resolved with it: what a change of its choice must forget.
        # Tuples, not sets: most hold one key, and a tuple of one is a quarter of an empty set's size.
        self._memo_by_address: dict[str, tuple[str, ...]] = {}
        self._memo_by_mac: dict[str, tuple[str, ...]] = {}
        # client key -> last DNS query (wall seconds), only for kiosk clients with a personal choice.
        # The pipeline reads this dict directly: an empty dict costs the hot path one truth test.
        self.kiosk_seen: dict[str, float] = {}
        # A kiosk's subject key (its MAC, else its address) -> the client keys linked to its session
        # (a DNS source that looked up its pairing name, another address its page chose through), and
        # the reverse: their queries keep its session in use, as its own do.
        self.kiosk_links: dict[str, tuple[str, ...]] = {}
        self._kiosk_owners: dict[str, tuple[str, ...]] = {}
        # The last resolution made for a view of an address (not a kiosk's), until anything is
        # forgotten: a change's answer shows the client's view, and the client's next query needs
        # the same resolution (`_state`).
        self._viewed: tuple[Resolution, float] | None = None  # and when it was made

    # -- the hot path --------------------------------------------------------------------------
    def blocked(self, client: str, vendor: Vendor, now: float) -> Verdict:
        """Whether `client` (an address, or "address|mac") may resolve `vendor`'s names now: "" if it
        may, else why not (the sinkhole's EDE says it, so the answer costs no second lookup)."""
        state = self.states.get(client)
        if state is None or now >= state.until:
            state = self._state(client, now)
        verdict = state.verdicts.get(vendor)
        if verdict is None:  # a vendor first met (a block list's, or one a reload brought)
            verdict = state.verdicts[vendor] = decide(vendor, state.profile, state.choice, self.notice).verdict
        return verdict

    def allows(self, client: str, vendor: Vendor, now: float) -> bool:
        return not self.blocked(client, vendor, now)

    def touch(self, client: str, now: float) -> None:
        """A DNS query from a kiosk client with a choice (or an identity linked to its session): the
        session is still in use.

        A query after the session's idle limit does not revive it; the sweeper resets it."""
        seen = self.kiosk_seen
        if now - seen[client] <= self.kiosk_idle or now - (self.last_use(client) or 0.0) <= self.kiosk_idle:
            seen[client] = now

    def last_use(self, key: str) -> float | None:
        """The last query of the kiosk session `key` belongs to: the latest of all its identities (the
        kiosk's client keys, which share its subject key, and every key linked to it); None if none
        is tracked. Each process notes its own queries per key, so merging them stays a max."""
        if not self.kiosk_seen:
            return None  # (no kiosk session is tracked: every choice's plan asks)
        owners = {self._subject_key(key), *self._kiosk_owners.get(key, ())}
        return max(self._latest(owners).values(), default=None)

    def last_uses(self) -> dict[str, float]:
        """`last_use` of every tracked key, in one pass (the sweeper's and a worker's)."""
        latest = self._latest(None)
        found: dict[str, float] = {}
        for k in self.kiosk_seen:
            found[k] = max(latest[owner] for owner in (self._subject_key(k), *self._kiosk_owners.get(k, ()))
                           if owner in latest)
        return found

    def _latest(self, owners: set[str] | None) -> dict[str, float]:
        """Subject key -> the last query of its kiosk's own keys and of the keys linked to it (of the
        subject keys in `owners`; all if None)."""
        seen, subject_key = self.kiosk_seen, self._subject_key
        latest: dict[str, float] = {}
        for k, at in seen.items():
            owner = subject_key(k)
            if (owners is None or owner in owners) and at > latest.get(owner, -math.inf):
                latest[owner] = at
        for owner, keys in self.kiosk_links.items():
            if owners is None or owner in owners:
                for k in keys:
                    linked = seen.get(k)
                    if linked is not None and linked > latest.get(owner, -math.inf):
                        latest[owner] = linked
        return latest

    def _subject_key(self, key: str) -> str:
        """The subject key of a client key (`Subject.key`: the MAC if known, else the address)."""
        address, _, mac = key.partition(KEY_SEPARATOR)
        return mac or self.neighbours.get(address) or address

    def _state(self, client: str, now: float) -> ClientState:
        """`resolve` without what only explains it (notes, reasons, every vendor decided at once): the
        choice that applies and until when; each vendor is decided when first asked (`blocked`)."""
        address, _, mac = client.partition(KEY_SEPARATOR)
        viewed, at = self._viewed or (None, 0.0)
        if viewed is not None and viewed.address == client and at <= now < viewed.until:
            # (nothing forgotten since, made before `now` and its time limit not reached: the same)
            profile, device, applied, until = viewed.profile, viewed.mac, viewed.applied, viewed.until
            verdicts = {v: d.verdict for v, d in viewed.decisions}
        else:
            profile = self.profiles.of(address)[0]
            device = mac or self.neighbours.get(address)
            _, applied, until = self._applicable(address, device, profile, now, client, [])
            verdicts = {}
        memo = self.states
        if len(memo) >= MEMO_LIMIT or len(self._memo_by_address) >= MEMO_LIMIT or len(self._memo_by_mac) >= MEMO_LIMIT:
            self._forget_all()  # a flood of addresses (or MACs) must not grow memory without bound
        state = memo[client] = ClientState(verdicts, until, profile, applied)
        for by, key in ((self._memo_by_address, address), (self._memo_by_mac, device)):
            if key is not None:
                keys = by.get(key, ())
                if client not in keys:
                    by[key] = (*keys, client)
        return state

    def decided(self, client: str, vendor: Vendor, now: float) -> tuple[Verdict, ClientState]:
        """`blocked`, and the client's state it comes from: the verdict holds while that state is
        the one in `states` and the wall clock is before its `until`."""
        verdict = self.blocked(client, vendor, now)
        return verdict, self.states[client]

    def grant_for(self, client: str, vendor: Vendor, now: float) -> Grant | None:
        """What allowed `client` to resolve `vendor` (for the query log), or None if it may not."""
        state = self.states.get(client)
        if state is None or now >= state.until:
            state = self._state(client, now)
        grant = state.grants.get(vendor, _UNKNOWN)
        if grant is _UNKNOWN:  # once per client and vendor: the log asks on every allowed query
            grant = state.grants[vendor] = self._grant(vendor, state)
        return grant  # type: ignore[return-value]

    def _grant(self, vendor: Vendor, state: ClientState) -> Grant | None:
        d = decide(vendor, state.profile, state.choice, self.notice)
        if not d.allowed:
            return None
        c = state.choice
        if d.by_choice and c is not None:
            return Grant(vendor.category, c.made_at, c.expires_at, c.source)
        return Grant(vendor.category, 0.0, PROFILE_GRANT_EXPIRY, f"profile:{state.profile}")

    # -- resolution (off the hot path) ------------------------------------------------------------
    def mac_of(self, address: str) -> str | None:
        return self.neighbours.get(address)

    def resolve(self, address: str, mac: str | None, now: float, key: str | None = None) -> Resolution:
        """Profile, identity, the applicable choice, and every vendor's decision, with reasons.

        `key` is the resolver's client key when it asks (it registers a kiosk session's clock)."""
        profile, network = self.profiles.of(address)
        mac_source = "trusted forwarder (EDNS)" if mac else None
        if mac is None:
            mac = self.neighbours.get(address)
            mac_source = "neighbour table" if mac else None
        notes: list[str] = []
        choice, applied, until = self._applicable(address, mac, profile, now, key, notes)
        decisions = tuple((v, decide(v, profile, applied, self.notice)) for v in self.vendors)
        r = Resolution(address, mac, mac_source, profile, network, self.profiles.why(address), choice,
                       tuple(notes), decisions, until, applied)
        if mac_source != "trusted forwarder (EDNS)" and profile != "kiosk":  # (a kiosk's depends on the key)
            self._viewed = r, now  # the state of client key `address`, as `_state` would find it
        return r

    def _applicable(self, address: str, mac: str | None, profile: Profile, now: float, key: str | None,
                    notes: list[str]) -> tuple[Choice | None, Choice | None, float]:
        """The choice that applies to a client (as recorded, and what of it is in force) and until
        when that holds; how it was found goes to `notes`. `key`: as for `resolve`."""
        choice: Choice | None = None
        applied: Choice | None = None
        until = FOREVER
        # deny/allow networks ignore choices (decide says so), but a view still shows the choice.
        for candidate, personal in self._candidates(address, mac, notes):
            if not candidate.active(now):
                notes.append(f"choice #{candidate.id} ({candidate.subject.describe()}) expired")
                continue
            if personal and profile == "kiosk":
                # The resolver's lookups (with a key) start the idle clock; views only read it. A key
                # new to a session that is already tracked joins it at the session's last query, so
                # it cannot revive an idle session.
                last = self.last_use(address if key is None else key)
                if key is not None and key not in self.kiosk_seen:
                    self.kiosk_seen[key] = now if last is None or now - last <= self.kiosk_idle else last
                if last is None:
                    last = now
                if now - last > self.kiosk_idle:
                    notes.append(f"choice #{candidate.id}: the kiosk session went idle; it is reset")
                    continue
                until = min(until, last + self.kiosk_idle)
            choice = candidate
            applied = candidate.in_force(now)
            if candidate.expires_at > now:
                until = min(until, candidate.expires_at)  # then its grants end (and its opt-outs may stand)
            else:
                notes.append(f"the grants of choice #{candidate.id} expired; its refusals are opt-outs, which "
                             "stand until changed")
            break
        return choice, applied, until

    def _candidates(self, address: str, mac: str | None, notes: list[str]) -> Iterator[tuple[Choice, bool]]:
        """Choices that may apply, most specific first: the device's, the address's, the networks'."""
        index = self._index
        if mac is not None:
            by_mac = index.by_mac.get(mac)
            if by_mac is not None:
                yield by_mac, True
        by_address = index.by_address.get(address)
        if by_address is not None:
            bound = by_address.subject.mac
            if bound is not None and mac is not None and bound != mac:
                notes.append(f"choice #{by_address.id} was made by {bound} at {address}; that address now "
                             f"belongs to {mac}, so it does not apply")
            else:
                yield by_address, True
        if index.networks:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                return
            for net, choice in index.networks:
                if ip.version == net.version and ip in net:
                    yield choice, False

    # -- changes (ConsentService calls these after the store committed) ---------------------------
    def put(self, choice: Choice) -> None:
        """Make `choice` current for its subject (it replaces what the subject had)."""
        index = self._index
        replaced: list[Choice] = []
        for table, key in index.slots(choice):
            previous = table.get(key)
            if previous is not None and previous.id != choice.id:
                replaced.append(previous)
            table[key] = choice
        self._file(choice)
        for previous in replaced:
            if not index.holds(previous):
                self._unfile(previous.id)  # (it may have held both of the slots)
        if choice.subject.network is not None:
            index.sort_networks()
        self._forget(choice.subject)

    def remove(self, choice_id: int) -> Choice | None:
        """Drop a choice from every index (it expired, was reset or superseded)."""
        index = self._index
        found = self._unfile(choice_id)
        if found is None:
            return None
        for table, key in index.slots(found):
            c = table.get(key)
            if c is not None and c.id == choice_id:
                del table[key]
        if found.subject.network is not None:
            index.sort_networks()
        self._forget(found.subject)
        return found

    def reset(self, choices: Iterable[Choice]) -> None:
        """Replace every choice (a shared store's whole state); later ones of a subject win."""
        self._index = _Index()
        for choice in choices:
            self.put(choice)
        self._forget_all()

    def find(self, choice_id: int) -> Choice | None:
        return self._index.by_id.get(choice_id)

    def _file(self, choice: Choice) -> None:
        index = self._index
        index.by_id[choice.id] = choice
        granted = self._granted_categories(choice)
        if granted:
            index.granting[choice.id] = granted
        else:
            index.granting.pop(choice.id, None)

    def _unfile(self, choice_id: int) -> Choice | None:
        self._index.granting.pop(choice_id, None)
        return self._index.by_id.pop(choice_id, None)

    def _granted_categories(self, choice: Choice) -> tuple[str, ...]:
        if self.notice is None or choice.items is None or choice.terms not in self.notice.terms:
            return ()
        granted = tuple(c for c, said in choice.categories.items() if said)
        if len(_GRANTED) < 4096:  # most choices grant one of a few sets: keep one tuple of each
            granted = _GRANTED.setdefault(granted, granted)
        return granted

    def superseded_by(self, subject: Subject) -> list[Choice]:
        """The choices a new choice by `subject` replaces (a device's choice at an address also
        replaces that address's own choice, unless that belongs to another device)."""
        index = self._index
        found: list[Choice] = []
        if subject.network is not None:
            c = index.by_network.get(subject.network)
            return [c] if c else []
        if subject.mac is not None and (c := index.by_mac.get(subject.mac)) is not None:
            found.append(c)
        c = index.by_address.get(subject.address) if subject.address is not None else None
        # Another device's choice made at this address stays: it follows that device's MAC.
        if c is not None and (c.subject.mac is None or c.subject.mac == subject.mac) and c not in found:
            found.append(c)
        if len(found) > 1:
            found.sort(key=lambda c: c.made_at, reverse=True)
        return found

    def personal_choices(self, address: str, mac: str | None) -> list[Choice]:
        """The device's and the address's own choices (not a network's) that apply to this client."""
        return [c for c, personal in self._candidates(address, mac, []) if personal]

    def grants(self, client: str) -> dict[str, Grant]:
        """The categories granted (terms in force) by the choice that applies to `client`, expired or
        not (readers such as the dashboard compare the expiry themselves)."""
        address, _, mac = client.partition(KEY_SEPARATOR)
        for choice, _personal in self._candidates(address, mac or self.neighbours.get(address), []):
            return self._granted(choice)
        return {}

    def granting_now(self, now: float) -> int:
        """Choices whose grants under the current notice are in force at `now` (len() also counts
        those expired and not swept yet)."""
        by_id = self._index.by_id
        return sum(1 for choice_id in self._index.granting if by_id[choice_id].expires_at > now)

    def granted_counts(self, now: float) -> dict[str, int]:
        """Per category, the choices that grant it under the current notice and have not expired."""
        counts: dict[str, int] = {}
        by_id = self._index.by_id
        for choice_id, categories in self._index.granting.items():
            if by_id[choice_id].expires_at > now:
                for category in categories:
                    counts[category] = counts.get(category, 0) + 1
        return counts

    def _granted(self, choice: Choice) -> dict[str, Grant]:
        return {c: Grant(c, choice.made_at, choice.expires_at, choice.source) for c in self._granted_categories(choice)}

    def choices(self) -> list[Choice]:
        return sorted(self._index.by_id.values(), key=lambda c: c.id)

    def choice_of(self, subject: Subject) -> Choice | None:
        index = self._index
        if subject.network is not None:
            return index.by_network.get(subject.network)
        if subject.mac is not None:
            return index.by_mac.get(subject.mac)
        return index.by_address.get(subject.address or "")

    def set_neighbours(self, table: Mapping[str, str]) -> bool:
        """Adopt a fresh neighbour table (address -> MAC); returns whether it changed anything."""
        new, old = dict(table), self.neighbours
        if new == old:
            return False
        self.neighbours = new
        moved = [a for a in new.keys() | old.keys() if new.get(a) != old.get(a)]
        if len(moved) > NEIGHBOUR_CHANGES_FORGOTTEN_ONE_BY_ONE:
            self._forget_all()
        else:  # a client's resolution reads the neighbour table at its own address only
            for address in moved:
                self._forget(Subject(address))
        return True

    def set_seen(self, key: str, at: float | None) -> None:
        """The consent service's own word on a kiosk client's last query: a new session starts its
        clock (`at`), an ended one is forgotten (None). The pipeline's `touch` updates it per query."""
        if at is None:
            self.kiosk_seen.pop(key, None)
        else:
            self.kiosk_seen[key] = at

    def tracks_kiosk(self, key: str) -> bool:
        """Whether `key` is a kiosk client with a choice, whose queries keep its session alive."""
        return key in self.kiosk_seen

    def set_kiosk_links(self, links: Mapping[str, tuple[str, ...]]) -> None:
        """Adopt the identities linked to each kiosk's session (the consent service's pairings of
        kiosks; replaced whole, journaled to the workers like any change)."""
        old, new = self.kiosk_links, dict(links)
        self.kiosk_links = new
        owners: dict[str, tuple[str, ...]] = {}
        for owner, keys in new.items():
            for key in keys:
                owners[key] = (*owners.get(key, ()), owner)
        self._kiosk_owners = owners
        # A memoized state holds until its session's idle time: one that lost a link may end sooner.
        for owner in old.keys() | new.keys():
            if old.get(owner) != new.get(owner):
                for key in (owner, *old.get(owner, ()), *new.get(owner, ())):
                    address, _, mac = key.partition(KEY_SEPARATOR)
                    self._forget(Subject(address, mac or address))  # (an address, a MAC, or both)

    def merge_seen(self, theirs: Mapping[str, float]) -> None:
        """Adopt another process's latest query time of each kiosk client (dns.workers > 1). In place:
        the pipeline holds this dict."""
        mine = self.kiosk_seen
        for key, last in theirs.items():
            if last > mine.get(key, -1.0):
                mine[key] = last

    def forget_idle(self, now: float) -> None:
        """A worker drops the kiosk clients whose session has been idle for twice the limit: by then
        the primary's sweeper has ended it. Until then each stays, so a later query (touch, or a key
        joining the session) cannot revive it here while the primary has it idle."""
        seen = self.kiosk_seen
        for key, last in self.last_uses().items():
            if now - last > 2 * self.kiosk_idle:
                del seen[key]

    def set_profiles(self, profiles: ProfileMap) -> None:
        self.profiles = profiles
        self._forget_all()

    def set_notice(self, notice: CurrentNotice) -> None:
        self.notice = notice
        for choice in list(self._index.by_id.values()):
            self._file(choice)  # what counts as granting changed
        self._forget_all()

    def set_vendors(self, vendors: Iterable[Vendor]) -> None:
        """A reload brought a new catalog: decide (and show) its vendors."""
        self.vendors = tuple(vendors)
        self._forget_all()

    def _forget(self, subject: Subject) -> None:
        """Forget the memo of every client key a choice of `subject` can apply to."""
        self._viewed = None
        if subject.network is not None:  # rare (an admin's): the network may hold any number of clients
            self._forget_all()
            return
        memo = self.states
        for by, key in ((self._memo_by_address, subject.address), (self._memo_by_mac, subject.mac)):
            if key is not None:
                for client in by.pop(key, ()):
                    memo.pop(client, None)

    def _forget_all(self) -> None:
        self._viewed = None
        self.states.clear()
        self._memo_by_address.clear()
        self._memo_by_mac.clear()

    def copy(self) -> TableCopy:
        """Everything but the memo, for a replica (`from_copy`, in a worker process). It shares this
        table's objects: pickle it at once, never keep it."""
        return TableCopy(self.vendors, self.profiles, self.notice, self.kiosk_idle, self.neighbours, self._index,
                         self.kiosk_seen, self.kiosk_links)

    @classmethod
    def from_copy(cls, c: TableCopy) -> ConsentTable:
        table = cls(c.vendors, c.profiles, c.notice, c.kiosk_idle)
        table.neighbours, table._index = c.neighbours, c.index
        table.kiosk_seen.update(c.kiosk_seen)
        table.set_kiosk_links(c.kiosk_links)
        return table

    def memoized(self) -> set[str]:
        """The client keys whose state is memoized now."""
        return set(self.states)

    def __len__(self) -> int:
        """Subjects whose choice grants something under the current notice ("clients with consent")."""
        return len(self._index.granting)
