"""The API's outer defences, kept apart from the routes: the Host a request may name and the Origin
that may change consent (`Boundaries`: dnsgate's own, exactly), security headers on every response,
a per-client rate limit on consent changes, the admin token check (constant time, never logged),
the admin dashboard's sessions, admin endpoints confined to their own listener, and 503 while the
consent store is unavailable.
"""

from __future__ import annotations

import _json
import functools
import hashlib
import hmac
import html
import ipaddress
import json
import logging
import math
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Final
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.typedefs import Middleware

from dnsgate.addresses import normalize_client
from dnsgate.consent.records import RefusalsHeld, StoreError

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Pages that set their own policy (dashboard, portal) keep it; everything else may load nothing.
DEFAULT_CSP: Final = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
SECURITY_HEADERS: Final = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}
LIMITER_SIZE: Final = 10_000  # addresses tracked; beyond, those with a full bucket are forgotten
HOSTS_MEMO: Final = 1024  # Host headers whose verdict is remembered
WILDCARDS: Final = {"0.0.0.0": 4, "::": 6}  # a listener on every address (of one family; "::" takes both)


# Every JSON answer is encoded by one encoder, made once (json.dumps makes one per call): json.dumps's own
# C encoder with its defaults, without the check for cycles (an answer is a tree of dicts and lists built
# for it).
_encoder: Final = _json.make_encoder(None, json.JSONEncoder().default, json.encoder.encode_basestring_ascii, None,
                                     ": ", ", ", False, False, True)


def json_response(data: Any, status: int = 200, headers: Mapping[str, str] | None = None,
                  content_type: str = "application/json") -> web.Response:
    """`data` as JSON (UTF-8): the body handed over as bytes, as aiohttp's own json_response would send it."""
    return web.Response(body="".join(_encoder(data, 0)).encode(), status=status, headers=headers,
                        content_type=content_type, charset="utf-8")


def error_response(status: int, code: str, message: str, field: str | None = None) -> web.Response:
    """The API's one error shape: {"error": {"status", "code", "message", "field"?}}."""
    body: dict[str, Any] = {"status": status, "code": code, "message": message}
    if field is not None:
        body["field"] = field
    return json_response({"error": body}, status=status)


def html_error(status: int, title: str, message: str) -> web.Response:
    """An error page for a browser (the API's clients get `error_response`): plain HTML, nothing loaded."""
    body = (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{status} {html.escape(title)} '
            f'- dnsgate</title></head>\n<body><main><h1>{html.escape(title)}</h1><p>{html.escape(message)}</p>'
            '<p><a href="/">Consent portal</a> · <a href="/dashboard">Dashboard</a></p></main></body></html>\n')
    return web.Response(status=status, text=body, content_type="text/html", headers={"Cache-Control": "no-store"})


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every response, errors and streams included, gets the headers."""
    headers = response.headers
    for name, value in SECURITY_HEADERS.items():
        headers.setdefault(name, value)
    if response.status == 401:  # RFC 9110: a 401 names the scheme that would succeed
        headers.setdefault("WWW-Authenticate", 'Bearer realm="dnsgate admin"')
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


SESSION_COOKIE: Final = "dnsgate_admin"
SESSION_LIFETIME: Final = 8 * 3600.0  # seconds from login: the admin logs in again after a working day
SESSION_IDLE: Final = 3600.0  # seconds without a request that end a session
MAX_SESSIONS: Final = 64  # beyond, the least recently used session ends


class AdminSessions:
    """The admin dashboard's logins, kept in memory only (a restart logs everyone out).

    A login trades the admin token, posted once, for a random session id in an HttpOnly cookie, so
    the token is never kept by the browser nor put in a URL. Only a hash of each id is kept. A
    session ends at logout, `idle` seconds after its last use, or `lifetime` after the login.
    """

    def __init__(self, lifetime: float = SESSION_LIFETIME, idle: float = SESSION_IDLE, limit: int = MAX_SESSIONS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.lifetime, self.idle, self.limit, self.clock = lifetime, idle, limit, clock
        self._sessions: dict[bytes, tuple[float, float]] = {}  # hash of the id -> (started, last used)

    @staticmethod
    def _key(session_id: str) -> bytes:
        return hashlib.sha256(session_id.encode()).digest()

    def start(self) -> str:
        now = self.clock()
        self._expire(now)
        while len(self._sessions) >= self.limit:  # the dict is kept in order of last use
            del self._sessions[next(iter(self._sessions))]
        session_id = secrets.token_urlsafe(32)
        self._sessions[self._key(session_id)] = (now, now)
        return session_id

    def check(self, session_id: str | None) -> bool:
        """Whether the id is a live session's; a live one counts as used now."""
        if not session_id:
            return False
        now = self.clock()
        key = self._key(session_id)
        found = self._sessions.pop(key, None)
        if found is None or now - found[0] >= self.lifetime or now - found[1] >= self.idle:
            return False
        self._sessions[key] = (found[0], now)
        return True

    def end(self, session_id: str | None) -> None:
        if session_id:
            self._sessions.pop(self._key(session_id), None)

    def __len__(self) -> int:
        return len(self._sessions)

    def _expire(self, now: float) -> None:
        for key, (started, used) in list(self._sessions.items()):
            if now - started >= self.lifetime or now - used >= self.idle:
                del self._sessions[key]


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


def rate_limited(limiter: ChangeLimiter, address: str) -> web.Response | None:
    """429 for a consent change from `address` over its rate limit; None (a token used) when within it."""
    wait = limiter.take(address)
    if not wait:
        return None
    response = error_response(429, "rate_limited", "too many consent changes from this address; "
                              f"try again in {math.ceil(wait)} s")
    response.headers["Retry-After"] = str(math.ceil(wait))
    return response


def store_error_response(exc: StoreError) -> web.Response:
    """503: nothing changed; or, for a choice whose refusals hold (`RefusalsHeld`), nothing it grants."""
    if isinstance(exc, RefusalsHeld):
        return json_response({"error": {
            "status": 503, "code": "consent_store_unavailable",
            "message": f"consent cannot be recorded right now ({exc}); nothing this choice grants was changed, "
                       "what it refuses is in force at once (see held)"}, "held": exc.held}, status=503)
    return error_response(503, "consent_store_unavailable",
                          f"consent cannot be recorded or read right now ({exc}); nothing was changed, "
                          "trackers stay blocked for clients without a recorded grant")


# ------------------------------------------------------------------------------------------------
# Host and Origin: dnsgate's own, exactly


@functools.lru_cache(maxsize=256)
def is_local_address(ip: str) -> bool:
    """Whether `ip` is an address of this host: binding to it succeeds only then (nothing is sent)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((ip, 0))
    except OSError:
        return False
    return True


def _ip(text: str) -> str | None:
    """The canonical text of an IP literal, or None for a name."""
    try:
        return normalize_client(text)
    except ValueError:
        return None


class Boundaries:
    """Which `Host` a request may name, and which `Origin` may change consent.

    A page whose name an attacker re-points at dnsgate (DNS rebinding) sends its own name as Host:
    only dnsgate's names (the portal host, localhost, `api.hosts`) are served, and IP literals, which
    no DNS answer can re-point (behind a port mapping the address a browser used is not the one the
    socket has, so any address is taken). Origins are dnsgate's own pages
    as served: http, one of those names or an address dnsgate listens on, and the port of one of its
    listeners; plus the portal's configured URL and `api.allowed_origins`. Nothing else, so no IP
    literal, other port or scheme stands in for dnsgate.
    """

    def __init__(self, names: Iterable[str], addresses: Iterable[str], listeners: Iterable[tuple[str, int]],
                 allowed_origins: Iterable[str] = (), extra_origins: Iterable[str] = (),
                 is_local: Callable[[str], bool] = is_local_address) -> None:
        self.names = frozenset(n.lower().rstrip(".") for n in names)
        self.addresses = frozenset(a for a in map(_ip, addresses) if a is not None)
        self.listeners = tuple((h, p) for h, p in listeners)
        self.ports = frozenset(p for _, p in self.listeners)
        self.allowed_origins = frozenset(allowed_origins)
        self.extra_origins = frozenset(o.rstrip("/").lower() for o in extra_origins)
        self.is_local = is_local
        # Host headers seen and their verdict: every request asks, and a page sends the same one each
        # time (bounded: the header is the client's to choose)
        self._hosts: dict[str, bool] = {}

    def host_allowed(self, header: str | None) -> bool:
        """`header`: the request's Host (None: absent, as from HTTP/1.0 probes; a browser always sends
        one)."""
        if header is None:
            return True
        allowed = self._hosts.get(header)
        if allowed is None:
            if len(self._hosts) >= HOSTS_MEMO:
                self._hosts.clear()
            allowed = self._hosts[header] = self._host_allowed(header)
        return allowed

    def _host_allowed(self, header: str) -> bool:
        try:
            host = urlsplit("//" + header.strip()).hostname
        except ValueError:
            return False
        if not host:
            return False
        host = host.rstrip(".")
        return host in self.names or _ip(host) is not None

    def origin_allowed(self, origin: str) -> bool:
        return origin in self.allowed_origins or self.own_origin(origin)

    def own_origin(self, origin: str) -> bool:
        """A page dnsgate itself served (allow-listed sites are not: they get no CORS)."""
        if origin.lower() in self.extra_origins:
            return True
        try:
            parts = urlsplit(origin)
            port = parts.port or 80
        except ValueError:
            return False
        host = (parts.hostname or "").rstrip(".")
        if parts.scheme != "http" or not host or port not in self.ports or parts.path or parts.query:
            return False
        if host in self.names:
            return True
        ip = _ip(host)
        if ip is None:
            return False
        return ip in self.addresses or any(port == p and self._listens_on(h, ip) for h, p in self.listeners)

    def _listens_on(self, listener: str, ip: str) -> bool:
        family = WILDCARDS.get(listener)
        if family is None:
            return _ip(listener) == ip
        return (family == 6 or ipaddress.ip_address(ip).version == 4) and self.is_local(ip)


def local_address(request: web.Request) -> tuple[str, int] | None:
    """(address, port) of the socket that took the request's connection."""
    sockname = request.transport.get_extra_info("sockname") if request.transport is not None else None
    if not sockname:
        return None
    return normalize_client(str(sockname[0])), int(sockname[1])


def host_guard(boundaries: Boundaries) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        header = request.headers.get("Host")
        if not boundaries.host_allowed(header):
            return error_response(421, "misdirected_request",
                                  f"Host {header!r} is not this dnsgate: open it by the portal's name, localhost or "
                                  "its address, or list the name in api.hosts")
        return await handler(request)

    return middleware
