"""Pairing an HTTP caller with the DNS source of the same device.

A browser's HTTP request and its device's DNS queries can come from different addresses (IPv6 vs
IPv4, a proxy, a forwarder). Every consent response carries a one-time token; the page resolves
`<token>.pair.<portal host>` through the system resolver, and the DNS source that asks is bound
to the HTTP caller's choice. Tokens live `identity.pairing_ttl` seconds and are used once.
In memory only: a token that outlives a restart is simply re-issued with the next response.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Final

from .identity import PAIR_LABEL

MAX_OFFERS: Final = 10_000


@dataclass(frozen=True, slots=True)
class Offer:
    token: str
    name: str  # the DNS name to resolve
    address: str  # the HTTP caller
    mac: str | None
    issued_at: float
    expires_at: float


class Pairings:
    """Outstanding one-time tokens (bounded; the oldest go first)."""

    def __init__(self, portal_host: str, ttl: float) -> None:
        self.portal_host = portal_host
        self.ttl = ttl
        self._offers: dict[str, Offer] = {}

    def offer(self, address: str, mac: str | None, now: float) -> Offer:
        # Hex: DNS names are case-insensitive and resolvers may randomize case (0x20).
        token = secrets.token_hex(10)
        offer = Offer(token, f"{token}.{PAIR_LABEL}.{self.portal_host}", address, mac, now, now + self.ttl)
        offers = self._offers
        while len(offers) >= MAX_OFFERS:
            del offers[next(iter(offers))]
        offers[token] = offer
        return offer

    def claim(self, token: str, now: float) -> Offer | None:
        """The offer behind `token`, once; None if unknown, used or expired."""
        offer = self._offers.pop(token.lower(), None)
        if offer is None or offer.expires_at <= now:
            return None
        return offer

    def expire(self, now: float) -> None:
        for token in [t for t, o in self._offers.items() if o.expires_at <= now]:
            del self._offers[token]

    def __len__(self) -> int:
        return len(self._offers)
