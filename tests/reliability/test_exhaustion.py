"""Out of file descriptors, short (the full run: `python -m tests.reliability.exhaustion`, a limit
of 1 024 and 1 100 connections): dnsgate under a limit of 256 open files, its descriptors taken
through the API and DNS over TCP, answers fresh names SERVFAIL at once and resolves every one of
them once the connections close; with limits that fit, a flood of API connections cannot take the
descriptors DNS needs. And at start, the soft limit is raised to the hard one."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from tests.reliability.exhaustion import BUDGET_FITS, BUDGET_OVER, QUICK, log_line, report, run
from tests.reliability.process import serve
from tests.support.stub_upstream import StubUpstream


async def test_out_of_descriptors_degrades_and_recovers(tmp_path: Path) -> None:
    f = await run(nofile=256, connections=300, names=20, work=tmp_path)
    print(report(f))
    assert f.problems == []
    assert f.warned_at_start and f.fds_full >= 255
    assert f.servfail_not_ready == 25 and f.slowest_during < QUICK and f.local_answered
    assert f.recovered_in is not None and f.healthz_ok_in is not None
    assert f.shortage_logged == 1 and f.recovery_logged == 1
    assert f.flood_api_held <= f.flood_api_cap and f.flood_fds_max < 256


async def test_the_soft_limit_is_raised_to_the_hard_limit_at_start(tmp_path: Path) -> None:
    stub = await StubUpstream().start()
    served = await serve(stub.address, tmp_path / "data", nofile=(256, 2048))
    try:
        limits = await asyncio.to_thread(Path(f"/proc/{served.process.pid}/limits").read_text)
        assert re.search(r"^Max open files\s+2048\s+2048\s", limits, re.M)
        started = await log_line(served, BUDGET_FITS, BUDGET_OVER)
        assert "file descriptors: limit 2048 (raised from 256); the configured limits can hold 740" in started
    finally:
        await served.stop()
        await stub.stop()
