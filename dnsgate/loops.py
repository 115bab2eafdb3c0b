"""The event loop every dnsgate process runs on: uvloop where it is installed, asyncio's own elsewhere.

uvloop roughly halves the event loop's share of each query. The primary (`dnsgate serve`) and
each worker process start their loop through `loop_factory`, so both run on the same kind.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it exists
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory
