"""The answer cache's bound and eviction (CLOCK, second chance): always within its bounds, names
served since eviction last passed them stay, a flood of names asked once goes first, and the entry
just put is never the one evicted for it."""

from __future__ import annotations

import dns.message

from dnsgate.dns.cache import AnswerCache, Entry
from dnsgate.dns.pipeline import Forward
from tests.dns.test_pipeline import Clock, build, forward, query


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
    assert by_bytes.bytes == sum(e.size + len(k) for k, e in by_bytes.entries.items())


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
