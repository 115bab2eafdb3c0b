"""File descriptors: the process's limit, what the configuration may hold open at once, and running out.

At start dnsgate raises its soft RLIMIT_NOFILE to the hard limit (`raise_limit`), and once started
logs what the configured limits can hold at once (`budget`), with a warning if that is more than the
limit: every DNS TCP and API connection holds one descriptor, and so does every upstream socket.

Running out (EMFILE: this process's limit; ENFILE: the system's; ENOBUFS/ENOMEM: kernel memory for
a socket) must degrade, not poison: `Shortage` records an episode, logs its start once and its end
once, and is shown in /healthz and /metrics. An episode starts when an operation fails for lack of a
descriptor, or when the probe that runs every second cannot open a socket (an accept that the event
loop sheds fails out of our sight); it ends when the probe can open one again.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from dnsgate.config import Config

log = logging.getLogger(__name__)

SHORTAGE_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# What the budget counts besides connections and upstream sockets: standard streams, the event
# loop's own descriptors, the SQLite files (consent, query log, each with its WAL), list and webhook
# fetches, the Redis client, the listening sockets.
OTHER_DESCRIPTORS: Final = 64
PER_WORKER: Final = 4  # the primary's side of each worker: its line and the child's pipes


def is_shortage(exc: BaseException) -> bool:
    """Whether `exc` says a descriptor (or a socket's kernel memory) could not be had."""
    if isinstance(exc, OSError):
        if exc.errno in SHORTAGE_ERRNOS:
            return True
        return exc.__cause__ is not None and is_shortage(exc.__cause__)  # uvloop chains the system error
    return False


def reason(exc: OSError) -> str:
    """"Too many open files (EMFILE)", from the error or the system error it wraps."""
    for error in (exc, exc.__cause__):
        if isinstance(error, OSError) and error.errno in SHORTAGE_ERRNOS:
            return f"{os.strerror(error.errno)} ({errno.errorcode[error.errno]})"
    return str(exc)


def _can_open_socket() -> OSError | None:
    """Open and close a UDP socket: the resource an upstream query needs."""
    try:
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close()
    except OSError as exc:
        return exc
    return None


class Shortage:
    """Episodes of running out of descriptors in this process."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 probe: Callable[[], OSError | None] = _can_open_socket) -> None:
        self.clock = clock
        self.probe = probe
        self.since: float | None = None  # when the current episode started; None: descriptors to spare
        self.why = ""
        self.episodes = 0
        self.failures = 0  # operations that failed for lack of a descriptor, in every episode

    @property
    def short(self) -> bool:
        return self.since is not None

    def hit(self, exc: OSError, doing: str) -> None:
        """An operation failed for lack of a descriptor: an episode starts (logged once) or goes on."""
        self.failures += 1
        if self.since is None:
            self.since = self.clock()
            self.episodes += 1
            self.why = f"{reason(exc)} {doing}"
            log.warning("out of file descriptors or socket buffers: %s; queries that need a new upstream "
                        "socket get SERVFAIL (EDE Not Ready) until they free up; open=%s limit=%d",
                        self.why, _open_count(), soft_limit())

    def check(self) -> None:
        """Every second: probe whether a descriptor can be had; start or end an episode by what it says."""
        problem = self.probe()
        if problem is not None:
            if is_shortage(problem):
                self.hit(problem, "opening a socket")
            return
        if self.since is not None:
            log.warning("file descriptors available again after %.1f s: %d operations failed meanwhile",
                        self.clock() - self.since, self.failures)
            self.since = None
            self.why = ""

    def describe(self) -> str:
        if self.since is None:
            return "ok"
        return f"out of file descriptors or socket buffers for {self.clock() - self.since:.0f} s: {self.why}"


# --------------------------------------------------------------------------------------------
# The limit and the budget


def soft_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _open_count() -> int | str:
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the directory's own
    except OSError:  # no /proc, or (out of descriptors) no descriptor left to read it with
        return "?"


def open_count() -> int | None:
    count = _open_count()
    return count if isinstance(count, int) else None


def raise_limit() -> tuple[int, int]:
    """Raise the soft limit on open files to the hard limit; returns (soft before, soft now)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft >= hard:
        return soft, soft
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):  # a hard limit above the system's nr_open: keep what we have
        return soft, soft
    return soft, target


@dataclass(frozen=True, slots=True)
class Budget:
    """The descriptors the configured limits can hold at once, in the busiest process (the primary)."""

    dns_tcp: int
    api: int
    upstream: int
    workers: int
    other: int = OTHER_DESCRIPTORS

    @property
    def total(self) -> int:
        return self.dns_tcp + self.api + self.upstream + self.workers + self.other

    def __str__(self) -> str:
        return (f"{self.total} (dns tcp {self.dns_tcp}, api {self.api}, upstream sockets {self.upstream}, "
                f"workers {self.workers}, other {self.other})")


def budget(cfg: Config, servers: int, sockets_per_family: int) -> Budget:
    """Each process answering DNS holds its own DNS TCP connections and upstream sockets (a worker
    has its own descriptor table, with the limit it inherits); the primary adds the API and its
    side of every worker, so it is the one that can need most. `servers`: the upstream servers,
    conditional-forwarding ones included."""
    # + a UDP and a TCP socket per address, and one per DNS-over-TLS address (its connections are
    # counted with TCP's)
    dns_tcp = cfg.dns.tcp_max_connections + 2 * len(cfg.dns.listen) + len(cfg.dns.tls_listen)
    api = cfg.api.max_connections + 1 + bool(cfg.api.admin_listen)  # + the listening sockets
    # A UDP pool per address family, where a socket that has served its queries stays open until its
    # last reply while its replacement serves; and a TCP (or TLS) connection per server.
    upstream = 2 * sockets_per_family * 2 + servers
    return Budget(dns_tcp, api, upstream, PER_WORKER * (cfg.dns.workers - 1))


def log_budget(cfg: Config, servers: int, sockets_per_family: int, before: int, now: int) -> Budget:
    """Log the limit (`raise_limit` took it from `before` to `now`) and what the configured limits can
    hold at once; a warning if that is more than the limit."""
    need = budget(cfg, servers, sockets_per_family)
    raised = f" (raised from {before})" if now != before else ""
    if need.total > now:
        log.warning("file descriptor limit %d%s is below what the configured limits can hold at once: %s; "
                    "lower dns.tcp_max_connections or api.max_connections, or raise the limit "
                    "(LimitNOFILE=, docker run --ulimit nofile=)", now, raised, need)
    else:
        log.info("file descriptors: limit %d%s; the configured limits can hold %s", now, raised, need)
    return need
