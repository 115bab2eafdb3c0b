"""The kill -9 loop, short (the full run: `python -m tests.reliability.durability --restarts 200`)."""

from __future__ import annotations

from pathlib import Path

from tests.reliability.durability import report, run
from tests.support.stub_upstream import StubUpstream


async def test_acknowledged_changes_survive_kill_9(upstream: StubUpstream, data_dir: Path) -> None:
    f = await run(restarts=8, workers=4, seed=8, data_dir=data_dir, upstream=upstream)
    print(report(f))
    assert f.restarts == 8 and f.acknowledged > 50 and f.unacknowledged > 0  # the loop really ran
    assert (f.lost, f.half, f.problems) == (0, 0, [])
