"""Run inside a network namespace by test_netns.py: a stub upstream, dnsgate on 127.0.0.1:53 (what
the namespace's resolv.conf names), and a small web site, all on the namespace's own loopback.

    ip netns exec NS python -m tests.e2e.resolver.netns_helper DATA_DIR

Prints one line `ready` when serving, then answers commands read from stdin, one per line:
`count NAME` (how often the upstream was asked for NAME), `grant` (marketing consent for
127.0.0.1, through the API) and `quit` (or end of input).
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import replace
from pathlib import Path

from aiohttp import web

from dnsgate.config import DnsConfig
from tests.conftest import make_config, running_gate, zone_for_tests
from tests.support.stub_upstream import StubUpstream

PAGE = ("<html><head><title>clean</title></head><body>"
        '<script src="http://trackcmp.net/t.js"></script></body></html>')


async def page(_: web.Request) -> web.Response:
    return web.Response(text=PAGE, content_type="text/html")


async def tracker_script(_: web.Request) -> web.Response:
    return web.Response(text='document.title = "tracked";', content_type="application/javascript")


async def web_site() -> web.AppRunner:
    app = web.Application()
    app.router.add_get("/", page)
    app.router.add_get("/t.js", tracker_script)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 80).start()
    return runner


async def main(data_dir: Path) -> None:
    stub = await zone_for_tests(StubUpstream()).start()
    stub.add("page.example.test", "page.example.test. 300 IN A 127.0.0.1")
    stub.zone["trackcmp.net"] = ["trackcmp.net. 300 IN A 127.0.0.1"]  # the tracker, served locally here
    stub.add("cdn.example.test", "cdn.example.test. 300 IN CNAME host.example.test.")
    stub.cname_alone = {"cdn.example.test"}  # its CNAME comes alone, as from an authoritative server
    cfg = make_config(stub, data_dir, dns=replace(DnsConfig(), listen=("127.0.0.1:53",)))
    site = await web_site()
    loop = asyncio.get_running_loop()
    try:
        async with running_gate(cfg) as gate:
            print("ready", flush=True)
            while True:
                line = (await loop.run_in_executor(None, sys.stdin.readline)).split()
                if not line or line[0] == "quit":
                    break
                if line[0] == "count":
                    print(stub.count(line[1]), flush=True)
                elif line[0] == "grant":
                    status, _ = await gate.http("PUT", "/v1/consent", json={"categories": ["marketing"]})
                    print(status, flush=True)
    finally:
        await site.cleanup()
        await stub.stop()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
