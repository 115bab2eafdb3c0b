"""dnsgate as a real process (`python -m dnsgate serve`), for the kill -9 loop and the soak."""

from __future__ import annotations

import asyncio
import os
import re
import resource
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

UDP_IO = "DNSGATE_DNS_UDP_IO"  # dns.udp_io of the dnsgate started here, if set
READY = re.compile(r"^dnsgate ready: dns \(udp\+tcp(?:, \d+ processes)?\) 127\.0\.0\.1:(\d+); api http://127\.0\.0\.1:(\d+);")


@dataclass
class Served:
    process: asyncio.subprocess.Process
    dns_port: int
    api_port: int
    log: list[str] = field(default_factory=list)  # its stderr (the log), read continuously
    reader: asyncio.Task[None] | None = None

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    async def kill9(self) -> None:
        self.process.kill()  # SIGKILL: no shutdown code runs
        await self.process.wait()
        if self.reader is not None:
            await self.reader

    async def stop(self) -> list[str]:
        """SIGTERM, wait; returns its log lines."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(self.process.wait(), 20)
        if self.reader is not None:
            await self.reader
        return self.log


async def _read_log(stream: asyncio.StreamReader, into: list[str]) -> None:
    async for line in stream:
        into.append(line.decode(errors="replace").rstrip())


async def serve(upstream: str, data_dir: Path, *extra: str, token: str = "reliability",
                config: Path | None = None, dns: str = "127.0.0.1:0",
                nofile: int | tuple[int, int] | None = None) -> Served:
    """`nofile`: the limit on open files, soft and hard (`prlimit --nofile=N` sets both), or (soft, hard)."""
    # The caller's DNSGATE_* variables are not dnsgate's, except the UDP path under test: the runs
    # are made on each path (DNSGATE_DNS_UDP_IO=asyncio python -m tests.reliability.soak).
    env = {k: v for k, v in os.environ.items() if not k.startswith("DNSGATE_") or k == UDP_IO}
    env["DNSGATE_ADMIN_TOKEN"] = token
    args = ["--dns", dns, "--api", "127.0.0.1:0", "--upstream", upstream, "--data-dir", str(data_dir)]
    if config is not None:
        args += ["--config", str(config)]

    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile) if isinstance(nofile, int) else nofile)

    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dnsgate", "serve", *args, *extra, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env, preexec_fn=limit if nofile is not None else None)
    assert process.stdout is not None and process.stderr is not None
    log: list[str] = []
    reader = asyncio.get_running_loop().create_task(_read_log(process.stderr, log))
    line = (await asyncio.wait_for(process.stdout.readline(), 20)).decode().strip()
    match = READY.match(line)
    if not match:
        process.kill()
        await process.wait()
        await reader
        raise RuntimeError(f"dnsgate did not start: {line!r} {' | '.join(log[-20:])}")
    return Served(process, int(match[1]), int(match[2]), log, reader)


def udp_io() -> str:
    """The UDP path the processes started here use, for the figures."""
    return os.environ.get(UDP_IO) or "batched (the default)"
