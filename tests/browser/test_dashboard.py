"""The dashboards in a real headless Chromium: the public one loads nothing from outside, breaks no
CSP rule, draws its charts from live numbers, shows no client and no name; the admin one is behind a
login whose session cookie reads the admin API, finds a client's gated queries in the query log and
shows its consent. Both pass axe and stay legible at phone width."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from axe_playwright_python.async_playwright import Axe
from playwright.async_api import Browser, BrowserContext, ConsoleMessage, Page, Request, Response, ViewportSize, expect

from dnsgate.config import QueryLogConfig
from tests.conftest import TOKEN, Gate, make_config, running_gate
from tests.support.browser import browser  # noqa: F401 - the fixture
from tests.support.stub_upstream import StubUpstream

PHONE, DESKTOP = ViewportSize(width=390, height=844), ViewportSize(width=1280, height=900)
CLIENT_BLOCKED, CLIENT_GRANTED = "127.0.0.41", "127.0.0.42"


@pytest.fixture
async def logging_gate(upstream: StubUpstream, data_dir: Path) -> AsyncIterator[Gate]:
    """dnsgate whose query log keeps every query (the default keeps only those for gated names)."""
    async with running_gate(make_config(upstream, data_dir, querylog=QueryLogConfig(mode="full"))) as g:
        yield g


class Watch:
    """Every request a page makes and every console error (CSP violations are reported there)."""

    def __init__(self, page: Page) -> None:
        self.requests: list[str] = []
        self.problems: list[str] = []
        self.json_bodies: list[Callable[[], object]] = []
        page.on("request", self._request)
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.problems.append(str(exc)))

    def _request(self, request: Request) -> None:
        self.requests.append(request.url)

    def _console(self, message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            self.problems.append(message.text)

    def check(self, origin: str) -> None:
        assert self.problems == []
        assert self.requests and all(url.startswith(origin + "/") for url in self.requests), self.requests
        assert not any(TOKEN in url for url in self.requests)  # the token never travels in a URL


async def traffic(gate: Gate) -> None:
    """One client without consent meets the tracker twice; one with consent once, and asks another name."""
    await gate.query("trackcmp.net", source=CLIENT_BLOCKED)
    await gate.query("prism.app-us1.com", source=CLIENT_BLOCKED)
    status, _ = await gate.http("PUT", "/v1/consent", source=CLIENT_GRANTED, json={"categories": ["marketing"]})
    assert status == 200
    await gate.query("trackcmp.net", source=CLIENT_GRANTED)
    await gate.query("host.example.test", source=CLIENT_GRANTED)


async def serious_violations(page: Page) -> list[object]:
    results = await Axe().run(page, options={"resultTypes": ["violations"]})
    assert results.response["testEngine"]["name"] == "axe-core"  # it did run
    return [(v["id"], v["impact"], [n["target"] for n in v["nodes"]])
            for v in results.response["violations"] if v["impact"] in ("serious", "critical")]


# The size chart text is drawn at: its CSS font size times the scale of the svg it is in.
TEXT_SIZES = """() => Array.from(document.querySelectorAll('svg text')).map(t =>
    parseFloat(getComputedStyle(t).fontSize) * t.getScreenCTM().a)"""
OVERFLOW = "document.documentElement.scrollWidth - document.documentElement.clientWidth"


async def test_dashboard_draws_live_charts_from_same_origin_only(browser: Browser, gate: Gate) -> None:  # noqa: F811
    origin = gate.api_url
    page = await browser.new_page()
    watch = Watch(page)

    response = await page.goto(origin + "/dashboard")
    assert response is not None and response.ok
    csp = response.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    # Waits use locators, not page-side eval: the page's CSP (rightly) forbids eval.
    await expect(page.locator("#updated")).to_have_attribute("data-refreshes", re.compile(r"^[1-9]"))
    assert await page.text_content("#t-queries") == "0"
    assert await page.locator("#chart-vendors text.empty").count() == 1  # no gated queries yet

    await traffic(gate)

    # The page refreshes by itself (every 2 s) and shows the new numbers.
    await expect(page.locator("#t-blocked")).to_have_text("2", timeout=10_000)
    assert await page.text_content("#t-allowed") == "1"
    assert await page.text_content("#t-queries") == "4"
    bar = page.locator("#chart-vendors rect[data-vendor='activecampaign']")
    assert await bar.get_attribute("data-sinkholed") == "2"
    assert await page.text_content("#clients-met") == "2"
    assert await page.text_content("#clients-allowed") == "1"
    assert await page.text_content("#clients-blocked") == "1"
    assert await page.text_content("#clients-granting") == "1"
    assert await page.locator("#chart-upstreams rect[data-quantile='p50']").count() == 1
    assert await page.locator("#chart-upstreams rect[data-share='1']").count() == 1  # one upstream, all queries
    await expect(page.locator("#chart-traffic path[data-series='queries']")).to_have_count(1, timeout=10_000)
    await expect(page.locator("#chart-types path[data-series='A']")).to_have_count(1)
    # the grant above is drawn among the consent changes
    await expect(page.locator("#chart-consent rect[data-kind='grant']")).to_have_count(1, timeout=10_000)
    watch.check(origin)
    await page.close()


async def test_clients_that_met_a_tracker_count_what_the_gate_answered(gate: Gate) -> None:
    """A client whose tracker query was allowed counts as allowed after it withdraws (it held a grant
    then, not now); the grants held now are a number of their own, named as such."""
    status, _ = await gate.http("PUT", "/v1/consent", source=CLIENT_GRANTED, json={"categories": ["marketing"]})
    assert status == 200
    answer = await gate.query("trackcmp.net", source=CLIENT_GRANTED)
    assert answer.answer  # allowed: the real address
    status, _ = await gate.http("DELETE", "/v1/consent", source=CLIENT_GRANTED)
    assert status == 200
    await gate.query("trackcmp.net", source=CLIENT_BLOCKED)
    status, stats = await gate.http("GET", "/v1/stats")
    assert status == 200
    clients = stats["clients"]
    assert (clients["met_tracker"], clients["tracker_allowed"], clients["only_blocked"]) == (2, 1, 1)
    assert clients["choices_granting"] == 0
    assert clients["window_seconds"] == 3600


async def test_the_public_dashboard_shows_no_client_and_no_name(browser: Browser, gate: Gate) -> None:  # noqa: F811
    await traffic(gate)
    page = await browser.new_page()
    bodies: list[str] = []

    async def keep(response: Response) -> None:
        bodies.append(await response.text())

    page.on("response", keep)
    await page.goto(gate.api_url + "/dashboard")
    await expect(page.locator("#t-queries")).to_have_text("4", timeout=10_000)
    await expect(page.locator("#updated")).to_have_attribute("data-refreshes", re.compile(r"^[2-9]"), timeout=10_000)
    shown = [await page.content(), await page.inner_text("body"), *bodies]
    assert any('"met_tracker": 2' in b or '"met_tracker":2' in b for b in bodies)  # the data did load
    for secret in (CLIENT_BLOCKED, CLIENT_GRANTED, "trackcmp.net", "prism.app-us1.com",
                   "host.example.test", TOKEN):
        assert not any(secret in text for text in shown), secret
    await page.close()


async def login(context: BrowserContext, origin: str, token: str = TOKEN) -> Page:
    page = await context.new_page()
    await page.goto(origin + "/dashboard/admin")
    await expect(page).to_have_url(origin + "/dashboard/login")  # no session: the login page
    await page.get_by_label("Admin token").fill(token)
    await page.get_by_role("button", name="Log in").click()
    return page


async def test_admin_logs_in_finds_gated_queries_and_consent(browser: Browser, logging_gate: Gate) -> None:  # noqa: F811
    gate = logging_gate
    origin = gate.api_url
    await traffic(gate)
    context = await browser.new_context(viewport=DESKTOP)

    # A wrong token: the login page again, with the error, and no session.
    page = await login(context, origin, "not-the-token")
    await expect(page.locator("#login-error")).to_have_text("That is not the admin token.")
    assert [c for c in await context.cookies() if c["name"] == "dnsgate_admin"] == []
    await page.close()

    page = await login(context, origin)
    watch = Watch(page)
    await expect(page).to_have_url(origin + "/dashboard/admin")
    [cookie] = [c for c in await context.cookies() if c["name"] == "dnsgate_admin"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and not cookie["secure"]  # http here
    assert TOKEN not in cookie["value"]

    # Top clients: both, with their consent; top gated names.
    await expect(page.locator("#updated")).to_have_attribute("data-refreshes", re.compile(r"^[1-9]"))
    blocked_row = page.locator(f"#top-clients tr[data-client='{CLIENT_BLOCKED}']")
    await expect(blocked_row).to_contain_text("no choice")
    await expect(page.locator(f"#top-clients tr[data-client='{CLIENT_GRANTED}']")).to_contain_text("granted marketing")
    await expect(page.locator("#top-gated tbody tr").first).to_contain_text("trackcmp.net")
    await expect(page.locator("#chart-kinds rect[data-kind='gated']")).to_have_count(1)
    # every query of the last 30 minutes, from memory (whatever the log keeps)
    await expect(page.locator("#chart-live path[data-series='sinkholed']")).to_have_count(1, timeout=10_000)
    await expect(page.locator("#chart-upstreams rect[data-quantile='p99']")).to_have_count(1)

    # The query-log search: the blocked client's gated queries, and its consent.
    await page.fill("#f-client", CLIENT_BLOCKED)
    await page.select_option("#f-gated", "true")
    await page.get_by_role("button", name="Search").click()
    await expect(page.locator("#log-status")).to_have_attribute("data-count", "2")
    rows = page.locator("#log-table tbody tr")
    await expect(rows).to_have_count(2)
    assert {await r.get_attribute("data-outcome") for r in await rows.all()} == {"sinkholed"}
    assert "prism.app-us1.com" in await rows.nth(0).inner_text()  # newest first
    panel = page.locator("#client-consent")
    await expect(panel).to_have_attribute("data-client", CLIENT_BLOCKED)
    await expect(panel.locator("[data-category='marketing']")).to_have_attribute("data-allowed", "false")
    await expect(panel.locator("[data-field='profile']")).to_have_text("opt-in")

    # The same through the button in the clients table, for the client that consented.
    await page.locator(f"#top-clients tr[data-client='{CLIENT_GRANTED}'] button").click()
    await expect(page.locator("#log-status")).to_have_attribute("data-count", "1")
    assert await rows.nth(0).get_attribute("data-outcome") == "forwarded"
    await expect(panel.locator("[data-category='marketing']")).to_have_attribute("data-allowed", "true")

    # A name search, and paging back and forth (by entry id, on /v1/queries).
    await page.fill("#f-client", "")
    await page.select_option("#f-gated", "")
    await page.fill("#f-name", "*track*")
    await page.get_by_role("button", name="Search").click()
    await expect(page.locator("#log-status")).to_have_attribute("data-count", "2")
    for _ in range(12):
        await gate.query("other.example.test", source="127.0.0.43")
    await page.fill("#f-name", "other.example.test")
    await page.select_option("#page-size", "10")
    await page.get_by_role("button", name="Search").click()
    await expect(page.locator("#log-status")).to_have_attribute("data-count", "10")
    newest = await rows.nth(0).get_attribute("data-id")
    await page.get_by_role("button", name="Older").click()
    await expect(page.locator("#log-status")).to_have_attribute("data-count", "2")
    assert await page.locator("#older").is_disabled()
    await page.get_by_role("button", name="Newer").click()
    await expect(page.locator("#log-status")).to_have_attribute("data-count", "10")
    assert await rows.nth(0).get_attribute("data-id") == newest

    assert await serious_violations(page) == []
    watch.check(origin)

    # Logout ends the session: the page and the API refuse the old cookie.
    await page.get_by_role("button", name="Log out").click()
    await expect(page).to_have_url(origin + "/dashboard/login")
    async with aiohttp.ClientSession(headers={"Cookie": f"dnsgate_admin={cookie['value']}"}) as session:
        async with session.get(origin + "/v1/queries") as response:
            assert response.status == 401
        async with session.get(origin + "/dashboard/admin", allow_redirects=False) as response:
            assert response.status == 303 and response.headers["Location"] == "/dashboard/login"
    await context.close()


async def test_both_views_pass_axe_and_are_legible_on_a_phone(browser: Browser, logging_gate: Gate) -> None:  # noqa: F811
    gate = logging_gate
    await traffic(gate)
    context = await browser.new_context(viewport=PHONE, device_scale_factor=1)
    public = await context.new_page()
    await public.goto(gate.api_url + "/dashboard")
    await expect(public.locator("#chart-traffic path[data-series='queries']")).to_have_count(1, timeout=10_000)
    admin = await login(context, gate.api_url)
    await expect(admin.locator("#updated")).to_have_attribute("data-refreshes", re.compile(r"^[1-9]"))
    await expect(admin.locator("#log-status")).to_have_attribute("data-count", "4")
    for page in (public, admin):
        assert await serious_violations(page) == []
        await page.screenshot(full_page=True)  # drawn as a phone shows it
        sizes = await page.evaluate(TEXT_SIZES)
        assert len(sizes) >= 10, sizes  # the charts have labels
        assert min(sizes) >= 10, sorted(sizes)[:5]
        assert await page.evaluate(OVERFLOW) <= 0  # nothing wider than the screen
    await context.close()


async def test_dashboard_assets_and_unknown_files(gate: Gate) -> None:
    async with aiohttp.ClientSession() as session:
        for path, kind in (("/dashboard", "text/html"), ("/dashboard/app.js", "text/javascript"),
                           ("/dashboard/charts.js", "text/javascript"), ("/dashboard/admin.js", "text/javascript"),
                           ("/dashboard/app.css", "text/css"), ("/dashboard/icon.svg", "image/svg+xml"),
                           ("/dashboard/login", "text/html")):
            async with session.get(gate.api_url + path) as response:
                assert response.status == 200 and response.content_type == kind
                assert "default-src 'none'" in response.headers["Content-Security-Policy"]
                assert await response.read()
    status, body = await gate.http("GET", "/dashboard/../../etc/passwd")
    assert status == 404
    status, body = await gate.http("GET", "/dashboard/nope.js")
    assert status == 404 and body["error"]["code"] == "not_found"
