"""Where the pipeline meets upstream I/O, and where failures become RCODEs.

`Resolver.start(fwd, deliver)` resolves a `Forward` from the pipeline and calls `deliver` once with
the reply. Identical queries in flight share one upstream exchange. The first attempt of a miss
goes out over UDP driven by callbacks alone (`Upstreams.begin`), because a task, a coroutine chain
and futures per query cost more CPU than the rest of a miss together (tests/bench/run.py, miss);
whatever that attempt cannot settle (a timeout, TC, an error RCODE, a TCP or TLS upstream) continues
in a task with `Upstreams.exchange`. The reply becomes a cache entry; the pipeline gates and renders
it for each waiting client. Upstream failure or an unusable reply -> a stale answer if serve-stale
has one (RFC 8767), else SERVFAIL; anything unexpected -> SERVFAIL and a logged traceback.
Prefetches the pipeline asks for go the same way, with nobody to deliver to.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from . import message
from .cache import Entry, OptNotLast, UnusableReply
from .pipeline import Forward, Pipeline
from .upstream import After, UpstreamError, Upstreams

log = logging.getLogger(__name__)

Spawn = Callable[[Coroutine[Any, Any, None]], None]
Deliver = Callable[[bytes], None]
Waiters = list[tuple[Forward, Deliver | None]]


class Resolver:
    def __init__(self, pipeline: Pipeline, upstreams: Upstreams, spawn: Spawn) -> None:
        self.pipeline = pipeline
        self.upstreams = upstreams
        self._waiting: dict[bytes, Waiters] = {}
        self.coalesced = 0
        self._spawn = spawn  # runs the exchanges that outlive the first attempt, as owned tasks
        pipeline.on_refresh = self._refresh

    def start(self, fwd: Forward, deliver: Deliver | None) -> None:
        """Resolve `fwd`; `deliver(reply)` is called once, later (never from within this call)."""
        key = fwd.query.key
        waiters = self._waiting.get(key)
        if waiters is not None:
            self.coalesced += 1
            waiters.append((fwd, deliver))
            return
        self._waiting[key] = [(fwd, deliver)]
        deadline = self.upstreams.begin(fwd.query, self._attempted, fwd)
        if deadline is None:
            self._spawn(self._exchange(fwd, None, None))

    async def forward(self, fwd: Forward) -> bytes:
        """`start`, awaited."""
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        def deliver(reply: bytes) -> None:
            if not future.done():
                future.set_result(reply)

        self.start(fwd, deliver)
        return await future

    def _refresh(self, fwd: Forward) -> None:
        if fwd.query.key not in self._waiting:
            self.start(fwd, None)

    def _attempted(self, fwd: Forward, reply: bytes | None, after: After | None) -> None:
        """The first (callback-driven) attempt is over."""
        if reply is None:
            self._spawn(self._exchange(fwd, fwd.started + self.upstreams.timeout, after))
            return
        try:
            entry = self._admit(fwd, reply)
        except UnusableReply as exc:
            self._finish(fwd, None, exc)
        except Exception as exc:
            log.exception("SERVFAIL for %s: unexpected error", fwd.query.text)
            self._finish(fwd, None, exc)
        else:
            self._finish(fwd, entry, None)

    async def _exchange(self, fwd: Forward, deadline: float | None, after: After | None) -> None:
        try:
            # the pipeline's clock and the loop's are both monotonic; the loop's is what exchange uses
            if deadline is not None:
                deadline += asyncio.get_running_loop().time() - self.pipeline.mono()
            entry = self._admit(fwd, await self.upstreams.exchange(fwd.query, deadline, after))
        except (UpstreamError, UnusableReply) as exc:
            self._finish(fwd, None, exc)
        except Exception as exc:
            log.exception("SERVFAIL for %s: unexpected error", fwd.query.text)
            self._finish(fwd, None, exc)
        else:
            self._finish(fwd, entry, None)

    def _finish(self, first: Forward, entry: Entry | None, problem: Exception | None) -> None:
        """Answer every client waiting for this key: each is gated on its own consent."""
        pipeline = self.pipeline
        for fwd, deliver in self._waiting.pop(first.query.key, ()):
            if deliver is None:
                continue  # a prefetch: the cache entry was the point
            try:
                if entry is not None:
                    reply = pipeline.complete(fwd, entry)
                else:
                    stale = pipeline.stale(fwd)
                    log.debug("%s for %s: %s", "stale answer" if stale else "SERVFAIL", fwd.query.text, problem)
                    reply = stale if stale is not None else pipeline.servfail(fwd)
                deliver(reply)
            except Exception:
                log.exception("cannot answer %s", fwd.query.text)

    def _admit(self, fwd: Forward, reply: bytes) -> Entry:
        # The upstream transports accept only replies whose question is ours, byte for byte
        # (upstream._is_reply_to), so the records start right after it.
        try:
            return self.pipeline.admit(fwd, reply)
        except OptNotLast:
            return self.pipeline.admit(fwd, message.opt_last(reply))

