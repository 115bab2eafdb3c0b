"""The consent portal over HTTP (no browser): the page and its assets, the strings file, the state the
page reads, the read-only status with CORS, the RFC 8908 captive-portal API, and error hygiene."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import aiohttp
import pytest

from dnsgate.config import ConfigError, PortalConfig, parse_config_text
from tests.conftest import Gate, make_config, running_gate
from tests.support.consent_fixtures import KIOSK, consent_config
from tests.support.stub_upstream import StubUpstream

PORTAL = Path(__file__).resolve().parents[2] / "dnsgate" / "data" / "portal"
SITE = "https://shop.example"


async def fetch(url: str, method: str = "GET", headers: dict[str, str] | None = None,
                source: str = "127.0.0.1") -> tuple[int, dict[str, str], bytes]:
    connector = aiohttp.TCPConnector(local_addr=(source, 0))
    async with aiohttp.ClientSession(connector=connector) as session, session.request(
            method, url, headers=headers or {}) as response:
        return response.status, dict(response.headers), await response.read()


@pytest.fixture
async def portal_gate(upstream: StubUpstream, data_dir: Path) -> AsyncIterator[Gate]:
    cfg = consent_config(make_config(upstream, data_dir))
    cfg = replace(cfg, portal=PortalConfig(captive=True, cors_origins=(SITE,)))
    async with running_gate(cfg) as g:
        yield g


class Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


async def test_page_is_small_same_origin_and_has_no_inline_code(gate: Gate) -> None:
    status, headers, body = await fetch(gate.api_url + "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    csp = headers["Content-Security-Policy"]
    for directive in ("default-src 'none'", "script-src 'self'", "style-src 'self'", "frame-ancestors 'none'",
                      "connect-src 'self' http://*.pair.consent.dnsgate.internal"):
        assert directive in csp
    assert "unsafe" not in csp
    parser = Tags()
    parser.feed(body.decode())
    assert parser.tags[0][0] == "html" and parser.tags[0][1]["lang"] == "en"
    for tag, attrs in parser.tags:
        assert not any(name.startswith("on") or name == "style" for name in attrs), (tag, attrs)
        if tag == "script":
            assert attrs.get("src", "").startswith("/portal/")  # type: ignore[union-attr]
        value = attrs.get("src")
        assert value is None or value.startswith("/"), (tag, attrs)  # nothing loaded from elsewhere
        value = attrs.get("href")  # links elsewhere (a vendor's privacy policy) give away nothing
        assert value is None or value.startswith(("/", "#")) or attrs.get("rel") == "noopener noreferrer", attrs
        if tag == "form":
            assert attrs.get("method") == "post" and attrs.get("action") == "/"
    total = len(body)
    for name, kind in (("app.js", "text/javascript"), ("app.css", "text/css"),
                       ("strings.json", "application/json"), ("icon.svg", "image/svg+xml")):
        status, headers, asset = await fetch(f"{gate.api_url}/portal/{name}")
        assert status == 200 and headers["Content-Type"].startswith(kind), name
        assert headers["X-Content-Type-Options"] == "nosniff"
        total += len(asset)
    assert total < 64 * 1024  # small: the whole portal, uncompressed
    for path in ("/portal/nope.js", "/portal/..%2Fapi.py", "/portal/"):
        status, _, body = await fetch(gate.api_url + path)
        assert status == 404 and json.loads(body)["error"]["code"] == "not_found"


def test_every_string_the_page_uses_is_in_the_strings_file() -> None:
    strings = {p.stem: json.loads(p.read_text()) for p in (PORTAL / "lang").glob("*.json")}
    assert {"en", "de"} <= set(strings)
    english = strings["en"]
    html = (PORTAL / "index.html").read_text()
    script = (PORTAL / "app.js").read_text()
    used = set(re.findall(r'data-t="([a-z0-9_-]+)"', html))
    used |= set(re.findall(r'\bt\("([a-z0-9_-]+)"', script)) - {"profile_", "gpc_"}  # + a profile name:
    used |= {f"profile_{p}" for p in ("opt-in", "opt-out", "kiosk", "deny", "allow")}
    used |= {f"gpc_{p}" for p in ("opt-in", "opt-out", "kiosk", "deny", "allow")}
    used |= set(re.findall(r'"(summary_[a-z_]+|state_[a-z_]+|result_[a-z_]+|cookie_[a-z]+)"', script))
    server = (PORTAL.parent.parent / "http/portal_page.py").read_text()  # the page as the server renders it
    used |= set(re.findall(r'\bt\("([a-z0-9_-]+)"', html + server))
    used |= set(re.findall(r'"((?:summary|state|result|in_force)_[a-z_]+)"', server)) - {"result_kind"}
    missing = sorted(k for k in used if k not in english)
    assert not missing, missing
    for language, table in strings.items():  # a translation names the same keys
        assert set(table) == set(english), language
    # no user-visible English hides in the script: every string literal shown goes through t()
    assert not re.search(r'textContent\s*=\s*"', script)


async def test_state_for_the_page_says_since_until_and_gpc(gate: Gate) -> None:
    status, before = await gate.http("GET", "/v1/consent", headers={"Sec-GPC": "1"})
    assert status == 200 and before["sec_gpc"] == "1"
    ac = next(v for v in before["vendors"] if v["id"] == "activecampaign")
    assert ac == {**ac, "allowed": False, "by_choice": False, "since": None, "until": None}
    assert before["by_category"]["analytics"]["allowed"] is False
    status, after = await gate.http("PUT", "/v1/consent", json={"categories": ["marketing"], "channel": "portal"})
    assert status == 200 and after["sec_gpc"] is None and after["pairing"]["name"].endswith(
        ".pair.consent.dnsgate.internal")
    ac = next(v for v in after["vendors"] if v["id"] == "activecampaign")
    assert ac["allowed"] and ac["by_choice"] and ac["since"] == after["choice"]["made_at"]
    assert ac["until"] == after["choice"]["expires_at"]
    assert after["by_category"] == {  # Analytics lists nothing: the choice says nothing of it
        "marketing": {**after["by_category"]["marketing"], "allowed": True, "by_choice": True},
        "analytics": {**after["by_category"]["analytics"], "allowed": False, "by_choice": False}}


async def test_status_has_no_identity_and_cors_only_for_listed_origins(portal_gate: Gate) -> None:
    url = portal_gate.api_url + "/v1/consent/status"
    status, headers, body = await fetch(url, headers={"Origin": SITE})
    state = json.loads(body)
    assert status == 200 and headers["Access-Control-Allow-Origin"] == SITE and headers["Vary"] == "Origin"
    assert "Access-Control-Allow-Credentials" not in headers and headers["Cache-Control"] == "no-store"
    assert state["vendors"]["activecampaign"] == {"allowed": False, "by_choice": False, "until": None}
    assert state["decided"] is False and state["profile"] == "opt-in"
    assert "127.0.0.1" not in body.decode() and "identity" not in state  # nothing that names the device
    assert state["portal_url"] == f"http://consent.dnsgate.internal:{portal_gate.running.api.port}/"

    for other in ("https://evil.example", "https://shop.example.evil", "null", SITE + ":443"):
        status, headers, _ = await fetch(url, headers={"Origin": other})
        assert status == 200 and "Access-Control-Allow-Origin" not in headers and headers["Vary"] == "Origin"

    preflight = {"Origin": SITE, "Access-Control-Request-Method": "GET",
                 "Access-Control-Request-Private-Network": "true"}
    status, headers, _ = await fetch(url, "OPTIONS", preflight)
    assert status == 204 and headers["Access-Control-Allow-Origin"] == SITE
    assert headers["Access-Control-Allow-Private-Network"] == "true"
    assert headers["Access-Control-Allow-Methods"] == "GET" and headers["Vary"] == "Origin"
    assert "Access-Control-Allow-Credentials" not in headers
    status, headers, body = await fetch(url, "OPTIONS", {**preflight, "Origin": "https://evil.example"})
    assert status == 403 and json.loads(body)["error"]["code"] == "origin_refused"
    assert "Access-Control-Allow-Origin" not in headers
    status, _, body = await fetch(url, "OPTIONS", {**preflight, "Access-Control-Request-Method": "PUT"})
    assert status == 405
    # CORS never opens a state change: the consent API refuses other origins as before.
    status, answer = await portal_gate.http("PUT", "/v1/consent", json={"categories": ["marketing"]},
                                            headers={"Origin": SITE})
    assert status == 403 and answer["error"]["code"] == "origin_refused"

    await portal_gate.http("PUT", "/v1/consent", json={"categories": ["marketing"]})
    _, _, body = await fetch(url)
    state = json.loads(body)
    assert state["decided"] and state["vendors"]["activecampaign"]["allowed"]
    assert state["categories"]["marketing"]["until"] is not None


@pytest.mark.parametrize("first", ["accept", "reject"])
async def test_captive_until_the_first_choice_whatever_it_is(portal_gate: Gate, first: str) -> None:
    url = portal_gate.api_url + "/captive-portal/api"
    status, headers, body = await fetch(url)
    assert status == 200 and headers["Content-Type"].startswith("application/captive+json")
    assert "no-store" in headers["Cache-Control"]
    assert json.loads(body) == {"captive": True, "user-portal-url":
                                f"http://consent.dnsgate.internal:{portal_gate.running.api.port}/"}
    categories = ["marketing", "analytics"] if first == "accept" else []
    status, _ = await portal_gate.http("PUT", "/v1/consent", json={"categories": categories})
    assert status == 200
    assert json.loads((await fetch(url))[2])["captive"] is False
    assert json.loads((await fetch(url, source="127.0.0.2"))[2])["captive"] is True  # another device
    # withdrawing is a choice too: still released
    await portal_gate.http("DELETE", "/v1/consent")
    assert json.loads((await fetch(url))[2])["captive"] is False


async def test_captive_again_after_a_kiosk_session_ends(portal_gate: Gate) -> None:
    kiosk = KIOSK + "7"
    url = portal_gate.api_url + "/captive-portal/api"
    await portal_gate.http("PUT", "/v1/consent", source=kiosk, json={"categories": []})
    assert json.loads((await fetch(url, source=kiosk))[2])["captive"] is False
    status, state = await portal_gate.http("POST", "/v1/session/end", source=kiosk)
    assert status == 200 and state["choice"] is None  # answered with the new state
    assert json.loads((await fetch(url, source=kiosk))[2])["captive"] is True


async def test_captive_api_is_off_by_default(gate: Gate) -> None:
    status, body = await gate.http("GET", "/captive-portal/api")
    assert status == 404 and body["error"]["code"] == "not_found"


async def test_errors_have_one_shape_and_405_says_what_is_allowed(gate: Gate) -> None:
    status, headers, body = await fetch(gate.api_url + "/v1/consent", "PATCH")
    assert status == 405 and set(headers["Allow"].split(",")) >= {"GET", "PUT", "DELETE"}
    assert json.loads(body) == {"error": {"status": 405, "code": "method_not_allowed",
                                          "message": "Method Not Allowed"}}
    status, body = await gate.http("GET", "/nowhere")
    assert status == 404 and body == {"error": {"status": 404, "code": "not_found", "message": "Not Found"}}
    status, body = await gate.http("PUT", "/v1/consent", json={"categories": ["nope"]})
    assert status == 400 and body["error"]["field"] == "categories[0]" and set(body["error"]) == {
        "status", "code", "message", "field"}


async def test_days_as_a_whole_float_is_accepted(gate: Gate) -> None:
    status, body = await gate.http("PUT", "/v1/consent", json={"categories": ["marketing"], "days": 30.0})
    assert status == 200 and body["choice"]["expires_at"] is not None
    status, body = await gate.http("PUT", "/v1/consent", json={"categories": ["marketing"], "days": 30.5})
    assert status == 400 and body["error"]["field"] == "days"


@pytest.mark.parametrize(("text", "key"), [
    ("[portal]\nhost = 'consent'", "portal.host"),
    ("[portal]\nhost = 'bad_name.example'", "portal.host"),
    ("[portal]\nhost = '*.example.com'", "portal.host"),
    ("[portal]\naddresses = ['consent.example']", "portal.addresses"),
    ("[portal]\nurl = 'javascript:alert(1)'", "portal.url"),
    ("[portal]\ncors_origins = ['https://shop.example/']", "portal.cors_origins"),
    ("[portal]\ncaptive = 'yes'", "portal.captive"),
])
def test_portal_config_errors_name_the_key(text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(key)):
        parse_config_text(text)


async def test_portal_host_is_configurable(upstream: StubUpstream, data_dir: Path) -> None:
    cfg = replace(make_config(upstream, data_dir), portal=PortalConfig(host="consent.home.arpa",
                                                                      url="https://consent.example.net/"))
    async with running_gate(cfg) as g:
        status, headers, _ = await fetch(g.api_url + "/")
        assert "http://*.pair.consent.home.arpa" in headers["Content-Security-Policy"]
        port = g.running.api.port
        status, state = await g.http("PUT", "/v1/consent", json={"categories": []},
                                     headers={"Origin": f"http://consent.home.arpa:{port}"})
        assert status == 200 and state["pairing"]["name"].endswith(".pair.consent.home.arpa")
        # the configured URL is an origin of the portal as served (behind its proxy); other ports are not
        for origin, expected in (("https://consent.example.net", 200), ("http://consent.home.arpa", 403)):
            status, _ = await g.http("PUT", "/v1/consent", json={"categories": []}, headers={"Origin": origin})
            assert status == expected, origin
        _, status_body = await g.http("GET", "/v1/consent/status")
        assert status_body["portal_url"] == "https://consent.example.net/"


async def test_the_form_needs_its_page_and_its_origin(gate: Gate) -> None:
    """The page's forms: a post from another site is refused by the Origin check; a post without an
    Origin (an old or text browser) needs the token of a page dnsgate gave this address."""
    status, _, body = await fetch(gate.api_url + "/")
    page = body.decode()
    token = re.search(r'name="token" value="([^"]+)"', page)
    version = re.search(r'name="notice_version" value="([^"]+)"', page)
    sha = re.search(r'name="notice_sha256" value="([^"]+)"', page)
    assert token and version and sha
    form = {"action": "accept_all", "notice_version": version[1], "notice_sha256": sha[1], "language": "en"}

    async def post(fields: dict[str, str], **headers: str) -> tuple[int, str]:
        async with aiohttp.ClientSession() as session, session.post(
                gate.api_url + "/", data=fields, headers=headers, allow_redirects=False) as r:
            return r.status, r.headers.get("Location", "")

    assert (await post({**form, "token": token[1]}, Origin="https://evil.example"))[0] == 403
    for forged in ("", "1.2", token[1][:-1] + ("0" if token[1][-1] != "0" else "1")):
        assert await post({**form, "token": forged}) == (303, "/?done=expired")
    assert (await post(form))[0] == 400  # no token at all
    _, state = await gate.http("GET", "/v1/consent")
    assert state["choice"] is None  # nothing was recorded
    status, location = await post({**form, "token": token[1], "return_to": "https://shop.example/"})
    assert status == 303 and location == "/?return_to=https://shop.example/&done=granted"
    _, state = await gate.http("GET", "/v1/consent")
    assert state["choice"]["channel"] == "portal" and state["choice"]["notice"]["version"] == version[1]
    # A page shown before the notice changed: nothing recorded, the page asks again.
    assert (await post({**form, "token": token[1], "notice_version": "old"}))[1] == "/?done=notice_changed"


async def test_the_operator_is_named_at_the_top(upstream: StubUpstream, data_dir: Path) -> None:
    cfg = replace(make_config(upstream, data_dir), portal=PortalConfig(
        operator="Café <b>Ørsted</b> & Co", contact="privacy@cafe.test", privacy_url="https://cafe.test/privacy"))
    async with running_gate(cfg) as g:
        _, _, body = await fetch(g.api_url + "/")
        page = body.decode()
        assert "Café &lt;b&gt;Ørsted&lt;/b&gt; &amp; Co" in page and "<b>Ørsted" not in page  # escaped
        assert "privacy@cafe.test" in page and 'href="https://cafe.test/privacy"' in page
        assert "has not given" not in page
        assert "warning" not in g.running.ready_line()
    async with running_gate(make_config(upstream, data_dir / "unnamed")) as g:
        _, _, body = await fetch(g.api_url + "/")
        assert "has not given their name or a contact" in body.decode()
        assert "warning: no operator named (portal.operator)" in g.running.ready_line()
        _, notice = await g.http("GET", "/v1/notice")
        assert notice["operator"] is None


async def test_without_javascript_the_kiosk_layout_ends_a_session_everywhere(portal_gate: Gate) -> None:
    """?layout=kiosk shows End session on any network; on a kiosk's it resets the session, elsewhere
    it withdraws (the next person starts with nothing allowed; an opt-out is never forgotten)."""
    for source, done, action in ((KIOSK + "77", "session_ended", "reset"), ("127.0.0.77", "session_withdrawn",
                                                                             "withdrawal")):
        await portal_gate.http("PUT", "/v1/consent", source=source, json={"categories": ["marketing"]})
        connector = aiohttp.TCPConnector(local_addr=(source, 0))
        async with aiohttp.ClientSession(connector=connector) as session:
            async with session.get(portal_gate.api_url + "/?layout=kiosk") as r:
                page = await r.text()
            bar = re.search(r'<div id="kiosk" class="kiosk-bar"( hidden)?>', page)
            assert bar is not None and bar[1] is None, source  # shown
            token = re.search(r'name="token" value="([^"]+)"', page)
            assert token
            async with session.post(portal_gate.api_url + "/", allow_redirects=False, data={
                    "action": "end_session", "token": token[1], "layout": "kiosk"}) as r:
                assert r.status == 303 and r.headers["Location"] == f"/?layout=kiosk&done={done}", source
            async with session.get(portal_gate.api_url + f"/?layout=kiosk&done={done}") as r:
                assert "Session ended" in await r.text() and "a minute or two" in await r.text()
        _, log = await portal_gate.http("GET", f"/v1/audit?client={source}", admin=True)
        assert log["events"][0]["action"] == action, source
        assert (await portal_gate.query("trackcmp.net", source=source)).rcode() == 3  # NXDOMAIN
