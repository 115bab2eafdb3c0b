"""Instructions per cache miss in the real server, counted by valgrind's callgrind: independent of
the machine's load, so before/after comparisons hold on a shared machine where q/s and CPU time
move by tens of percent.

    .venv/bin/python -m tests.bench.miss_instructions [--n 3000] [--udp-io batched] [--syscalls]

dnsgate (`dnsgate serve`, as ./dev bench configures it) runs under callgrind with instrumentation
off; an upstream unbound answers every name under miss.test. After a warm-up, instrumentation is
switched on, dnsperf (8 clients, 100 queries outstanding: the server saturated, as in the miss
workload) asks `n` names nobody asked before, and instrumentation goes off again once the last
is answered. The figure is the instructions of the dnsgate process in that interval (user space:
Python, libc, uvloop; the kernel's work is not counted) divided by `n`. Needs valgrind, unbound and
dnsperf. Uses ports 26400-26401. With --syscalls, dnsgate runs without valgrind and strace counts
its system calls per miss in the same interval instead (also independent of the load: the kernel's
per-call cost is what batching saves beyond the instructions).
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dns.message
import dns.query
import dns.rcode

UPSTREAM, DNS = 26400, 26401
ROOT = Path(__file__).resolve().parents[2]


def names(path: Path, prefix: str, n: int) -> Path:
    path.write_text("".join(f"u{i}.{prefix}.miss.test A\n" for i in range(n)))
    return path


def ready(port: int, timeout: float) -> bool:
    end = time.monotonic() + timeout
    query = dns.message.make_query("ready.miss.test", "A")
    while time.monotonic() < end:
        try:
            if dns.query.udp(query, "127.0.0.1", port=port, timeout=1).rcode() == dns.rcode.NOERROR:
                return True
        except Exception:
            time.sleep(0.2)
    return False


def dnsperf(path: Path) -> str:
    out = subprocess.run(["dnsperf", "-s", "127.0.0.1", "-p", str(DNS), "-d", str(path), "-n", "1", "-c", "8",
                          "-q", "100", "-t", "60"], capture_output=True, text=True, timeout=900)
    return out.stdout


def control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True, timeout=120)


def syscalls(pid: int, gen: Path, queries: Path, n: int) -> None:
    out = gen / "strace.txt"
    tracer = subprocess.Popen(["strace", "-f", "-c", "-o", str(out), "-p", str(pid)], stderr=subprocess.DEVNULL)
    time.sleep(1)  # (attached)
    text = dnsperf(queries)
    tracer.send_signal(signal.SIGINT)
    tracer.wait(30)
    completed = int(re.search(r"Queries completed:\s+(\d+)", text).group(1))  # type: ignore[union-attr]
    calls = {}
    for line in out.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[-1].isidentifier() and fields[3].isdigit() and fields[-1] != "total":
            calls[fields[-1]] = int(fields[3])
    total = sum(calls.values())
    print(f"{total / n:.2f} system calls per miss ({completed} answered): "
          + ", ".join(f"{name} {count / n:.2f}" for name, count in sorted(calls.items(), key=lambda c: -c[1])[:12]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=3000, help="misses counted")
    parser.add_argument("--warm", type=int, default=1000, help="misses before counting")
    parser.add_argument("--udp-io", default="batched")
    parser.add_argument("--keep", action="store_true", help="keep the callgrind output (its path is printed)")
    parser.add_argument("--syscalls", action="store_true", help="count system calls (strace) instead")
    args = parser.parse_args()
    for tool in ("strace" if args.syscalls else "valgrind", "unbound", "dnsperf"):
        if shutil.which(tool) is None:
            sys.exit(f"needs {tool}")
    with tempfile.TemporaryDirectory(prefix="miss-instr-") as tmp:
        gen = Path(tmp)
        (gen / "upstream.conf").write_text("\n".join([
            "server:", f"  interface: 127.0.0.1@{UPSTREAM}", f"  port: {UPSTREAM}", "  do-ip6: no",
            '  username: ""', '  chroot: ""', f'  directory: "{gen}"', '  pidfile: ""', "  use-syslog: no",
            '  logfile: ""', "  verbosity: 0", "  num-threads: 1", "  so-reuseport: no",
            '  module-config: "iterator"', "  access-control: 127.0.0.0/8 allow", '  local-zone: "." static',
            '  local-zone: "miss.test." redirect', '  local-data: "miss.test. 86400 IN A 198.18.255.1"',
            "remote-control:", "  control-enable: no", ""]))
        (gen / "dnsgate.toml").write_text(
            '[api]\nadmin_token = "bench"\n[querylog]\nmode = "gated-only"\n'
            f'[dns]\nudp_io = "{args.udp_io}"\n')
        out_file = gen / "callgrind.out"
        upstream = subprocess.Popen(["unbound", "-d", "-c", str(gen / "upstream.conf")])
        wrapper: list[str] = [] if args.syscalls else ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                                                  f"--callgrind-out-file={out_file}"]
        server = subprocess.Popen(
            [*wrapper, sys.executable, "-m", "dnsgate", "serve", "--config", str(gen / "dnsgate.toml"),
             "--dns", f"127.0.0.1:{DNS}", "--api", f"127.0.0.1:{DNS + 100}", "--upstream", f"127.0.0.1:{UPSTREAM}",
             "--data-dir", str(gen / "data"), "--log-level", "warning"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=(gen / "server.log").open("w"))
        try:
            if not ready(DNS, 300):
                sys.exit("dnsgate under valgrind did not answer: " + (gen / "server.log").read_text()[-2000:])
            dnsperf(names(gen / "warm.txt", "warm", args.warm))
            if args.syscalls:
                syscalls(server.pid, gen, names(gen / "count.txt", "count", args.n), args.n)
                return
            control(server.pid, "-i", "on")
            text = dnsperf(names(gen / "count.txt", "count", args.n))
            control(server.pid, "-i", "off")
            control(server.pid, "-d")
            completed = int(re.search(r"Queries completed:\s+(\d+)", text).group(1))  # type: ignore[union-attr]
            time.sleep(1)
            totals = [line for p in gen.glob("callgrind.out*") for line in p.read_text().splitlines()
                      if line.startswith(("totals:", "summary:"))]
            ir = max(int(line.split()[1]) for line in totals)
            print(f"{args.udp_io}: {ir / args.n:,.0f} instructions per miss ({ir:,} for {args.n} misses, "
                  f"{completed} answered)")
            if args.keep:
                keep = Path(tempfile.mkdtemp(prefix="miss-instr-out-"))
                for p in gen.glob("callgrind.out*"):
                    shutil.copy(p, keep)
                print(f"callgrind output: {keep}")
        finally:
            for proc in (server, upstream):
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


if __name__ == "__main__":
    main()
