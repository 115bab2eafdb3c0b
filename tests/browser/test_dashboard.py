"""The dashboard in a real headless Chromium: it loads nothing from outside, breaks no CSP rule,
draws its charts from live numbers, and refreshes as traffic arrives."""

from __future__ import annotations

import re

import aiohttp
from playwright.async_api import Browser, ConsoleMessage, Request, expect

from tests.conftest import Gate
from tests.support.browser import browser  # noqa: F401 - the fixture


async def test_dashboard_draws_live_charts_from_same_origin_only(browser: Browser, gate: Gate) -> None:  # noqa: F811
    origin = gate.api_url
    page = await browser.new_page()
    requests: list[str] = []
    problems: list[str] = []

    def on_request(request: Request) -> None:
        requests.append(request.url)

    def on_console(message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):  # CSP violations are reported here
            problems.append(message.text)

    page.on("request", on_request)
    page.on("console", on_console)
    page.on("pageerror", lambda exc: problems.append(str(exc)))

    response = await page.goto(origin + "/dashboard")
    assert response is not None and response.ok
    csp = response.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    # Waits use locators, not page-side eval: the page's CSP (rightly) forbids eval.
    await expect(page.locator("#updated")).to_have_attribute("data-refreshes", re.compile(r"^[1-9]"))
    assert await page.text_content("#t-queries") == "0"
    assert await page.locator("#chart-vendors text.empty").count() == 1  # no gated queries yet

    # Traffic: a client without consent meets the tracker twice, one with consent once.
    await gate.query("trackcmp.net", source="127.0.0.41")
    await gate.query("prism.app-us1.com", source="127.0.0.41")
    await gate.http("PUT", "/v1/consent", source="127.0.0.42", json={"categories": ["marketing"]})
    await gate.query("trackcmp.net", source="127.0.0.42")
    await gate.query("host.example.test", source="127.0.0.42")

    # The page refreshes by itself (every 2 s) and shows the new numbers.
    await expect(page.locator("#t-blocked")).to_have_text("2", timeout=10_000)
    assert await page.text_content("#t-allowed") == "1"
    assert await page.text_content("#t-queries") == "4"
    bar = page.locator("#chart-vendors rect.bar-b[data-vendor='activecampaign']")
    assert await bar.get_attribute("data-sinkholed") == "2"
    assert await page.text_content("#clients-with") == "with consent: 1"
    assert await page.text_content("#clients-without") == "without consent: 1"
    assert await page.locator("#chart-upstreams rect[data-quantile='p50']").count() == 1
    await expect(page.locator("#chart-traffic path[data-series='queries']")).to_have_count(1, timeout=10_000)

    assert problems == []
    assert requests and all(url.startswith(origin + "/") for url in requests), requests
    await page.close()


async def test_dashboard_assets_and_unknown_files(gate: Gate) -> None:
    async with aiohttp.ClientSession() as session:
        for path, kind in (("/dashboard", "text/html"), ("/dashboard/app.js", "text/javascript"),
                           ("/dashboard/app.css", "text/css"), ("/dashboard/icon.svg", "image/svg+xml")):
            async with session.get(gate.api_url + path) as response:
                assert response.status == 200 and response.content_type == kind
                assert "default-src 'none'" in response.headers["Content-Security-Policy"]
                assert await response.read()
    status, body = await gate.http("GET", "/dashboard/../../etc/passwd")
    assert status == 404
    status, body = await gate.http("GET", "/dashboard/nope.js")
    assert status == 404 and body["error"]["code"] == "not_found"
