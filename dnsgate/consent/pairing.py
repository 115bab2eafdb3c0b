"""Pairing an HTTP caller with the other identities of the same device.

A browser's HTTP requests and its device's DNS queries can come from different addresses (IPv6 vs
IPv4, a proxy, a forwarder). A consent change's answer carries a one-time token; the page resolves
`<token>.pair.<portal host>` through the system resolver, and the DNS source that asks is linked to
the HTTP caller (`claim`, once). The page also records the same choice through the API's address of
the other family, naming the token, so that address is linked too (`bind`: the first address other
than the caller's that names it; no other after it). What a link may carry is the consent service's
business (consent/service.py): never a grant.

Tokens carry what they are about, so minting one stores nothing and no number of addresses (an
IPv6 /64 has 2^64) can fill a table and leave another device without its token. A token is a DNS
label (base32, case-insensitive): a serial, when it was issued and its owner (address, and MAC where
known), the owner encrypted so the name does not show them, under an HMAC with a key made at start
(a token does not outlive a restart: it is re-issued with the next change). It lives
`identity.pairing_ttl` seconds; a client address is given at most `PER_MINUTE` a minute.

What is kept is bounded and only for tokens that were used or voided: which were claimed and which
address each is bound to (until it expires), and, for the identities a session end reached, that the
tokens issued to them until then are void (`void`), for as long as those tokens live. Past `MAX_USED`
used tokens (or `MAX_VOIDED` voided identities), the oldest entry is dropped and every token issued
up to it is void: a token can be refused then, never used twice or by a second address. A page uses
its token within a second or two of getting it; reaching the bound takes a hundred thousand changes
through the API in less.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import secrets
import struct
from dataclasses import dataclass
from typing import Final

PAIR_LABEL: Final = "pair"  # <token>.pair.<portal host>: the name a page resolves to link its device
PER_MINUTE: Final = 10  # tokens one client address may be given a minute (a burst of as many)
MAX_BUCKETS: Final = 20_000  # clients whose minting rate is tracked; beyond, those with a full bucket go
MAX_USED: Final = 100_000  # tokens claimed or bound, remembered while they live
MAX_VOIDED: Final = 100_000  # identities whose earlier tokens a session end voided, remembered while those live
HEAD: Final = struct.Struct(">5sI")  # serial (40 bits), issued (whole seconds)
TAG_BYTES: Final = 8
OWNER_BYTES: Final = {4: (4, False), 10: (4, True), 16: (16, False), 22: (16, True)}  # -> (address, with MAC)
LONGEST: Final = 63  # a DNS label


@dataclass(frozen=True, slots=True)
class Offer:
    token: str
    name: str  # the DNS name to resolve
    address: str  # the HTTP caller
    mac: str | None
    issued_at: float
    expires_at: float
    serial: int = 0


@dataclass(slots=True)
class _Use:
    expires_at: float
    claimed: bool = False  # its DNS lookup linked a source
    bound: str | None = None  # the address other than the owner's that chose naming it


class Pairings:
    """Stateless tokens (see the module docstring); state only for tokens used or voided, bounded."""

    def __init__(self, portal_host: str, ttl: float, key: bytes | None = None,
                 max_used: int = MAX_USED, max_voided: int = MAX_VOIDED) -> None:
        self.portal_host = portal_host
        self.ttl = ttl
        secret = key or secrets.token_bytes(32)
        self._mac_key = hashlib.sha256(b"pairing tag\0" + secret).digest()
        self._enc_key = hashlib.sha256(b"pairing owner\0" + secret).digest()
        self._serial = 0
        self._used: dict[int, _Use] = {}  # serial -> its use, in the order first used
        self._voided: dict[str, tuple[int, float]] = {}  # address or MAC -> (tokens below this serial void, since)
        self._void_below = 1  # every token with a lower serial is void (state dropped at a bound)
        self._max_used, self._max_voided = max_used, max_voided
        self._buckets: dict[str, tuple[float, float]] = {}  # address -> (mints left, at)

    # -- minting -----------------------------------------------------------------------------------
    def offer(self, address: str, mac: str | None, now: float) -> Offer | None:
        """A new token for `address`, or None if it had its share this minute."""
        if not self._take(address, now):
            return None
        self._serial += 1
        head = HEAD.pack(self._serial.to_bytes(5, "big"), max(0, int(now)))
        owner = ipaddress.ip_address(address).packed + (bytes.fromhex(mac.replace(":", "")) if mac else b"")
        body = bytes(a ^ b for a, b in zip(owner, self._stream(head), strict=False))
        tag = hmac.new(self._mac_key, head + body, hashlib.sha256).digest()[:TAG_BYTES]
        token = base64.b32encode(head + body + tag).decode("ascii").rstrip("=").lower()
        offer = self._open(token)
        assert offer is not None, "a token this instance made opens"
        return offer

    def _stream(self, head: bytes) -> bytes:
        return hmac.new(self._enc_key, head, hashlib.sha256).digest()

    def _open(self, token: str) -> Offer | None:
        """The offer a token was made as, if this instance made it (whether or not it still counts)."""
        text = token.strip().upper()
        if not 0 < len(text) <= LONGEST or not text.isalnum():
            return None
        try:
            raw = base64.b32decode(text + "=" * (-len(text) % 8))
        except ValueError:
            return None
        head, body, tag = raw[:HEAD.size], raw[HEAD.size:-TAG_BYTES], raw[-TAG_BYTES:]
        if len(body) not in OWNER_BYTES or len(tag) != TAG_BYTES:
            return None
        if not hmac.compare_digest(tag, hmac.new(self._mac_key, head + body, hashlib.sha256).digest()[:TAG_BYTES]):
            return None
        serial_bytes, issued = HEAD.unpack(head)
        owner = bytes(a ^ b for a, b in zip(body, self._stream(head), strict=False))
        size, with_mac = OWNER_BYTES[len(body)]
        address = str(ipaddress.ip_address(owner[:size]))
        mac = ":".join(f"{b:02x}" for b in owner[size:]) if with_mac else None
        canonical = base64.b32encode(raw).decode("ascii").rstrip("=").lower()
        return Offer(canonical, f"{canonical}.{PAIR_LABEL}.{self.portal_host}", address, mac, float(issued),
                     issued + self.ttl, int.from_bytes(serial_bytes, "big"))

    # -- using -------------------------------------------------------------------------------------
    def lookup(self, token: str, now: float) -> Offer | None:
        """The offer behind `token` while it counts: made here, alive, not voided."""
        offer = self._open(token)
        if offer is None or offer.expires_at <= now or offer.serial < self._void_below:
            return None
        for identity in (offer.address, offer.mac):
            voided = self._voided.get(identity) if identity else None
            if voided is not None and offer.serial < voided[0]:
                return None
        return offer

    def claim(self, token: str, now: float) -> Offer | None:
        """The offer behind a looked-up pairing name, once; None if unknown, used, expired or void."""
        offer = self.lookup(token, now)
        if offer is None:
            return None
        use = self._use(offer, now)
        if use is None or use.claimed:
            return None
        use.claimed = True
        return offer

    def bind(self, offer: Offer, address: str, now: float) -> bool:
        """Whether `address` may choose naming `offer`'s token: the first address other than the
        owner's to do so may, and only it (a name seen on the network does not link a third one)."""
        use = self._use(offer, now)
        if use is None or use.bound not in (None, address):
            return False
        use.bound = address
        return True

    def _use(self, offer: Offer, now: float) -> _Use | None:
        use = self._used.get(offer.serial)
        if use is not None:
            return use
        if offer.serial < self._void_below:
            return None
        used = self._used
        while used and len(used) >= self._max_used:
            serial, oldest = next(iter(used.items()))
            del used[serial]
            if oldest.expires_at > now:  # (still alive: forgotten, so void, with all issued before it)
                self._void_below = max(self._void_below, serial + 1)
        if offer.serial < self._void_below:
            return None
        use = used[offer.serial] = _Use(offer.expires_at)
        return use

    def void(self, identities: tuple[str | None, ...], now: float) -> None:
        """Every token issued so far to these addresses or MACs counts no more (a session ended)."""
        voided = self._voided
        for identity in identities:
            if not identity:
                continue
            voided.pop(identity, None)  # (kept in the order voided)
            while len(voided) >= self._max_voided:
                oldest = next(iter(voided))
                self._void_below = max(self._void_below, voided.pop(oldest)[0])
            voided[identity] = (self._serial + 1, now)

    def expire(self, now: float) -> None:
        """Forget what no longer matters: uses of expired tokens, voids older than any live token."""
        self._used = {s: u for s, u in self._used.items() if u.expires_at > now}
        self._voided = {k: v for k, v in self._voided.items() if v[1] + self.ttl >= now}

    # -- rate ----------------------------------------------------------------------------------------
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
        """Tokens remembered as used (minted ones are not kept anywhere)."""
        return len(self._used)
