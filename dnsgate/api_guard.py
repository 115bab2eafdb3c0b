"""The API's outer defences, kept apart from the routes: security headers on every response, a
per-client rate limit on consent changes, the admin token check (constant time, never logged),
admin endpoints confined to their own listener, and 503 while the consent store is unavailable.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiohttp import web
from aiohttp.typedefs import Middleware

from .store import StoreError

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
STATE_CHANGING: Final = frozenset({"PUT", "POST", "DELETE", "PATCH"})
# Pages that set their own policy (dashboard, portal) keep it; everything else may load nothing.
DEFAULT_CSP: Final = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
SECURITY_HEADERS: Final = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}
LIMITER_SIZE: Final = 10_000  # addresses tracked; beyond, those with a full bucket are forgotten


def error_response(status: int, code: str, message: str, field: str | None = None) -> web.Response:
    """The API's one error shape: {"error": {"status", "code", "message", "field"?}}."""
    body: dict[str, Any] = {"status": status, "code": code, "message": message}
    if field is not None:
        body["field"] = field
    return web.json_response({"error": body}, status=status)


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every response, errors and streams included, gets the headers."""
    headers = response.headers
    for name, value in SECURITY_HEADERS.items():
        headers.setdefault(name, value)
    csp = headers.get("Content-Security-Policy")
    if csp is None:
        headers["Content-Security-Policy"] = DEFAULT_CSP
    elif "frame-ancestors" not in csp:
        headers["Content-Security-Policy"] = csp.rstrip("; ") + "; frame-ancestors 'none'"


def token_matches(given: str, expected: str) -> bool:
    """Constant time, length included: both sides are hashed to 32 bytes before comparing."""
    return hmac.compare_digest(hashlib.sha256(given.encode()).digest(), hashlib.sha256(expected.encode()).digest())


def bearer(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


class ChangeLimiter:
    """A token bucket per client address: `per_minute` consent changes, refilled continuously."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = float(per_minute)
        self.per_second = per_minute / 60.0
        self.clock = clock
        self.buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, at)
        self.refused = 0

    def take(self, address: str) -> float:
        """0 if the change may go ahead (a token is used), else the seconds until one is back."""
        if self.capacity <= 0:
            return 0.0
        now = self.clock()
        tokens, at = self.buckets.get(address, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - at) * self.per_second)
        if tokens < 1:
            self.refused += 1
            self.buckets[address] = (tokens, now)
            return (1 - tokens) / self.per_second
        if len(self.buckets) >= LIMITER_SIZE:  # forget full buckets; if that is not enough, the oldest half
            self.buckets = {a: (t, s) for a, (t, s) in self.buckets.items()
                            if min(self.capacity, t + (now - s) * self.per_second) < self.capacity}
            if len(self.buckets) >= LIMITER_SIZE // 2:
                self.buckets = dict(list(self.buckets.items())[-LIMITER_SIZE // 4:])
        self.buckets[address] = (tokens - 1, now)
        return 0.0


def consent_rate_limit(limiter: ChangeLimiter, is_admin: Callable[[web.Request], bool]) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method in STATE_CHANGING and request.remote is not None and not is_admin(request):
            wait = limiter.take(request.remote)
            if wait:
                response = error_response(429, "rate_limited", "too many consent changes from this address; "
                                          f"try again in {math.ceil(wait)} s")
                response.headers["Retry-After"] = str(math.ceil(wait))
                return response
        return await handler(request)

    return middleware


@web.middleware
async def store_unavailable(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A consent change or log read that the store cannot serve: 503, and nothing changed."""
    try:
        return await handler(request)
    except StoreError as exc:
        log.error("consent store unavailable: %s %s answered 503: %s", request.method, request.path, exc)
        return error_response(503, "consent_store_unavailable",
                              f"consent cannot be recorded or read right now ({exc}); nothing was changed, "
                              "trackers stay blocked for clients without a recorded grant")
