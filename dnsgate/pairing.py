"""Pairing an HTTP caller with the other identities of the same device.

A browser's HTTP requests and its device's DNS queries can come from different addresses (IPv6 vs
IPv4, a proxy, a forwarder). A consent change's answer carries a one-time token; the page resolves
`<token>.pair.<portal host>` through the system resolver, and the DNS source that asks is linked to
the HTTP caller (`claim`, once). The page also records the same choice through the API's address of
the other family, naming the token, so that address is linked too (`lookup`, while the token lives).
What a link may carry is the consent service's business (consents.py): never a grant.

Tokens live `identity.pairing_ttl` seconds. They are minted only with a consent change's answer,
at most `PER_MINUTE` a minute and `PER_CLIENT` at a time per client address (a client's new token
replaces its own oldest), and never push out another client's: when the table is full, a new one is
refused. In memory only: a token that outlives a restart is simply re-issued with the next change.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Final

from .identity import PAIR_LABEL

MAX_OFFERS: Final = 10_000
PER_CLIENT: Final = 4  # tokens one client address holds at once
PER_MINUTE: Final = 10  # tokens one client address may be given a minute (a burst of as many)
MAX_BUCKETS: Final = 20_000  # clients whose minting rate is tracked; beyond, those with a full bucket go


@dataclass(frozen=True, slots=True)
class Offer:
    token: str
    name: str  # the DNS name to resolve
    address: str  # the HTTP caller
    mac: str | None
    issued_at: float
    expires_at: float


class Pairings:
    """Outstanding tokens: bounded in all and per client, and rate limited per client."""

    def __init__(self, portal_host: str, ttl: float) -> None:
        self.portal_host = portal_host
        self.ttl = ttl
        self._offers: dict[str, Offer] = {}
        self._by_client: dict[str, list[str]] = {}  # address -> its tokens, oldest first
        self._claimed: set[str] = set()  # tokens whose DNS lookup was used
        self._buckets: dict[str, tuple[float, float]] = {}  # address -> (mints left, at)

    def offer(self, address: str, mac: str | None, now: float) -> Offer | None:
        """A new token for `address`, or None if it had its share this minute or the table is full."""
        if not self._take(address, now):
            return None
        mine = self._by_client.get(address, [])
        while len(mine) >= PER_CLIENT:
            self._drop(mine[0])
        if len(self._offers) >= MAX_OFFERS:
            self._expire_oldest(now)
            if len(self._offers) >= MAX_OFFERS:
                return None
        # Hex: DNS names are case-insensitive and resolvers may randomize case (0x20).
        token = secrets.token_hex(10)
        offer = Offer(token, f"{token}.{PAIR_LABEL}.{self.portal_host}", address, mac, now, now + self.ttl)
        self._offers[token] = offer
        self._by_client.setdefault(address, []).append(token)
        return offer

    def claim(self, token: str, now: float) -> Offer | None:
        """The offer behind a looked-up pairing name, once; None if unknown, used or expired."""
        token = token.lower()
        offer = self.lookup(token, now)
        if offer is None or token in self._claimed:
            return None
        self._claimed.add(token)
        return offer

    def lookup(self, token: str, now: float) -> Offer | None:
        """The offer behind `token` while it lives (the page's submission through another address)."""
        offer = self._offers.get(token.lower())
        if offer is None or offer.expires_at <= now:
            return None
        return offer

    def outstanding(self, address: str) -> int:
        return len(self._by_client.get(address, ()))

    def expire(self, now: float) -> None:
        for token in [t for t, o in self._offers.items() if o.expires_at <= now]:
            self._drop(token)

    def _expire_oldest(self, now: float) -> None:
        """Drop expired offers from the oldest on (all live equally long: the oldest expire first)."""
        offers = self._offers
        while offers:
            token, offer = next(iter(offers.items()))
            if offer.expires_at > now:
                return
            self._drop(token)

    def _drop(self, token: str) -> None:
        offer = self._offers.pop(token)
        self._claimed.discard(token)
        mine = self._by_client[offer.address]
        mine.remove(token)
        if not mine:
            del self._by_client[offer.address]

    def _take(self, address: str, now: float) -> bool:
        """A token bucket per address: PER_MINUTE mints, refilled continuously."""
        rate = PER_MINUTE / 60.0
        left, at = self._buckets.get(address, (float(PER_MINUTE), now))
        left = min(float(PER_MINUTE), left + (now - at) * rate)
        if left < 1:
            return False
        buckets = self._buckets
        if len(buckets) >= MAX_BUCKETS and address not in buckets:
            self._buckets = buckets = {a: (n, t) for a, (n, t) in buckets.items()
                                       if n + (now - t) * rate < PER_MINUTE}
            if len(buckets) >= MAX_BUCKETS // 2:  # a flood of addresses: forget the rates of the older ones
                self._buckets = buckets = dict(list(buckets.items())[-MAX_BUCKETS // 4:])
        buckets[address] = (left - 1, now)
        return True

    def __len__(self) -> int:
        return len(self._offers)
