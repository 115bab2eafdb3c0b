"""Which address the portal host (consent.dnsgate.internal) resolves to, for the client asking.

The answer must be an address where the client can reach the API:
- `portal.addresses` when configured (NAT, port mappings, a proxy in front);
- else the API's own address when it listens on one;
- else (the API listens on 0.0.0.0 or ::) the address of this host that faces the client: the
  source address the kernel picks to reach it, which is also the address a reply to its DNS query
  comes from. A UDP `connect` finds it without sending anything; it is remembered per client for a
  minute, so a flood of portal queries costs a dict lookup each.
Families follow the API: an IPv4-only API gives no AAAA record, and an IPv6 client of a `0.0.0.0`
API gets none either (NODATA, not a wrong address).

`v4.<host>` and `v6.<host>` carry the portal's address in one family only. dnsgate grants only the
address that asks, so when a device's HTTP and DNS use different families (HTTP over IPv4, DNS over
IPv6), the page also records the choice through the other family's name: the device's DNS, asking
in that family, gets the address its requests in that family should go to.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable, Iterable
from typing import Final

from dnsgate.addresses import normalize_client
from dnsgate.dns.local_answers import LocalZone
from dnsgate.wire import NOERROR, name_to_wire

A_TYPE: Final = 1
AAAA_TYPE: Final = 28
MEMO_SECONDS: Final = 60.0
MEMO_LIMIT: Final = 4096
PORTAL_TTL: Final = 60  # short: the API's address may change with a restart
WILDCARDS: Final = {"0.0.0.0": 4, "::": 6}

Records = dict[int, tuple[bytes, ...]]


def facing_address(client: str) -> str | None:
    """The local address the kernel would use to reach `client` (no packet is sent)."""
    family = socket.AF_INET6 if ":" in client else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((client, 9))
        except OSError:
            return None  # no route to it
        return normalize_client(probe.getsockname()[0])


def records_for(addresses: Iterable[str]) -> Records:
    """A and AAAA rdata for `addresses`."""
    records: Records = {}
    for ip in map(ipaddress.ip_address, addresses):
        rtype = A_TYPE if ip.version == 4 else AAAA_TYPE
        records[rtype] = (*records.get(rtype, ()), ip.packed)
    return records


class PortalAddresses:
    """The portal host's A/AAAA records for a client: fixed, or this host's address facing it."""

    __slots__ = ("_memo", "facing", "fixed", "mono", "version")

    def __init__(self, api_host: str, configured: Iterable[str] = (),
                 facing: Callable[[str], str | None] = facing_address,
                 mono: Callable[[], float] = time.monotonic) -> None:
        configured = tuple(configured)
        self.version = WILDCARDS.get(api_host)  # None: fixed records
        self.fixed: Records = records_for(configured or ([] if self.version else [api_host]))
        if configured:
            self.version = None
        self.facing = facing
        self.mono = mono
        self._memo: dict[str, tuple[float, Records]] = {}

    @property
    def is_fixed(self) -> bool:
        return self.version is None

    def records(self, client: str) -> Records:
        if self.version is None:
            return self.fixed
        now = self.mono()
        found = self._memo.get(client)
        if found is not None and found[0] > now:
            return found[1]
        records = self._lookup(client)
        if len(self._memo) >= MEMO_LIMIT:
            self._memo.clear()
        self._memo[client] = (now + MEMO_SECONDS, records)
        return records

    def _lookup(self, client: str) -> Records:
        address = client.partition("|")[0]  # a client key may carry a MAC
        try:
            v6_client = ipaddress.ip_address(address).version == 6
        except ValueError:
            return {}
        if v6_client and self.version == 4:
            return {}  # an IPv4-only API has no address for an IPv6 client to use
        local = self.facing(address)
        return records_for([local]) if local else {}


def portal_zone(host: str, addresses: PortalAddresses) -> LocalZone:
    """The local answer for the portal host: its A/AAAA records (fixed, or per client); other types
    NODATA. Names below it are not covered here (pairing names are answered before local zones)."""
    return LocalZone(name_to_wire(host), NOERROR, addresses.fixed, "none", PORTAL_TTL,
                     "the consent portal", per_client=None if addresses.is_fixed else addresses.records)


FAMILY_NAMES: Final = {"v4": A_TYPE, "v6": AAAA_TYPE}


def family_zones(host: str, addresses: PortalAddresses) -> list[LocalZone]:
    """`v4.<host>` and `v6.<host>`: the portal host's records of one family only."""
    zones: list[LocalZone] = []
    for label, rtype in FAMILY_NAMES.items():
        def only(records: Records, rtype: int = rtype) -> Records:
            return {rtype: records[rtype]} if rtype in records else {}

        per_client = None if addresses.is_fixed else (lambda client, only=only: only(addresses.records(client)))
        zones.append(LocalZone(name_to_wire(f"{label}.{host}"), NOERROR, only(addresses.fixed), "none", PORTAL_TTL,
                               f"the consent portal over IPv{label[1]}", per_client=per_client))
    return zones
