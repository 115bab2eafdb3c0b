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

A waiting entry is registered in one place, `start`, and nothing may strand it: every path that
registers one goes through `start`, whose clients are answered on every error (no socket to be
had: SERVFAIL with EDE "Not Ready" at once; a send that fails, an upstream pool closed under it, a
task cancelled, anything raised), and only by the exchange that owns the entry. As a last resort
`reap` answers entries older than the upstream deadline and counts them: a bug there shows in
/metrics and the log instead of leaving a name unanswerable for good.

An answer whose CNAME chain stops short (dns/cname_chains.py) is completed before anyone is answered: the name
it stops at is asked through `start` like any query (so it shares an exchange with identical queries
and is cached under its own key), with the query waiting on it as one more waiter, within the client
query's deadline, at most MAX_CHAIN names deep and never round a loop. A chain already known to lead
into a gated vendor is followed only if someone waiting may see that vendor: dnsgate never asks the
upstream for a vendor's names on behalf of clients without consent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Final

from dnsgate.dns import message
from dnsgate.dns.cache import Entry, OptNotLast, UnusableReply
from dnsgate.dns.pipeline import Chase, Forward, Pipeline
from dnsgate.dns.upstreams import After, LocalShortage, UpstreamError, Upstreams
from dnsgate.rules.catalog import DomainRule
from dnsgate.wire import EDE_NOT_READY, ede_option

log = logging.getLogger(__name__)

REAP_AFTER: Final = 2.0  # seconds past the upstream deadline before a waiting entry counts as stranded
MAX_CHAIN: Final = 8  # names dnsgate asks for to complete one CNAME chain (unbound restarts up to 11 times)

Spawn = Callable[[Coroutine[Any, Any, None]], None]
Deliver = Callable[[bytes], None]


class ChainWaiter:
    """A query whose answer's CNAME chain stops short, waiting among the waiters of the name it
    stops at: settled with that name's entry, or with the reason there is none."""

    __slots__ = ("chase", "fwd")

    def __init__(self, fwd: Forward, chase: Chase) -> None:
        self.fwd = fwd  # the query's own forward: the first of those waiting for its key
        self.chase = chase


Waiters = list[tuple[Forward, Deliver | ChainWaiter | None]]  # the first is the forward whose exchange answers them all


class Resolver:
    def __init__(self, pipeline: Pipeline, upstreams: Upstreams, spawn: Spawn) -> None:
        self.pipeline = pipeline
        self.upstreams = upstreams
        self._waiting: dict[bytes, Waiters] = {}
        self.coalesced = 0
        self.reaped = 0  # waiting entries answered by `reap`: each one a bug
        self.short = 0  # clients answered SERVFAIL because no upstream socket could be opened
        self._spawn = spawn  # runs the exchanges that outlive the first attempt, as owned tasks

    def start(self, fwd: Forward, deliver: Deliver | ChainWaiter | None) -> None:
        """Resolve `fwd`; `deliver(reply)` is called once, later (never from within this call)."""
        key = fwd.query.key
        waiters = self._waiting.get(key)
        if waiters is not None:
            self.coalesced += 1
            waiters.append((fwd, deliver))
            return
        self._waiting[key] = [(fwd, deliver)]
        if fwd.local is not None:  # a local chain into a name outside the local data: complete it from there
            asyncio.get_running_loop().call_soon(self._received, fwd, fwd.local)
            return
        upstreams = self.upstreams
        try:
            if fwd.hop and self.pipeline.mono() + upstreams.attempt_timeout > fwd.started + upstreams.timeout:
                deadline = None  # too little time left for a whole first attempt: the exchange keeps to the deadline
            else:
                deadline = upstreams.begin(fwd.query, self._attempted, fwd)
            if deadline is None:
                self._spawn(self._exchange(fwd, fwd.started + upstreams.timeout, None))
        except Exception as exc:  # no exchange owns the entry: its clients are answered on the next turn
            if not isinstance(exc, LocalShortage):  # a shortage is logged once per episode, by its record
                log.exception("SERVFAIL for %s: cannot start the upstream query", fwd.query.text)
            asyncio.get_running_loop().call_soon(self._finish, fwd, None, exc)

    async def forward(self, fwd: Forward) -> bytes:
        """`start`, awaited."""
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        def deliver(reply: bytes) -> None:
            if not future.done():
                future.set_result(reply)

        self.start(fwd, deliver)
        return await future

    def refresh(self, fwd: Forward) -> None:
        if fwd.query.key not in self._waiting:
            self.start(fwd, None)

    def _attempted(self, fwd: Forward, reply: bytes | None, after: After | None) -> None:
        """The first (callback-driven) attempt is over."""
        if reply is None:
            try:
                self._spawn(self._exchange(fwd, fwd.started + self.upstreams.timeout, after))
            except Exception as exc:
                log.exception("SERVFAIL for %s: cannot go on with the upstream query", fwd.query.text)
                self._finish(fwd, None, exc)
            return
        self._received(fwd, reply)

    async def _exchange(self, fwd: Forward, deadline: float, after: After | None) -> None:
        reply: bytes | None = None
        problem: BaseException | None = None
        try:
            # the pipeline's clock and the loop's are both monotonic; the loop's is what exchange uses
            deadline += asyncio.get_running_loop().time() - self.pipeline.mono()
            reply = await self.upstreams.exchange(fwd.query, deadline, after)
        except UpstreamError as exc:
            problem = exc
        except Exception as exc:
            log.exception("SERVFAIL for %s: unexpected error", fwd.query.text)
            problem = exc
        except BaseException as exc:  # cancelled (shutdown): the clients are answered all the same
            problem = exc
            raise
        finally:
            if reply is None:
                self._finish(fwd, None, problem)
        if reply is not None:
            self._received(fwd, reply)

    def _received(self, fwd: Forward, reply: bytes) -> None:
        """An upstream reply for `fwd`'s key: answer everyone waiting, or complete its chain first.
        The upstream transports accept only replies whose question is ours, byte for byte
        (upstreams.is_reply_to), so the records start right after it."""
        try:
            try:
                result = self.pipeline.admit(fwd, reply)
            except OptNotLast:
                result = self.pipeline.admit(fwd, message.opt_last(reply))
            if isinstance(result, Chase):
                self._chase(fwd, result)
                return
        except UnusableReply as exc:
            self._finish(fwd, None, exc)
        except Exception as exc:
            log.exception("SERVFAIL for %s: unexpected error", fwd.query.text)
            self._finish(fwd, None, exc)
        else:
            self._finish(fwd, result, None)

    def _chase(self, fwd: Forward, chase: Chase) -> None:
        """Complete the chain of `fwd`'s answer: ask for the name it stops at (or take its cached entry)."""
        pipeline = self.pipeline
        key = fwd.query.key
        rule = chase.entry.rule
        if rule is not None and not self._wanted(key, rule):
            self._finish(fwd, chase.entry, None, whole=False)  # the sinkhole for every one of them
            return
        problem = self._chain_problem(fwd, chase.key)
        if problem is not None:
            self._finish(fwd, None, UnusableReply(f"{fwd.query.text}: {problem}"))
            return
        cached = pipeline.cache.get(chase.key, pipeline.mono())
        if cached is not None:
            self._joined(fwd, chase, cached, None, True)
            return
        fwd.awaits = chase.key
        in_flight = self._waiting.get(chase.key)
        if in_flight is not None and in_flight[0][0].started > fwd.started:
            # the lookup this joins keeps its own, later deadline: this query ends by its own
            loop = asyncio.get_running_loop()
            loop.call_at(fwd.started + self.upstreams.timeout + loop.time() - pipeline.mono(), self._overdue, fwd)
        self.start(pipeline.target_forward(fwd, chase, fwd.hop + 1), ChainWaiter(fwd, chase))

    def _overdue(self, fwd: Forward) -> None:
        self._finish(fwd, None, UpstreamError(f"{fwd.query.text}: the rest of its CNAME chain came too late"))

    def _chain_problem(self, fwd: Forward, target: bytes) -> str | None:
        """Why `fwd` may not wait for `target`: the wait would close a loop (through chains waiting on
        one another), or the chain would grow longer than MAX_CHAIN names."""
        hops = fwd.hop + 1
        key: bytes | None = target
        while key is not None and hops <= MAX_CHAIN:  # along the chains already waiting on one another
            if key == fwd.query.key:
                return "a CNAME loop"
            waiters = self._waiting.get(key)
            if waiters is None:
                break
            key = waiters[0][0].awaits
            hops += key is not None
        if hops > MAX_CHAIN:
            return f"a CNAME chain that needs more than {MAX_CHAIN} further names"
        return None

    def _wanted(self, key: bytes, rule: DomainRule) -> bool:
        """Whether anyone waiting for `key` may see an answer gated on `rule`: a client with consent, a
        prefetch (hits on gated entries are only served to clients with consent), or a chain waiting
        on it that someone wants."""
        for fwd, deliver in self._waiting.get(key, ()):
            if deliver is None:
                return True
            if isinstance(deliver, ChainWaiter):
                if self._wanted(deliver.fwd.query.key, rule):
                    return True
            elif self.pipeline.allows(fwd.client, rule):
                return True
        return False

    def _joined(self, fwd: Forward, chase: Chase, target: Entry | None, problem: BaseException | None,
                whole: bool) -> None:
        """The name `fwd`'s chain stopped at is settled: answer everyone waiting for `fwd`'s key."""
        if target is None:
            self._finish(fwd, None, problem)
            return
        try:
            entry = self.pipeline.chained(fwd, chase, target, keep=whole)
        except UnusableReply as exc:
            self._finish(fwd, None, exc)
        except Exception as exc:
            log.exception("SERVFAIL for %s: unexpected error", fwd.query.text)
            self._finish(fwd, None, exc)
        else:
            self._finish(fwd, entry, None, whole)

    def _finish(self, first: Forward, entry: Entry | None, problem: BaseException | None,
                whole: bool = True) -> None:
        """Answer every client waiting for this key: each is gated on its own consent. Only the
        exchange of the entry's first forward may: one that `reap`, or a chain's own deadline,
        answered already is over. `whole` is False for an answer whose chain was left short
        (nobody waiting may see where it leads)."""
        key = first.query.key
        waiting = self._waiting.get(key)
        if waiting is None or waiting[0][0] is not first:
            return
        del self._waiting[key]
        pipeline = self.pipeline
        ede = ede_option(EDE_NOT_READY, str(problem)) if isinstance(problem, LocalShortage) else b""
        for fwd, deliver in waiting:
            if deliver is None:
                continue  # a prefetch: the cache entry was the point
            if isinstance(deliver, ChainWaiter):
                self._joined(deliver.fwd, deliver.chase, entry, problem, whole)
                continue
            try:
                if entry is not None:
                    reply = pipeline.complete(fwd, entry)
                else:
                    stale = pipeline.stale(fwd)
                    log.debug("%s for %s: %s", "stale answer" if stale else "SERVFAIL", fwd.query.text, problem)
                    if stale is None and ede:
                        self.short += 1
                    reply = stale if stale is not None else pipeline.servfail(fwd, ede)
                deliver(reply)
            except Exception:
                log.exception("cannot answer %s", fwd.query.text)

    def reap(self) -> int:
        """The last resort, every second: answer (stale or SERVFAIL) every waiting entry older than the
        upstream deadline and REAP_AFTER, which its exchange should have answered; returns how many."""
        oldest = self.pipeline.mono() - self.upstreams.timeout - REAP_AFTER
        stranded = [waiters[0][0] for waiters in self._waiting.values() if waiters[0][0].started < oldest]
        for fwd in stranded:
            self._finish(fwd, None, UpstreamError("no answer within the upstream deadline"))
        if stranded:
            self.reaped += len(stranded)
            log.error("queries left waiting past the upstream deadline, answered by the sweep: %d (%s, ...); "
                      "a bug, counted in dnsgate_forwards_reaped", len(stranded), stranded[0].query.text)
        return len(stranded)

    @property
    def waiting(self) -> int:
        """Questions waiting for an upstream answer (identical ones count once)."""
        return len(self._waiting)

