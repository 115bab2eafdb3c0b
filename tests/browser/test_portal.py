"""The consent portal in a real browser (Debian's chromium, headless, through Playwright).

The browser talks to dnsgate over loopback from 127.0.0.1, and the DNS checks ask from the address
the page itself says dnsgate sees, so the HTTP caller and the DNS client are the same client.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import dns.rcode
import pytest
from axe_playwright_python.async_playwright import Axe
from playwright.async_api import Browser, ConsoleMessage, Page, Request, ViewportSize, expect

from dnsgate.config import ApiConfig, DnsConfig, ListsConfig, ListSource, PortalConfig, ProfilesConfig
from tests.conftest import TOKEN, Gate, ipv6_loopback, make_config, running_gate
from tests.support.browser import CHROMIUM_ARGS, launched
from tests.support.consent_fixtures import consent_config, eventually
from tests.support.stub_upstream import StubUpstream

TRACKER, TRACKER_ADDRESS = "trackcmp.net", "198.51.100.1"
PHONE, DESKTOP = ViewportSize(width=390, height=844), ViewportSize(width=1280, height=900)
KIOSK_SCREEN = ViewportSize(width=1920, height=1080)
# The page resolves <token>.pair.<portal host> through the system resolver to pair HTTP with DNS, and
# records each choice through v4./v6.<portal host> too (the API's address of the other family).
# Here HTTP and DNS are both 127.0.0.1, and the host's resolver is not dnsgate: keep those names local.
OWN_NAMES = (".pair.consent.dnsgate.internal", "//v4.consent.dnsgate.internal", "//v6.consent.dnsgate.internal")
RULES = "MAP *.pair.consent.dnsgate.internal ~NOTFOUND, MAP v4.consent.dnsgate.internal ~NOTFOUND"
ARGS = [*CHROMIUM_ARGS, f"--host-resolver-rules={RULES}, MAP v6.consent.dnsgate.internal ~NOTFOUND"]


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with launched(ARGS) as started:
        yield started


@contextlib.asynccontextmanager
async def portal(upstream: StubUpstream, data_dir: Path, profile: str = "opt-in") -> AsyncIterator[Gate]:
    """dnsgate whose network profile for the browser's address (127.0.0.1) is `profile`."""
    cfg = consent_config(make_config(upstream, data_dir))
    cfg = replace(cfg, profiles=ProfilesConfig(networks=(("127.0.0.1/32", profile), *cfg.profiles.networks)),
                  portal=PortalConfig(captive=True))
    async with running_gate(cfg) as g:
        yield g


@dataclass
class Watch:
    """Everything the page asked for, and anything it complained about (CSP violations included)."""

    origin: str
    requests: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def attach(self, page: Page) -> None:
        def on_request(request: Request) -> None:
            self.requests.append(request.url)

        def on_console(message: ConsoleMessage) -> None:
            where = message.text + " " + (message.location or {}).get("url", "")
            pairing = any(name in where for name in OWN_NAMES)
            if message.type in ("error", "warning") and not pairing:  # these fetches may fail here
                self.problems.append(message.text)

        page.on("request", on_request)
        page.on("console", on_console)
        page.on("pageerror", lambda exc: self.problems.append(str(exc)))

    def check(self) -> None:
        assert self.problems == []
        elsewhere = [u for u in self.requests if not u.startswith(self.origin + "/")
                     and not any(name in u for name in OWN_NAMES)]
        assert elsewhere == []


async def open_portal(browser: Browser, g: Gate, query: str = "", viewport: ViewportSize = DESKTOP,
                      **context: Any) -> tuple[Page, Watch]:
    page = await (await browser.new_context(viewport=viewport, **context)).new_page()
    watch = Watch(g.api_url)
    watch.attach(page)
    response = await page.goto(g.api_url + "/" + query)
    assert response is not None and response.ok
    await expect(page.locator("body")).to_have_attribute("data-ready", "true")
    return page, watch


async def seen_address(page: Page) -> str:
    """The address dnsgate says this browser has: the DNS checks ask from it."""
    text = await page.locator("#device-text").text_content() or ""
    found = re.search(r"at (\d+\.\d+\.\d+\.\d+)", text)
    assert found, text
    return found[1]


async def tracker(g: Gate, source: str) -> tuple[int, list[str]]:
    reply = await g.query(TRACKER, source=source)
    return reply.rcode(), [rr.to_text() for rrset in reply.answer for rr in rrset]


def vendor_row(page: Page, vendor: str = "activecampaign") -> Any:
    return page.locator(f"#overview li[data-vendor='{vendor}']")


async def test_accept_then_withdraw_changes_the_trackers_dns(browser: Browser, upstream: StubUpstream,
                                                             data_dir: Path) -> None:
    async with portal(upstream, data_dir) as g:
        page, watch = await open_portal(browser, g, "?return_to=https://shop.example/cart?id=7")
        client = await seen_address(page)
        assert client == "127.0.0.1"

        # A new visitor sees what is at stake and that the tracker is blocked.
        await expect(page.locator("h1")).to_have_text("Tracking on this network")
        await expect(vendor_row(page)).to_have_attribute("data-state", "blocked")
        await expect(vendor_row(page)).to_contain_text("ActiveCampaign (Marketing): blocked")
        accept, reject = page.get_by_role("button", name="Accept all"), page.get_by_role("button", name="Reject all")
        a, r = await accept.bounding_box(), await reject.bounding_box()
        assert a and r and (a["width"], a["height"]) == (r["width"], r["height"])  # equally prominent
        assert a["y"] + a["height"] < DESKTOP["height"]  # on the first screen
        await expect(page.locator("#notice-text")).to_contain_text("unless you agree")
        assert await tracker(g, client) == (dns.rcode.NXDOMAIN, [])

        await accept.click()
        await expect(page.locator("#result")).to_contain_text("Saved")
        await expect(page.locator("#result")).to_contain_text("ActiveCampaign")
        await expect(page.locator("#result")).to_contain_text("a minute or two")  # honest about caches
        await expect(vendor_row(page)).to_have_attribute("data-state", "allowed")
        await expect(vendor_row(page)).to_contain_text("allowed since")
        assert await tracker(g, client) == (dns.rcode.NOERROR, [TRACKER_ADDRESS])

        back = page.get_by_role("link", name="Back to shop.example")
        await expect(back).to_have_attribute("href", "https://shop.example/cart?id=7")

        await page.get_by_role("button", name="Withdraw all consent").click()
        await expect(page.locator("#result")).to_contain_text("Withdrawn")
        await expect(vendor_row(page)).to_have_attribute("data-state", "blocked")
        assert await tracker(g, client) == (dns.rcode.NXDOMAIN, [])

        # The proof: both changes came from the portal, with the notice it showed.
        _, notice = await g.http("GET", "/v1/notice")
        _, audit = await g.http("GET", "/v1/audit?client=127.0.0.1", admin=True)
        latest = audit["events"][:2]
        assert [e["action"] for e in latest] == ["withdrawal", "grant"]
        assert {e["channel"] for e in latest} == {"portal"}
        assert {e["notice_sha256"] for e in latest} == {notice["languages"]["en"]["sha256"]}
        watch.check()


async def test_reject_all_and_choosing_per_category(browser: Browser, upstream: StubUpstream,
                                                    data_dir: Path) -> None:
    async with portal(upstream, data_dir) as g:
        page, watch = await open_portal(browser, g)
        client = await seen_address(page)
        await page.get_by_role("button", name="Reject all").click()
        await expect(page.locator("#result")).to_contain_text("stay blocked")
        await expect(page.locator("fieldset[data-category='marketing'] > p.state")).to_contain_text(
            "blocked since")
        assert await tracker(g, client) == (dns.rcode.NXDOMAIN, [])
        # released from the captive portal exactly as an acceptance would
        _, captive = await g.http("GET", "/captive-portal/api")  # application/captive+json
        assert json.loads(captive)["captive"] is False

        await page.get_by_label("Allow Marketing trackers on this device").check()
        await page.get_by_role("button", name="Save my choices").click()
        await expect(vendor_row(page)).to_have_attribute("data-state", "allowed")
        await expect(page.get_by_label("Allow Analytics trackers on this device")).not_to_be_checked()
        assert await tracker(g, client) == (dns.rcode.NOERROR, [TRACKER_ADDRESS])
        _, state = await g.http("GET", "/v1/consent")
        assert state["choice"]["categories"] == {"marketing": True}  # Analytics lists nothing: not recorded

        # What a person is shown about the vendor, before choosing.
        details = page.locator("article[data-vendor='activecampaign'] details")
        await details.locator("summary").click()
        for fact in ("ac_enable_tracking", "1 year", "Full URL and title of every page visited",
                     "ActiveCampaign, LLC", "trackcmp.net"):
            await expect(details).to_contain_text(fact)
        await expect(page.locator("article[data-vendor='activecampaign']")).to_contain_text(
            "Create profiles for personalised advertising")
        watch.check()


async def test_the_summary_counts_what_the_page_lists(browser: Browser, upstream: StubUpstream, data_dir: Path,
                                                     tmp_path: Path) -> None:
    """A block list is on the page as much as a vendor: the summary counts both, says so, and the
    overview lists both, with scripts and without."""
    hosts = tmp_path / "local.hosts"
    hosts.write_text("0.0.0.0 beacon.localtrackers.test\n0.0.0.0 pixel.localtrackers.test\n", encoding="utf-8")
    source = ListSource(id="localtrackers", name="Local trackers", category="analytics", file=str(hosts))
    cfg = consent_config(make_config(upstream, data_dir))
    cfg = replace(cfg, lists=ListsConfig(sources=(source,)),
                  profiles=ProfilesConfig(networks=(("127.0.0.1/32", "opt-in"), *cfg.profiles.networks)))
    summary = {
        "en": ["All 2 entries listed here (trackers and block lists) are blocked on this device.",
               "1 of 2 entries listed here (trackers and block lists) are allowed on this device.",
               "All 2 entries listed here (trackers and block lists) are allowed on this device."],
        "de": ["Alle 2 hier genannten Einträge (Tracker und Sperrlisten) sind auf diesem Gerät gesperrt.",
               "1 von 2 hier genannten Einträgen (Trackern und Sperrlisten) sind auf diesem Gerät erlaubt.",
               "Alle 2 hier genannten Einträge (Tracker und Sperrlisten) sind auf diesem Gerät erlaubt."],
    }
    rows = {"en": "Local trackers (block list, Analytics): blocked: no choice yet",
            "de": "Local trackers (Sperrliste, Analyse): gesperrt: noch keine Wahl"}
    buttons = {"en": ("Allow Marketing trackers on this device", "Save my choices", "Accept all", "Reject all"),
               "de": ("Marketing-Tracker auf diesem Gerät erlauben", "Meine Wahl speichern", "Alle akzeptieren",
                      "Alle ablehnen")}
    async with running_gate(cfg) as g:
        for scripts in (False, True):
            for lang in ("en", "de"):
                context = await browser.new_context(java_script_enabled=scripts, locale=lang, viewport=DESKTOP)
                page = await context.new_page()
                await page.goto(g.api_url + "/")
                if scripts:
                    await expect(page.locator("body")).to_have_attribute("data-ready", "true")
                marketing, save, accept, reject = buttons[lang]
                none, some, every = summary[lang]
                await expect(page.locator("#summary")).to_contain_text(none)
                listed = page.locator("#overview li[data-list='localtrackers']")
                await expect(listed).to_have_text(rows[lang])
                await expect(page.locator("#overview li")).to_have_count(2)
                await page.get_by_label(marketing).check()
                await page.get_by_role("button", name=save).click()
                await expect(page.locator("#summary")).to_contain_text(some)
                await page.get_by_role("button", name=accept).click()
                await expect(page.locator("#summary")).to_contain_text(every)
                await expect(listed).to_have_attribute("data-state", "allowed")
                await page.get_by_role("button", name=reject).click()
                await expect(page.locator("#summary")).to_contain_text(none)
                await context.close()
                # the next round is a new visitor
                assert (await g.http("POST", "/v1/clients/127.0.0.1/session/end", admin=True))[0] == 200


async def test_keyboard_only(browser: Browser, upstream: StubUpstream, data_dir: Path) -> None:
    async with portal(upstream, data_dir) as g:
        page, watch = await open_portal(browser, g)
        client = await seen_address(page)

        async def tab_to(element_id: str) -> None:
            for _ in range(60):
                await page.keyboard.press("Tab")
                if await page.evaluate("document.activeElement && document.activeElement.id") == element_id:
                    return
            raise AssertionError(f"#{element_id} cannot be reached with Tab")

        await page.keyboard.press("Tab")
        await expect(page.get_by_role("link", name="Skip to the choices")).to_be_focused()
        await tab_to("accept-all")
        await page.keyboard.press("Enter")
        await expect(vendor_row(page)).to_have_attribute("data-state", "allowed")
        assert await tracker(g, client) == (dns.rcode.NOERROR, [TRACKER_ADDRESS])

        await tab_to("cat-marketing")
        await page.keyboard.press("Space")  # untick Marketing
        await expect(page.locator("#cat-marketing")).not_to_be_checked()
        await tab_to("save")
        await page.keyboard.press("Enter")
        await expect(vendor_row(page)).to_have_attribute("data-state", "blocked")
        assert await tracker(g, client) == (dns.rcode.NXDOMAIN, [])
        # focus is visible on whatever has it
        outline = await page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
        assert outline not in ("none", "")
        watch.check()


async def test_kiosk_large_type_and_end_session(browser: Browser, upstream: StubUpstream, data_dir: Path) -> None:
    async with portal(upstream, data_dir, profile="kiosk") as g:
        page, watch = await open_portal(browser, g)
        client = await seen_address(page)
        await expect(page.locator("body")).to_have_class(re.compile(r"\bkiosk\b"))
        size = await page.evaluate("parseFloat(getComputedStyle(document.body).fontSize)")
        assert size >= 20
        end = page.get_by_role("button", name="End session")
        await expect(end).to_be_visible()
        await expect(page.locator("#kiosk-text")).to_contain_text("reset for the next person")

        await page.get_by_role("button", name="Accept all").click()
        await expect(vendor_row(page)).to_have_attribute("data-state", "allowed")
        assert await tracker(g, client) == (dns.rcode.NOERROR, [TRACKER_ADDRESS])
        await end.click()
        # what ends now, and what lives on in the browser's cache
        await expect(page.locator("#result")).to_contain_text("Session ended: the choice made here is reset on this "
                                                              "kiosk and on every address it reached")
        await expect(page.locator("#result")).to_contain_text("may still use a tracker for a minute or two")
        await expect(vendor_row(page)).to_have_attribute("data-state", "blocked")
        assert await tracker(g, client) == (dns.rcode.NXDOMAIN, [])
        _, audit = await g.http("GET", "/v1/audit?client=127.0.0.1", admin=True)
        assert audit["events"][0]["action"] == "reset"
        watch.check()


async def test_kiosk_layout_elsewhere_has_end_session_too(browser: Browser, upstream: StubUpstream,
                                                          data_dir: Path) -> None:
    """?layout=kiosk on a network that is not a kiosk's: the button is there, and ends the session by
    withdrawing every grant (a reset there would forget an opt-out)."""
    async with portal(upstream, data_dir) as g:
        page, watch = await open_portal(browser, g, "?layout=kiosk", viewport=KIOSK_SCREEN)
        client = await seen_address(page)
        await expect(page.locator("body")).to_have_class(re.compile(r"\bkiosk\b"))
        end = page.get_by_role("button", name="End session")
        await expect(end).to_be_visible()
        await expect(page.locator("#kiosk-text")).to_contain_text("withdrawn for the next person")
        await page.get_by_role("button", name="Accept all").click()
        await expect(vendor_row(page)).to_have_attribute("data-state", "allowed")
        assert await tracker(g, client) == (dns.rcode.NOERROR, [TRACKER_ADDRESS])
        await end.click()
        await expect(page.locator("#result")).to_contain_text("Session ended: every grant made on this device is "
                                                              "withdrawn")
        await expect(page.locator("#result")).to_contain_text("a minute or two")
        assert await tracker(g, client) == (dns.rcode.NXDOMAIN, [])
        _, audit = await g.http("GET", "/v1/audit?client=127.0.0.1", admin=True)
        assert audit["events"][0]["action"] == "withdrawal"
        watch.check()


@pytest.mark.skipif(not ipv6_loopback(), reason="::1 is not configured on this machine")
async def test_the_page_records_the_choice_over_the_other_family_too(upstream: StubUpstream, data_dir: Path) -> None:
    """HTTP over IPv4, DNS over IPv6 from one device: dnsgate grants only the address that asks, so the
    page also records the choice through v6.<portal host> (here mapped to ::1, as the device's DNS
    would answer it), naming its pairing token. Each address chooses for itself."""
    rules = (f"{RULES}, MAP v6.consent.dnsgate.internal [::1]")
    cfg = make_config(upstream, data_dir, api=ApiConfig(listen="[::]:0", admin_token=TOKEN),
                      dns=DnsConfig(listen=("[::]:0",)))
    async with launched([*CHROMIUM_ARGS, f"--host-resolver-rules={rules}"]) as chromium, \
            running_gate(consent_config(cfg)) as g:
        origin = f"http://127.0.0.1:{g.running.api.port}"
        page = await (await chromium.new_context(viewport=DESKTOP)).new_page()
        watch = Watch(origin)
        watch.attach(page)
        response = await page.goto(origin + "/")
        assert response is not None and response.ok
        await expect(page.locator("body")).to_have_attribute("data-ready", "true")

        async def over(family: str) -> int:
            server = "::1" if family == "v6" else "127.0.0.1"
            return (await g.query(TRACKER, source=server, server=server)).rcode()

        assert (await over("v4"), await over("v6")) == (dns.rcode.NXDOMAIN, dns.rcode.NXDOMAIN)
        await page.get_by_role("button", name="Accept all").click()
        await expect(vendor_row(page)).to_have_attribute("data-state", "allowed")

        async def both() -> bool:
            return (await over("v4"), await over("v6")) == (dns.rcode.NOERROR, dns.rcode.NOERROR)

        await eventually(both)
        (event,) = [e for e in (await _audit(g, "::1")) if e["action"] == "grant"]
        assert event["channel"] == "portal" and "made through this address by the portal of address 127.0.0.1" \
            in event["reason"]
        await page.get_by_role("button", name="Withdraw all consent").click()

        async def neither() -> bool:
            return (await over("v4"), await over("v6")) == (dns.rcode.NXDOMAIN, dns.rcode.NXDOMAIN)

        await eventually(neither)
        watch.check()


async def _audit(g: Gate, client: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{g.running.api.port}/v1/audit?client={client}"
    async with aiohttp.ClientSession() as session, session.get(
            url, headers={"Authorization": f"Bearer {TOKEN}"}) as response:
        return list((await response.json())["events"])


async def test_gpc_is_shown_with_what_it_means_here(browser: Browser, upstream: StubUpstream,
                                                    data_dir: Path) -> None:
    async with portal(upstream, data_dir, profile="opt-out") as g:
        page, watch = await open_portal(browser, g, extra_http_headers={"Sec-GPC": "1"})
        client = await seen_address(page)
        gpc = page.locator("#gpc")
        await expect(gpc).to_be_visible()
        await expect(gpc).to_contain_text("Global Privacy Control")
        await expect(gpc).to_contain_text("counts as your opt-out")
        await expect(page.locator("#summary")).to_contain_text("opt-out")
        await expect(vendor_row(page)).to_have_attribute("data-state", "blocked")  # the signal was honoured
        await expect(vendor_row(page)).to_contain_text("until you change it")  # an opt-out has no end date
        assert await tracker(g, client) == (dns.rcode.NXDOMAIN, [])
        await expect(page.locator("#ask-again")).to_contain_text("not be asked")
        watch.check()

    async with portal(upstream, data_dir.parent / "opt-in") as g:
        page, _ = await open_portal(browser, g, extra_http_headers={"Sec-GPC": "1"})
        await expect(page.locator("#gpc")).to_contain_text("GPC never grants anything")
        page, _ = await open_portal(browser, g)
        await expect(page.locator("#gpc")).to_be_hidden()


@pytest.mark.parametrize("given", ["javascript:alert(document.domain)", "data:text/html,hi", "//evil.example/",
                                   "https://user:pw@shop.example/", "ftp://shop.example/", "not a url"])
async def test_return_to_only_takes_web_addresses(browser: Browser, gate: Gate, given: str) -> None:
    page, watch = await open_portal(browser, gate, "?return_to=" + given.replace("&", "%26"))
    await expect(page.locator("#return")).to_be_hidden()
    assert await page.locator("a[href^='javascript']").count() == 0
    watch.check()


async def test_accessibility_and_layout(browser: Browser, upstream: StubUpstream, data_dir: Path) -> None:
    async with portal(upstream, data_dir) as g:
        for viewport, query in ((DESKTOP, "?return_to=https://shop.example/"), (PHONE, ""),
                                (KIOSK_SCREEN, "?layout=kiosk")):
            page, watch = await open_portal(browser, g, query, viewport=viewport)
            await page.get_by_role("button", name="Accept all").click()
            await expect(page.locator("#result")).to_contain_text("Saved")
            for summary in await page.locator("details summary").all():
                await summary.click()  # check the vendor facts too
            results = await Axe().run(page, options={"resultTypes": ["violations"]})
            assert results.response["testEngine"]["name"] == "axe-core"  # it did run
            serious = [(v["id"], v["impact"], [n["target"] for n in v["nodes"]])
                       for v in results.response["violations"] if v["impact"] in ("serious", "critical")]
            assert serious == [], serious
            # responsive: nothing is wider than the screen
            root = "document.documentElement"
            overflow = await page.evaluate(f"{root}.scrollWidth - {root}.clientWidth")
            assert overflow <= 0, (viewport, overflow)
            watch.check()


async def test_without_javascript_choose_withdraw_and_see_the_state(browser: Browser, upstream: StubUpstream,
                                                                     data_dir: Path) -> None:
    """The page dnsgate renders, with scripts off: plain forms choose, withdraw and show the state, and
    the device's DNS answers follow each step; the evidence is the same as the script's."""
    async with portal(upstream, data_dir) as g:
        context = await browser.new_context(java_script_enabled=False, viewport=DESKTOP)
        page = await context.new_page()
        watch = Watch(g.api_url)
        watch.attach(page)
        response = await page.goto(g.api_url + "/?return_to=https://shop.example/cart")
        assert response is not None and response.ok
        assert await page.locator("body").get_attribute("data-ready") is None  # no script ran
        client = await seen_address(page)
        await expect(page.locator("#operator")).to_contain_text("has not given their name")
        await expect(vendor_row(page)).to_have_attribute("data-state", "blocked")
        await expect(page.locator("#in-force")).to_have_text("No choice of yours is in force on this device yet.")
        assert await tracker(g, client) == (dns.rcode.NXDOMAIN, [])

        await page.get_by_role("button", name="Accept all").click()
        await expect(page.locator("#result")).to_contain_text("Saved")
        await expect(page.locator("#result")).to_contain_text("ActiveCampaign")
        await expect(vendor_row(page)).to_have_attribute("data-state", "allowed")
        await expect(vendor_row(page)).to_contain_text("allowed since")
        await expect(page.locator("#in-force")).to_contain_text("In force: your choice of")
        assert await tracker(g, client) == (dns.rcode.NOERROR, [TRACKER_ADDRESS])
        await expect(page.get_by_role("link", name="Back to shop.example")).to_have_attribute(
            "href", "https://shop.example/cart")

        await page.get_by_label("Allow Marketing trackers on this device").uncheck()
        await page.get_by_role("button", name="Save my choices").click()
        await expect(vendor_row(page)).to_have_attribute("data-state", "blocked")
        await expect(page.locator("#result")).to_contain_text("Withdrawn")
        assert await tracker(g, client) == (dns.rcode.NXDOMAIN, [])

        await page.get_by_role("button", name="Accept all").click()
        await expect(vendor_row(page)).to_have_attribute("data-state", "allowed")
        assert await tracker(g, client) == (dns.rcode.NOERROR, [TRACKER_ADDRESS])
        await page.get_by_role("button", name="Withdraw all consent").click()
        await expect(page.locator("#result")).to_contain_text("Withdrawn")
        await expect(page.locator("#result")).to_contain_text("a minute or two")
        await expect(vendor_row(page)).to_have_attribute("data-state", "blocked")
        assert await tracker(g, client) == (dns.rcode.NXDOMAIN, [])

        await page.get_by_role("button", name="Reject all").click()  # nothing was allowed: no cache warning
        await expect(page.locator("#result")).to_have_text("Saved. The trackers stay blocked on this device.")
        await expect(page.locator("fieldset[data-category='marketing'] > p.state")).to_contain_text("blocked since")
        assert await tracker(g, client) == (dns.rcode.NXDOMAIN, [])

        _, notice = await g.http("GET", "/v1/notice")
        _, audit = await g.http("GET", "/v1/audit?client=127.0.0.1", admin=True)
        latest = audit["events"][:5]
        assert [e["action"] for e in latest] == ["refusal", "withdrawal", "grant", "withdrawal", "grant"]
        assert {e["channel"] for e in latest} == {"portal"}
        assert {(e["notice_version"], e["notice_sha256"], e["language"]) for e in latest} == {
            (notice["version"], notice["languages"]["en"]["sha256"], "en")}
        watch.check()


async def test_german_end_to_end(browser: Browser, upstream: StubUpstream, data_dir: Path) -> None:
    """A browser asking for German gets the page, the notice and the catalog's facts in German, with
    and without scripts, and the choice records the German notice and the German facts it showed."""
    async with portal(upstream, data_dir) as g:
        _, notice = await g.http("GET", "/v1/notice")
        (item,) = notice["items"]
        for scripts in (False, True):
            context = await browser.new_context(java_script_enabled=scripts, locale="de-DE", viewport=DESKTOP)
            page = await context.new_page()
            await page.goto(g.api_url + "/")
            if scripts:
                await expect(page.locator("body")).to_have_attribute("data-ready", "true")
            await expect(page.locator("html")).to_have_attribute("lang", "de")
            await expect(page.locator("h1")).to_have_text("Tracking in diesem Netz")
            await expect(page.locator("#notice-text")).to_contain_text("solange Sie nicht zustimmen")
            # the catalog's facts: categories, the vendor's summary, data, cookies, recipients, names
            analytics = page.locator("fieldset[data-category='analytics']")
            await expect(analytics.locator("legend")).to_have_text("Analyse")
            await expect(analytics).to_contain_text("Tracker, die messen, wie Websites genutzt werden")
            await expect(page.get_by_label("Marketing-Tracker auf diesem Gerät erlauben")).to_be_visible()
            await expect(vendor_row(page)).to_contain_text("ActiveCampaign (Marketing): gesperrt")
            card = page.locator("article[data-vendor='activecampaign']")
            await expect(card).to_contain_text("ActiveCampaign ist eine CRM- und Marketing-Automatisierungsplattform")
            await card.locator("details summary").click()
            for fact in ("Vollständige URL und Titel jeder besuchten Seite", "1 Jahr",
                         "Merkt sich, ob das Site-Tracking für diesen Browser eingeschaltet ist.",
                         "Die Daten werden auf Infrastruktur in den USA verarbeitet",
                         "Das ältere Tracking-Snippet"):
                await expect(card.locator("details")).to_contain_text(fact)
            await expect(card).not_to_contain_text("Full URL and title")
            await page.get_by_role("button", name="Alle akzeptieren").click()
            await expect(page.locator("#result")).to_contain_text("Gespeichert")
            await expect(vendor_row(page)).to_have_attribute("data-state", "allowed")
            _, audit = await g.http("GET", "/v1/audit?client=127.0.0.1&limit=1", admin=True)
            (event,) = audit["events"]
            assert (event["language"], event["notice_sha256"]) == ("de", notice["languages"]["de"]["sha256"])
            # what the choice covers is the vendor as the German page showed it
            assert event["covers"] == {"vendor:activecampaign": item["fingerprints"]["de"]}
            await page.get_by_role("button", name="Alle Zustimmungen widerrufen").click()
            await expect(vendor_row(page)).to_have_attribute("data-state", "blocked")
            await context.close()
