"""The consent notice: everything a person is told before choosing, its version and its SHA-256.

Proof of consent (GDPR Art. 7(1)) needs to show what the person saw. The notice in force
(`NoticeInForce`) is the consent text (notice.toml, per language), the operator who runs the network
(Art. 13(1)(a)), the categories, and every item a choice can cover: each catalog vendor and each
block list, by id and a fingerprint of what the page shows about it (its description, not a list's
entries), in each language of the notice (where the catalog translates an item, its fingerprint in
that language covers the translation as well as the catalog's own words). The hash of the notice
in a language covers what a page in that language shows. Any change to any of these gives a new
version and new hashes. A choice records the
items it covered with their fingerprints, and the "terms" (text and operator) it was made under;
a grant counts for an item only while both are unchanged. Pure: parsing takes text, never files.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from dnsgate.consent.model import CurrentNotice, item_key
from dnsgate.rules.catalog import Catalog, Category, Vendor

FINGERPRINT_DIGITS = 16  # of the SHA-256: plenty to tell two descriptions apart, short in every record
NO_OPERATOR_WARNING = ("no operator named (portal.operator): the consent portal says that whoever runs this "
                       "network has not given its name or a contact")


class NoticeError(ValueError):
    """The notice file is invalid; the message names the key."""


@dataclass(frozen=True, slots=True)
class Notice:
    """The consent text (notice.toml): its own version and the text per language."""

    version: str
    default_language: str
    texts: Mapping[str, str]  # language -> text
    hashes: Mapping[str, str] = field(init=False)  # language -> SHA-256 of the text alone, hashed once

    def __post_init__(self) -> None:
        object.__setattr__(self, "hashes", {lang: sha256_text(text) for lang, text in self.texts.items()})


@dataclass(frozen=True, slots=True)
class Operator:
    """Who runs the network and answers for the consent recorded ([portal] operator, contact, privacy_url)."""

    name: str = ""
    contact: str = ""
    privacy_url: str = ""

    @property
    def named(self) -> bool:
        return bool(self.name)

    def as_json(self) -> dict[str, str]:
        return {"name": self.name, "contact": self.contact, "privacy_url": self.privacy_url}


@dataclass(frozen=True, slots=True)
class Item:
    """One thing a choice can cover: a catalog vendor or a block list."""

    key: str  # "vendor:<id>" or "list:<id>"
    vendor: Vendor
    fingerprint: str  # of the catalog's own words
    fingerprints: Mapping[str, str] = field(default_factory=dict, compare=False)  # language -> what it shows there

    def fingerprint_in(self, language: str) -> str:
        """The fingerprint of the item as a page in `language` shows it."""
        return self.fingerprints.get(language, self.fingerprint)

    @property
    def kind(self) -> str:
        return self.vendor.kind

    def as_json(self) -> dict[str, Any]:
        v = self.vendor
        return {"kind": v.kind, "id": v.id, "name": v.name, "category": v.category, "fingerprint": self.fingerprint,
                "fingerprints": dict(self.fingerprints)}


def fingerprint(vendor: Vendor, category: Category | None, language: str = "") -> str:
    """What the page shows about an item, hashed: who it is, its category, what it does and collects,
    who receives the data. Not its domain names or a list's entries (a refresh of the same list for
    the same purpose is the same item), but a list's source (another URL may be another list).
    In a `language` the catalog translates the item or its category to, the translation is hashed
    with the catalog's own words: a change of either is a change for that language's readers."""
    own = _shown(vendor, category)
    if not language or (language not in vendor.languages and (category is None or language not in category.languages)):
        return _sha256(own)[:FINGERPRINT_DIGITS]
    translated = _shown(vendor.in_language(language), category.in_language(language) if category else None)
    return _sha256({"catalog": own, "language": language, "shown": translated})[:FINGERPRINT_DIGITS]


def _shown(vendor: Vendor, category: Category | None) -> dict[str, Any]:
    shown: dict[str, Any] = {
        "kind": vendor.kind, "id": vendor.id, "name": vendor.name, "category": vendor.category,
        "category_name": category.name if category else "",
        "category_description": category.description if category else "",
        "summary": vendor.summary, "purposes": list(vendor.tcf_purposes), "data": list(vendor.data_collected),
        "cookies": [[c.name, c.duration, c.purpose] for c in vendor.cookies], "recipients": vendor.recipients,
        "privacy_policy": vendor.privacy_policy, "sale_or_share": vendor.ccpa_sale_or_share,
    }
    if vendor.kind == "list":
        shown["source"] = list(vendor.sources)
    return shown


def items_of(catalog: Catalog, languages: Iterable[str] = ()) -> tuple[Item, ...]:
    """Every item of the catalog in force, its vendors then its block lists, with its fingerprint in
    each of `languages` that shows it differently from the catalog's own words."""
    categories = {c.id: c for c in catalog.categories}
    items = []
    for v in (*catalog.vendors, *catalog.listed):
        category = categories.get(v.category)
        own = fingerprint(v, category)
        shown = {language: fingerprint(v, category, language) for language in languages}
        items.append(Item(item_key(v), v, own, {lang: fp for lang, fp in shown.items() if fp != own}))
    return tuple(items)


@dataclass(frozen=True, slots=True)
class NoticeInForce:
    """The whole notice as shown now: text, operator, categories and items, with its version and hashes."""

    text: Notice
    operator: Operator
    catalog_version: str
    categories: tuple[Category, ...]
    items: tuple[Item, ...]
    version: str = field(init=False)  # the text's version + a digest of everything
    hashes: Mapping[str, str] = field(init=False)  # language -> SHA-256 of the notice in that language
    terms: Mapping[str, str] = field(init=False)  # language -> SHA-256 of the text and the operator

    def __post_init__(self) -> None:
        own = self._common("")
        everything = {"text_version": self.text.version, "texts": dict(self.text.texts), **own}
        translated = {lang: common for lang in self.text.texts if (common := self._common(lang)) != own}
        if translated:  # (a notice without translations keeps the version it always had)
            everything["translated"] = translated
        version = f"{self.text.version}+{_sha256(everything)[:12]}"
        object.__setattr__(self, "version", version)
        object.__setattr__(self, "terms", {lang: terms_sha256(text, self.operator)
                                           for lang, text in self.text.texts.items()})
        object.__setattr__(self, "hashes", {
            lang: _sha256({"version": version, "language": lang, "text": text, **self._common(lang)})
            for lang, text in self.text.texts.items()})

    def _common(self, language: str) -> dict[str, Any]:
        """What a page in `language` shows besides the text ("": the catalog's own words)."""
        return {"operator": self.operator.as_json(), "catalog": self.catalog_version,
                "categories": [[c.id, c.name, c.description] for c in self.categories_in(language)],
                "items": [[i.key, i.fingerprint_in(language)] for i in self.items]}

    def categories_in(self, language: str) -> tuple[Category, ...]:
        return tuple(c.in_language(language) for c in self.categories)

    @property
    def default_language(self) -> str:
        return self.text.default_language

    @property
    def languages(self) -> tuple[str, ...]:
        return tuple(self.text.texts)

    def current(self) -> CurrentNotice:
        return CurrentNotice(self.catalog_version, self.version, dict(self.hashes), frozenset(self.terms.values()),
                             {i.key: i.fingerprint for i in self.items},
                             {i.key: frozenset(i.fingerprints.values()) for i in self.items if i.fingerprints})

    def in_categories(self, categories: Iterable[str]) -> list[Item]:
        wanted = set(categories)
        return [i for i in self.items if i.vendor.category in wanted]

    def item(self, key: str) -> Item | None:
        return next((i for i in self.items if i.key == key), None)


def notice_in_force(text: Notice, operator: Operator, catalog: Catalog) -> NoticeInForce:
    return NoticeInForce(text, operator, catalog.version, catalog.categories, items_of(catalog, text.texts))


def changes_between(old: NoticeInForce, new: NoticeInForce) -> list[str]:
    """What a person is told differently in `new` (a reload's report): the text, the operator, each
    category and each item added, removed or described differently."""
    said: list[str] = []
    if (old.text.version, old.text.default_language, dict(old.text.texts)) != \
            (new.text.version, new.text.default_language, dict(new.text.texts)):
        said.append("notice text")
    if old.operator != new.operator:
        said.append("operator")
    if old.catalog_version != new.catalog_version:
        said.append(f"catalog version {old.catalog_version} → {new.catalog_version}")
    before = {c.id: [(x.name, x.description) for x in (c, *map(c.in_language, c.languages))] for c in old.categories}
    after = {c.id: [(x.name, x.description) for x in (c, *map(c.in_language, c.languages))] for c in new.categories}
    said += _added_removed_changed("category", before, after)
    said += _added_removed_changed("", {i.key: (i.fingerprint, dict(i.fingerprints)) for i in old.items},
                                   {i.key: (i.fingerprint, dict(i.fingerprints)) for i in new.items})
    return said


def _added_removed_changed(kind: str, before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    said = []
    for key in [*before, *(k for k in after if k not in before)]:
        name = f"{kind} {key}" if kind else " ".join(key.split(":", 1))  # "vendor:adco" -> "vendor adco"
        if key not in after:
            said.append(f"{name} removed")
        elif key not in before:
            said.append(f"{name} added")
        elif before[key] != after[key]:
            said.append(f"{name} described differently")
    return said


def terms_sha256(text: str, operator: Operator) -> str:
    """The terms a grant rests on: the consent text shown and the operator named."""
    return _sha256({"text": text, "operator": operator.as_json()})


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _sha256(value: Any) -> str:
    """SHA-256 of canonical JSON (sorted keys, no spaces, UTF-8): the same value always hashes the same."""
    return sha256_text(json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False))


def parse_notice_text(text: str, source: str = "notice") -> Notice:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise NoticeError(f"{source}: not valid TOML: {exc}") from None
    version = data.get("version")
    if not isinstance(version, str) or not version:
        raise NoticeError(f"{source}: version: expected a non-empty string")
    texts = data.get("text")
    if not isinstance(texts, dict) or not texts or not all(
            isinstance(k, str) and isinstance(v, str) and v.strip() for k, v in texts.items()):
        raise NoticeError(f"{source}: text: expected a table of language = \"text\" entries")
    default = data.get("default_language", next(iter(texts)))
    if default not in texts:
        raise NoticeError(f"{source}: default_language: {default!r} has no entry in [text]")
    unknown = set(data) - {"version", "default_language", "text"}
    if unknown:
        raise NoticeError(f"{source}: {sorted(unknown)[0]}: unknown key")
    return Notice(version, default, dict(texts))


def builtin_notice_text() -> str:
    return resources.files("dnsgate").joinpath("data/notice.toml").read_text(encoding="utf-8")
