"""The vendor catalog: who a gated name belongs to, what consent it needs, and what a person must know.

`Catalog.match(name)` maps a lower-case wire name to the most specific `DomainRule` in O(labels),
with a bounded memo so repeated names cost one dict lookup. Pure: parsing takes text, never files.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final

from .wire import label_offsets, name_to_wire

MEMO_LIMIT: Final = 65_536


class CatalogError(ValueError):
    """The catalog is invalid; the message names the vendor and key."""


@dataclass(frozen=True, slots=True)
class Category:
    id: str
    name: str
    description: str


@dataclass(frozen=True, slots=True)
class Cookie:
    name: str
    duration: str
    purpose: str


# Vendors and rules compare and hash by identity: they key per-query dicts, so hashing must be cheap.
@dataclass(frozen=True, slots=True, eq=False)
class Vendor:
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


@dataclass(frozen=True, slots=True, eq=False)
class DomainRule:
    """One catalog domain pattern. `apex` is the wire name the pattern is written on."""

    pattern: str
    vendor: Vendor
    apex: bytes
    subdomains_only: bool
    serves: str
    source: str


class Catalog:
    """Categories, vendors and domain rules; immutable once built (a reload builds a new one)."""

    __slots__ = ("_by_apex", "categories", "memo", "rules", "vendors", "version")

    def __init__(
        self,
        version: str,
        categories: tuple[Category, ...],
        vendors: tuple[Vendor, ...],
        rules: tuple[DomainRule, ...],
    ) -> None:
        self.version = version
        self.categories = categories
        self.vendors = vendors
        self.rules = rules
        self._by_apex = {r.apex: r for r in rules}
        # name -> rule, for names already looked up (the fast path reads it directly)
        self.memo: dict[bytes, DomainRule | None] = {}

    def match(self, name: bytes) -> DomainRule | None:
        """The most specific rule covering the lower-case wire `name`, or None."""
        try:
            return self.memo[name]
        except KeyError:
            pass
        rule = self._lookup(name)
        memo = self.memo
        if len(memo) >= MEMO_LIMIT:
            memo.clear()  # a flood of unique names must not grow memory without bound
        memo[name] = rule
        return rule

    def _lookup(self, name: bytes) -> DomainRule | None:
        by_apex = self._by_apex
        for i in label_offsets(name):
            rule = by_apex.get(name[i:] if i else name)
            if rule is not None and not (i == 0 and rule.subdomains_only):
                return rule
        return None

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
                       tuple(r for r in self.rules if r.pattern not in off))


# --------------------------------------------------------------------------------------------
# Parsing


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


def _parse_pattern(pattern: str, where: str) -> tuple[bytes, bool]:
    subdomains_only = pattern.startswith("*.")
    try:
        apex = name_to_wire(pattern[2:] if subdomains_only else pattern)
    except ValueError as exc:
        raise CatalogError(f"{where}.pattern: {exc}") from None
    if "*" in pattern[2 if subdomains_only else 0 :] or apex == b"\x00":
        raise CatalogError(f"{where}.pattern: use 'example.com' or '*.example.com', got {pattern!r}")
    return apex, subdomains_only


def parse_catalog(data: Mapping[str, Any], source: str = "catalog") -> Catalog:
    version = _get(data, "version", str, source)
    categories = tuple(
        Category(
            id=_get(c, "id", str, f"{source}: category[{i}]"),
            name=_get(c, "name", str, f"{source}: category[{i}]"),
            description=_get(c, "description", str, f"{source}: category[{i}]", ""),
        )
        for i, c in enumerate(_get(data, "category", list, source))
    )
    category_ids = {c.id for c in categories}
    vendors: list[Vendor] = []
    rules: dict[bytes, DomainRule] = {}
    for i, v in enumerate(_get(data, "vendor", list, source)):
        where = f"{source}: vendor[{i}]"
        vid = _get(v, "id", str, where)
        where = f"{source}: vendor {vid!r}"
        category = _get(v, "category", str, where)
        if category not in category_ids:
            raise CatalogError(f"{where}.category: {category!r} is not a defined category")
        purposes = _get(v, "tcf_purposes", list, where, [])
        if not all(isinstance(p, int) and 1 <= p <= 24 for p in purposes):
            raise CatalogError(f"{where}.tcf_purposes: expected integers 1..24")
        vendor = Vendor(
            id=vid,
            name=_get(v, "name", str, where),
            category=category,
            tcf_purposes=tuple(purposes),
            summary=_get(v, "summary", str, where, ""),
            recipients=_get(v, "recipients", str, where, ""),
            privacy_policy=_get(v, "privacy_policy", str, where, ""),
            data_collected=_str_list(v, "data_collected", where),
            cookies=tuple(
                Cookie(
                    name=_get(c, "name", str, f"{where}.cookie[{j}]"),
                    duration=_get(c, "duration", str, f"{where}.cookie[{j}]"),
                    purpose=_get(c, "purpose", str, f"{where}.cookie[{j}]", ""),
                )
                for j, c in enumerate(_get(v, "cookie", list, where, []))
            ),
            sources=_str_list(v, "sources", where),
            ccpa_sale_or_share=_get(v, "ccpa_sale_or_share", bool, where, True),
            gvl_id=_get(v, "gvl_id", int, where, None),
        )
        if any(x.id == vid for x in vendors):
            raise CatalogError(f"{where}: duplicate vendor id")
        vendors.append(vendor)
        for j, d in enumerate(_get(v, "domain", list, where)):
            dwhere = f"{where}.domain[{j}]"
            pattern = _get(d, "pattern", str, dwhere)
            apex, subdomains_only = _parse_pattern(pattern, dwhere)
            if apex in rules:
                raise CatalogError(f"{dwhere}.pattern: {pattern!r} is already listed by {rules[apex].vendor.id!r}")
            rules[apex] = DomainRule(
                pattern=pattern,
                vendor=vendor,
                apex=apex,
                subdomains_only=subdomains_only,
                serves=_get(d, "serves", str, dwhere, ""),
                source=_get(d, "source", str, dwhere, ""),
            )
    return Catalog(version, categories, tuple(vendors), tuple(rules.values()))


def parse_catalog_text(text: str, source: str = "catalog") -> Catalog:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"{source}: not valid TOML: {exc}") from None
    return parse_catalog(data, source)


def builtin_catalog_text() -> str:
    """The catalog shipped with dnsgate (config/vendors.toml)."""
    return resources.files("dnsgate").joinpath("data/vendors.toml").read_text(encoding="utf-8")
