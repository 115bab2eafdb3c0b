"""File descriptors: the process's limit, what the configuration may hold open at once, and running out.

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
from typing import Final

log = logging.getLogger(__name__)

SHORTAGE_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


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
# The limit


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
