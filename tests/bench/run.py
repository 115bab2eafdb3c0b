#!/usr/bin/env python3
"""dnsgate against dnsmasq and unbound, measured with dnsperf on loopback.

    ./dev bench              # the full run, about 10 minutes
    ./dev bench --quick      # about 2 minutes: one short run per cell
    ./dev bench --only dnsgate --workloads mix,miss

Every server gates the same names (NXDOMAIN for trackcmp.net and its subdomains, app-us1.com and
its subdomains, subdomains of api-us1.com) and forwards the rest to a local unbound holding the
test zone, so nothing leaves loopback. The servers run side by side, pinned to CPU 0; dnsperf and
the upstream to CPU 1. Each run records queries/s, loss, latency, server CPU time per answered
query (utime+stime from /proc) and RSS; other processes' CPU use is recorded too, and a run
disturbed by them is measured again. A workload's runs alternate between the servers and ratios
are computed within one execution: absolute rates move by tens of percent within minutes on a
shared machine.

Workloads: blocked (a client without consent asks for gated names), allowed (cached names), mix
(90 % allowed, 10 % blocked), miss (every name unique: cache-miss forwarding), tcp (mix over TCP,
one connection per dnsperf client), light (1,000 q/s: service latency); dot and doh (the mix over
DNS over TLS and over HTTPS/2, GET, one connection per dnsperf client: dnsgate only, whose
certificate `dnsgate cert init` makes). dnsgate alone also gets:
churn (mix while a client grants and withdraws consent 100 times/s through the API, and checks each
change reaches the next query; 10 000 other clients hold a choice; run right after each mix cell of
the same server when both are asked for), memory (RSS with
100k cached names and 10k clients holding consent), ready (seconds from start to the ready line).
"dnsgate-workers" (in --only) is dnsgate with dns.workers = --workers, on --workers-cpus, beside
the single-process dnsgate: what worker processes do on this machine, measured in the same minutes.
"dnsgate-asyncio" is dnsgate with dns.udp_io = "asyncio" (one receive and one send call per datagram)
beside dnsgate with --udp-io (default "batched": recvmmsg/sendmmsg): the two UDP paths, interleaved.

Writes results.json and summary.md into tests/bench/results/<timestamp>/ and prints the table.
Needs Debian packages dnsperf, dnsmasq, unbound, bind9-dnsutils (installed with --install when
missing and running as root).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.exception
import dns.message
import dns.query
import dns.rcode

ROOT = Path(__file__).resolve().parents[2]
HZ = os.sysconf("SC_CLK_TCK")
SERVER_CPU, CLIENT_CPU = "0", "1"
PORTS = {"upstream": 25300, "unbound": 25301, "dnsmasq": 25302, "dnsgate": 25320, "dnsgate-api": 25321,
         "echo": 25322, "dnsgate-workers": 25326, "dnsgate-workers-api": 25327, "dnsgate-asyncio": 25328,
         "dnsgate-asyncio-api": 25329, "dnsgate-dot": 25330, "dnsgate-doh": 25331}
ENCRYPTED = {"dot": "dnsgate-dot", "doh": "dnsgate-doh"}  # workloads of dnsgate alone: the transport's port
DNSGATES = ("dnsgate", "dnsgate-workers", "dnsgate-asyncio")
ECHO_WORKLOADS = ("blocked", "allowed", "mix", "light")  # the echo answers UDP only, and forwards nothing
N_HOSTS = 4000  # 8000 RRsets (A + AAAA): fit every cache
GATED_SUFFIXES = ("trackcmp.net", "app-us1.com")
PACKAGES = {"dnsperf": "dnsperf", "dnsmasq": "dnsmasq", "unbound": "unbound", "dig": "bind9-dnsutils",
            "taskset": "util-linux"}


# ------------------------------------------------------------------------------------------------
# Data


def label(rnd: random.Random, k: int) -> str:
    return "".join(rnd.choice(string.ascii_lowercase + string.digits) for _ in range(k))


def generate(gen: Path, miss_names: int, reps: int) -> None:
    """Upstream zone, query files and peer configurations (deterministic: fixed seed)."""
    rnd = random.Random(20261128)
    gen.mkdir(parents=True, exist_ok=True)
    upstream = [
        "server:",
        f"  interface: 127.0.0.1@{PORTS['upstream']}", f"  port: {PORTS['upstream']}",
        "  do-ip6: no", "  do-tcp: yes", '  username: ""', '  chroot: ""', f'  directory: "{gen}"',
        '  pidfile: ""', "  use-syslog: no", '  logfile: ""', "  verbosity: 0", "  num-threads: 1",
        "  so-reuseport: no", '  module-config: "iterator"', "  access-control: 127.0.0.0/8 allow",
        '  local-zone: "." static',  # never recurse anywhere
        '  local-zone: "example.test." static',
        # every name under miss.test exists: cache-miss forwarding gets real answers
        '  local-zone: "miss.test." redirect', '  local-data: "miss.test. 86400 IN A 198.18.255.1"',
        # the gated names exist upstream, so a client with consent gets a real answer
        '  local-zone: "trackcmp.net." redirect', '  local-data: "trackcmp.net. 86400 IN A 198.18.254.1"',
    ]
    for n in range(N_HOSTS):
        upstream.append(f'  local-data: "host{n}.example.test. 86400 IN A 198.18.{n // 256}.{n % 256}"')
        upstream.append(f'  local-data: "host{n}.example.test. 86400 IN AAAA 2001:db8::{n:x}"')
    upstream += ["remote-control:", "  control-enable: no", ""]
    (gen / "upstream.conf").write_text("\n".join(upstream))

    allowed = [f"host{n}.example.test {t}" for n in range(N_HOSTS) for t in ("A", "AAAA")]
    rnd.shuffle(allowed)
    blocked = []
    for i in range(10000):
        t = "A" if i % 2 == 0 else "AAAA"
        r = i % 10
        if r == 0:
            blocked.append(f"trackcmp.net {t}")
        elif r < 4:
            blocked.append(f"{label(rnd, rnd.randint(6, 12))}.trackcmp.net {t}")
        elif r < 6:
            blocked.append(f"{rnd.choice(['prism', 'diffuser-cdn'])}.app-us1.com {t}")
        elif r < 9:
            blocked.append(f"{label(rnd, rnd.randint(6, 12))}.api-us1.com {t}")
        else:
            blocked.append(f"{label(rnd, 4)}.{label(rnd, 8)}.api-us1.com {t}")
    rnd.shuffle(blocked)
    mix = [rnd.choice(allowed) for _ in range(18000)] + [rnd.choice(blocked) for _ in range(2000)]
    rnd.shuffle(mix)
    for name, lines in (("allowed", allowed), ("blocked", blocked), ("mix", mix)):
        (gen / f"q_{name}.txt").write_text("\n".join(lines) + "\n")
    # A file of names per repetition: a second run through the first's names would be answered
    # from the cache the first filled (every server's r2 of "miss" was half cache hits).
    for r in range(1, reps + 1):
        (gen / f"q_miss{r}.txt").write_text("".join(f"u{i}.r{r}{label(rnd, 6)}.miss.test A\n"
                                                    for i in range(miss_names)))

    (gen / "dnsmasq.conf").write_text("\n".join([
        f"port={PORTS['dnsmasq']}", "listen-address=127.0.0.1", "bind-interfaces", "no-resolv", "no-hosts",
        "no-poll", "user=root", f"server=127.0.0.1#{PORTS['upstream']}", "cache-size=150000",
        "dns-forward-max=1000", f"pid-file={gen}/dnsmasq.pid",
        # an address with no IP answers NXDOMAIN, like dnsgate's default sinkhole
        "address=/trackcmp.net/", "address=/app-us1.com/", "address=/api-us1.com/", "",
    ]))
    (gen / "unbound.conf").write_text("\n".join([
        "server:", f"  interface: 127.0.0.1@{PORTS['unbound']}", f"  port: {PORTS['unbound']}", "  do-ip6: no",
        '  username: ""', '  chroot: ""', f'  directory: "{gen}"', '  pidfile: ""', "  use-syslog: no",
        '  logfile: ""', "  verbosity: 0", "  num-threads: 1", "  so-reuseport: no", "  msg-cache-size: 64m",
        "  rrset-cache-size: 128m", '  module-config: "iterator"', "  do-not-query-localhost: no",
        "  access-control: 127.0.0.0/8 allow", '  local-zone: "test." nodefault',
        '  local-zone: "trackcmp.net." always_nxdomain', '  local-zone: "app-us1.com." always_nxdomain',
        '  local-zone: "api-us1.com." always_nxdomain',
        "forward-zone:", '  name: "."', f"  forward-addr: 127.0.0.1@{PORTS['upstream']}",
        "remote-control:", "  control-enable: no", "",
    ]))


# ------------------------------------------------------------------------------------------------
# Processes and /proc accounting


def proc_tree(pid: int) -> list[int]:
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(x) for x in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
        except OSError:
            pass
    return seen


def cpu_seconds(pid: int) -> tuple[float, float]:
    user = system = 0
    for p in proc_tree(pid):
        try:
            rest = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            user += int(rest[11])
            system += int(rest[12])
        except (OSError, IndexError):
            pass
    return user / HZ, system / HZ


def rss_mib(pid: int) -> float:
    total = 0
    for p in proc_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return round(total / 1024, 1)


def busy_seconds() -> float:
    """Busy CPU seconds of the whole machine so far (all CPUs)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / HZ


def port_free(port: int) -> bool:
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def dig(port: int, name: str, rdtype: str = "A", *extra: str) -> str:
    return subprocess.run(["dig", "@127.0.0.1", "-p", str(port), name, rdtype, "+time=1", "+tries=1", *extra],
                          capture_output=True, text=True).stdout


def wait_ready(port: int, timeout: float = 20) -> bool:
    """Poll every 10 ms until host1.example.test gets NOERROR (a dig per 0.1 s overstated start-up)."""
    query = dns.message.make_query("host1.example.test", "A")
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if dns.query.udp(query, "127.0.0.1", port=port, timeout=0.01).rcode() == dns.rcode.NOERROR:
                return True
        except (OSError, dns.exception.DNSException):
            pass
        time.sleep(0.01)
    return False


def wait_idle(pid: int, limit: float = 15) -> None:
    """Until the server uses under 5 % of a core (half-second samples), at most `limit` seconds."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        before = sum(cpu_seconds(pid))
        time.sleep(0.5)
        if sum(cpu_seconds(pid)) - before < 0.025:
            return


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------------------------
# dnsperf


@dataclass
class Run:
    server: str
    workload: str
    rep: int
    qps: float = 0.0
    sent: int = 0
    completed: int = 0
    lost_pct: float = 0.0
    lat_avg_ms: float = 0.0
    lat_max_ms: float = 0.0
    lat_sd_ms: float = 0.0
    rcodes: str = ""
    server_cpu_pct: float = 0.0
    cpu_us_per_query: float = 0.0
    dnsperf_cpu_pct: float = 0.0
    other_cpu_pct: float = 0.0
    disturbed: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def parse_dnsperf(text: str, run: Run) -> None:
    def grab(pattern: str) -> float:
        m = re.search(pattern, text)
        return float(m.group(1)) if m else 0.0

    run.sent = int(grab(r"Queries sent:\s+(\d+)"))
    run.completed = int(grab(r"Queries completed:\s+(\d+)"))
    run.lost_pct = grab(r"Queries lost:\s+\d+ \(([\d.]+)%\)")
    run.qps = grab(r"Queries per second:\s+([\d.]+)")
    run.lat_avg_ms = round(grab(r"Average Latency \(s\):\s+([\d.]+)") * 1000, 3)
    run.lat_max_ms = round(grab(r"Average Latency \(s\):.*max ([\d.]+)") * 1000, 3)
    run.lat_sd_ms = round(grab(r"Latency StdDev \(s\):\s+([\d.]+)") * 1000, 3)
    m = re.search(r"Response codes:\s+(.*)", text)
    run.rcodes = m.group(1).strip() if m else ""
    # Over TCP, DoT and DoH: a connection the server closed (dns.tcp_max_queries_per_connection) is
    # opened again, and the queries dnsperf had sent that the server never read are lost, each holding
    # one of its outstanding slots until the timeout (-t).
    m = re.search(r"Reconnections:\s+(\d+)", text)
    if m:
        run.extra["reconnections"] = int(m.group(1))


@dataclass(frozen=True)
class Started:
    name: str
    pid: int
    port: int


class Bench:
    def __init__(self, args: argparse.Namespace, gen: Path, out: Path) -> None:
        self.args = args
        self.gen = gen
        self.out = out
        self.runs: list[Run] = []
        self.meta: dict[str, dict[str, Any]] = {}
        self.filled: set[str] = set()  # servers given the churn's other clients' choices
        (out / "raw").mkdir(parents=True, exist_ok=True)

    def log(self, message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        print(line, flush=True)
        with open(self.out / "run.log", "a") as f:
            f.write(line + "\n")

    def dnsperf(self, server: str, pid: int, port: int, workload: str, rep: int, *, duration: float,
                q: int = 100, qps: int | None = None, tcp: bool = False, queries: int | None = None) -> Run:
        data = {"tcp": "mix", "churn": "mix", "light": "allowed", "miss": f"miss{rep}", "dot": "mix",
                "doh": "mix"}.get(workload, workload)
        if workload in ENCRYPTED:
            port = PORTS[ENCRYPTED[workload]]
        cmd = ["taskset", "-c", CLIENT_CPU, "dnsperf", "-s", "127.0.0.1", "-p", str(port),
               "-d", str(self.gen / f"q_{data}.txt"), "-c", str(self.args.clients), "-T", "1", "-q", str(q),
               "-t", "2"]
        cmd += ["-n", str(queries)] if queries else ["-l", str(duration)]
        if qps:
            cmd += ["-Q", str(qps)]
        if tcp:
            cmd += ["-m", "tcp"]
        elif workload == "dot":
            cmd += ["-m", "dot"]
        elif workload == "doh":
            cmd += ["-m", "doh", "-O", f"doh-uri=https://127.0.0.1:{port}/dns-query"]
        run = Run(server, workload, rep)
        user0, sys0 = cpu_seconds(pid)
        child0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        busy0, t0 = busy_seconds(), time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
        busy1, t1 = busy_seconds(), time.monotonic()
        user1, sys1 = cpu_seconds(pid)
        child1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        (self.out / "raw" / f"{server}_{workload}_{rep}.txt").write_text(" ".join(cmd) + "\n" + proc.stdout
                                                                         + proc.stderr)
        parse_dnsperf(proc.stdout, run)
        if not run.completed:
            raise RuntimeError(f"dnsperf answered nothing: {(proc.stdout + proc.stderr)[-300:]}")
        wall = t1 - t0
        srv = (user1 - user0) + (sys1 - sys0)
        cli = (child1.ru_utime - child0.ru_utime) + (child1.ru_stime - child0.ru_stime)
        run.server_cpu_pct = round(100 * srv / wall, 1)
        run.cpu_us_per_query = round(1e6 * srv / max(1, run.completed), 2)
        run.dnsperf_cpu_pct = round(100 * cli / wall, 1)
        # What neither the server nor dnsperf used; the upstream (idle once warm) counts here too.
        run.other_cpu_pct = round(max(0.0, 100 * ((busy1 - busy0) - srv - cli) / wall), 1)
        run.disturbed = run.other_cpu_pct > self.args.other_max and workload not in ("miss",)
        return run

    def measure(self, server: str, pid: int, port: int, workload: str, rep: int, **kw: Any) -> Run:
        for attempt in range(self.args.retries + 1):
            run = self.dnsperf(server, pid, port, workload, rep, **kw)
            if not run.disturbed or attempt == self.args.retries:
                break
            self.log(f"{server} {workload} r{rep}: disturbed (other {run.other_cpu_pct}%), measuring again")
            self.wait_quiet()
        self.runs.append(run)
        self.log(f"{server:8} {workload:8} r{rep}: {run.qps:9.0f} q/s  lost {run.lost_pct:5.2f}%  "
                 f"avg {run.lat_avg_ms:.3f} ms  max {run.lat_max_ms:.3f} ms  {run.cpu_us_per_query:5.2f} us/q  "
                 f"srv {run.server_cpu_pct}%  perf {run.dnsperf_cpu_pct}%  other {run.other_cpu_pct}%  {run.rcodes}"
                 + (f"  reconnections {run.extra['reconnections']}" if "reconnections" in run.extra else ""))
        return run

    def wait_quiet(self, limit: float = 30) -> None:
        end = time.monotonic() + limit
        while time.monotonic() < end:
            b0 = busy_seconds()
            time.sleep(1)
            load = 100 * (busy_seconds() - b0)
            if load < self.args.other_max:
                return
            self.log(f"machine busy ({load:.0f}% of a core used by other processes), waiting")

    # --------------------------------------------------------------------------------------------

    def server_command(self, name: str, data_dir: Path) -> list[str]:
        if name == "dnsmasq":
            return ["dnsmasq", "-k", "-C", str(self.gen / "dnsmasq.conf")]
        if name == "unbound":
            return ["unbound", "-d", "-c", str(self.gen / "unbound.conf")]
        if name == "echo":
            return [sys.executable, "-m", "tests.bench.echo", "--port", str(PORTS["echo"])]
        config = data_dir / "dnsgate.toml"
        encrypted = ""
        if name == "dnsgate":
            from dnsgate.cli.cert import init

            tls = init(data_dir / "tls", [], ["127.0.0.1"])
            encrypted = (f'tls_listen = ["127.0.0.1:{PORTS["dnsgate-dot"]}"]\n'
                         f'https_listen = ["127.0.0.1:{PORTS["dnsgate-doh"]}"]\n'
                         f'tls_cert = "{tls.cert_file}"\ntls_key = "{tls.key_file}"\n')
        # one [dns] table: TOML refuses a table declared twice
        config.write_text(f'[dns]\nudp_io = "{"asyncio" if name == "dnsgate-asyncio" else self.args.udp_io}"\n'
                          f'{encrypted}[cache]\nmax_entries = {self.args.cache_entries}\n'
                          f'[api]\nadmin_token = "bench"\nconsent_changes_per_minute = 0\n'
                          f'[storage]\nsynchronous = "{self.args.synchronous}"\n'
                          f'[querylog]\nmode = "{self.args.querylog}"\n')
        return [sys.executable, "-m", "dnsgate", "serve", "--config", str(config),
                "--dns", f"127.0.0.1:{PORTS[name]}", "--api", f"127.0.0.1:{PORTS[name + '-api']}",
                "--upstream", f"127.0.0.1:{PORTS['upstream']}", "--data-dir", str(data_dir), "--log-level", "warning",
                *(["--workers", str(self.args.workers)] if name == "dnsgate-workers" else [])]

    def start(self, name: str, stack: contextlib.ExitStack) -> Started | None:
        """Start one server (stopped when `stack` closes), wait until it answers, check its answers
        and warm its cache."""
        port = PORTS[name]
        if not port_free(port):
            self.log(f"{name}: port {port} busy, skipped")
            return None
        self.wait_quiet()
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix=f"bench-{name}-"))
        log_file = stack.enter_context((self.out / f"{name}.log").open("w"))
        started = time.monotonic()
        cpus = self.args.workers_cpus if name == "dnsgate-workers" else SERVER_CPU
        proc = subprocess.Popen(["taskset", "-c", cpus, *self.server_command(name, Path(tmp))],
                                stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT)
        stack.callback(stop, proc)
        if not wait_ready(port):
            self.log(f"{name}: not ready, skipped")
            return None
        meta = self.meta.setdefault(name, {})
        meta["ready_s"] = round(time.monotonic() - started, 2)
        meta["check"] = {q: self.check(port, q) for q in
                         ("host7.example.test A", "host7.example.test AAAA", "trackcmp.net A",
                          "x.trackcmp.net AAAA", "prism.app-us1.com A", "ab.cd.api-us1.com A",
                          "u1.abc.miss.test A")}
        self.log(f"{name}: up in {meta['ready_s']} s; {meta['check']}")
        self.dnsperf(name, proc.pid, port, "allowed", 0, duration=0, q=50, queries=1)  # warm the cache
        return Started(name, proc.pid, port)

    def bench_servers(self, names: list[str]) -> None:
        """Every server runs at once (idle ones cost nothing), and each cell of a workload runs on one
        server after the other: the VM's speed drifts by tens of percent within minutes, so peers
        measured back to back compare, peers measured minutes apart may not."""
        # churn is judged against mix: with both, each churn cell runs right after the same server's
        # mix cell, both with the other clients' choices held, so the pair shares the VM's minute
        # (its speed drifts by tens of percent between minutes) and the server's state.
        paired = "mix" in self.args.workloads and "churn" in self.args.workloads
        with contextlib.ExitStack() as stack:
            servers = [s for s in (self.start(name, stack) for name in names) if s is not None]
            for workload in self.args.workloads:
                if workload in ("light", "memory") or (paired and workload == "churn"):
                    continue  # light runs last (after the cache is warm again); memory is dnsgate's
                for rep in range(1, self.args.reps + 1):
                    for s in servers:
                        if ((workload == "churn" and s.name not in DNSGATES)
                                or (workload in ENCRYPTED and s.name != "dnsgate")
                                or (s.name == "echo" and workload not in ECHO_WORKLOADS)):
                            continue
                        with_churn = paired and workload == "mix" and s.name in DNSGATES
                        if with_churn:
                            self.fill(s.name, s.pid)
                        self.cell(s, workload, rep)
                        if with_churn:
                            self.cell(s, "churn", rep)
            if "light" in self.args.workloads:
                for rep in range(1, self.args.reps + 1):
                    for s in servers:
                        self.measure(s.name, s.pid, s.port, "light", rep, duration=self.args.light_dur, qps=1000)
            for s in servers:
                self.meta[s.name]["rss_mib"] = rss_mib(s.pid)
                self.log(f"{s.name}: RSS {self.meta[s.name]['rss_mib']} MiB after the runs")
                if s.name == "dnsgate" and "memory" in self.args.workloads:
                    self.memory(s.pid, s.port)

    def cell(self, s: Started, workload: str, rep: int) -> None:
        try:
            if workload == "churn":
                self.churn(s.name, s.pid, s.port, rep)
            else:
                self.measure(s.name, s.pid, s.port, workload, rep, duration=self.args.dur, tcp=workload == "tcp")
        except RuntimeError as exc:  # one failed cell (a peer that stopped answering)
            self.log(f"{s.name} {workload} r{rep}: failed, left out: {exc}")
        if workload == "miss":  # refill: the miss run evicts nothing we use, but be sure
            self.dnsperf(s.name, s.pid, s.port, "allowed", 0, duration=0, q=50, queries=1)

    def check(self, port: int, query: str) -> str:
        name, rdtype = query.split()
        out = dig(port, name, rdtype)
        status = re.search(r"status: (\w+)", out)
        answers = re.findall(rf"^{re.escape(name)}\.\s+\d+\s+IN\s+\w+\s+(\S+)", out, re.M)
        return f"{status.group(1) if status else 'timeout'} {','.join(answers)}".strip()

    # dnsgate-only workloads -----------------------------------------------------------------------

    def churn(self, name: str, pid: int, port: int, rep: int) -> None:
        """The mix workload while 127.0.0.2 grants and withdraws 100 times a second through the API; after
        each change a query from 127.0.0.2 must see it (counted as stale if it does not)."""
        stats = {"changes": 0, "stale": 0, "errors": 0}
        done = threading.Event()

        def changer() -> None:
            os.sched_setaffinity(0, {int(CLIENT_CPU)})  # this thread only: keep CPU 0 for the server
            # Raw bytes on a keep-alive connection from 127.0.0.2 (as a consent page in a browser would
            # use) and on a UDP socket: this thread shares dnsperf's CPU, and http.client with dnspython
            # took ~1.2 ms of it per change, which slowed dnsperf rather than measuring the server.
            api = socket.create_connection(("127.0.0.1", PORTS[name + "-api"]), timeout=2,
                                           source_address=("127.0.0.2", 0))
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind(("127.0.0.2", 0))
            udp.connect(("127.0.0.1", port))
            udp.settimeout(2)
            requests = [put_consent(PORTS[name + "-api"], categories) for categories in ([], ["marketing"])]
            pending = b""
            granted = False
            next_at = time.monotonic()
            while not done.is_set():
                granted = not granted
                try:
                    api.sendall(requests[granted])
                    status, pending = read_response(api, pending)
                    if status != 200:  # (the config lifts the per-client limit on changes)
                        raise RuntimeError(f"PUT /v1/consent answered {status}")
                    qid = stats["changes"] & 0xFFFF
                    udp.send(qid.to_bytes(2, "big") + TRACKCMP_QUERY)
                    reply = udp.recv(512)
                    while reply[:2] != qid.to_bytes(2, "big"):  # (a late reply to an earlier query)
                        reply = udp.recv(512)
                    blocked = reply[3] & 0xF == dns.rcode.NXDOMAIN
                    if blocked == granted:
                        stats["stale"] += 1
                    stats["changes"] += 1
                except Exception:
                    stats["errors"] += 1
                    api.close()
                    pending = b""
                    with contextlib.suppress(OSError):
                        api = socket.create_connection(("127.0.0.1", PORTS[name + "-api"]), timeout=2,
                                                       source_address=("127.0.0.2", 0))
                next_at += 0.01
                time.sleep(max(0.0, next_at - time.monotonic()))
            stats["changer_cpu_ms"] = round(1000 * time.thread_time())  # (this thread's: dnsperf's CPU too)
            api.close()
            udp.close()

        self.fill(name, pid)
        self.wait_quiet()
        thread = threading.Thread(target=changer, daemon=True)
        started = time.monotonic()
        thread.start()
        try:  # no re-measuring here: the changes are part of the load
            run = self.dnsperf(name, pid, port, "churn", rep, duration=self.args.dur)
        finally:
            done.set()
            thread.join()
        elapsed = time.monotonic() - started
        # The changer is client load beside dnsperf (on its core), not another process's: its CPU is
        # shown on its own and taken out of "other".
        changer_pct = round(100 * stats.get("changer_cpu_ms", 0) / 1000 / elapsed, 1)
        run.other_cpu_pct = round(max(0.0, run.other_cpu_pct - changer_pct), 1)
        run.disturbed = run.other_cpu_pct > self.args.other_max
        run.extra.update(stats, changes_per_s=round(stats["changes"] / elapsed, 1), changer_cpu_pct=changer_pct)
        self.runs.append(run)
        self.log(f"{name}  churn    r{rep}: {run.qps:9.0f} q/s  lost {run.lost_pct:5.2f}%  "
                 f"{run.cpu_us_per_query:5.2f} us/q  srv {run.server_cpu_pct}%  perf {run.dnsperf_cpu_pct}%  "
                 f"changer {changer_pct}%  other {run.other_cpu_pct}%  {run.extra}")

    def fill(self, name: str, pid: int) -> None:
        """Once per server: the churn's other clients holding a choice (a change must not cost more
        with many of them)."""
        if self.args.churn_clients and name not in self.filled:
            give_choices(self.args.churn_clients, PORTS[name + "-api"])
            wait_idle(pid)  # (the consent store checkpoints its log after those writes)
            self.filled.add(name)

    def memory(self, pid: int, port: int) -> None:
        """RSS with 100k cached names and 10k clients holding consent."""
        api = f"http://127.0.0.1:{PORTS['dnsgate-api']}"
        give_choices(10000, PORTS["dnsgate-api"])
        names = self.gen / "q_memory.txt"
        names.write_text("".join(f"m{i}.miss.test A\n" for i in range(100_000)))
        subprocess.run(["taskset", "-c", CLIENT_CPU, "dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(names),
                        "-n", "1", "-c", "8", "-q", "50", "-t", "2"], capture_output=True, timeout=300)
        health = json.loads(urllib.request.urlopen(f"{api}/healthz", timeout=5).read())
        self.meta["dnsgate"]["memory"] = {"rss_mib": rss_mib(pid), "cache_entries": health.get("cache_entries"),
                                          "clients_with_consent": health.get("clients_with_consent")}
        self.log(f"dnsgate memory: {self.meta['dnsgate']['memory']}")


def give_choices(n: int, api_port: int) -> None:
    """Clients 10.0.0.0 up to 10.x.y.z each grant marketing, through dnsgate's admin API."""
    conn = http.client.HTTPConnection("127.0.0.1", api_port, timeout=5)
    try:
        for i in range(n):
            client = f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}"
            conn.request("PUT", f"/v1/clients/{client}/consent", body=json.dumps({"categories": ["marketing"]}),
                         headers={"Content-Type": "application/json", "Authorization": "Bearer bench"})
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"PUT /v1/clients/{client}/consent answered {response.status}")
    finally:
        conn.close()


# A query for trackcmp.net A (recursion desired) without its 2-byte ID.
TRACKCMP_QUERY = bytes.fromhex("0100 0001 0000 0000 0000") + b"\x08trackcmp\x03net\x00\x00\x01\x00\x01"


def put_consent(api_port: int, categories: list[str]) -> bytes:
    """A client's own PUT /v1/consent, as bytes on the wire."""
    body = json.dumps({"categories": categories}).encode()
    return (f"PUT /v1/consent HTTP/1.1\r\nHost: 127.0.0.1:{api_port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def read_response(sock: socket.socket, pending: bytes) -> tuple[int, bytes]:
    """One HTTP/1.1 response with a Content-Length read from `sock` (after `pending`, bytes already
    received): its status and what came after it."""
    while b"\r\n\r\n" not in pending:
        pending += recv_some(sock)
    head, _, rest = pending.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next(int(line.split(":", 1)[1]) for line in lines[1:] if line.lower().startswith("content-length:"))
    while len(rest) < length:
        rest += recv_some(sock)
    return int(lines[0].split()[1]), rest[length:]


def recv_some(sock: socket.socket) -> bytes:
    data = sock.recv(65536)
    if not data:
        raise ConnectionError("the API closed the connection")
    return data


# ------------------------------------------------------------------------------------------------
# Report


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def summarize(bench: Bench) -> str:
    cells: dict[tuple[str, str], list[Run]] = {}
    for run in bench.runs:
        cells.setdefault((run.server, run.workload), []).append(run)
    servers = [s for s in bench.args.only if any(k[0] == s for k in cells)]
    workloads = [w for w in bench.args.workloads if any(k[1] == w for k in cells)]
    lines = ["| server | workload | q/s (mean of runs) | lost % (max) | avg latency ms | max latency ms "
             "| server CPU us/query | RSS MiB |", "|---|---|---|---|---|---|---|---|"]
    for server in servers:
        for workload in workloads:
            runs = cells.get((server, workload))
            if not runs:
                continue
            lines.append(
                f"| {server} | {workload} | {mean([r.qps for r in runs]):.0f} "
                f"({' / '.join(f'{r.qps:.0f}' for r in runs)}) | {max(r.lost_pct for r in runs):.2f} | "
                f"{mean([r.lat_avg_ms for r in runs]):.3f} | {max(r.lat_max_ms for r in runs):.3f} | "
                f"{mean([r.cpu_us_per_query for r in runs]):.2f} | {bench.meta.get(server, {}).get('rss_mib', '')} |")
    for gate in (g for g in DNSGATES if g in servers):
        peers = [p for p in ("dnsmasq", "unbound", "echo", "dnsgate", "dnsgate-asyncio") if p in servers and p != gate]
        lines += ["", "| workload | " + " | ".join(f"{gate} q/s x {p}" for p in peers) + " | "
                  + " | ".join(f"CPU us/query x {p}" for p in peers) + " |", "|---" * (1 + 2 * len(peers)) + "|"]
        for workload in workloads:
            mine = cells.get((gate, workload))
            if not mine:
                continue
            row = [workload]
            for metric in ("qps", "cpu_us_per_query"):
                for peer in peers:
                    theirs = cells.get((peer, workload))
                    ours = mean([getattr(r, metric) for r in mine])
                    their_mean = mean([getattr(r, metric) for r in theirs or []])
                    row.append(f"{ours / their_mean:.2f}" if their_mean else "-")
            lines.append("| " + " | ".join(row) + " |")
    for gate in DNSGATES:
        meta = bench.meta.get(gate, {})
        if meta:
            lines += ["", f"{gate}: ready in {meta.get('ready_s')} s; memory {meta.get('memory', '-')}"]
            churn = cells.get((gate, "churn"))
            if churn:
                lines.append(f"{gate} churn: " + "; ".join(json.dumps(r.extra) for r in churn))
    return "\n".join(lines)


def ensure_tools(install: bool) -> None:
    missing = [tool for tool in PACKAGES if shutil.which(tool) is None]
    if not missing:
        return
    packages = sorted({PACKAGES[t] for t in missing})
    if not install or os.geteuid() != 0 or shutil.which("apt-get") is None:
        sys.exit(f"missing {', '.join(missing)}: apt-get install {' '.join(packages)} (or run with --install as root)")
    subprocess.run(["apt-get", "install", "-y", "-q", *packages], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short run per cell (about 2 minutes)")
    parser.add_argument("--only", default="dnsmasq,unbound,dnsgate,echo", help="servers, comma-separated")
    parser.add_argument("--workloads", default="blocked,allowed,mix,tcp,dot,doh,miss,light,churn,memory",
                        help="(miss comes late: dnsmasq stalls after it)")
    parser.add_argument("--dur", type=float, default=7.0, help="seconds per load run")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--light-dur", type=float, default=3.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--cache-entries", type=int, default=200_000)
    parser.add_argument("--churn-clients", type=int, default=10_000, help="other clients holding a choice in churn")
    parser.add_argument("--other-max", type=float, default=10.0, help="%% of a core other processes may use")
    parser.add_argument("--retries", type=int, default=2)
    parser.add_argument("--synchronous", choices=["full", "normal"], default="full",
                        help="dnsgate's storage.synchronous (what a consent change costs)")
    parser.add_argument("--querylog", choices=["full", "anonymous", "gated-only", "off"], default="gated-only",
                        help="dnsgate's query log mode (the default's: every gated query is logged)")
    parser.add_argument("--udp-io", choices=["batched", "asyncio"], default="batched",
                        help="dns.udp_io of the servers dnsgate and dnsgate-workers (dnsgate-asyncio: always asyncio)")
    parser.add_argument("--workers", type=int, default=2, help="dns.workers of the server dnsgate-workers")
    parser.add_argument("--workers-cpus", default=SERVER_CPU,
                        help=f"CPUs dnsgate-workers may use (the others get {SERVER_CPU}, dnsperf {CLIENT_CPU}); "
                             f"{SERVER_CPU},{CLIENT_CPU} lets its processes share dnsperf's core")
    parser.add_argument("--install", action="store_true", help="apt-get install missing tools (root)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.dur, args.reps, args.light_dur, args.retries = 3.0, 1, 2.0, 1
    args.only = [s for s in args.only.split(",") if s]
    args.workloads = [w for w in args.workloads.split(",") if w]
    ensure_tools(args.install)
    # Start-up as installed: pip compiles an installed package's bytecode; a checkout may have none
    # (PYTHONDONTWRITEBYTECODE), and compiling ~50 modules at every start adds ~0.2 s to "ready".
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "dnsgate")], check=True)
    out = args.out or ROOT / "tests" / "bench" / "results" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    gen = out / "gen"
    generate(gen, miss_names=int(150_000 * args.dur) + 10, reps=args.reps)
    bench = Bench(args, gen, out)
    if not port_free(PORTS["upstream"]):
        sys.exit(f"port {PORTS['upstream']} (upstream) is busy")
    with open(out / "upstream.log", "w") as upstream_log:
        run_all(bench, args, gen, out, upstream_log)


def version(cmd: list[str]) -> str:
    lines = subprocess.run(cmd, capture_output=True, text=True).stdout.splitlines()
    return lines[0] if lines else "?"


def run_all(bench: Bench, args: argparse.Namespace, gen: Path, out: Path, upstream_log: Any) -> None:
    upstream = subprocess.Popen(["taskset", "-c", CLIENT_CPU, "unbound", "-d", "-c", str(gen / "upstream.conf")],
                                stdout=upstream_log, stderr=subprocess.STDOUT)
    try:
        if not wait_ready(PORTS["upstream"]):
            sys.exit("the local upstream did not start")
        env = {"lscpu": subprocess.run(["lscpu"], capture_output=True, text=True).stdout,
               "kernel": os.uname().release, "python": sys.version.split()[0],
               "dnsmasq": version(["dnsmasq", "--version"]), "unbound": version(["unbound", "-V"]),
               "git": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True).stdout.strip()}
        bench.meta["env"] = env
        bench.bench_servers(args.only)
    finally:
        stop(upstream)
        summary = summarize(bench)
        (out / "summary.md").write_text(summary + "\n")
        (out / "results.json").write_text(json.dumps({"runs": [r.__dict__ for r in bench.runs], "meta": bench.meta,
                                                      "args": {k: str(v) for k, v in vars(args).items()}},
                                                     indent=1))
        shutil.rmtree(gen, ignore_errors=True)
        print("\n" + summary)
        print(f"\nresults: {out}")


if __name__ == "__main__":
    main()
