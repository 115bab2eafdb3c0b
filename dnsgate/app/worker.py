"""A worker process (dns.workers > 1): answers DNS on the primary's addresses, and nothing else.

The primary (workers/supervisor.py) starts it as `python -m dnsgate.app.worker FD PID`, FD being its end of a
socketpair and PID the primary's. The first message carries what it needs to answer exactly as the
primary does (replica.Start); it builds the same DNS side (app/dns_side.py) and says so ("built"), then
applies the primary's journal of consent changes and reloads as it comes, acknowledging each batch;
it binds the same addresses with SO_REUSEPORT only when the primary says "listen", so that every
change sent before that is in force before its first answer. It answers the primary's heartbeat
("ping"), sends its query-log entries every 0.1 s and its counts and kiosk activity every second.

A worker never answers from a consent table nobody updates: the kernel kills it when the primary
dies, even while it is stopped (PR_SET_PDEATHSIG), and it checks its line to the primary before each
batch of queries it answers, exiting at once when the line is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from typing import NoReturn

from dnsgate.app import dns_side
from dnsgate.app.dns_side import DnsStack, os_reason
from dnsgate.config import Config
from dnsgate.consent.model import ConsentTable
from dnsgate.dns.tally import LogEntry
from dnsgate.gc_policy import frozen_startup, refreeze
from dnsgate.logs import setup_logging
from dnsgate.loops import loop_factory
from dnsgate.rules.ruleset import Ruleset
from dnsgate.tasks import background
from dnsgate.workers.link import Link, LinkClosed, LinkGuard
from dnsgate.workers.replica import Start, apply

log = logging.getLogger("dnsgate.app.worker")

LOG_EVERY = 0.1  # seconds between batches of query-log entries
COUNTS_EVERY = 10  # ... and counts and kiosk activity every this many batches
PR_SET_PDEATHSIG = 1  # prctl(2)


class CannotListen(Exception):
    """An address the primary listens on cannot be bound here (the message says why)."""


def main(argv: Sequence[str]) -> int:
    if len(argv) != 2 or not all(a.isdigit() for a in argv):
        print("usage: python -m dnsgate.app.worker FD PID (dnsgate starts its workers itself: see dns.workers)",
              file=sys.stderr)
        return 2
    die_with_parent()
    if os.getppid() != int(argv[1]):  # the primary died before the line above: nobody to answer for
        return 1
    sock = socket.socket(fileno=int(argv[0]))
    # A worker lives as long as its line to the primary: signals meant for dnsgate (Ctrl-C and a
    # hangup reach the whole process group; systemd sends SIGTERM to every process of the service)
    # are the primary's to act on, and it stops its workers in order. SIGKILL still ends one.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)

    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(serve(sock))


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent (the primary) dies: a stopped process
    cannot notice that its line closed, and must not answer from its table once it runs again."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        failed = libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0
    except (OSError, AttributeError):  # not Linux: the line check before each answer remains
        failed = True
    if failed:
        log.warning("cannot ask to be stopped with the primary (prctl PR_SET_PDEATHSIG); the check of its "
                    "line before each answer remains")


def lost() -> NoReturn:
    """The line to the primary is gone: stop at once, answering nothing more (no queries waiting
    upstream either; the primary, if alive, starts a fresh worker)."""
    log.error("the line to the primary is closed: exiting")
    os._exit(1)


async def serve(sock: socket.socket) -> int:
    link = await Link.over(sock)
    guard = LinkGuard(sock, lost)
    try:
        kind, start = await link.receive()
    except LinkClosed:
        return 1
    if kind != "start" or not isinstance(start, Start):
        return 1
    setup_logging(start.cfg.log.level, start.cfg.log.format)
    table = ConsentTable.from_copy(start.table)

    def pair(token: str, client: str) -> bool:
        """The primary holds the offers: it binds the token (or not). NOERROR says the name was heard."""
        link.send("pair", token, client)
        return True

    pending: list[LogEntry] = []  # the query log's entries, sent to the primary every second
    try:
        stack = dns_side.build(start.cfg, start.rules, table, start.servers, on_pair=pair, wall=time.time,
                                log_gated=pending.append, log_all=pending.append if start.log_all else None,
                                server_id=f"dnsgate worker {start.worker}".encode(), may_answer=guard, join=True)
    except dns_side.UpstreamError as exc:
        log.error("worker %d: %s", start.worker, exc)
        return 1
    dns_side.install(stack, start.rules, start.live)
    link.send("built")
    async with AsyncExitStack() as exits:
        await exits.enter_async_context(stack.running())  # on leaving: listeners, forwards, upstreams close

        async def listen() -> None:
            for address in start.bound:
                try:
                    await stack.listeners.start(address)
                except OSError as exc:
                    raise CannotListen(f"worker {start.worker}: dns.listen {address}: {os_reason(exc)}") from None
            await exits.enter_async_context(background(_report(link, stack, table, pending)))
            link.send("ready")

        with frozen_startup():
            try:
                await _follow(link, table, stack, listen)
            except LinkClosed:
                lost()
            except CannotListen as exc:
                log.error("%s", exc)
                return 1
    # The listeners are closed and the last queries answered: their entries and counts go too.
    link.send("log", pending)
    link.send("counts", stack.counts(), table.kiosk_seen)
    with contextlib.suppress(LinkClosed):
        await link.drain()
    link.close()
    return 0


async def _follow(link: Link, table: ConsentTable, stack: DnsStack, listen: Callable[[], Awaitable[None]]) -> None:
    """Apply what the primary sends, in order, until it says stop. Raises LinkClosed if its line closes."""

    def install(rules: Ruleset, live: Config) -> None:
        dns_side.install(stack, rules, live)
        refreeze()

    while True:
        message = await link.receive()
        kind = message[0]
        if kind == "ops":
            apply(table, message[2], install)
            link.send("ack", message[1])
        elif kind == "ping":
            link.send("pong")
        elif kind == "seen":
            table.merge_seen(message[1])
            table.forget_idle(time.time())
        elif kind == "listen":  # every change sent before this one is applied: answering may start
            await listen()
        elif kind == "stop":
            return
        else:
            raise LinkClosed(f"unknown message {kind!r}")


async def _report(link: Link, stack: DnsStack, table: ConsentTable, pending: list[LogEntry]) -> None:
    batches = 0
    while True:
        await asyncio.sleep(LOG_EVERY)
        if pending:
            link.send("log", pending)
            pending.clear()  # the same list: the pipeline holds its bound append
        batches += 1
        if batches % COUNTS_EVERY == 0:
            link.send("counts", stack.counts(), table.kiosk_seen)
        await link.drain()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
