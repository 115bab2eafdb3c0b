"""Pairing tokens under a flood of addresses, black box: dnsgate (a real process) on an opt-out
network; `--addresses` loopback addresses each make `--changes` consent changes (each answer may
carry a token), as fast as the API takes them. Then another device chooses "Reject all" the way the
portal does: through its own address, then through its other address naming the token the first
answer carried. Its answer must carry a token, the second choice must be recorded, and the other
address must no longer resolve the tracker. (2 600 addresses x 4 changes once filled the table of
outstanding tokens: the device got `"pairing": null` for the token lifetime, and its other address
kept resolving.)

    .venv/bin/python -m tests.reliability.pairing_flood [--addresses 2600] [--changes 4]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import aiohttp
import dns.asyncquery
import dns.message
import dns.rcode

from tests.reliability.process import Served, serve
from tests.support.stub_upstream import StubUpstream

TRACKER = "trackcmp.net"
DEVICE, DEVICE_OTHER = "127.0.0.20", "127.0.0.200"
WORKERS = 64


def flood_address(i: int) -> str:
    return f"127.1.{i >> 8}.{i & 255}"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def put(served: Served, source: str, body: dict[str, object]) -> tuple[int, dict[str, object]]:
    connector = aiohttp.TCPConnector(local_addr=(source, 0))
    async with aiohttp.ClientSession(connector=connector) as session, session.put(
            f"{served.api}/v1/consent", json=body) as response:
        return response.status, await response.json()


async def rcode(served: Served, source: str) -> int:
    q = dns.message.make_query(TRACKER, "A")
    return (await dns.asyncquery.udp(q, "127.0.0.1", port=served.dns_port, source=source, timeout=3)).rcode()


async def run(addresses: int, changes: int) -> int:
    stub = await StubUpstream(default_a="203.0.113.10").start()
    try:
        with tempfile.TemporaryDirectory(prefix="dnsgate-pairing-flood-") as tmp:
            config = Path(tmp) / "dnsgate.toml"
            config.write_text('[profiles]\ndefault = "opt-out"\n', encoding="utf-8")
            served = await serve(stub.address, Path(tmp) / "data", config=config)
            try:
                return await flood(served, addresses, changes)
            finally:
                await served.stop()
    finally:
        await stub.stop()


async def flood(served: Served, addresses: int, changes: int) -> int:
    before = rss_mb(served.process.pid)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(addresses):
        queue.put_nowait(i)
    tokens = failures = late = 0

    async def worker() -> None:
        nonlocal tokens, failures, late
        while not queue.empty():
            source = flood_address(queue.get_nowait())
            for _ in range(changes):
                status, body = await put(served, source, {"categories": ["marketing"]})
                if status == 503:
                    # The store's write outlasted the change's deadline (64 changes at once on a loaded
                    # machine): what a change then answers, and no concern of the tokens.
                    late += 1
                elif status != 200:
                    failures += 1
                elif body.get("pairing"):
                    tokens += 1

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(WORKERS)))
    took = time.monotonic() - started
    after = rss_mb(served.process.pid)
    print(f"flood: {addresses} addresses x {changes} changes in {took:.1f} s ({addresses * changes / took:.0f}/s), "
          f"{tokens} tokens given, {failures} changes refused, {late} answered 503; dnsgate RSS {before:.1f} -> "
          f"{after:.1f} MB")

    assert await rcode(served, DEVICE_OTHER) == dns.rcode.NOERROR  # opt-out: allowed until it opts out
    status, first = await put(served, DEVICE, {"categories": [], "channel": "portal"})
    pairing = first.get("pairing")
    ok = status == 200 and isinstance(pairing, dict)
    print(f"device {DEVICE}: \"Reject all\" answered {status}, pairing {'a token' if ok else pairing!r}")
    if ok:
        assert isinstance(pairing, dict)
        status, _ = await put(served, DEVICE_OTHER,
                              {"categories": [], "channel": "portal", "pairing": pairing["token"]})
        print(f"device {DEVICE_OTHER} (its other address, naming the token): {status}")
        ok = status == 200
    blocked = await rcode(served, DEVICE_OTHER) == dns.rcode.NXDOMAIN
    print(f"{DEVICE_OTHER} asks for {TRACKER}: {'NXDOMAIN (opted out)' if blocked else 'resolved'}")
    # (most of the flood must have been answered, each with a token: the table of tokens is what it fills)
    return 0 if ok and blocked and not failures and late <= addresses * changes // 4 else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--addresses", type=int, default=2600)
    parser.add_argument("--changes", type=int, default=4)
    args = parser.parse_args()
    raise SystemExit(asyncio.run(run(args.addresses, args.changes)))


if __name__ == "__main__":
    main()
