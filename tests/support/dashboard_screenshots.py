"""Screenshots of the dashboards for docs/observability.md, taken in Debian's headless chromium:

    .venv/bin/python -m tests.support.dashboard_screenshots docs

Runs dnsgate in-process on loopback (a stub upstream, a throwaway data dir, the query log keeping
every query), sends a little traffic from three loopback clients (one grants marketing), and writes
docs/dashboard-phone.png (the public page, 390 px wide) and docs/dashboard-admin.png (the admin page
after a login and a search for one client's gated queries, 1280 px wide).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

from playwright.async_api import ViewportSize, async_playwright

from dnsgate.config import QueryLogConfig
from tests.conftest import TOKEN, Gate, make_config, running_gate, zone_for_tests
from tests.support.browser import CHROMIUM, CHROMIUM_ARGS
from tests.support.stub_upstream import StubUpstream

PHONE, DESKTOP = ViewportSize(width=390, height=844), ViewportSize(width=1280, height=1000)


async def traffic(gate: Gate) -> None:
    for _ in range(3):
        await gate.query("host.example.test", source="127.0.0.21")
        await gate.query("trackcmp.net", source="127.0.0.21")
        await gate.query("other.example.test", "AAAA", source="127.0.0.23")
    await gate.http("PUT", "/v1/consent", source="127.0.0.22", json={"categories": ["marketing"]})
    for name in ("trackcmp.net", "prism.app-us1.com", "host.example.test"):
        await gate.query(name, source="127.0.0.22")


async def main(out: Path) -> None:
    stub = await zone_for_tests(StubUpstream()).start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = make_config(stub, Path(tmp) / "data", querylog=QueryLogConfig(mode="full"))
            async with running_gate(cfg) as gate, async_playwright() as pw:
                browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                await traffic(gate)
                await asyncio.sleep(4)  # two samples of the live charts after the traffic
                await traffic(gate)
                await asyncio.sleep(2)
                page = await browser.new_page(viewport=PHONE)
                await page.goto(gate.api_url + "/dashboard")
                await page.wait_for_selector("#updated[data-refreshes]")
                await page.screenshot(path=out / "dashboard-phone.png", full_page=True)
                print(out / "dashboard-phone.png")
                page = await browser.new_page(viewport=DESKTOP)
                await page.goto(gate.api_url + "/dashboard/login")
                await page.fill("#token", TOKEN)
                await page.click("button[type=submit]")
                await page.wait_for_selector("#updated[data-refreshes]")
                await page.fill("#f-client", "127.0.0.21")
                await page.select_option("#f-gated", "true")
                await page.click("#search button[type=submit]")
                await page.wait_for_selector("#client-consent[data-client]")
                await page.wait_for_selector("#chart-live path")
                await page.screenshot(path=out / "dashboard-admin.png", full_page=True)
                print(out / "dashboard-admin.png")
                await browser.close()
    finally:
        await stub.stop()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs")))
