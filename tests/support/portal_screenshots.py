"""Screenshots of the consent portal for docs/consent.md, taken in Debian's headless chromium:

    .venv/bin/python -m tests.support.portal_screenshots docs

Runs dnsgate in-process on loopback (a stub upstream, a throwaway data dir) and writes
docs/portal-phone.png (390 px wide) and docs/portal-desktop.png (1280 px wide).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

from playwright.async_api import ViewportSize, async_playwright

from tests.conftest import make_config, running_gate, zone_for_tests
from tests.support.browser import CHROMIUM, CHROMIUM_ARGS
from tests.support.stub_upstream import StubUpstream

SHOTS = {"phone": ViewportSize(width=390, height=844), "desktop": ViewportSize(width=1280, height=1000)}


async def main(out: Path) -> None:
    stub = await zone_for_tests(StubUpstream()).start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            async with running_gate(make_config(stub, Path(tmp) / "data")) as gate, async_playwright() as pw:
                browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                for name, viewport in SHOTS.items():
                    page = await browser.new_page(viewport=viewport)
                    await page.goto(f"{gate.api_url}/?return_to=https://shop.example/cart")
                    await page.wait_for_selector("body[data-ready]")
                    await page.screenshot(path=out / f"portal-{name}.png")
                    print(out / f"portal-{name}.png")
                await browser.close()
    finally:
        await stub.stop()


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "docs")
    target.mkdir(parents=True, exist_ok=True)
    asyncio.run(main(target))
