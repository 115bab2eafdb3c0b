"""Consent test helpers: state built directly (for the pipeline and the table), fake clocks and
neighbour tables, and the settings the end-to-end consent tests run dnsgate with."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import dns.edns

from dnsgate.config import Config, ConsentConfig, IdentityConfig, ProfilesConfig
from dnsgate.consent.model import Choice, ConsentTable, CurrentNotice, NoticeRef, Profile, ProfileMap, Subject
from dnsgate.consent.notice import items_of
from dnsgate.rules.catalog import Vendor, builtin_catalog_text, parse_catalog_text

CATALOG = parse_catalog_text(builtin_catalog_text())
ITEMS = {i.key: i.fingerprint for i in items_of(CATALOG)}  # every item of the built-in catalog
TERMS = "d" * 64  # the consent text and operator in force
NOTICE = CurrentNotice(CATALOG.version, "test-1", {"en": "a" * 64}, frozenset({TERMS}), ITEMS)
SHOWN = NoticeRef(CATALOG.version, "test-1", "a" * 64, "en")
_ids = itertools.count(1)


def table(vendors: Iterable[Vendor] = CATALOG.vendors, default: Profile = "opt-in",
          networks: Iterable[tuple[str, Profile]] = (), kiosk_idle: float = 900.0) -> ConsentTable:
    return ConsentTable(vendors, ProfileMap(default, networks), NOTICE, kiosk_idle)


def choice(address: str | None = None, *, mac: str | None = None, network: str | None = None,
           categories: Mapping[str, bool] | None = None, vendors: Mapping[str, bool] | None = None,
           made_at: float = 0.0, expires_at: float = 2_000_000_000.0, notice: NoticeRef | None = SHOWN,
           sec_gpc: str | None = None, profile: str = "opt-in", items: Mapping[str, str] | None = ITEMS,
           terms: str = TERMS) -> Choice:
    """A choice covering every item of the built-in catalog under the terms in force, unless told otherwise."""
    return Choice(next(_ids), Subject(address, mac, network),
                  {"marketing": True} if categories is None else dict(categories), dict(vendors or {}),
                  made_at, expires_at, notice, "device", profile, sec_gpc, "en",
                  None if items is None else dict(items), terms)


class FakeClock:
    """A wall clock that tests move by hand (consent expiry, kiosk idle time)."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeNeighbours:
    """A neighbour table (address -> MAC) that tests edit; dnsgate reads it like the kernel's."""

    def __init__(self, table: Mapping[str, str] | None = None) -> None:
        self.table = dict(table or {})
        self.reads = 0

    def __call__(self) -> dict[str, str]:
        self.reads += 1
        return dict(self.table)


# -- running dnsgate with consent settings --------------------------------------------------------

# Networks of the loopback range with each profile; everything else in 127/8 is opt-in (the default).
OPT_OUT, KIOSK, DENY, ALLOW = "127.0.1.", "127.0.2.", "127.0.3.", "127.0.4."
PROFILE_NETWORKS: tuple[tuple[str, str], ...] = (
    ("127.0.1.0/24", "opt-out"), ("127.0.2.0/24", "kiosk"), ("127.0.3.0/24", "deny"), ("127.0.4.0/24", "allow"))

# The built-in catalog plus a second marketing vendor that does not sell data, to test vendor scopes.
PIXEL = "pixel.example.test"
SECOND_VENDOR = f'''
[[vendor]]
id = "pixelco"
name = "PixelCo"
category = "marketing"
ccpa_sale_or_share = false
[[vendor.domain]]
pattern = "{PIXEL}"
'''


def two_vendor_catalog(directory: Path, version: str | None = None) -> Path:
    text = builtin_catalog_text() + SECOND_VENDOR
    if version is not None:
        text = text.replace(f'version = "{CATALOG.version}"', f'version = "{version}"', 1)
    path = directory / f"catalog-{version or 'builtin'}.toml"
    path.write_text(text, encoding="utf-8")
    return path


def consent_config(base: Config, *, catalog: Path | None = None, trusted: tuple[str, ...] = (),
                   **consent: Any) -> Config:
    """`base` with the profile networks above, fast sweeps, and the given consent settings."""
    return replace(
        base,
        consent=replace(ConsentConfig(sweep_interval=0.05), **consent),
        profiles=ProfilesConfig(networks=PROFILE_NETWORKS),
        identity=IdentityConfig(neighbours=False, neighbour_refresh=0.05, trusted_forwarders=trusted),
        gate=replace(base.gate, catalog=str(catalog) if catalog else ""),
    )


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    """Wait until `check()` holds (a background sweep or refresh has run), at most `timeout` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def parse_jsonl(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line]


def edns_option(code: int, data: bytes) -> dns.edns.GenericOption:
    """An EDNS option by number (dnspython types only the registered ones)."""
    return dns.edns.GenericOption(code, data)  # type: ignore[arg-type]
