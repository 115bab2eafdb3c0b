"""How many consent changes a second dnsgate records with many clients changing at once.

    .venv/bin/python -m tests.bench.change_rate [--changers 50] [--seconds 8] [--rounds 2] [--source DIR ...]

Starts `dnsgate serve` (loopback ports 25340/25341, a dead upstream), then has `--changers` clients,
each from its own loopback address (127.2.0.x: a choice is only for the identity making it) over
its own keep-alive connection, PUT /v1/consent granting marketing again and again for
`--seconds` (each waits for its answer before the next). Prints the changes answered 200 per
second, their latency (median, 99th percentile), the server's CPU per change (from /proc) and,
where the server exposes them, the store's transactions (`dnsgate_consent_commits_total`).

`--source` (repeatable) runs the server from another checkout of dnsgate (its directory: the
`dnsgate` package there is the one imported), so two versions are compared in alternating rounds
(`--rounds`) on the same machine in the same minutes: the figures say what changed, not the VM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp

DNS_PORT, API_PORT = 25340, 25341
HZ = os.sysconf("SC_CLK_TCK")
GRANT = {"categories": ["marketing"]}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / HZ


def commits(api: str) -> float | None:
    with urllib.request.urlopen(f"{api}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("dnsgate_consent_commits_total "):
                return float(line.split()[-1])
    return None


async def changer(api: str, address: str, until: float, latencies: list[float], errors: list[int]) -> None:
    connector = aiohttp.TCPConnector(local_addr=(address, 0), limit=1)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as session:
        while time.monotonic() < until:
            started = time.monotonic()
            async with session.put(f"{api}/v1/consent", json=GRANT) as r:
                await r.read()
                if r.status == 200:
                    latencies.append(time.monotonic() - started)
                else:
                    errors.append(r.status)


def measure(source: Path, changers: int, seconds: float) -> dict[str, float]:
    data_dir = tempfile.mkdtemp(prefix="dnsgate-change-rate-")
    config = Path(data_dir, "bench.toml")
    config.write_text('[api]\nadmin_token = "bench"\nconsent_changes_per_minute = 0\n')
    log = Path(data_dir, "dnsgate.log")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dnsgate", "serve", "--config", str(config), "--dns", f"127.0.0.1:{DNS_PORT}",
         "--api", f"127.0.0.1:{API_PORT}", "--upstream", "127.0.0.1:9", "--data-dir", data_dir,
         "--log-level", "warning"],
        cwd=source, stdout=subprocess.PIPE, stderr=log.open("wb"))
    api = f"http://127.0.0.1:{API_PORT}"
    try:
        assert proc.stdout is not None
        if not proc.stdout.readline():
            raise SystemExit(f"dnsgate did not start: {log.read_text(errors='replace')[-500:]}")
        addresses = [f"127.2.{i // 250}.{i % 250 + 1}" for i in range(changers)]
        latencies: list[float] = []
        errors: list[int] = []

        async def run(duration: float) -> None:
            until = time.monotonic() + duration
            await asyncio.gather(*(changer(api, a, until, latencies, errors) for a in addresses))

        asyncio.run(run(1.0))  # warm up: every client has a choice, connections are open
        latencies.clear()
        errors.clear()
        before_commits = commits(api)
        cpu = cpu_seconds(proc.pid)
        started = time.monotonic()
        asyncio.run(run(seconds))
        elapsed = time.monotonic() - started
        cpu = cpu_seconds(proc.pid) - cpu
        after_commits = commits(api)
        done = len(latencies)
        latencies.sort()
        result = {
            "changes_per_s": done / elapsed, "errors": float(len(errors)),
            "p50_ms": 1e3 * statistics.median(latencies) if latencies else 0.0,
            "p99_ms": 1e3 * latencies[int(0.99 * (done - 1))] if latencies else 0.0,
            "cpu_us_per_change": 1e6 * cpu / max(1, done),
        }
        if before_commits is not None and after_commits is not None:
            result["changes_per_commit"] = done / max(1.0, after_commits - before_commits)
        return result
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(data_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--changers", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--source", action="append", type=Path,
                        help="a dnsgate checkout to run (repeatable; default: this one)")
    args = parser.parse_args()
    sources = args.source or [Path(__file__).resolve().parents[2]]
    for round_ in range(1, args.rounds + 1):
        for source in sources:
            result = measure(source.resolve(), args.changers, args.seconds)
            print(f"r{round_} {source}: {json.dumps({k: round(v, 2) for k, v in result.items()})}  "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
