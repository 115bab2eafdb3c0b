"""API hardening over the real aiohttp server: security headers on every response, the admin
token (constant time, never logged), a separate admin listener, body limits, and a rate limit on
consent changes per client."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from dnsgate.http.guard import AdminSessions, ChangeLimiter, json_response, token_matches
from tests.conftest import TOKEN, Gate, make_config, running_gate
from tests.support.stub_upstream import StubUpstream

PATHS = ["/healthz", "/v1/consent", "/v1/notice", "/v1/vendors", "/metrics", "/v1/stats", "/dashboard",
         "/v1/clients", "/no/such/page"]


async def headers_of(url: str, method: str = "GET", **kw: object) -> tuple[int, dict[str, str]]:
    async with aiohttp.ClientSession() as session, session.request(method, url, **kw) as response:  # type: ignore[arg-type]
        await response.read()
        return response.status, dict(response.headers)


@pytest.mark.parametrize("path", PATHS)
async def test_security_headers_on_every_page(gate: Gate, path: str) -> None:
    status, headers = await headers_of(gate.api_url + path)
    assert status in (200, 401, 404)
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["Referrer-Policy"] == "no-referrer"


async def test_errors_and_state_changes_carry_the_headers_too(gate: Gate) -> None:
    cases: list[tuple[str, str, dict[str, Any]]] = [
        ("PUT", "/v1/consent", {"data": b"x", "headers": {"Content-Type": "text/plain"}}),
        ("PUT", "/v1/consent", {"json": {"categories": ["marketing"]}}),
        ("POST", "/v1/reload", {})]
    for method, path, kw in cases:
        status, headers = await headers_of(gate.api_url + path, method, **kw)
        assert status in (200, 401, 415)
        assert headers["X-Content-Type-Options"] == "nosniff" and "Content-Security-Policy" in headers


async def test_dashboard_keeps_its_own_policy(gate: Gate) -> None:
    _, headers = await headers_of(gate.api_url + "/dashboard")
    assert "script-src 'self'" in headers["Content-Security-Policy"] or "default-src 'self'" in \
        headers["Content-Security-Policy"]


def test_token_comparison_hashes_both_sides() -> None:
    assert token_matches("secret", "secret")
    assert not token_matches("secret", "secreT")
    assert not token_matches("", "secret") and not token_matches("secret" * 100, "secret")


async def test_admin_token_is_never_logged(gate: Gate, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    assert (await gate.http("GET", "/v1/clients", admin=True))[0] == 200
    assert (await gate.http("PUT", "/v1/clients/10.0.0.9/consent", json={"categories": ["marketing"]},
                            admin=True))[0] == 200
    wrong = "wrong-" + TOKEN
    assert (await gate.http("GET", "/v1/clients", headers={"Authorization": f"Bearer {wrong}"}))[0] == 401
    assert (await gate.http("POST", "/v1/reload", headers={"Authorization": f"Bearer {wrong}"}))[0] == 401
    assert caplog.records, "nothing was logged at all: the check below would prove nothing"
    assert TOKEN not in caplog.text and wrong not in caplog.text


async def test_admin_endpoints_on_their_own_listener(upstream: StubUpstream, data_dir: Path) -> None:
    cfg = make_config(upstream, data_dir)
    async with running_gate(replace(cfg, api=replace(cfg.api, admin_listen="127.0.0.1:0"))) as g:
        assert g.running.admin is not None
        admin_url = f"http://{g.running.admin}"
        status, body = await g.http("GET", "/v1/clients", admin=True)
        assert status == 404 and body["error"]["code"] == "not_found"
        assert (await g.http("GET", "/v1/queries", admin=True))[0] == 404
        assert (await g.http("PUT", "/v1/consent", json={"categories": ["marketing"]}))[0] == 200  # public: as ever
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert (await headers_of(admin_url + "/v1/clients", headers=auth))[0] == 200
        assert (await headers_of(admin_url + "/v1/clients"))[0] == 401  # the token is still needed there


async def test_request_body_limit(upstream: StubUpstream, data_dir: Path) -> None:
    cfg = make_config(upstream, data_dir)
    async with running_gate(replace(cfg, api=replace(cfg.api, max_body_bytes=1024))) as g:
        big = {"categories": ["marketing"], "language": "x" * 2000}
        status, body = await g.http("PUT", "/v1/consent", json=big)
        assert status == 413 and body["error"]["code"] == "body_too_large"
        assert (await g.http("GET", "/v1/consent"))[1]["categories"] == {}  # nothing changed


async def test_consent_changes_are_rate_limited_per_client(upstream: StubUpstream, data_dir: Path) -> None:
    cfg = make_config(upstream, data_dir)
    async with running_gate(replace(cfg, api=replace(cfg.api, consent_changes_per_minute=3))) as g:
        for _ in range(3):
            assert (await g.http("PUT", "/v1/consent", json={"categories": ["marketing"]}))[0] == 200
        status, body = await g.http("DELETE", "/v1/consent")
        assert status == 429 and body["error"]["code"] == "rate_limited"
        assert (await g.http("GET", "/v1/consent"))[1]["categories"]  # the refused withdrawal changed nothing
        assert (await g.http("DELETE", "/v1/consent", source="127.0.0.2"))[0] == 200  # another client
        assert (await g.http("DELETE", "/v1/clients/127.0.0.1/consent", admin=True))[0] == 200  # admins are not


def test_change_limiter_refills_and_stays_bounded() -> None:
    now = [0.0]
    limiter = ChangeLimiter(60, clock=lambda: now[0])
    assert all(limiter.take("a") == 0 for _ in range(60))
    assert limiter.take("a") == pytest.approx(1.0)
    now[0] += 1.0
    assert limiter.take("a") == 0
    for i in range(20_000):
        limiter.take(f"10.0.{i >> 8}.{i & 255}")
    assert len(limiter.buckets) <= 10_001


# ------------------------------------------------------------------------------------------------
# 401 and 404 as HTTP says, and the admin dashboard's session


@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/queries"), ("GET", "/v1/clients"), ("POST", "/v1/reload"),
                                              ("PUT", "/v1/clients/127.0.0.9/consent"), ("GET", "/v1/top")])
async def test_every_401_names_the_bearer_scheme(gate: Gate, method: str, path: str) -> None:
    status, headers = await headers_of(gate.api_url + path, method, json={"categories": []})
    assert status == 401
    assert headers["WWW-Authenticate"].startswith("Bearer ")


@pytest.mark.parametrize("path", ["/no/such/page", "/dashboard/nope.js", "/v1/nothing"])
async def test_a_browser_gets_an_html_404_and_an_api_client_json(gate: Gate, path: str) -> None:
    browser = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
    async with aiohttp.ClientSession() as session:
        async with session.get(gate.api_url + path, headers={"Accept": browser}) as response:
            page = await response.text()
            assert response.status == 404 and response.content_type == "text/html"
            assert "<h1>Not found</h1>" in page and "<script" not in page
            assert response.headers["Content-Security-Policy"].startswith("default-src 'none'")
        for accept in ("application/json", "*/*", "application/json, text/html"):
            async with session.get(gate.api_url + path, headers={"Accept": accept}) as response:
                assert response.status == 404 and response.content_type == "application/json"
                assert (await response.json())["error"]["code"] == "not_found"


async def test_html_404_escapes_the_path(gate: Gate) -> None:
    async with aiohttp.ClientSession() as session, session.get(
            gate.api_url + "/x%3Cscript%3Ealert(1)%3C%2Fscript%3E", headers={"Accept": "text/html"}) as response:
        page = await response.text()
    assert response.status == 404 and "<script>" not in page and "&lt;script&gt;" in page


async def post_login(url: str, token: str, **headers: str) -> tuple[int, dict[str, str], str]:
    async with aiohttp.ClientSession() as session, session.post(
            url + "/dashboard/login", data={"token": token}, headers=headers, allow_redirects=False) as response:
        return response.status, dict(response.headers), await response.text()


def session_cookie(headers: dict[str, str]) -> str:
    cookie = headers["Set-Cookie"]
    assert cookie.startswith("dnsgate_admin=")
    return cookie.split(";")[0]


async def test_login_sets_a_strict_http_only_cookie_that_only_reads(gate: Gate) -> None:
    url = gate.api_url
    status, headers, page = await post_login(url, "wrong", Origin=url)
    assert status == 401 and "Set-Cookie" not in headers and "That is not the admin token." in page
    assert headers["WWW-Authenticate"].startswith("Bearer ")
    status, headers, _ = await post_login(url, TOKEN, Origin=url)
    assert status == 303 and headers["Location"] == "/dashboard/admin"
    attributes = {a.strip().split("=")[0].lower(): a.strip() for a in headers["Set-Cookie"].split(";")}
    assert "httponly" in attributes and attributes["samesite"] == "SameSite=Strict" and attributes["path"] == "Path=/"
    assert "secure" not in attributes  # plain http here: a Secure cookie would never come back
    cookie = session_cookie(headers)
    assert TOKEN not in cookie
    assert "Referrer-Policy" in headers
    with_cookie = {"Cookie": cookie}
    # Reads: the query log, the clients, the admin page.
    for path in ("/v1/queries", "/v1/clients", "/v1/top", "/dashboard/admin"):
        assert (await headers_of(url + path, headers=with_cookie))[0] == 200, path
    # Changes: never with a cookie, whatever the Origin says.
    for method, path in (("PUT", "/v1/clients/127.0.0.9/consent"), ("POST", "/v1/reload"),
                         ("DELETE", "/v1/clients/127.0.0.9/consent")):
        status, _ = await headers_of(url + path, method, headers={**with_cookie, "Origin": url},
                                     json={"categories": ["marketing"]})
        assert status == 401, (method, path)
    # Logging in from another site's page is refused before the token is looked at.
    status, headers, _ = await post_login(url, TOKEN, Origin="http://evil.example")
    assert status == 403 and "Set-Cookie" not in headers
    # Logout ends the session on the server, not just in the browser.
    async with aiohttp.ClientSession() as session, session.post(
            url + "/dashboard/logout", headers={**with_cookie, "Origin": url}, allow_redirects=False) as response:
        assert response.status == 303 and response.headers["Location"] == "/dashboard/login"
        assert "dnsgate_admin=\"\"" in response.headers["Set-Cookie"] or "Max-Age=0" in response.headers["Set-Cookie"]
    assert (await headers_of(url + "/v1/queries", headers=with_cookie))[0] == 401
    status, headers = await headers_of(url + "/dashboard/admin", headers=with_cookie, allow_redirects=False)
    assert status == 303 and headers["Location"] == "/dashboard/login"


async def test_failed_logins_are_limited_per_address(gate: Gate) -> None:
    statuses = [(await post_login(gate.api_url, f"wrong-{i}"))[0] for i in range(12)]
    assert statuses[:10] == [401] * 10 and statuses[10:] == [429, 429]
    status, headers, _ = await post_login(gate.api_url, TOKEN)  # the right token still works
    assert status == 303 and session_cookie(headers)


async def test_the_login_is_on_the_admin_listener_only(upstream: StubUpstream, data_dir: Path) -> None:
    cfg = make_config(upstream, data_dir)
    async with running_gate(replace(cfg, api=replace(cfg.api, admin_listen="127.0.0.1:0"))) as g:
        assert (await headers_of(g.api_url + "/dashboard/login"))[0] == 404
        assert (await post_login(g.api_url, TOKEN))[0] == 404
        assert (await headers_of(g.api_url + "/dashboard"))[0] == 200  # the public one stays
        admin_url = f"http://{g.running.admin}"
        status, headers, _ = await post_login(admin_url, TOKEN)
        assert status == 303
        cookie = {"Cookie": session_cookie(headers)}
        assert (await headers_of(admin_url + "/v1/queries", headers=cookie))[0] == 200
        assert (await headers_of(g.api_url + "/v1/queries", headers=cookie))[0] == 404


def test_sessions_end_when_idle_at_their_lifetime_at_logout_and_stay_bounded() -> None:
    now = [1000.0]
    sessions = AdminSessions(lifetime=100.0, idle=30.0, limit=3, clock=lambda: now[0])
    a = sessions.start()
    assert sessions.check(a) and not sessions.check("made-up") and not sessions.check(None)
    for _ in range(3):  # used every 25 s: never idle, but the lifetime still ends it
        now[0] += 25
        assert sessions.check(a)
    now[0] += 26  # 101 s after the login, 26 s after its last use
    assert not sessions.check(a)
    b = sessions.start()
    now[0] += 31
    assert not sessions.check(b)  # idle
    c = sessions.start()
    sessions.end(c)
    assert not sessions.check(c)
    ids = [sessions.start() for _ in range(5)]
    assert len(sessions) == 3 and not sessions.check(ids[0]) and sessions.check(ids[-1])


@pytest.mark.parametrize("data", [
    {"a": [1, 2.5, None, True, False], "b": {"c": "x"}, "é": "\u2028 \"quoted\" \\ \n"},
    {"nan": float("nan"), "inf": float("-inf"), "big": 10**30, "nested": [[{}], []]},
    {1: "int key", None: "null key", 2.5: "float key"},
    [], "text", 0,
])
def test_json_answers_are_what_json_dumps_makes(data: Any) -> None:
    """The encoder kept for every answer writes the same bytes as json.dumps with its defaults."""
    response = json_response(data, status=201)
    assert response.body == json.dumps(data).encode()
    assert response.status == 201 and response.content_type == "application/json" and response.charset == "utf-8"
