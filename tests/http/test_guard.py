"""API hardening over the real aiohttp server: security headers on every response, the admin
token (constant time, never logged), a separate admin listener, body limits, and a rate limit on
consent changes per client."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from dnsgate.http.guard import ChangeLimiter, token_matches
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
