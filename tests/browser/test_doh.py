"""Debian's chromium in secure DNS mode with dnsgate as its DNS-over-HTTPS server: a shop page loads,
its tracker script does not, until the same client grants consent; then the next loads run it.

Chromium is set up as a user would in Settings → Privacy and security → Use secure DNS → custom
provider: the `dns_over_https.mode` "secure" and `dns_over_https.templates` preferences, written in
this test's own profile (its Local State). The managed policy of the same name
(/etc/chromium/policies/managed/*.json) would do the same for every chromium on the machine, other
tests' included, so it is not used here. The private CA is trusted by its key pin for this browser
only (--ignore-certificate-errors-spki-list). In secure mode chromium never falls back to plain DNS:
the queries the page needs reach dnsgate over HTTPS or not at all."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from playwright.async_api import async_playwright

from dnsgate.cli.cert import init
from tests.conftest import running_gate
from tests.e2e.test_dot import metric
from tests.support.browser import CHROMIUM, CHROMIUM_ARGS, needs_chromium
from tests.support.encrypted import Certs, encrypted_config
from tests.support.stub_upstream import StubUpstream

GRANT = {"categories": ["marketing"]}


@pytest.fixture
async def shop() -> AsyncIterator[int]:
    """A shop page on loopback whose tracker script (from trackcmp.net) sets window.tracked."""

    async def serve(request: web.Request) -> web.Response:
        if request.path == "/track.js":
            return web.Response(text="window.tracked = true;", content_type="application/javascript")
        port = request.url.port
        return web.Response(text=f'<!doctype html><title>shop</title><p>shop</p>'
                                 f'<script src="http://trackcmp.net:{port}/track.js"></script>',
                            content_type="text/html")

    app = web.Application()
    app.router.add_get("/{tail:.*}", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


@needs_chromium
async def test_chromium_in_secure_dns_mode_loads_the_tracker_only_after_consent(data_dir: Path, tmp_path: Path,
                                                                                shop: int) -> None:
    stub = await StubUpstream().start()
    stub.add("shop.example.test", "shop.example.test. 300 IN A 127.0.0.1")
    stub.add("trackcmp.net", "trackcmp.net. 300 IN A 127.0.0.1")
    issued = init(tmp_path / "tls", ["dns.dnsgate.test"], ["127.0.0.1"])
    certs = Certs(issued.ca_file, issued.cert_file, issued.key_file)
    try:
        async with running_gate(encrypted_config(stub, data_dir, certs, tls=False, https=True)) as g:
            template = f"https://127.0.0.1:{g.running.https[0].port}/dns-query{{?dns}}"
            profile = tmp_path / "profile"
            profile.mkdir()
            (profile / "Local State").write_text(json.dumps(
                {"dns_over_https": {"mode": "secure", "templates": template}}))
            args = [*CHROMIUM_ARGS, f"--ignore-certificate-errors-spki-list={issued.spki_pin}"]
            async with async_playwright() as playwright:
                browser = await playwright.chromium.launch_persistent_context(
                    str(profile), executable_path=CHROMIUM, args=args)
                try:
                    page = await browser.new_page()
                    await page.goto(f"http://shop.example.test:{shop}/", timeout=20_000)
                    assert await page.text_content("p") == "shop"  # resolved through dnsgate's DoH
                    assert not await page.evaluate("window.tracked === true")  # the tracker: sinkholed
                    assert stub.count("trackcmp.net") == 0
                    assert await metric(g, "dnsgate_queries_total", protocol="https", outcome="sinkholed",
                                        type="A") >= 1

                    status, _ = await g.http("PUT", "/v1/consent", json=GRANT)  # chromium's DoH comes from here
                    assert status == 200
                    # the browser may keep the sinkhole's NXDOMAIN for its TTL (5 s), never longer
                    deadline = asyncio.get_running_loop().time() + 20  # (5 s of TTL, and a loaded machine)
                    tracked = False
                    while not tracked and asyncio.get_running_loop().time() < deadline:
                        await asyncio.sleep(0.5)
                        await page.reload()
                        tracked = await page.evaluate("window.tracked === true")
                    assert tracked, "the tracker never loaded after consent"
                finally:
                    await browser.close()
    finally:
        await stub.stop()
