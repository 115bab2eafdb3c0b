"""Consent state in memory: which client has granted which category, until when.

The resolver asks `ConsentTable.allows` on every gated query, so it is a dict lookup and two
comparisons. The table changes only through `ConsentService` (consents.py), which persists a
change before applying it here. Pure: no I/O; time is passed in.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

from .catalog import Vendor

Source = Literal["self", "admin"]


@dataclass(frozen=True, slots=True)
class Grant:
    """Consent for one category, as recorded (times are UNIX seconds, UTC)."""

    category: str
    granted_at: float
    expires_at: float
    source: Source

    def active(self, now: float) -> bool:
        return self.expires_at > now


class ConsentTable:
    """client address -> {category: Grant}. Each client's mapping is replaced whole, never edited."""

    __slots__ = ("_clients",)

    def __init__(self) -> None:
        self._clients: dict[str, Mapping[str, Grant]] = {}

    def allows(self, client: str, vendor: Vendor, now: float) -> bool:
        """Whether `client` may resolve `vendor`'s names now (opt-in: no grant, no resolution)."""
        grants = self._clients.get(client)
        if grants is None:
            return False
        grant = grants.get(vendor.category)
        return grant is not None and grant.expires_at > now

    def grants(self, client: str) -> Mapping[str, Grant]:
        return self._clients.get(client, {})

    def replace(self, client: str, grants: Mapping[str, Grant]) -> None:
        if grants:
            self._clients[client] = dict(grants)
        else:
            self._clients.pop(client, None)

    def clients(self) -> Iterator[tuple[str, Mapping[str, Grant]]]:
        return iter(list(self._clients.items()))

    def __len__(self) -> int:
        return len(self._clients)


def normalize_client(address: str) -> str:
    """The canonical text of a client address: IPv4-mapped IPv6 as IPv4, zone ids dropped.

    Raises ValueError for anything that is not an IP address.
    """
    ip = ipaddress.ip_address(address.split("%", 1)[0] if ":" in address else address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)
