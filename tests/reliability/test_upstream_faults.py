"""Upstream faults over sockets, short (the full run: `python -m tests.reliability.faults`, 100k
queries per behaviour): correct answers or SERVFAIL within the deadline, no forged answer, no task
left behind, no error in the log."""

from __future__ import annotations

from pathlib import Path

from tests.reliability.faults import MODES, TIMEOUT, report, run


async def test_every_upstream_fault_gives_an_answer_or_servfail_in_time(data_dir: Path) -> None:
    f = await run(per_mode=400, window=200, data_dir=data_dir)
    print(report(f))
    assert f.queries == 400 * len(MODES)
    assert f.problems == []
    assert f.tasks_after == f.tasks_before
    assert max(r.slowest for r in f.results) < TIMEOUT + 1.0
