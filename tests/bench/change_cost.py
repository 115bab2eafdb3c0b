"""What one consent change costs the server, by how many other clients hold a choice and query.

    .venv/bin/python -m tests.bench.change_cost [--changes 300] [--clients 0,10000] [--active 0,1000]

Starts `dnsgate serve` (loopback ports 25330/25331, a dead upstream: only sinkholed names are
asked), gives N other clients (127.1.x.y, admin API) a choice that refuses marketing, then times
rounds of: a PUT /v1/consent from 127.0.0.1 granting or withdrawing marketing, then a query for
trackcmp.net from each of the first A of those clients (their own sockets, so each is its own
client). The server's CPU time (from /proc) for the same rounds without the PUT is subtracted,
so the figure is what a change costs: the API request, the store, and whatever the change makes
the DNS path recompute for the clients that query after it. The churn workload of
tests/bench/run.py measures the same on throughput, with one client.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DNS_PORT, API_PORT = 25330, 25331
QUERY = bytes.fromhex("ab cd 01 00 00 01 00 00 00 00 00 00") + b"\x08trackcmp\x03net\x00\x00\x01\x00\x01"
BATCH = 50  # queries in flight at once (more overflows the server's receive buffer)
BLOCK = 20  # rounds with and without a change alternate in blocks of this many
HZ = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / HZ


class Server:
    def __init__(self, data_dir: str) -> None:
        config = Path(data_dir, "bench.toml")
        config.write_text('[api]\nadmin_token = "bench"\nconsent_changes_per_minute = 0\n')
        log = Path(data_dir, "dnsgate.log")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dnsgate", "serve", "--config", str(config), "--dns", f"127.0.0.1:{DNS_PORT}",
             "--api", f"127.0.0.1:{API_PORT}", "--upstream", "127.0.0.1:9", "--data-dir", data_dir,
             "--log-level", "warning"],
            stdout=subprocess.PIPE, stderr=log.open("wb"))
        assert self.proc.stdout is not None
        if not self.proc.stdout.readline():  # the ready line, or nothing: it did not start
            raise SystemExit(f"dnsgate did not start: {log.read_text(errors='replace')[-500:]}")
        self.api = http.client.HTTPConnection("127.0.0.1", API_PORT, timeout=5)

    def put(self, path: str, categories: list[str], admin: bool = False) -> None:
        headers = {"Content-Type": "application/json"}
        if admin:
            headers["Authorization"] = "Bearer bench"
        self.api.request("PUT", path, body=json.dumps({"categories": categories}), headers=headers)
        response = self.api.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"PUT {path} answered {response.status}")

    def stop(self) -> None:
        self.api.close()
        self.proc.terminate()
        self.proc.wait(timeout=10)


def measure(clients: int, active: int, changes: int) -> float:
    """Server CPU microseconds per change."""
    data_dir = tempfile.mkdtemp(prefix="dnsgate-change-cost-")
    server = Server(data_dir)
    sockets: list[socket.socket] = []
    try:
        for i in range(clients):
            server.put(f"/v1/clients/127.1.{i // 256}.{i % 256}/consent", [], admin=True)
        for i in range(min(active, clients)):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((f"127.1.{i // 256}.{i % 256}", 0))
            s.settimeout(2)
            sockets.append(s)

        def query_all() -> None:
            for k in range(0, len(sockets), BATCH):
                batch = sockets[k:k + BATCH]
                for s in batch:
                    s.sendto(QUERY, ("127.0.0.1", DNS_PORT))
                for s in batch:
                    s.recv(512)

        def change(i: int) -> None:
            server.put("/v1/consent", ["marketing"] if i % 2 == 0 else [])

        for i in range(20):  # warm up both paths
            change(i)
            query_all()
        queries_alone = with_changes = 0.0
        made = 0
        for block in range(0, changes, BLOCK):  # alternate blocks: the VM's speed drifts
            started = cpu_seconds(server.proc.pid)
            for _ in range(BLOCK):
                query_all()
            queries_alone += cpu_seconds(server.proc.pid) - started
            started = cpu_seconds(server.proc.pid)
            for i in range(block, block + BLOCK):
                change(i)
                query_all()
            with_changes += cpu_seconds(server.proc.pid) - started
            made += BLOCK
        return 1e6 * (with_changes - queries_alone) / made
    finally:
        for s in sockets:
            s.close()
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--changes", type=int, default=300)
    parser.add_argument("--clients", default="0,10000", help="other clients holding a choice (comma-separated)")
    parser.add_argument("--active", default="0,1000", help="how many of them query after each change")
    args = parser.parse_args()
    for clients in (int(n) for n in args.clients.split(",")):
        for active in sorted({min(int(a), clients) for a in args.active.split(",")}):
            started = time.monotonic()
            us = measure(clients, active, args.changes)
            print(f"{clients:6d} clients with a choice, {active:5d} querying after each change: "
                  f"{us:7.0f} us server CPU per change  ({time.monotonic() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
