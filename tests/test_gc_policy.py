"""Keeping full GC passes short: untracked cache entries, a frozen start-up, a refreeze on reload."""

from __future__ import annotations

import gc
import sys
import weakref

from dnsgate.dns.cache import AnswerCache, Entry
from dnsgate.gc_policy import frozen_startup, refreeze, untrack


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def entry(n: int) -> Entry:
    return Entry(0, (1, 0, 0), b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + n.to_bytes(4, "big"), (4,),
                 0.0, 60.0, None)


def test_cached_entries_and_the_cache_dict_are_not_tracked() -> None:
    cache = AnswerCache(1000, 10**7)
    for i in range(100):
        cache.put(b"key%d" % i, entry(i))
    assert not gc.is_tracked(cache.entries)
    gc.collect()
    assert not gc.is_tracked(cache.entries)
    served = cache.get(b"key7", 1.0)  # unpacked: an object of a GC type in the dict from now on
    assert served is not None and cache.entries[b"key7"] is served
    assert not gc.is_tracked(served) and not gc.is_tracked(cache.entries)
    assert cache.get(b"key7", 1.0) is served
    held = sys.getrefcount(served)
    cache.clear()
    assert sys.getrefcount(served) == held - 1  # the cache let go: reference counting frees entries


def test_untrack_leaves_untracked_objects_alone() -> None:
    untrack(b"bytes are never tracked")
    node = Node()
    untrack(node)
    untrack(node)
    assert not gc.is_tracked(node)


def test_a_full_pass_does_not_see_cached_entries() -> None:
    cache = AnswerCache(200_000, 10**9)
    for i in range(200_000):
        cache.put(i.to_bytes(4, "big"), entry(i))
    gc.collect()
    walked = {id(o) for o in gc.get_objects()}
    assert id(cache.entries) not in walked
    assert not any(id(e) in walked for e in cache.entries.values())
    assert id(cache) in walked  # (the cache object itself still is)


def test_frozen_startup_keeps_objects_out_of_collections_until_refreeze() -> None:
    assert refreeze() == 0.0  # nothing frozen: a no-op
    with frozen_startup():
        assert gc.get_freeze_count() > 0
        a, b = Node(), Node()
        a.other, b.other = b, a
        ref = weakref.ref(a)
        gc.freeze()  # as if alive at start-up (a catalog a reload later replaces)
        del a, b
        gc.collect()
        assert ref() is not None  # frozen: not collected
        assert refreeze() > 0
        assert ref() is None
        assert gc.get_freeze_count() > 0  # what is alive is frozen again
    assert gc.get_freeze_count() == 0
