"""The SQLite store's own thread: jobs run in order, one that fails is logged and the next still
runs, and shutting down waits for the jobs handed over before it."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from dnsgate.consent.sqlite_store import StoreThread


def test_jobs_run_in_order_and_a_failing_one_leaves_the_thread_serving(caplog: pytest.LogCaptureFixture) -> None:
    thread = StoreThread("test-store")
    ran: list[str] = []
    names: list[str] = []
    try:
        thread.post(lambda: ran.append("first"))
        thread.post(lambda: 1 / 0)
        thread.post(lambda: names.append(threading.current_thread().name))
        def second() -> int:
            ran.append("second")
            return len(ran)

        future = thread.submit(second)
        assert future.result(timeout=5) == 2
        failing = thread.submit(lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            failing.result(timeout=5)
    finally:
        thread.shutdown(wait=True)
    assert ran == ["first", "second"] and names == ["test-store"]
    assert [r.message for r in caplog.records if r.levelno == logging.ERROR] == ["consent store: a job failed"]


def test_shutdown_waits_for_the_jobs_before_it_and_refuses_new_ones() -> None:
    thread = StoreThread("test-store")
    done: list[bool] = []

    def slow() -> None:
        time.sleep(0.2)
        done.append(True)

    thread.post(slow)
    thread.shutdown(wait=True)
    assert done == [True]
    with pytest.raises(RuntimeError):
        thread.submit(lambda: None)
