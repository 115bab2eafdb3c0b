"""Out of file descriptors, black box: dnsgate (a real process) under a small limit on open files
(what `prlimit --nofile=N` sets, here set in the child), its descriptors taken by idle connections.

Two runs:
- exhaust: dnsgate configured with connection limits above what its descriptor limit allows (it
  warns at start); idle API and DNS TCP connections take every descriptor. Meanwhile queries for
  fresh names must get SERVFAIL with EDE "Not Ready" at once (not time out), and names dnsgate
  answers itself still answer. Once the connections close, every name asked during the exhaustion
  must resolve again, over UDP and TCP (nothing was stranded); the shortage is logged once, its end
  once, and /healthz and /metrics say so.
- flood: the limits fit the descriptor limit (no warning); far more API and DNS TCP connections
  than their caps allow, from many addresses, are opened and held, a tenth of them slow-loris (a
  request begun, never finished). Each keeps at most its cap, so DNS keeps its descriptors: fresh
  names resolve over UDP and TCP (the idlest connection makes room), and so does the API.

    .venv/bin/python -m tests.reliability.exhaustion [--nofile 1024] [--connections 1100] [--names 100]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import dns.asyncquery
import dns.message
import dns.rcode

from dnsgate import descriptors
from dnsgate.wire import EDE_NOT_READY
from tests.reliability.process import Served, serve, udp_io
from tests.support.stub_upstream import StubUpstream

QUICK = 0.5  # "at once": half the upstream deadline
UPSTREAM_TIMEOUT = 1.0
HOLD = 300.0  # idle and header timeouts while descriptors are taken: nothing closes the connections but us
LOCAL_NAME = "healthcheck.dnsgate.internal"


@dataclass
class Figures:
    nofile: int
    connections: int
    names: int
    warned_at_start: bool = False
    fds_full: int = 0  # descriptors dnsgate held once the connections took them
    opened: int = 0  # connections opened to get there (dnsgate closes those it cannot accept)
    servfail_not_ready: int = 0
    servfail_while_freeing: int = 0  # asked again before dnsgate had seen the connections close
    slowest_during: float = 0.0
    local_answered: bool = False
    recovered_in: float | None = None  # from closing the connections to every name resolved again
    healthz_ok_in: float | None = None
    shortage_logged: int = 0
    recovery_logged: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    flood_api_cap: int = 0
    flood_api_held: float = 0.0
    flood_tcp_cap: int = 0
    flood_tcp_held: float = 0.0
    flood_fds_max: int = 0
    flood_slowest_dns: float = 0.0
    flood_budget: str = ""
    problems: list[str] = field(default_factory=list)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def ask(port: int, name: str, *, tcp: bool = False, timeout: float = 3.0) -> tuple[dns.message.Message | None,
                                                                                         float]:
    q = dns.message.make_query(name, "A", use_edns=0)
    started = time.monotonic()
    try:
        if tcp:
            reply = await dns.asyncquery.tcp(q, "127.0.0.1", port=port, timeout=timeout)
        else:
            reply = await dns.asyncquery.udp(q, "127.0.0.1", port=port, timeout=timeout)
    except (TimeoutError, dns.exception.Timeout, OSError, EOFError):
        return None, time.monotonic() - started
    return reply, time.monotonic() - started


async def log_line(served: Served, *texts: str, within: float = 5.0) -> str:
    """The first line of dnsgate's log with one of `texts` in it, waiting for it a while ("" if none)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(within):
            while True:
                found = [line for line in served.log if any(t in line for t in texts)]
                if found:
                    return found[0]
                await asyncio.sleep(0.05)
    return ""


BUDGET_FITS, BUDGET_OVER = "file descriptors: limit", "is below what the configured limits can hold"


def not_ready(reply: dns.message.Message) -> bool:
    return reply.rcode() == dns.rcode.SERVFAIL and any(e.code == EDE_NOT_READY for e in reply.extended_errors())


async def hold(port: int, count: int, sources: list[str], into: list[asyncio.StreamWriter],
               begun: bytes = b"") -> None:
    """Open `count` connections to `port` (spread over `sources`) and keep them; every tenth sends
    `begun`, the start of a request it never finishes."""
    for i in range(count):
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(
                "127.0.0.1", port, local_addr=(sources[i % len(sources)], 0)), 3)
        except (OSError, TimeoutError):
            continue
        if begun and i % 10 == 0:
            writer.write(begun)
        into.append(writer)


async def metric_values(served: Served, f: Figures) -> dict[str, float]:
    try:
        async with aiohttp.ClientSession() as session, session.get(served.api + "/metrics") as response:
            text = await response.text()
    except aiohttp.ClientError as exc:
        f.problems.append(f"/metrics: {exc}")
        return {}
    return {m[1]: float(m[2]) for m in re.finditer(r"^(dnsgate_[a-z_]+(?:\{[^}]*\})?) (\S+)$", text, re.M)}


async def shortage_in_healthz(served: Served) -> str:
    try:
        async with aiohttp.ClientSession() as session, session.get(served.api + "/healthz") as response:
            body = await response.json()
    except aiohttp.ClientError as exc:
        return f"/healthz: {exc}"
    return str(body.get("file_descriptors", {}).get("shortage"))


def config_file(path: Path, *, tcp: int, tcp_per_client: int, api: int, api_per_client: int, hold: float) -> Path:
    path.write_text(f"""
[dns]
tcp_max_connections = {tcp}
tcp_max_connections_per_client = {tcp_per_client}
tcp_idle_timeout = {min(hold, 3600)}
tcp_query_timeout = {min(hold, 600)}
[api]
max_connections = {api}
max_connections_per_client = {api_per_client}
idle_timeout = {min(hold, 3600)}
header_timeout = {min(hold, 3600)}
[upstream]
timeout = {UPSTREAM_TIMEOUT}
attempt_timeout = 0.4
""")
    return path


async def exhaust(f: Figures, stub: StubUpstream, tmp: Path) -> None:
    over = f.connections * 2
    cfg = config_file(tmp / "exhaust.toml", tcp=over, tcp_per_client=over, api=over, api_per_client=over, hold=HOLD)
    served = await serve(stub.address, tmp / "exhaust", config=cfg, nofile=f.nofile)
    pid = served.process.pid
    held: list[asyncio.StreamWriter] = []
    try:
        f.warned_at_start = BUDGET_OVER in await log_line(served, BUDGET_FITS, BUDGET_OVER)
        api_port = served.api_port
        await hold(api_port, f.connections // 2, ["127.0.0.1"], held)
        await hold(served.dns_port, f.connections - f.connections // 2, ["127.0.0.1"], held)
        f.opened = len(held)
        f.fds_full = fd_count(pid)
        if f.fds_full < f.nofile - 1:
            f.problems.append(f"descriptors not exhausted: {f.fds_full} of {f.nofile} after {f.opened} connections")
        # the sweep's probe finds the shortage within a second: from then on it is known for sure
        if not await log_line(served, "out of file descriptors"):
            f.problems.append("the shortage was not logged within 5 s")

        names = [f"during{i}.exhaust.example.test" for i in range(f.names)]
        semaphore = asyncio.Semaphore(20)

        async def during(name: str) -> None:
            async with semaphore:
                reply, took = await ask(served.dns_port, name)
            f.slowest_during = max(f.slowest_during, took)
            if reply is None:
                f.problems.append(f"{name}: no reply while out of descriptors ({took:.2f} s)")
            elif not_ready(reply):
                f.servfail_not_ready += 1
            elif not reply.answer:
                f.problems.append(f"{name}: {dns.rcode.to_text(reply.rcode())} without EDE Not Ready")

        await asyncio.gather(*(during(n) for n in names + names[: f.names // 4]))  # a quarter asked twice
        if f.slowest_during >= QUICK:
            f.problems.append(f"a reply took {f.slowest_during:.2f} s while out of descriptors (at once: < {QUICK})")
        if f.servfail_not_ready == 0:
            f.problems.append("no SERVFAIL with EDE Not Ready while out of descriptors")
        local, _ = await ask(served.dns_port, LOCAL_NAME)
        f.local_answered = local is not None and local.rcode() == dns.rcode.NOERROR and bool(local.answer)

        for writer in held:
            writer.close()
        held.clear()
        freed = time.monotonic()
        pending = set(names)
        while pending and time.monotonic() - freed < 10:
            for name in list(pending):
                reply, _ = await ask(served.dns_port, name, tcp=hash(name) % 2 == 0, timeout=2)
                if reply is not None and reply.rcode() == dns.rcode.NOERROR and reply.answer:
                    pending.discard(name)
                elif reply is not None and not_ready(reply):
                    f.servfail_while_freeing += 1
            if pending:
                await asyncio.sleep(0.1)
        if pending:
            f.problems.append(f"{len(pending)} names asked during the exhaustion never resolved again, "
                              f"e.g. {sorted(pending)[0]}")
        else:
            f.recovered_in = time.monotonic() - freed
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                while True:
                    if await shortage_in_healthz(served) == "ok":
                        break
                    await asyncio.sleep(0.1)
                f.healthz_ok_in = time.monotonic() - freed
        if f.healthz_ok_in is None:
            f.problems.append("/healthz still reports the shortage 5 s after the connections closed")
        f.metrics = await metric_values(served, f)
    finally:
        for writer in held:
            writer.close()
        log = await served.stop()
    f.shortage_logged = sum("out of file descriptors" in line for line in log)
    f.recovery_logged = sum("file descriptors available again" in line for line in log)
    if f.shortage_logged != 1 or f.recovery_logged != 1:
        f.problems.append(f"the shortage was logged {f.shortage_logged} times and its end {f.recovery_logged} "
                          "times (once each)")
    if not f.warned_at_start:
        f.problems.append("no warning at start that the configured limits exceed the descriptor limit")
    if not f.local_answered:
        f.problems.append(f"{LOCAL_NAME} (answered locally) not answered while out of descriptors")
    errors = [line for line in log if " ERROR " in line or "Traceback" in line]
    if errors:
        f.problems.append(f"error lines in the log: {errors[:3]}")
    expected = {"dnsgate_descriptor_shortages_total": 1.0, "dnsgate_descriptor_shortage": 0.0,
                "dnsgate_forwards_reaped_total": 0.0,
                "dnsgate_descriptor_shortage_servfail_total": float(f.servfail_not_ready + f.servfail_while_freeing)}
    for name, value in expected.items():
        if f.metrics.get(name) != value:
            f.problems.append(f"/metrics {name} = {f.metrics.get(name)}, expected {value}")


def fitting_limits(nofile: int) -> tuple[int, int]:
    """(dns.tcp_max_connections, api.max_connections): the defaults where they fit, else a share."""
    return (512, 128) if nofile >= 1024 else (nofile // 3, nofile // 5)


async def flood(f: Figures, stub: StubUpstream, tmp: Path) -> None:
    tcp, api = fitting_limits(f.nofile)
    f.flood_api_cap, f.flood_tcp_cap = api, tcp
    cfg = config_file(tmp / "flood.toml", tcp=tcp, tcp_per_client=32, api=api, api_per_client=16, hold=HOLD)
    served = await serve(stub.address, tmp / "flood", config=cfg, nofile=f.nofile)
    pid = served.process.pid
    held: list[asyncio.StreamWriter] = []
    try:
        budget = await log_line(served, BUDGET_FITS, BUDGET_OVER)
        f.flood_budget = budget.split("can hold ", 1)[-1]
        if BUDGET_FITS not in budget:
            f.problems.append(f"flood: the limits chosen to fit: {budget or 'nothing logged'}")
        sources = [f"127.0.1.{i}" for i in range(1, f.connections // 16 + 2)]  # 16 per address: the per-client cap
        await hold(served.api_port, f.connections, sources, held, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        await hold(served.dns_port, f.connections, sources, held, b"\x00\x30\x12")
        f.flood_fds_max = fd_count(pid)
        for i in range(f.names):
            reply, took = await ask(served.dns_port, f"flood{i}.exhaust.example.test", tcp=i % 10 == 0)
            f.flood_slowest_dns = max(f.flood_slowest_dns, took)
            f.flood_fds_max = max(f.flood_fds_max, fd_count(pid))
            if reply is None or not reply.answer:
                got = "no reply" if reply is None else dns.rcode.to_text(reply.rcode())
                f.problems.append(f"flood: flood{i}: {got}")
        m = await metric_values(served, f)
        f.flood_api_held = m.get("dnsgate_api_connections", -1.0)
        f.flood_tcp_held = m.get("dnsgate_tcp_connections", -1.0)
        if not 0 < f.flood_api_held <= api or not 0 < f.flood_tcp_held <= tcp:
            f.problems.append(f"flood: {f.flood_api_held} API and {f.flood_tcp_held} DNS TCP connections held "
                              f"(caps {api} and {tcp})")
        if f.flood_fds_max >= f.nofile:
            f.problems.append(f"flood: {f.flood_fds_max} descriptors open: the API took what DNS needs")
    finally:
        for writer in held:
            writer.close()
        await served.stop()


async def run(nofile: int, connections: int, names: int, work: Path) -> Figures:
    """`work`: an existing directory for the config files and both runs' data dirs."""
    descriptors.raise_limit()  # this side holds as many connections
    f = Figures(nofile, connections, names)
    stub = await StubUpstream(default_a="192.0.2.77").start()
    try:
        await exhaust(f, stub, work)
        await flood(f, stub, work)
    finally:
        await stub.stop()
    return f


def seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f} s"


def report(f: Figures) -> str:
    m = f.metrics
    return "\n".join([
        f"exhaust: nofile {f.nofile}, {f.opened} connections opened (API, then DNS TCP): dnsgate at {f.fds_full} "
        f"descriptors; warned at start: {f.warned_at_start}",
        f"  {f.servfail_not_ready} of {f.names + f.names // 4} fresh-name queries SERVFAIL + EDE Not Ready, slowest "
        f"{f.slowest_during * 1000:.1f} ms; {LOCAL_NAME} answered: {f.local_answered}",
        f"  after closing them: every name resolved again in {seconds(f.recovered_in)} (UDP and TCP); /healthz ok "
        f"in {seconds(f.healthz_ok_in)}; log: shortage {f.shortage_logged}x, end {f.recovery_logged}x",
        f"  /metrics: shortages {m.get('dnsgate_descriptor_shortages_total')}, servfail "
        f"{m.get('dnsgate_descriptor_shortage_servfail_total')}, reaped {m.get('dnsgate_forwards_reaped_total')}",
        f"flood: {f.connections} API and {f.connections} DNS TCP connections against caps of {f.flood_api_cap} and "
        f"{f.flood_tcp_cap}: {f.flood_api_held:.0f} and {f.flood_tcp_held:.0f} held, dnsgate at most "
        f"{f.flood_fds_max} of {f.nofile} descriptors (budget {f.flood_budget}); {f.names} fresh names answered, "
        f"slowest {f.flood_slowest_dns * 1000:.1f} ms",
        f"problems: {len(f.problems)}",
    ])


async def main_async(args: argparse.Namespace) -> int:
    print(f"dns.udp_io: {udp_io()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        f = await run(args.nofile, args.connections, args.names, Path(tmp))
    print(report(f))
    for p in f.problems:
        print("  problem:", p)
    return 1 if f.problems else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nofile", type=int, default=1024, help="dnsgate's limit on open files")
    parser.add_argument("--connections", type=int, default=1100, help="idle connections opened")
    parser.add_argument("--names", type=int, default=100, help="fresh names asked meanwhile")
    raise SystemExit(asyncio.run(main_async(parser.parse_args())))


if __name__ == "__main__":
    main()
