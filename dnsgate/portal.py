"""The consent portal's HTTP side: the page, its read-only status for other sites, captive-portal API.

The page (`data/portal/`) is a client of the consent API on the same origin, so it needs no CORS
and triggers no local-network prompt; it loads nothing from elsewhere and runs under a strict
Content-Security-Policy (no inline script). Sites link to it by top-level navigation with
`return_to`. For operators who accept the browser's local-network prompt, `GET /v1/consent/status`
answers CORS requests from exact allow-listed origins (no credentials, `Vary: Origin`), including
the Private Network Access preflight. With `portal.captive`, `/captive-portal/api` speaks RFC 8908.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any, Final

from aiohttp import web

from .api import CATALOG, CONSENT, SETTINGS, ApiError, caller_address, decision_json
from .config import HostPort
from .openapi import openapi_document

PORTAL_FILES: Final = {"app.js": "text/javascript", "app.css": "text/css", "strings.json": "application/json",
                       "icon.svg": "image/svg+xml"}
CAPTIVE_JSON: Final = "application/captive+json"
PREFLIGHT_MAX_AGE: Final = "600"


@dataclass(frozen=True, slots=True)
class PortalSettings:
    host: str
    url: str  # as people open it
    captive: bool
    cors_origins: frozenset[str]

    @property
    def csp(self) -> str:
        # The page resolves <token>.pair.<host> (a fetch that is meant to fail) to pair the device's
        # DNS source with its HTTP address; nothing else leaves the origin.
        pair = f"*.pair.{self.host}"
        return ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                f"connect-src 'self' http://{pair} https://{pair}; base-uri 'none'; form-action 'none'; "
                "frame-ancestors 'none'")


def portal_url(host: str, configured: str, api: HostPort) -> str:
    """The URL people open: the configured one, else http://<host>/ on the API's port."""
    if configured:
        return configured
    return f"http://{host}/" if api.port == 80 else f"http://{host}:{api.port}/"


PORTAL: web.AppKey[PortalSettings] = web.AppKey("portal", PortalSettings)


def add_routes(app: web.Application, settings: PortalSettings) -> None:
    app[PORTAL] = settings
    app.router.add_get("/", page)
    app.router.add_get("/portal/{file}", asset)
    app.router.add_get("/v1/consent/status", status)
    app.router.add_route("OPTIONS", "/v1/consent/status", preflight)
    app.router.add_get("/captive-portal/api", captive)
    app.router.add_get("/openapi.json", openapi)


def _file(name: str) -> bytes:
    return resources.files("dnsgate").joinpath(f"data/portal/{name}").read_bytes()


def _page_headers(settings: PortalSettings) -> dict[str, str]:
    return {"Content-Security-Policy": settings.csp, "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


async def page(request: web.Request) -> web.Response:
    return web.Response(body=_file("index.html"), content_type="text/html", charset="utf-8",
                        headers=_page_headers(request.app[PORTAL]))


async def asset(request: web.Request) -> web.Response:
    name = request.match_info["file"]
    if name not in PORTAL_FILES:
        raise web.HTTPNotFound()
    return web.Response(body=_file(name), content_type=PORTAL_FILES[name], headers=_page_headers(request.app[PORTAL]))


# ------------------------------------------------------------------------------------------------
# Read-only status, for other sites' pages (CORS)


def _cors(request: web.Request) -> dict[str, str]:
    """CORS headers for an allow-listed Origin (exact match), else none; always `Vary: Origin`."""
    origin = request.headers.get("Origin")
    if origin is not None and origin in request.app[PORTAL].cors_origins:
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
    return {"Vary": "Origin"}


async def status(request: web.Request) -> web.Response:
    """What this device's DNS lets through, without identity: safe to show to an allow-listed site."""
    control = request.app[CONSENT]
    view = control.view(caller_address(request))
    settings = request.app[PORTAL]
    body: dict[str, Any] = {
        "profile": view.profile,
        "decided": view.choice is not None,
        "notice_current": view.notice_current,
        "categories": {c: _brief(decision_json(d, view)) for c, d in view.by_category},
        "vendors": {v.id: _brief(decision_json(d, view)) for v, d in view.decisions},
        "portal_url": settings.url,
    }
    return web.json_response(body, headers={**_cors(request), "Cache-Control": "no-store"})


def _brief(decision: dict[str, Any]) -> dict[str, Any]:
    return {"allowed": decision["allowed"], "by_choice": decision["by_choice"], "until": decision["until"]}


async def preflight(request: web.Request) -> web.Response:
    """The CORS preflight, with the Private Network Access header Chrome sent before Local Network Access."""
    headers = _cors(request)
    if "Access-Control-Allow-Origin" not in headers:
        raise ApiError(403, "origin_refused", "this origin may not read the consent status; add it to "
                       "portal.cors_origins")
    method = request.headers.get("Access-Control-Request-Method", "GET")
    if method != "GET":
        raise ApiError(405, "method_not_allowed", "the consent status is read-only: GET")
    headers.update({"Access-Control-Allow-Methods": "GET", "Access-Control-Max-Age": PREFLIGHT_MAX_AGE})
    if request.headers.get("Access-Control-Request-Private-Network", "").lower() == "true":
        headers["Access-Control-Allow-Private-Network"] = "true"
    return web.Response(status=204, headers=headers)


# ------------------------------------------------------------------------------------------------
# RFC 8908 captive-portal API (guest Wi-Fi)


async def captive(request: web.Request) -> web.Response:
    """Captive until the device's first choice, whatever it was: refusing releases like accepting."""
    settings = request.app[PORTAL]
    if not settings.captive:
        raise ApiError(404, "not_found", "the captive-portal API is off (portal.captive = false)")
    view = request.app[CONSENT].view(caller_address(request))
    held = view.choice is None and view.profile not in ("deny", "allow")
    return web.json_response({"captive": held, "user-portal-url": settings.url}, content_type=CAPTIVE_JSON,
                             headers={"Cache-Control": "private, no-store"})


async def openapi(request: web.Request) -> web.Response:
    catalog = request.app[CATALOG]()
    document = openapi_document(tuple(c.id for c in catalog.categories), tuple(v.id for v in catalog.vendors),
                                tuple(request.app[CONSENT].notice.texts), request.app[SETTINGS].max_days)
    return web.json_response(document, headers={"Cache-Control": "no-cache"})
