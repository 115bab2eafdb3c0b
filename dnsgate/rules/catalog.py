"""The vendor catalog: who a gated name belongs to, what consent it needs, and what a person must know.

`Catalog.match(name)` maps a lower-case wire name to the rule it is gated on in O(labels): the
catalog's own vendor domains first, then the imported block lists (rules/blocklists.py) unless an
allow-list entry covers the name. A bounded memo makes repeated names cost one dict lookup (the
pipeline's fast path reads it directly). Answers are checked too: `cloaked` and `address_rule`
give the rule for a name reached through a CNAME or an address inside a vendor's IP ranges.

The catalog is one base file (config/vendors.toml) plus optional drop-in files, each validated
with errors that name the file, the vendor and the key. A category or vendor may carry its facts in
other languages (`[category.text.de]`, `[vendor.text.de]`): `in_language` gives what a page in that
language shows, the catalog's own words where a translation says nothing. Pure: parsing takes text,
never files.
"""

from __future__ import annotations

import bisect
import ipaddress
import itertools
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any, Final, Literal, Protocol

from dnsgate.gc_policy import untrack
from dnsgate.wire import label_offsets, name_to_wire

MEMO_LIMIT: Final = 65_536
# A language tag as the portal's strings and the notice name them: "de", "pt-br".
LANGUAGE_TAG: Final = re.compile(r"[a-z]{2,3}(-[a-z0-9]{2,8})*")


class CatalogError(ValueError):
    """The catalog is invalid; the message names the file, the vendor and the key."""


@dataclass(frozen=True, slots=True)
class CategoryText:
    """A category in another language; None: the catalog's own words."""

    name: str | None = None
    description: str | None = None


@dataclass(frozen=True, slots=True)
class Category:
    id: str
    name: str
    description: str
    texts: Mapping[str, CategoryText] = field(default_factory=dict, compare=False, repr=False)

    @property
    def languages(self) -> tuple[str, ...]:
        return tuple(self.texts)

    def in_language(self, language: str) -> Category:
        """The category as a page in `language` shows it (itself when it has no such translation)."""
        text = self.texts.get(language)
        if text is None:
            return self
        return replace(self, name=_or(text.name, self.name), description=_or(text.description, self.description))


@dataclass(frozen=True, slots=True)
class Cookie:
    name: str
    duration: str
    purpose: str


@dataclass(frozen=True, slots=True, eq=False)
class VendorText:
    """A vendor's facts in another language; None (or no entry): the catalog's own words."""

    summary: str | None = None
    recipients: str | None = None
    data_collected: tuple[str, ...] | None = None
    cookies: Mapping[str, tuple[str | None, str | None]] = field(default_factory=dict)  # name -> duration, purpose
    serves: Mapping[str, str] = field(default_factory=dict)  # domain pattern -> what it serves


def _or(translated: Any, own: Any) -> Any:
    return own if translated is None else translated


# Vendors and rules compare and hash by identity: they key per-query dicts, so hashing must be cheap.
@dataclass(frozen=True, slots=True, eq=False)
class Vendor:
    """A vendor of the catalog, or (kind "list") an imported block list gated on a category."""

    id: str
    name: str
    category: str
    tcf_purposes: tuple[int, ...]
    summary: str
    recipients: str
    privacy_policy: str
    data_collected: tuple[str, ...]
    cookies: tuple[Cookie, ...]
    sources: tuple[str, ...]
    ccpa_sale_or_share: bool
    gvl_id: int | None = None
    ip_ranges: tuple[str, ...] = ()
    kind: Literal["vendor", "list"] = "vendor"
    texts: Mapping[str, VendorText] = field(default_factory=dict, repr=False)  # language -> its facts there
    # (id, category): what the query log records. An untracked tuple of strings, so that a log entry
    # holding it is one the cycle collector can untrack too (a flood queues ~10 000 a second).
    logged: tuple[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        logged = (self.id, self.category)
        untrack(logged)
        object.__setattr__(self, "logged", logged)

    @property
    def languages(self) -> tuple[str, ...]:
        return tuple(self.texts)

    def in_language(self, language: str) -> Vendor:
        """The vendor's facts as a page in `language` shows them (itself when it has no such
        translation). Only for showing: what is gated is this vendor, by identity."""
        text = self.texts.get(language)
        if text is None:
            return self
        cookies = tuple(Cookie(c.name, _or(text.cookies.get(c.name, (None, None))[0], c.duration),
                               _or(text.cookies.get(c.name, (None, None))[1], c.purpose)) for c in self.cookies)
        return replace(self, summary=_or(text.summary, self.summary), recipients=_or(text.recipients, self.recipients),
                       data_collected=_or(text.data_collected, self.data_collected), cookies=cookies)

    def serves_in(self, language: str, rule: DomainRule) -> str:
        """What the domain of `rule` serves, in `language`."""
        text = self.texts.get(language)
        return rule.serves if text is None else text.serves.get(rule.pattern, rule.serves)


Via = Literal["", "cname", "address"]


@dataclass(frozen=True, slots=True, eq=False)
class DomainRule:
    """One gate: a catalog domain pattern, a whole block list, or a vendor IP range.

    `apex` is the wire name the pattern is written on; empty when the sinkhole's SOA should be
    owned by the query name itself (lists, and answers gated through a CNAME or an address).
    `via` says how an answer met the rule: "" by its own name, "cname" through an alias in the
    answer, "address" through an address inside `pattern` (a CIDR).
    """

    pattern: str
    vendor: Vendor
    apex: bytes
    subdomains_only: bool
    serves: str
    source: str
    via: Via = ""


class NameMatcher(Protocol):
    """Imported lists (blocklists.ListIndex): the rule of a name, or None (also when allow-listed)."""

    def match(self, name: bytes, offsets: list[int]) -> DomainRule | None: ...

    def __len__(self) -> int: ...


class Catalog:
    """Categories, vendors, domain rules and lists; immutable once built (a reload builds a new one)."""

    __slots__ = ("_by_apex", "_cloaked", "_v4", "_v6", "categories", "checks_addresses", "ip_rules", "listed", "lists",
                 "memo", "proven", "rules", "vendors", "version")

    def __init__(
        self,
        version: str,
        categories: tuple[Category, ...],
        vendors: tuple[Vendor, ...],
        rules: tuple[DomainRule, ...],
        lists: NameMatcher | None = None,
        listed: tuple[Vendor, ...] = (),
        proven: frozenset[str] = frozenset(),
    ) -> None:
        self.version = version
        self.categories = categories
        self.vendors = vendors
        self.rules = rules
        self.lists = lists
        # The block lists in force (kind "list"): each one is an item of the notice, as a vendor is.
        self.listed = listed
        # Vendors defined in files whose version is part of `version`: what a choice recorded under
        # this version can be proven to have been shown (an unversioned drop-in changes no version).
        self.proven = proven
        self._by_apex = {r.apex: r for r in rules}
        self._cloaked: dict[DomainRule, DomainRule] = {}
        self.ip_rules = tuple(
            DomainRule(pattern=cidr, vendor=v, apex=b"", subdomains_only=False, serves="", source="", via="address")
            for v in vendors for cidr in v.ip_ranges
        )
        self._v4 = _AddressRanges(r for r in self.ip_rules if ":" not in r.pattern)
        self._v6 = _AddressRanges(r for r in self.ip_rules if ":" in r.pattern)
        # Whether answers' addresses can reveal a vendor (read for every forwarded answer: kept, not computed)
        self.checks_addresses = bool(self._v4 or self._v6)
        # name -> rule, for names already looked up (the fast path reads it directly)
        self.memo: dict[bytes, DomainRule | None] = {}

    def match(self, name: bytes) -> DomainRule | None:
        """The rule the lower-case wire `name` is gated on, or None."""
        rule = self.memo.get(name)  # (not a KeyError per unique name: a flood of misses meets one each)
        if rule is not None:
            return rule
        rule = self._lookup(name)
        if rule is not None:  # only gated names: misses of unique names would fill it with None
            memo = self.memo
            if len(memo) >= MEMO_LIMIT:
                memo.clear()  # a flood of unique gated names must not grow memory without bound
            memo[name] = rule
        return rule

    def _lookup(self, name: bytes) -> DomainRule | None:
        by_apex = self._by_apex
        offsets = label_offsets(name)
        for i in offsets:
            rule = by_apex.get(name[i:] if i else name)
            if rule is not None and not (i == 0 and rule.subdomains_only):
                return rule
        # The catalog's vendors come first: their consent notice is what a person agreed to.
        return None if self.lists is None else self.lists.match(name, offsets)

    def cloaked(self, rule: DomainRule) -> DomainRule:
        """`rule` as met through a CNAME/DNAME/SVCB target: same vendor, SOA owned by the query name."""
        variant = self._cloaked.get(rule)
        if variant is None:
            variant = self._cloaked[rule] = replace(rule, apex=b"", via="cname")
        return variant

    def address_rule(self, address: bytes) -> DomainRule | None:
        """The IP-range rule covering a 4- or 16-byte address from an answer, or None."""
        ranges = self._v4 if len(address) == 4 else self._v6
        return ranges.find(int.from_bytes(address, "big")) if ranges else None

    def category(self, category_id: str) -> Category | None:
        return next((c for c in self.categories if c.id == category_id), None)

    def vendor(self, vendor_id: str) -> Vendor | None:
        return next((v for v in self.vendors if v.id == vendor_id), None)

    def domains_of(self, vendor: Vendor) -> tuple[DomainRule, ...]:
        return tuple(r for r in self.rules if r.vendor is vendor)

    def without(self, patterns: Iterable[str]) -> Catalog:
        """This catalog with some domain patterns switched off; unknown patterns are an error."""
        off = set(patterns)
        unknown = off - {r.pattern for r in self.rules}
        if unknown:
            raise CatalogError(
                f"gate.disabled_domains: {', '.join(sorted(unknown))} not in the catalog "
                f"(known: {', '.join(r.pattern for r in self.rules)})"
            )
        return Catalog(self.version, self.categories, self.vendors,
                       tuple(r for r in self.rules if r.pattern not in off), self.lists, self.listed, self.proven)

    def without_vendors(self, vendor_ids: Iterable[str]) -> Catalog:
        """This catalog with whole vendors switched off (their domains and IP ranges resolve freely)."""
        off = set(vendor_ids)
        unknown = off - {v.id for v in self.vendors}
        if unknown:
            raise CatalogError(
                f"gate.disabled_vendors: {', '.join(sorted(unknown))} not in the catalog "
                f"(known: {', '.join(v.id for v in self.vendors)})"
            )
        return Catalog(self.version, self.categories, tuple(v for v in self.vendors if v.id not in off),
                       tuple(r for r in self.rules if r.vendor.id not in off), self.lists, self.listed, self.proven)

    def with_lists(self, lists: NameMatcher | None, listed: tuple[Vendor, ...] = ()) -> Catalog:
        """This catalog gating the names of `lists` too; `listed` are the block lists (kind "list") in it."""
        return Catalog(self.version, self.categories, self.vendors, self.rules, lists, listed, self.proven)


class _AddressRanges:
    """Non-overlapping address ranges of one family, found by binary search on their starts."""

    __slots__ = ("_ends", "_rules", "_starts")

    def __init__(self, rules: Iterable[DomainRule]) -> None:
        spans = sorted((_span(r.pattern), r) for r in rules)
        self._starts = [s[0][0] for s in spans]
        self._ends = [s[0][1] for s in spans]
        self._rules = [s[1] for s in spans]

    def find(self, address: int) -> DomainRule | None:
        i = bisect.bisect_right(self._starts, address) - 1
        return self._rules[i] if i >= 0 and address <= self._ends[i] else None

    def __bool__(self) -> bool:
        return bool(self._rules)


def _span(cidr: str) -> tuple[int, int]:
    net = ipaddress.ip_network(cidr)
    return int(net.network_address), int(net.broadcast_address)


# --------------------------------------------------------------------------------------------
# Parsing

_TOP_KEYS: Final = frozenset({"version", "category", "vendor"})
_CATEGORY_KEYS: Final = frozenset({"id", "name", "description", "text"})
_CATEGORY_TEXT_KEYS: Final = frozenset({"name", "description"})
_VENDOR_KEYS: Final = frozenset({"id", "name", "category", "tcf_purposes", "summary", "recipients", "privacy_policy",
                                 "data_collected", "cookie", "sources", "ccpa_sale_or_share", "gvl_id", "ip_ranges",
                                 "domain", "text"})
_VENDOR_TEXT_KEYS: Final = frozenset({"summary", "recipients", "data_collected", "cookie", "domain"})
_COOKIE_TEXT_KEYS: Final = frozenset({"duration", "purpose"})
_COOKIE_KEYS: Final = frozenset({"name", "duration", "purpose"})
_DOMAIN_KEYS: Final = frozenset({"pattern", "serves", "source"})


def _known_keys(table: Any, known: frozenset[str], where: str) -> Mapping[str, Any]:
    if not isinstance(table, Mapping):
        raise CatalogError(f"{where}: expected a table, got {table!r}")
    for key in table:
        if key not in known:
            raise CatalogError(f"{where}.{key}: unknown key (known: {', '.join(sorted(known))})")
    return table


def _get(table: Mapping[str, Any], key: str, kind: type, where: str, default: Any = ...) -> Any:
    if key not in table:
        if default is ...:
            raise CatalogError(f"{where}: missing key {key!r}")
        return default
    value = table[key]
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise CatalogError(f"{where}.{key}: expected {kind.__name__}, got {value!r}")
    return value


def _str_list(table: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    values = _get(table, key, list, where, [])
    if not all(isinstance(v, str) for v in values):
        raise CatalogError(f"{where}.{key}: expected a list of strings")
    return tuple(values)


def _languages(table: Mapping[str, Any], where: str) -> dict[str, Mapping[str, Any]]:
    """The `text` table of a category or vendor: language tag -> its table."""
    texts = _get(table, "text", dict, where, {})
    for language in texts:
        if not LANGUAGE_TAG.fullmatch(language):
            raise CatalogError(f"{where}.text.{language}: not a language tag (lower case, as 'de' or 'pt-br')")
    return dict(texts)


def _category_texts(table: Mapping[str, Any], where: str) -> dict[str, CategoryText]:
    texts = {}
    for language, t in _languages(table, where).items():
        twhere = f"{where}.text.{language}"
        t = _known_keys(t, _CATEGORY_TEXT_KEYS, twhere)
        texts[language] = CategoryText(_get(t, "name", str, twhere, None), _get(t, "description", str, twhere, None))
    return texts


def _vendor_texts(table: Mapping[str, Any], where: str, cookies: Sequence[str],
                  patterns: Sequence[str]) -> dict[str, VendorText]:
    texts = {}
    for language, t in _languages(table, where).items():
        twhere = f"{where}.text.{language}"
        t = _known_keys(t, _VENDOR_TEXT_KEYS, twhere)
        translated: dict[str, tuple[str | None, str | None]] = {}
        for name, c in _get(t, "cookie", dict, twhere, {}).items():
            cwhere = f"{twhere}.cookie.{name}"
            if name not in cookies:
                raise CatalogError(f"{cwhere}: the vendor has no cookie {name!r} (it has: {', '.join(cookies)})")
            c = _known_keys(c, _COOKIE_TEXT_KEYS, cwhere)
            translated[name] = (_get(c, "duration", str, cwhere, None), _get(c, "purpose", str, cwhere, None))
        serves: dict[str, str] = {}
        for pattern, text in _get(t, "domain", dict, twhere, {}).items():
            dwhere = f"{twhere}.domain.{pattern}"
            if pattern not in patterns:
                raise CatalogError(f"{dwhere}: the vendor has no domain {pattern!r} (it has: {', '.join(patterns)})")
            if not isinstance(text, str):
                raise CatalogError(f"{dwhere}: expected str (what the domain serves), got {text!r}")
            serves[pattern] = text
        data = _str_list(t, "data_collected", twhere) if "data_collected" in t else None
        texts[language] = VendorText(_get(t, "summary", str, twhere, None), _get(t, "recipients", str, twhere, None),
                                     data, translated, serves)
    return texts


def _parse_pattern(pattern: str, where: str) -> tuple[bytes, bool]:
    subdomains_only = pattern.startswith("*.")
    try:
        apex = name_to_wire(pattern[2:] if subdomains_only else pattern)
    except ValueError as exc:
        raise CatalogError(f"{where}.pattern: {exc}") from None
    if "*" in pattern[2 if subdomains_only else 0 :] or apex == b"\x00":
        raise CatalogError(f"{where}.pattern: use 'example.com' or '*.example.com', got {pattern!r}")
    return apex, subdomains_only


def _ip_ranges(table: Mapping[str, Any], where: str) -> tuple[str, ...]:
    ranges = []
    for i, text in enumerate(_str_list(table, "ip_ranges", where)):
        try:
            ranges.append(str(ipaddress.ip_network(text, strict=True)))
        except ValueError as exc:
            raise CatalogError(f"{where}.ip_ranges[{i}]: {exc}") from None
    return tuple(ranges)


class _Builder:
    """Collects categories, vendors and rules from the base file and the drop-ins, in order."""

    def __init__(self) -> None:
        self.version = ""
        self.categories: list[Category] = []
        self.vendors: list[Vendor] = []
        self.rules: dict[bytes, DomainRule] = {}
        self.origin: dict[object, str] = {}  # category id / vendor id / rule apex -> source file
        self.versioned: set[str] = set()  # files that carry a version (named in the catalog's version)
        self.pending: list[tuple[Vendor, str]] = []  # vendor categories are checked once all files are in

    def add(self, data: Mapping[str, Any], source: str, base: bool) -> None:
        _known_keys(data, _TOP_KEYS, source)
        version = _get(data, "version", str, source, ... if base else "")
        if base:
            self.version = version
        elif version:
            self.version += f"+{source.rsplit('/', 1)[-1]}:{version}"
        if version:
            self.versioned.add(source)
        for i, c in enumerate(_get(data, "category", list, source, ... if base else [])):
            where = f"{source}: category[{i}]"
            c = _known_keys(c, _CATEGORY_KEYS, where)
            cid = _get(c, "id", str, where)
            category = Category(id=cid, name=_get(c, "name", str, where),
                                description=_get(c, "description", str, where, ""),
                                texts=_category_texts(c, f"{source}: category {cid!r}"))
            if any(x.id == category.id for x in self.categories):
                raise CatalogError(f"{source}: category {category.id!r}: already defined in "
                                   f"{self.origin[('category', category.id)]}")
            self.origin[("category", category.id)] = source
            self.categories.append(category)
        for i, v in enumerate(_get(data, "vendor", list, source, ... if base else [])):
            self._vendor(v, f"{source}: vendor[{i}]", source)

    def _vendor(self, v: Any, where: str, source: str) -> None:
        v = _known_keys(v, _VENDOR_KEYS, where)
        vid = _get(v, "id", str, where)
        where = f"{source}: vendor {vid!r}"
        purposes = _get(v, "tcf_purposes", list, where, [])
        if not all(isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= 24 for p in purposes):
            raise CatalogError(f"{where}.tcf_purposes: expected integers 1..24")
        cookies = []
        for j, c in enumerate(_get(v, "cookie", list, where, [])):
            cwhere = f"{where}.cookie[{j}]"
            c = _known_keys(c, _COOKIE_KEYS, cwhere)
            cookies.append(Cookie(name=_get(c, "name", str, cwhere), duration=_get(c, "duration", str, cwhere),
                                  purpose=_get(c, "purpose", str, cwhere, "")))
        domains = _get(v, "domain", list, where)
        patterns = [str(d["pattern"]) for d in domains if isinstance(d, Mapping) and isinstance(d.get("pattern"), str)]
        vendor = Vendor(
            id=vid,
            name=_get(v, "name", str, where),
            category=_get(v, "category", str, where),
            tcf_purposes=tuple(purposes),
            summary=_get(v, "summary", str, where, ""),
            recipients=_get(v, "recipients", str, where, ""),
            privacy_policy=_get(v, "privacy_policy", str, where, ""),
            data_collected=_str_list(v, "data_collected", where),
            cookies=tuple(cookies),
            sources=_str_list(v, "sources", where),
            ccpa_sale_or_share=_get(v, "ccpa_sale_or_share", bool, where, True),
            gvl_id=_get(v, "gvl_id", int, where, None),
            ip_ranges=_ip_ranges(v, where),
            texts=_vendor_texts(v, where, [c.name for c in cookies], patterns),
        )
        if any(x.id == vid for x in self.vendors):
            raise CatalogError(f"{where}: duplicate vendor id (already defined in {self.origin[('vendor', vid)]})")
        self.origin[("vendor", vid)] = source
        self.vendors.append(vendor)
        self.pending.append((vendor, where))
        for j, d in enumerate(domains):
            dwhere = f"{where}.domain[{j}]"
            d = _known_keys(d, _DOMAIN_KEYS, dwhere)
            pattern = _get(d, "pattern", str, dwhere)
            apex, subdomains_only = _parse_pattern(pattern, dwhere)
            if apex in self.rules:
                other = self.rules[apex]
                raise CatalogError(f"{dwhere}.pattern: {pattern!r} is already listed by {other.vendor.id!r} "
                                   f"({self.origin[apex]})")
            self.origin[apex] = source
            self.rules[apex] = DomainRule(
                pattern=pattern,
                vendor=vendor,
                apex=apex,
                subdomains_only=subdomains_only,
                serves=_get(d, "serves", str, dwhere, ""),
                source=_get(d, "source", str, dwhere, ""),
            )

    def build(self) -> Catalog:
        known = {c.id for c in self.categories}
        for vendor, where in self.pending:
            if vendor.category not in known:
                raise CatalogError(f"{where}.category: {vendor.category!r} is not a defined category "
                                   f"(known: {', '.join(sorted(known))})")
        _check_overlaps(self.vendors, self.origin)
        proven = frozenset(v.id for v in self.vendors if self.origin[("vendor", v.id)] in self.versioned)
        return Catalog(self.version, tuple(self.categories), tuple(self.vendors), tuple(self.rules.values()),
                       proven=proven)


def _check_overlaps(vendors: Sequence[Vendor], origin: Mapping[object, str]) -> None:
    """IP ranges must not overlap: an address belongs to one vendor."""
    spans = sorted((_span(cidr), cidr, v) for v in vendors for cidr in v.ip_ranges)
    for (a, a_cidr, a_vendor), (b, b_cidr, b_vendor) in itertools.pairwise(spans):
        same_family = (":" in a_cidr) == (":" in b_cidr)
        if same_family and b[0] <= a[1]:
            raise CatalogError(f"{origin[('vendor', b_vendor.id)]}: vendor {b_vendor.id!r}.ip_ranges: {b_cidr} "
                               f"overlaps {a_cidr} of {a_vendor.id!r}")


def _load_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"{source}: not valid TOML: {exc}") from None


def parse_catalog(data: Mapping[str, Any], source: str = "catalog") -> Catalog:
    builder = _Builder()
    builder.add(data, source, base=True)
    return builder.build()


def parse_catalog_text(text: str, source: str = "catalog") -> Catalog:
    return parse_catalog(_load_toml(text, source), source)


def parse_catalog_files(base: tuple[str, str], dropins: Sequence[tuple[str, str]] = ()) -> Catalog:
    """The base catalog (source, text) grown by drop-ins, in the order given (file name order).

    A drop-in may add categories and vendors (its `version` is optional); it may not redefine a
    category, a vendor or a domain pattern that an earlier file defines.
    """
    builder = _Builder()
    builder.add(_load_toml(base[1], base[0]), base[0], base=True)
    for source, text in dropins:
        builder.add(_load_toml(text, source), source, base=False)
    return builder.build()


def builtin_catalog_text() -> str:
    """The catalog shipped with dnsgate (config/vendors.toml)."""
    return resources.files("dnsgate").joinpath("data/vendors.toml").read_text(encoding="utf-8")
