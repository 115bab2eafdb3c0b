"""The ceiling of a Python DNS server on this machine: uvloop receives each datagram and sends it
back with QR set, and does nothing else.

    .venv/bin/python -m tests.bench.echo [--port 25322]

`tests/bench/run.py` runs it beside the real servers (blocked, allowed, mix and light only: it
answers nothing else), so the table shows how much of dnsgate's CPU per query, and of its latency
at 1 000 q/s, is the event loop's and the kernel's datagram work, which no Python handler avoids.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

import uvloop


class Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.sendto = transport.sendto  # type: ignore[attr-defined]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.sendto(data[:2] + bytes((data[2] | 0x80,)) + data[3:], addr)


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", port))
    stopped = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopped.set)
    await stopped.wait()
    transport.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=25322)
    uvloop.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
