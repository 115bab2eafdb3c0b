"""Pairing tokens: minted only where a page needs one, limited per client, and one client cannot push
out another's."""

from __future__ import annotations

from dnsgate.pairing import Pairings
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
    assert 1 <= len(given) < 100  # a burst gets a few, then nothing
    assert p.outstanding("10.0.0.5") <= 4
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

