"""A real browser for tests: Debian's chromium, headless, driven by Playwright (never a downloaded
browser). The dashboard tests use it; so do the consent portal's.

    from tests.support.browser import browser  # noqa: F401  (a pytest fixture: import it into the test module)

    async def test_page(browser: Browser, gate: Gate) -> None:
        page = await browser.new_page()
        ...

Tests that need it are skipped where chromium is not installed (.ci/run installs it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import AsyncIterator, Sequence

import pytest
from playwright.async_api import Browser, async_playwright

CHROMIUM = os.environ.get("DNSGATE_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]


def chromium_available() -> bool:
    return shutil.which(CHROMIUM) is not None


needs_chromium = pytest.mark.skipif(not chromium_available(),
                                    reason=f"{CHROMIUM} not found (apt-get install chromium)")


@contextlib.asynccontextmanager
async def launched(args: Sequence[str] = CHROMIUM_ARGS) -> AsyncIterator[Browser]:
    """Chromium started with `args`, closed afterwards; the test is skipped without chromium."""
    if not chromium_available():
        pytest.skip(f"{CHROMIUM} not found (apt-get install chromium)")
    async with async_playwright() as playwright:
        started = await playwright.chromium.launch(executable_path=CHROMIUM, args=list(args))
        try:
            yield started
        finally:
            await started.close()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with launched() as started:
        yield started
