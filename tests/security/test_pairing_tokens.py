"""Pairing tokens: minted only where a page needs one, limited per client, and no client or number of
clients can take a token from another, keep one alive for a second address, or outlive the kiosk
session that was given it."""

from __future__ import annotations

import base64
import ipaddress

from dnsgate.consent.pairing import Pairings
from tests.conftest import Gate

HOST = "consent.dnsgate.internal"


async def test_whoami_mints_no_token(gate: Gate) -> None:
    status, body = await gate.http("GET", "/v1/whoami")
    assert status == 200 and body.get("pairing") is None
    _, body = await gate.http("GET", "/v1/consent")
    assert body.get("pairing") is None


def test_one_client_cannot_evict_anothers_token() -> None:
    p = Pairings(HOST, ttl=300)
    victim = p.offer("10.0.0.6", None, 0.0)
    assert victim is not None
    for i in range(20_000):  # as fast as it likes, from one address: 3.5 s of whoami once did this
        p.offer("10.0.0.5", None, i / 10_000)
    assert p.claim(victim.token, 2.0) == victim


def test_offers_are_capped_and_rate_limited_per_client() -> None:
    p = Pairings(HOST, ttl=300)
    minted = [p.offer("10.0.0.5", None, 0.0) for _ in range(100)]
    given = [o for o in minted if o is not None]
    assert 1 <= len(given) <= 10  # a burst gets a few, then nothing
    assert p.offer("10.0.0.5", None, 0.0) is None
    assert p.offer("10.0.0.6", None, 0.0) is not None  # another client is not affected
    assert p.offer("10.0.0.5", None, 60.0) is not None  # the rate refills


def test_many_clients_fill_the_table_without_pushing_anyone_out() -> None:
    p = Pairings(HOST, ttl=300)
    first = p.offer("10.1.0.1", None, 0.0)
    assert first is not None
    for i in range(30_000):
        p.offer(f"10.2.{i >> 8}.{i & 255}", None, 1.0)
    assert p.claim(first.token, 2.0) == first



def test_no_number_of_addresses_denies_a_new_device_its_token() -> None:
    """2 600 addresses x 4 changes once filled the table of outstanding tokens in 16.5 s; then another
    device's change got no token for the token lifetime, so its other address was never reached. An
    IPv6 /64 has addresses enough for any table."""
    p = Pairings(HOST, ttl=300)
    for i in range(2_600):
        for _ in range(4):
            p.offer(f"10.2.{i >> 8}.{i & 255}", None, 1.0)
    for i in range(50_000):
        p.offer(f"2001:db8::{i:x}", None, 2.0)
    for mac in (None, "02:00:00:00:00:07"):
        for address in ("10.3.0.1", "2001:db8:1::7"):
            offer = p.offer(address, mac, 3.0)
            assert offer is not None and (offer.address, offer.mac) == (address, mac)
            assert p.lookup(offer.token, 4.0) == offer and p.claim(offer.token, 4.0) == offer


def test_a_token_counts_only_where_this_instance_made_it_and_as_made() -> None:
    p, other = Pairings(HOST, ttl=300), Pairings(HOST, ttl=300)
    offer = p.offer("10.0.0.7", "02:00:00:00:00:07", 0.0)
    assert offer is not None and len(offer.token) <= 63
    assert other.lookup(offer.token, 1.0) is None  # another instance (or one restarted) did not make it
    for i in range(len(offer.token)):  # a character changed is another token, which nobody was given
        changed = offer.token[:i] + ("a" if offer.token[i] != "a" else "b") + offer.token[i + 1:]
        assert p.lookup(changed, 1.0) in (None, offer)  # (the last character holds unused bits)
    for bad in ("", "x" * 64, "-*", "0189", offer.token[:-8]):
        assert p.lookup(bad, 1.0) is None
    # the name a sniffer sees on the network shows neither the address nor the MAC it was given to
    raw = base64.b32decode(offer.token.upper() + "=" * (-len(offer.token) % 8))
    assert ipaddress.ip_address("10.0.0.7").packed not in raw and bytes.fromhex("020000000007") not in raw


def test_used_tokens_are_bounded_and_never_reused_past_the_bound() -> None:
    """A flood of used tokens past the bound voids the oldest ones: a token may be refused then, never
    claimed twice or bound to a second address; a token given after the flood works."""
    p = Pairings(HOST, ttl=300, max_used=100)
    early = p.offer("10.0.0.8", None, 0.0)
    assert early is not None and p.claim(early.token, 0.5) == early
    for i in range(1_000):
        o = p.offer(f"10.4.{i >> 8}.{i & 255}", None, 1.0)
        assert o is not None and p.claim(o.token, 1.0) == o
    assert len(p) <= 100
    assert p.claim(early.token, 2.0) is None  # forgotten, so void: not claimed a second time
    fresh = p.offer("10.0.0.9", None, 2.0)
    assert fresh is not None and p.claim(fresh.token, 2.0) == fresh and p.bind(fresh, "10.0.0.10", 2.0)
