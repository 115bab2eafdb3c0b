"""The fault tests excuse a late answer only by the time the answering thread waited for a CPU
(`consent_ledger.RunQueue`): it must see such a wait when there is one, and never count more than
the time that passed."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.support.consent_ledger import RunQueue

BUSY = "import time\nend = time.monotonic() + 5\nwhile time.monotonic() < end: pass\n"


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
def test_the_run_queue_sees_a_thread_wait_for_a_cpu_another_process_holds() -> None:
    cpu = min(os.sched_getaffinity(0))
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})  # this thread and two busy processes share one CPU
    rivals = [subprocess.Popen([sys.executable, "-c", BUSY], preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
              for _ in range(2)]
    try:
        with RunQueue() as rq:
            if rq._read() is None:
                pytest.skip("no schedstat for this thread (a kernel without CONFIG_SCHED_INFO)")
            time.sleep(0.3)  # (the rival is running by now)
            start = time.monotonic()
            end = start + 1.0
            while time.monotonic() < end:  # busy as well: runnable the whole second
                pass
            time.sleep(0.05)  # (a sample after `end`)
            waited, span = rq.measured(start, end)
    finally:
        for rival in rivals:
            rival.kill()
            rival.wait()
        os.sched_setaffinity(0, before)
    # About two thirds of the second went to the rivals (its time on the CPU, the other figure
    # schedstat keeps, is the third left).
    assert 0.45 < waited <= span, (waited, span)


THIS_THREAD = "/proc/thread-self/schedstat"


def waited(schedstat: str) -> float:
    """A thread's time waiting for a CPU so far (seconds), from the kernel's own figure."""
    with open(schedstat, encoding="ascii") as f:
        return int(f.read().split()[1]) / 1e9


def rivals_on(cpu: int, n: int) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen([sys.executable, "-c", BUSY], preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
            for _ in range(n)]


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
def test_the_run_queue_sees_the_waits_of_another_process_and_counts_overlapping_waits_once() -> None:
    """dnsgate run as a process: its threads' waits count (this thread sleeps meanwhile); then this
    thread and that process both wait through the same second: counted once, not twice."""
    cpu = min(os.sched_getaffinity(0))
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    server, *rivals = rivals_on(cpu, 3)  # ("server": busy, sharing the CPU with two rivals and this thread)
    try:
        with RunQueue(server.pid) as rq:
            if rq._read() is None:
                pytest.skip("no schedstat for this thread (a kernel without CONFIG_SCHED_INFO)")
            time.sleep(0.3)
            start = time.monotonic()
            time.sleep(1.0)  # this thread waits for nothing: the server's waits alone
            end = time.monotonic()
            busy_end = end + 1.0
            own = waited(THIS_THREAD), waited(f"/proc/{server.pid}/task/{server.pid}/schedstat")
            while time.monotonic() < busy_end:  # both this thread and the server wait now
                pass
            each = waited(THIS_THREAD) - own[0], waited(f"/proc/{server.pid}/task/{server.pid}/schedstat") - own[1]
            time.sleep(0.05)
            alone, alone_span = rq.measured(start, end)
            together, together_span = rq.measured(end, busy_end)
    finally:
        for p in (server, *rivals):
            p.kill()
            p.wait()
        os.sched_setaffinity(0, before)
    # Three busy processes on one CPU: the server waits about two thirds of a second. With this
    # thread busy too, each waits about three quarters of it: the time either waited is all of the
    # second or nearly, and at least the longer of the two, while their sum is about one and a half.
    assert 0.45 < alone <= alone_span, (alone, alone_span)
    assert max(each) - 0.15 < together <= together_span, (together, together_span, each)
    assert together < 0.8 * sum(each), (together, each)
