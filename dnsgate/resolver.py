"""Where the pipeline meets upstream I/O, and where exceptions become RCODEs.

`Resolver.forward` resolves a `Forward` from the pipeline: identical queries in flight share one
upstream exchange; the reply becomes a cache entry; the pipeline gates and renders it. Upstream
failure or an unusable reply -> a stale answer if serve-stale has one (RFC 8767), else SERVFAIL;
anything unexpected -> SERVFAIL and a logged traceback. Prefetches the pipeline asks for run as
background tasks through the same coalescing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from . import message
from .cache import Entry, OptNotLast, UnusableReply, question_length
from .pipeline import Forward, Pipeline
from .upstream import UpstreamError, Upstreams

log = logging.getLogger(__name__)


Spawn = Callable[[Coroutine[Any, Any, None]], None]


class Resolver:
    def __init__(self, pipeline: Pipeline, upstreams: Upstreams, spawn: Spawn | None = None) -> None:
        self.pipeline = pipeline
        self.upstreams = upstreams
        self._inflight: dict[bytes, asyncio.Future[Entry]] = {}
        self.coalesced = 0
        self._spawn = spawn
        if spawn is not None:
            pipeline.on_refresh = self._refresh

    async def forward(self, fwd: Forward) -> bytes:
        try:
            entry = await self._entry(fwd)
        except (UpstreamError, UnusableReply) as exc:
            stale = self.pipeline.stale(fwd)
            log.debug("%s for %s: %s", "stale answer" if stale else "SERVFAIL", fwd.query.text, exc)
            return stale if stale is not None else self.pipeline.servfail(fwd)
        except Exception:
            log.exception("SERVFAIL for %s: unexpected error", fwd.query.text)
            return self.pipeline.servfail(fwd)
        return self.pipeline.complete(fwd, entry)

    def _refresh(self, fwd: Forward) -> None:
        if fwd.query.key not in self._inflight and self._spawn is not None:
            self._spawn(self._prefetch(fwd))

    async def _prefetch(self, fwd: Forward) -> None:
        try:
            await self._entry(fwd)
        except Exception as exc:  # the entry just lives out its TTL
            log.debug("prefetch of %s failed: %s", fwd.query.text, exc)

    async def _entry(self, fwd: Forward) -> Entry:
        key = fwd.query.key
        pending = self._inflight.get(key)
        if pending is not None:
            self.coalesced += 1
            return await asyncio.shield(pending)
        future: asyncio.Future[Entry] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_consume_exception)
        self._inflight[key] = future
        try:
            entry = self._admit(fwd, await self.upstreams.exchange(fwd.query))
        except BaseException as exc:
            future.set_exception(exc)
            raise
        else:
            future.set_result(entry)
            return entry
        finally:
            del self._inflight[key]

    def _admit(self, fwd: Forward, reply: bytes) -> Entry:
        if question_length(reply) != len(fwd.query.question):
            raise UnusableReply("question malformed")
        try:
            return self.pipeline.admit(fwd, reply)
        except OptNotLast:
            return self.pipeline.admit(fwd, message.opt_last(reply))


def _consume_exception(future: asyncio.Future[Entry]) -> None:
    # Waiters that were cancelled never read the exception; read it so asyncio does not warn.
    if not future.cancelled():
        future.exception()
