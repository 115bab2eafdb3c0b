"""The answer cache's bound and eviction (CLOCK, second chance): always within its bounds, names
served since eviction last passed them stay, a flood of names asked once goes first, and the entry
just put is never the one evicted for it; an entry is packed (one bytes value) until served, and
packed again when eviction passes it."""

from __future__ import annotations

import gc

import dns.message
import pytest

from dnsgate.dns import cache as cache_module
from dnsgate.dns.cache import AnswerCache, Entry, entry_size
from dnsgate.dns.pipeline import Forward
from tests.dns.test_pipeline import Clock, answer, build, forward, query


def entry(n: int, body_len: int = 16) -> Entry:
    body = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + n.to_bytes(4, "big")
    return Entry(0, (1, 0, 0), body + b"\x00" * (body_len - 16), (6,), 0.0, 600.0, None)


def key(n: int) -> bytes:
    return b"\x01n" + n.to_bytes(4, "big") + b"\x00\x00\x01\x00\x01\x00"


def test_within_both_bounds_after_every_put() -> None:
    cache = AnswerCache(500, 10**9)
    for i in range(5000):
        cache.put(key(i), entry(i))
        assert len(cache) <= 500
        if i % 3 == 0 and i >= 7:
            cache.get(key(i - 7), 1.0)  # some of them seen
    assert len(cache) >= 500 - 500 // 128  # a batch at most below the bound
    assert cache.evictions == 5000 - len(cache)
    by_bytes = AnswerCache(10**6, 40 * (entry(0, 400).size + len(key(0))))
    for i in range(1000):
        by_bytes.put(key(i), entry(i, 400 if i % 2 else 16))
        assert by_bytes.bytes <= by_bytes.max_bytes
    assert by_bytes.bytes == sum(entry_size(e) + len(k) for k, e in by_bytes.entries.items())


def test_names_in_use_outlive_a_flood_of_names_asked_once() -> None:
    cache = AnswerCache(1000, 10**9)
    for i in range(1000):
        cache.put(key(i), entry(i))
    hot = range(0, 1000, 50)  # the oldest entries among them: first in line under FIFO or LRU without hits
    for i in range(1000, 11_000):
        if i % 200 == 0:
            for h in hot:
                assert cache.get(key(h), 1.0) is not None, f"{h} evicted after {i - 1000} new names"
        cache.put(key(i), entry(i))
    assert all(cache.get(key(h), 1.0) is not None for h in hot)
    assert sum(cache.get(key(i), 1.0) is not None for i in range(1000)) == len(hot)  # the rest of them went


def test_a_name_no_longer_asked_is_evicted_at_the_next_pass() -> None:
    cache = AnswerCache(100, 10**9)
    for i in range(100):
        cache.put(key(i), entry(i))
    cache.get(key(0), 1.0)  # seen once, then never again
    for i in range(100, 300):
        cache.put(key(i), entry(i))
    assert cache.get(key(0), 1.0) is None


def test_the_entry_just_put_stays_when_every_other_one_was_seen() -> None:
    cache = AnswerCache(3, 10**9)
    for i in range(3):
        cache.put(key(i), entry(i))
        cache.get(key(i), 1.0)
    cache.put(key(3), entry(3))
    assert cache.get(key(3), 1.0) is not None
    assert len(cache) == 3 and cache.evictions == 1
    assert cache.get(key(0), 1.0) is None  # the oldest, once its mark was cleared


def test_a_cache_hit_through_the_pipeline_counts_as_use() -> None:
    clock = Clock()
    p = build(clock, max_entries=50)
    hot = query("hot.example.test")
    forward(p, hot, "hot.example.test. 300 IN A 192.0.2.1")
    for i in range(500):
        assert isinstance(p.answer(hot.to_wire(), "127.0.0.1", False), bytes)  # the fast path's hit
        forward(p, query(f"n{i}.example.test"), f"n{i}.example.test. 300 IN A 192.0.2.2")
    reply = p.answer(hot.to_wire(), "127.0.0.1", False)
    assert isinstance(reply, bytes) and not isinstance(reply, Forward)
    assert dns.message.from_wire(reply).answer[0][0].address == "192.0.2.1"
    assert len(p.cache) <= 50 and p.cache.evictions >= 450


def test_an_entry_stays_packed_until_served_and_is_packed_again_when_eviction_passes() -> None:
    clock = Clock()
    p = build(clock, max_entries=100)
    hot = query("hot.example.test")
    forward(p, hot, "hot.example.test. 300 IN A 192.0.2.1")
    (key,) = p.cache.entries
    assert isinstance(p.cache.entries[key], bytes)  # never served: one bytes value
    clock.now += 10.5
    first = p.answer(hot.to_wire(), "127.0.0.1", False)
    assert isinstance(first, bytes) and dns.message.from_wire(first).answer[0].ttl == 290
    assert isinstance(p.cache.entries[key], Entry)  # served: unpacked, and kept so for the next hits
    for i in range(100):  # an eviction pass: the served entry gets its second chance, packed
        forward(p, query(f"n{i}.example.test"), f"n{i}.example.test. 300 IN A 192.0.2.2")
    assert isinstance(p.cache.entries[key], bytes) and list(p.cache.entries)[-1] == key
    assert p.cache.bytes == sum(entry_size(e) + len(k) for k, e in p.cache.entries.items())
    clock.now += 5
    again = p.answer(hot.to_wire(), "127.0.0.1", False)  # its TTL still counts from when it was filled
    assert isinstance(again, bytes)
    (rrset,) = dns.message.from_wire(again).answer
    assert rrset.ttl == 285 and rrset[0].address == "192.0.2.1"
    clock.now += 286
    assert isinstance(p.answer(hot.to_wire(), "127.0.0.1", False), Forward)  # expired, packed or not


def test_past_the_kinds_it_indexes_the_cache_keeps_entries_unpacked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_module, "KINDS_LIMIT", 1)
    p = build(Clock(), max_entries=3)
    forward(p, query("a.example.test"), "a.example.test. 300 IN A 192.0.2.1")
    forward(p, query("a.example.test", "AAAA"), "a.example.test. 300 IN AAAA 2001:db8::1")  # another form
    forms = [type(e) for e in p.cache.entries.values()]
    assert forms == [bytes, Entry] and len(p.cache.kinds) == 1
    assert not gc.is_tracked(p.cache.entries)
    assert answer(p, query("a.example.test", "AAAA")).answer[0][0].address == "2001:db8::1"
    assert answer(p, query("a.example.test")).answer[0][0].address == "192.0.2.1"
    for i in range(5):
        forward(p, query(f"n{i}.example.test", "AAAA"), f"n{i}.example.test. 300 IN AAAA 2001:db8::2")
    assert len(p.cache) == 3 and p.cache.evictions == 4
    assert p.cache.bytes == sum(entry_size(e) + len(k) for k, e in p.cache.entries.items())
    p.install(p.catalog, p.sinkhole, p.plain_ttl, p.gated_ttl)  # a reload empties the cache and its kinds
    assert not p.cache.kinds and not p.cache.entries and p.cache.bytes == 0


def test_answers_of_one_form_share_a_kind_whatever_their_records_lengths() -> None:
    clock = Clock()
    p = build(clock)
    for i in range(1, 40):  # where the A record's TTL is moves with the CNAME target's length
        target = "x" * i + ".example.test."
        forward(p, query(f"c{i}.example.test"), f"c{i}.example.test. 300 IN CNAME {target}",
                f"{target} 60 IN A 192.0.2.3")
    assert len(p.cache) == 39 and len(p.cache.kinds) == 1
    clock.now += 7
    for i in range(1, 40):
        cname, a = answer(p, query(f"c{i}.example.test")).answer
        assert (cname.ttl, a.ttl, a[0].address) == (293, 53, "192.0.2.3")


def test_an_unpacked_entry_is_the_entry_that_was_packed_slot_for_slot() -> None:
    """`unpack` builds an Entry without its constructor (the numbers as packed, not recomputed): every
    slot must come back as it went in, a slot added to Entry later included."""
    cache = AnswerCache(100, 1 << 20)
    for lifetime, refresh_at in ((600.0, float("inf")), (37.25, 20.5)):
        original = Entry(0x8180, (1, 0, 0), entry(7).body0, (6,), 1000.0, 1000.0 + lifetime, None)
        original.refresh_at = refresh_at
        packed = cache.pack(original)
        assert isinstance(packed, bytes)
        back = cache_module.unpack(packed, cache.kinds)
        for slot in Entry.__slots__:
            assert getattr(back, slot) == getattr(original, slot), slot
