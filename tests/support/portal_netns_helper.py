"""A person on a fresh network, run inside a network namespace by tests/browser/test_portal_netns.py.

    ip netns exec NS python -m tests.support.portal_netns_helper DATA_DIR

The namespace's resolv.conf names 127.0.0.1, where dnsgate answers DNS on port 53; its API (and so
the portal) listens on 0.0.0.0:80, a shop's web site on 127.0.0.2:8080. Debian's chromium, driven by
Playwright, resolves every name through dnsgate like any application there. It opens the shop (its
ActiveCampaign script must not load), follows the shop's link to http://consent.dnsgate.internal/,
sees the tracker blocked, accepts, goes back (the script loads), withdraws, and checks DNS.
Prints one JSON object with what it saw.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.message
import dns.rcode
from aiohttp import web
from playwright.async_api import async_playwright, expect

from dnsgate.config import ApiConfig, DnsConfig
from tests.conftest import TOKEN, make_config, running_gate, zone_for_tests
from tests.support.browser import CHROMIUM, CHROMIUM_ARGS
from tests.support.stub_upstream import StubUpstream

SHOP, SHOP_ADDRESS, SHOP_URL = "shop.example.test", "127.0.0.2", "http://shop.example.test:8080/"
PORTAL = "http://consent.dnsgate.internal/"
PAGE = ("<!doctype html><html><head><title>clean</title></head><body>"
        f'<a id="consent" href="{PORTAL}?return_to={SHOP_URL}">Tracking on this network: your choice</a>'
        '<script src="http://trackcmp.net:8080/t.js"></script></body></html>')


async def shop() -> web.AppRunner:
    async def page(_: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    async def tracker(_: web.Request) -> web.Response:  # trackcmp.net resolves here too
        return web.Response(text='document.title = "tracked";', content_type="application/javascript")

    app = web.Application()
    app.router.add_get("/", page)
    app.router.add_get("/t.js", tracker)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, SHOP_ADDRESS, 8080).start()
    return runner


async def dns_rcode(name: str) -> str:
    reply = await dns.asyncquery.udp(dns.message.make_query(name, "A"), "127.0.0.1", port=53, timeout=3)
    return dns.rcode.to_text(reply.rcode())


async def main(data_dir: Path) -> dict[str, Any]:
    stub = await zone_for_tests(StubUpstream()).start()
    stub.add(SHOP, f"{SHOP}. 300 IN A {SHOP_ADDRESS}")
    stub.zone["trackcmp.net"] = [f"trackcmp.net. 300 IN A {SHOP_ADDRESS}"]
    cfg = make_config(stub, data_dir, dns=replace(DnsConfig(), listen=("127.0.0.1:53",)),
                      api=ApiConfig(listen="0.0.0.0:80", admin_token=TOKEN))
    site = await shop()
    seen: dict[str, Any] = {}
    try:
        async with running_gate(cfg) as gate, async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = await browser.new_page()
            page.set_default_timeout(15_000)
            await page.goto(SHOP_URL)
            seen["shop_title_before"] = await page.title()

            await page.click("#consent")  # a top-level navigation to the portal, by name
            await page.wait_for_url(re.compile(re.escape(f"{PORTAL}?return_to=")))
            await expect(page.locator("body")).to_have_attribute("data-ready", "true")
            row = page.locator("#overview li[data-vendor='activecampaign']")
            seen["portal_url"] = page.url
            seen["state_before"] = await row.get_attribute("data-state")
            seen["device"] = await page.locator("#device-text").text_content()
            await page.get_by_role("button", name="Accept all").click()
            await expect(row).to_have_attribute("data-state", "allowed")
            seen["result"] = await page.locator("#result").text_content()
            seen["dns_after_accept"] = await dns_rcode("trackcmp.net")

            await page.get_by_role("link", name=f"Back to {SHOP}:8080").click()
            await page.wait_for_url(SHOP_URL)
            await expect(page).to_have_title("tracked", timeout=10_000)
            seen["shop_title_after"] = await page.title()

            await page.goto(PORTAL)
            await expect(page.locator("body")).to_have_attribute("data-ready", "true")
            await page.get_by_role("button", name="Withdraw all consent").click()
            await expect(row).to_have_attribute("data-state", "blocked")
            seen["dns_after_withdraw"] = await dns_rcode("trackcmp.net")
            _, whoami = await gate.http("GET", "/v1/whoami")
            seen["whoami_dns"] = whoami["dns"]
            await browser.close()
    finally:
        await site.cleanup()
        await stub.stop()
    return seen


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(Path(sys.argv[1])))), flush=True)
