"""Keeping the cycle collector's full passes short, so they do not stall DNS.

CPython's full collection walks every tracked object, and runs each time the old generation has
grown by a quarter. Three kinds of objects made those passes long (measured under the miss benchmark:
10 passes in 30 s, p50 137 ms, max 154 ms, the benchmark's "max latency"):
- cache entries, ~100 000 of them: they can never be part of a reference cycle (they hold bytes,
  numbers and a catalog rule, and nothing points back at them), so the cache untracks each one
  (`untrack`) and reference counting frees it when it is evicted;
- query log entries, ~10 000 a second under a flood: they hold the vendor as `Vendor.logged`, an
  untracked tuple of strings, so CPython untracks them itself at their first young collection;
- what start-up built (modules, the catalog, lists of up to millions of names): `dnsgate serve`
  freezes it once it is ready (`frozen_startup`), and a reload, which replaces the catalog and
  lists, collects and refreezes (`refreeze`).
Garbage cycles among objects that live and die while serving are collected as before.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

if sys.implementation.name == "cpython":
    _untrack = ctypes.pythonapi.PyObject_GC_UnTrack  # the documented C API: no Python-level equivalent
    _untrack.argtypes = (ctypes.py_object,)
    _untrack.restype = None

    def untrack(obj: object) -> None:
        """Take `obj` out of the cycle collector's sight. Only for an object that can never be part
        of a reference cycle: one in a cycle would never be freed."""
        if gc.is_tracked(obj):
            _untrack(obj)
else:  # pragma: no cover - other interpreters collect differently
    def untrack(obj: object) -> None:
        """CPython only: elsewhere a no-op."""


@contextmanager
def frozen_startup() -> Iterator[None]:
    """Everything alive now goes to the permanent generation, which automatic collections skip."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def refreeze() -> float:
    """After a reload: collect what it replaced, then freeze what is alive. A no-op (0.0) unless
    `frozen_startup` is in effect; returns the seconds it took."""
    if not gc.get_freeze_count():
        return 0.0
    started = time.perf_counter()
    gc.unfreeze()
    try:
        found = gc.collect()
    finally:
        gc.freeze()
    took = time.perf_counter() - started
    log.debug("gc after reload: %d unreachable objects, %.1f ms", found, took * 1000)
    return took
