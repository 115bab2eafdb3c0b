"""Where the kernel hands out a port another process's SO_REUSEPORT group holds, run inside a
network namespace by tests/workers/test_workers.py:

    ip netns exec NS python -m tests.support.shared_port_helper

The namespace's ephemeral range is one port, which a socket of "another dnsgate" (SO_REUSEPORT,
this user) holds for UDP and TCP. An autobind with SO_REUSEPORT would join its group; dnsgate's
primary listeners with workers (port 0) must not. Prints one JSON object: the port held, and the
port the listeners got or the error they raised.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

from dnsgate.app import dns_side
from dnsgate.config import Config, DnsConfig, HostPort, UpstreamAddress
from dnsgate.consent.model import ConsentTable
from dnsgate.rules.catalog import builtin_catalog_text, parse_catalog_text
from dnsgate.rules.ruleset import ruleset_for


async def main() -> dict[str, Any]:
    held: list[socket.socket] = []
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        s = socket.socket(socket.AF_INET, kind)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", held[0].getsockname()[1] if held else 0))
        if kind == socket.SOCK_STREAM:
            s.listen()
        held.append(s)
    port = held[0].getsockname()[1]
    cfg = Config(dns=DnsConfig(listen=("127.0.0.1:0",), workers=2))
    catalog = parse_catalog_text(builtin_catalog_text())
    stack = dns_side.build(cfg, ruleset_for(cfg, catalog), ConsentTable(catalog.vendors),
                            (UpstreamAddress("127.0.0.1", 9),), on_pair=None, wall=time.time)
    listeners = stack.listeners  # the primary's (a worker's would join)
    try:
        bound = await listeners.start(HostPort("127.0.0.1", 0))
    except OSError as exc:
        return {"held": port, "error": str(exc)}
    finally:
        await listeners.close()
    return {"held": port, "bound": bound.port}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main())))
