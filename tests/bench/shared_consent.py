#!/usr/bin/env python3
"""Shared consent through Redis: how fast a change reaches another instance, and what the Redis
store costs DNS throughput against the SQLite store.

    .venv/bin/python tests/bench/shared_consent.py            # about 4 minutes
    .venv/bin/python tests/bench/shared_consent.py --quick    # about 1 minute

Loopback only, free ports: a redis-server of its own (appendonly, appendfsync always, as
docs/redis.md asks), a local unbound holding tests/bench/run.py's zone as the upstream, dnsgate as real processes.

1. Propagation. Instances A and B share Redis. --changes times (1,000), a client grants or
   withdraws marketing consent through A's API; as soon as A answers 200, B is asked for
   trackcmp.net from that client in a tight loop until B's answer flips (NOERROR <-> NXDOMAIN).
   Reported: p50, p99 and max of the delay after A's answer, and of the whole change (request sent
   -> B answers accordingly). Resolution: one DNS round trip to B (about 0.1 ms).
2. Throughput. One dnsgate on the SQLite store and one on the Redis store run side by side, both
   pinned to CPU 0 (the idle one costs nothing: a follower's XREAD returns once a second).
   dnsperf (CPU 1) sends run.py's `mix` workload (90 % cached names, 10 % gated names from a client
   without consent) to one, then the other, alternating ABBA, --runs times each. Reported: every
   run's q/s and server CPU per query, the mean and spread per store, and the ratio of the means.
   The machine may be shared: runs disturbed by other processes are reported as such.

Writes results.json and summary.md into tests/bench/results/<timestamp>-shared-consent/.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import dns.message

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.bench import run as base  # noqa: E402 -- dnsperf, unbound and /proc helpers of the main benchmark
from tests.support.redis_server import RedisServer, free_port  # noqa: E402

CLIENT = "127.0.0.2"
OTHER_MAX = 10.0  # % of a core that other processes may use during a run before it is measured again
RETRIES = 2
TOKEN = "bench"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


class Dnsgate:
    """One dnsgate process on free ports, pinned to a CPU."""

    def __init__(self, name: str, store: str, upstream: int, workdir: Path, cpu: str, prefix: str) -> None:
        self.name = name
        self.dns, self.api = free_port(), free_port()
        data = workdir / name
        data.mkdir(parents=True)
        config = data / "dnsgate.toml"
        config.write_text(f'[cache]\nmax_entries = 200000\n[api]\nadmin_token = "{TOKEN}"\n'
                          f'[storage]\nstore = "{store}"\nredis_prefix = "{prefix}"\n')
        self.log = open(workdir / f"{name}.log", "w")  # noqa: SIM115 -- open for the process's lifetime
        self.proc = subprocess.Popen(
            ["taskset", "-c", cpu, sys.executable, "-m", "dnsgate", "serve", "--config", str(config),
             "--dns", f"127.0.0.1:{self.dns}", "--api", f"127.0.0.1:{self.api}", "--upstream",
             f"127.0.0.1:{upstream}", "--data-dir", str(data), "--log-level", "warning"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        if not base.wait_ready(self.dns):
            self.stop()
            raise RuntimeError(f"{name} did not start; see {workdir / (name + '.log')}")

    def stop(self) -> None:
        base.stop(self.proc)
        self.log.close()


class Changer:
    """A client that grants and withdraws through one instance's API (one kept-alive connection)."""

    def __init__(self, api: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", api, timeout=5, source_address=(CLIENT, 0))

    def change(self, grant: bool) -> None:
        body = json.dumps({"categories": ["marketing"] if grant else []})
        self.conn.request("PUT", "/v1/consent", body, {"Content-Type": "application/json"})
        response = self.conn.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"PUT /v1/consent answered {response.status}")


class Prober:
    """Asks one instance for the tracker from the client's address; True if it resolves."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((CLIENT, 0))
        self.sock.connect(("127.0.0.1", port))
        self.sock.settimeout(2.0)
        self.query = bytearray(dns.message.make_query("trackcmp.net", "A").to_wire())
        self.id = 0

    def resolves(self) -> bool:
        self.id = (self.id + 1) & 0xFFFF
        self.query[0:2] = self.id.to_bytes(2, "big")
        self.sock.send(self.query)
        while True:
            reply = self.sock.recv(4096)
            if reply[:2] == self.query[:2]:
                return reply[3] & 0x0F == 0


def propagation(a: Dnsgate, b: Dnsgate, changes: int) -> dict[str, Any]:
    changer, prober = Changer(a.api), Prober(b.dns)
    after_ack: list[float] = []
    whole: list[float] = []
    timeouts = 0
    grant = not prober.resolves()
    for _ in range(changes):
        sent = time.perf_counter()
        changer.change(grant)
        acked = time.perf_counter()
        deadline = acked + 5.0
        while prober.resolves() != grant:
            if time.perf_counter() > deadline:
                timeouts += 1
                break
        flipped = time.perf_counter()
        after_ack.append((flipped - acked) * 1000)
        whole.append((flipped - sent) * 1000)
        grant = not grant
    return {"changes": changes, "timeouts": timeouts,
            "after_ack_ms": {"p50": percentile(after_ack, 50), "p99": percentile(after_ack, 99),
                             "max": max(after_ack), "mean": statistics.fmean(after_ack)},
            "whole_ms": {"p50": percentile(whole, 50), "p99": percentile(whole, 99), "max": max(whole),
                         "mean": statistics.fmean(whole)}}


def dnsperf(gate: Dnsgate, gen: Path, out: Path, tag: str, duration: float, clients: int) -> base.Run:
    """One dnsperf run of the `mix` workload against `gate`, with run.py's accounting."""
    cmd = ["taskset", "-c", base.CLIENT_CPU, "dnsperf", "-s", "127.0.0.1", "-p", str(gate.dns), "-d",
           str(gen / "q_mix.txt"), "-c", str(clients), "-T", "1", "-q", "100", "-t", "2", "-l", str(duration)]
    run = base.Run(gate.name, "mix", 0)
    user0, sys0 = base.cpu_seconds(gate.proc.pid)
    child0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0, t0 = base.busy_seconds(), time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    busy1, t1 = base.busy_seconds(), time.monotonic()
    child1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    user1, sys1 = base.cpu_seconds(gate.proc.pid)
    (out / f"dnsperf-{tag}.txt").write_text(" ".join(cmd) + "\n" + proc.stdout + proc.stderr)
    base.parse_dnsperf(proc.stdout, run)
    if not run.completed:
        raise RuntimeError(f"dnsperf answered nothing: {(proc.stdout + proc.stderr)[-300:]}")
    wall = t1 - t0
    server = (user1 - user0) + (sys1 - sys0)
    run.server_cpu_pct = round(100 * server / wall, 1)
    run.cpu_us_per_query = round(1e6 * server / max(1, run.completed), 2)
    client = (child1.ru_utime - child0.ru_utime) + (child1.ru_stime - child0.ru_stime)
    run.dnsperf_cpu_pct = round(100 * client / wall, 1)
    # What neither dnsgate nor dnsperf used: other work on a shared machine.
    run.other_cpu_pct = round(max(0.0, 100 * (busy1 - busy0 - server - client) / wall), 1)
    run.disturbed = run.other_cpu_pct > OTHER_MAX
    return run


def warm(gate: Dnsgate, gen: Path) -> None:
    subprocess.run(["dnsperf", "-s", "127.0.0.1", "-p", str(gate.dns), "-d", str(gen / "q_allowed.txt"), "-n", "1",
                    "-c", "8", "-q", "50", "-t", "2"], capture_output=True, timeout=120)


def throughput(gates: dict[str, Dnsgate], gen: Path, out: Path, runs: int, duration: float,
               clients: int) -> dict[str, Any]:
    for gate in gates.values():
        warm(gate, gen)
    results: dict[str, list[base.Run]] = {name: [] for name in gates}
    order = list(gates)
    for rep in range(runs):
        for name in (order if rep % 2 == 0 else order[::-1]):  # ABBA: drift hits both stores alike
            for attempt in range(RETRIES + 1):
                run = dnsperf(gates[name], gen, out, f"{name}-{rep}-{attempt}", duration, clients)
                if not run.disturbed or attempt == RETRIES:
                    break
                print(f"  {name:6} run {rep + 1}: disturbed ({run.other_cpu_pct}% of a core used by other "
                      "processes), measuring again", flush=True)
                time.sleep(2)
            results[name].append(run)
            print(f"  {name:6} run {rep + 1}: {run.qps:9.0f} q/s  {run.cpu_us_per_query:6.2f} us/q  "
                  f"lost {run.lost_pct:.2f}%  other load {run.other_cpu_pct}% of a core", flush=True)
    summary: dict[str, Any] = {}
    for name, rs in results.items():
        qps = [r.qps for r in rs]
        summary[name] = {"qps": qps, "mean": statistics.fmean(qps), "median": statistics.median(qps),
                         "min": min(qps), "max": max(qps),
                         "stdev_pct": 100 * statistics.pstdev(qps) / statistics.fmean(qps),
                         "cpu_us_per_query": [r.cpu_us_per_query for r in rs],
                         "other_cpu_pct": [r.other_cpu_pct for r in rs],
                         "disturbed": sum(r.disturbed for r in rs)}
    s, r = summary["sqlite"], summary["redis"]
    summary["redis_over_sqlite"] = r["mean"] / s["mean"]
    summary["median_ratio"] = r["median"] / s["median"]  # less moved by a run another job disturbed
    summary["pairwise"] = [rq / sq for rq, sq in zip(r["qps"], s["qps"], strict=True)]
    summary["cpu_ratio"] = statistics.fmean(r["cpu_us_per_query"]) / statistics.fmean(s["cpu_us_per_query"])
    return summary


def report(p: dict[str, Any], t: dict[str, Any], args: argparse.Namespace) -> str:
    a, w = p["after_ack_ms"], p["whole_ms"]
    s, r = t["sqlite"], t["redis"]
    lines = [
        f"Propagation over {p['changes']} changes (A's API -> B's DNS answer), {p['timeouts']} not seen within 5 s:",
        "", "| delay | p50 ms | p99 ms | max ms |", "|---|---|---|---|",
        f"| after A answered 200 | {a['p50']:.2f} | {a['p99']:.2f} | {a['max']:.2f} |",
        f"| whole change (request sent) | {w['p50']:.2f} | {w['p99']:.2f} | {w['max']:.2f} |", "",
        f"Throughput, dnsperf mix, {args.runs} runs of {args.duration:g} s per store, interleaved ABBA:", "",
        "| store | q/s per run | mean | median | spread (min-max) | stdev | dnsgate CPU us/query "
        "| runs still disturbed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, x in (("sqlite", s), ("redis", r)):
        lines.append(f"| {name} | {' / '.join(f'{q:.0f}' for q in x['qps'])} | {x['mean']:.0f} | {x['median']:.0f} | "
                     f"{x['min']:.0f}-{x['max']:.0f} | {x['stdev_pct']:.1f} % | "
                     f"{statistics.fmean(x['cpu_us_per_query']):.2f} | {x['disturbed']} |")
    lines += ["", f"Redis / SQLite: {t['redis_over_sqlite']:.3f} of the mean q/s, "
              f"{t['median_ratio']:.3f} of the median "
              f"(run pairs: {', '.join(f'{x:.3f}' for x in t['pairwise'])}); "
              f"CPU per query {t['cpu_ratio']:.3f}."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--changes", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=6, help="dnsperf runs per store")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per dnsperf run")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="200 changes, 2 runs of 5 s")
    args = parser.parse_args()
    if args.quick:
        args.changes, args.runs, args.duration = 200, 2, 5.0
    for tool in ("dnsperf", "unbound", "taskset", "dig", "redis-server"):
        if not shutil.which(tool) and not os.path.exists(f"/usr/sbin/{tool}"):
            sys.exit(f"{tool} is missing (Debian packages dnsperf, unbound, util-linux, bind9-dnsutils, redis-server)")
    out = ROOT / "tests" / "bench" / "results" / (time.strftime("%Y%m%d-%H%M%S") + "-shared-consent")
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="bench-shared-") as tmp:
        work = Path(tmp)
        base.PORTS["upstream"] = up = free_port()
        base.generate(work / "gen", miss_names=10, reps=1)
        redis = RedisServer(work / "redis-server").start()
        upstream = subprocess.Popen(["taskset", "-c", base.CLIENT_CPU, "unbound", "-d", "-c",
                                     str(work / "gen" / "upstream.conf")],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        gates: list[Dnsgate] = []
        try:
            if not base.wait_ready(up):
                sys.exit("the local upstream did not start")
            a = Dnsgate("a", redis.url, up, work, base.SERVER_CPU, "prop:")
            gates.append(a)
            b = Dnsgate("b", redis.url, up, work, base.CLIENT_CPU, "prop:")
            gates.append(b)
            print(f"propagation: {args.changes} changes through A, watched on B", flush=True)
            p = propagation(a, b, args.changes)
            a.stop()
            b.stop()
            gates.clear()
            stores = {"sqlite": Dnsgate("sqlite", "sqlite", up, work, base.SERVER_CPU, "x:"),
                      "redis": Dnsgate("redis", redis.url, up, work, base.SERVER_CPU, "tput:")}
            gates += stores.values()
            print("throughput: dnsperf mix against the SQLite and the Redis store, alternating", flush=True)
            t = throughput(stores, work / "gen", out, args.runs, args.duration, args.clients)
        finally:
            for gate in gates:
                gate.stop()
            base.stop(upstream)
            redis.stop()
    summary = report(p, t, args)
    (out / "summary.md").write_text(summary + "\n")
    (out / "results.json").write_text(json.dumps({"propagation": p, "throughput": t, "args": vars(args),
                                                  "loadavg": os.getloadavg()}, indent=1, default=str))
    print("\n" + summary + f"\n\nresults: {out}")


if __name__ == "__main__":
    main()
