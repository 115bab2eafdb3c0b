"""The data dir's record of the worker processes a dnsgate started (dns.workers > 1), so that the
next start ends any that outlived their primary.

The kernel kills a worker when its primary dies (app/worker.py), so a worker still alive after its
primary means that failed; it would share the DNS port with the new processes and answer from a
table nobody updates. The next start on the same data dir ends it, once sure it is the very process
recorded (PID and start time, then its command line, checked through a pidfd so the PID cannot be
reused in between): dnsgate never signals a process it did not start. Workers of a primary that is
still running (another dnsgate on the same data dir) are left alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

RECORD: Final = "workers.pids"
WORKER_ARGV: Final = b"\0-m\0dnsgate.app.worker\0"  # in /proc/PID/cmdline
EXIT_WAIT: Final = 2.0  # seconds for a killed leftover to be gone (its sockets closed)


@dataclass(frozen=True, slots=True)
class Started:
    """A process as the kernel knows it: its PID, and when it started (clock ticks after boot),
    which tells it apart from a later process given the same PID."""

    pid: int
    start: int


def started(pid: int) -> Started | None:
    """The process `pid` is now, or None if there is none (or no /proc to ask)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return Started(pid, int(stat.rsplit(")", 1)[1].split()[19]))  # field 22, starttime
    except (OSError, IndexError, ValueError):
        return None


def is_worker(pid: int) -> bool:
    try:
        return WORKER_ARGV in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def write(path: Path, primary: Started, workers: Iterable[Started]) -> None:
    """Replace the record (atomically: a start never reads half of one)."""
    text = json.dumps({"primary": [primary.pid, primary.start], "workers": [[w.pid, w.start] for w in workers]})
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text + "\n", encoding="utf-8")
    os.replace(temporary, path)


def read(path: Path) -> tuple[Started, list[Started]] | None:
    """The record, or None if there is none or it cannot be read (then nothing is ended)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        primary = Started(int(data["primary"][0]), int(data["primary"][1]))
        return primary, [Started(int(pid), int(start)) for pid, start in data["workers"]]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def end_leftovers(path: Path) -> list[int]:
    """Kill the recorded workers whose primary is gone and wait until they are; returns their PIDs.
    Blocking (up to EXIT_WAIT per worker): run it off the event loop."""
    record = read(path)
    if record is None:
        return []
    primary, workers = record
    if started(primary.pid) == primary:
        return []  # its primary runs: not leftovers
    ended = []
    for worker in workers:
        if started(worker.pid) != worker:
            continue  # exited (its PID may be another process's now)
        try:
            pidfd = os.pidfd_open(worker.pid)
        except OSError:
            continue
        try:
            # The pidfd holds the process: what is checked now is what gets the signal.
            if started(worker.pid) != worker or not is_worker(worker.pid):
                continue
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            waiter = select.poll()
            waiter.register(pidfd, select.POLLIN)  # readable once the process has exited
            waiter.poll(EXIT_WAIT * 1000)
            ended.append(worker.pid)
        finally:
            os.close(pidfd)
    return ended
