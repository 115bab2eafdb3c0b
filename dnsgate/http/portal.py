"""The consent portal's HTTP side: the page, its read-only status for other sites, captive-portal API.

The page (`data/portal/`) is a client of the consent API on the same origin, so it needs no CORS
and triggers no local-network prompt; it loads nothing from elsewhere and runs under a strict
Content-Security-Policy (no inline script). Sites link to it by top-level navigation with
`return_to`. For operators who accept the browser's local-network prompt, `GET /v1/consent/status`
answers CORS requests from exact allow-listed origins (no credentials, `Vary: Origin`), including
the Private Network Access preflight. With `portal.captive`, `/captive-portal/api` speaks RFC 8908.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlencode

from aiohttp import web

from dnsgate.config import HostPort
from dnsgate.consent.model import Subject
from dnsgate.consent.records import RefusalsHeld, StoreError
from dnsgate.consent.service import ChoiceRequest
from dnsgate.dns.portal_address import FAMILY_NAMES
from dnsgate.errors import ApiError
from dnsgate.http import portal_page
from dnsgate.http.consent_api import (
    CATALOG,
    CONSENT,
    RULES,
    SETTINGS,
    caller_address,
    decision_json,
    the_caller,
)
from dnsgate.http.guard import json_response
from dnsgate.http.openapi import openapi_document

if TYPE_CHECKING:
    import jinja2

PORTAL_FILES: Final = {"app.js": "text/javascript", "app.css": "text/css", "strings.json": "application/json",
                       "icon.svg": "image/svg+xml"}
CAPTIVE_JSON: Final = "application/captive+json"
PREFLIGHT_MAX_AGE: Final = "600"
FORM_ACTIONS: Final = ("accept_all", "reject_all", "save", "withdraw", "end_session")


@dataclass(frozen=True, slots=True)
class PortalSettings:
    host: str
    url: str  # as people open it
    captive: bool
    cors_origins: frozenset[str]
    form_key: bytes = b""  # signs the per-page token of the page's forms
    wall: Callable[[], float] = time.time
    api_port: int = 0  # where v4./v6.<host> reach the API (0: not used)

    @property
    def csp(self) -> str:
        # The page resolves <token>.pair.<host> (a fetch that is meant to fail) to pair the device's
        # DNS source with its HTTP address, and records each choice through the API's address of the
        # other family too (v4./v6.<host>); nothing else leaves the origin.
        pair = f"*.pair.{self.host}"
        port = "" if self.api_port in (0, 80) else f":{self.api_port}"
        families = "".join(f" http://{family}.{self.host}{port}" for family in FAMILY_NAMES) if self.api_port else ""
        return ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                f"connect-src 'self' http://{pair} https://{pair}{families}; base-uri 'none'; form-action 'self'; "
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
    app.router.add_post("/", choose_by_form)
    app.router.add_get("/portal/{file}", asset)
    app.router.add_get("/v1/consent/status", status)
    app.router.add_route("OPTIONS", "/v1/consent/status", preflight)
    app.router.add_get("/captive-portal/api", captive)
    app.router.add_get("/openapi.json", openapi)


def _file(name: str) -> bytes:
    if name == "strings.json":
        return json.dumps(portal_page.strings(), ensure_ascii=False).encode()
    return resources.files("dnsgate").joinpath(f"data/portal/{name}").read_bytes()


@functools.cache
def _template() -> jinja2.Template:
    import jinja2  # on the first page served: ~4 MB a process that serves none (a worker) never holds

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True)
    return env.from_string(_file("index.html").decode("utf-8"))


def _page_headers(settings: PortalSettings) -> dict[str, str]:
    # same-origin: the forms' posts carry the page's Origin (no-referrer would send "null"); other
    # sites still learn nothing of the page's address.
    return {"Content-Security-Policy": settings.csp, "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "same-origin", "Cache-Control": "no-store"}


async def page(request: web.Request) -> web.Response:
    """The portal with this device's state, in the browser's language (it works without JavaScript)."""
    return _render(request, request.query.get("done", ""), "", 200)


def _render(request: web.Request, done: str, error: str, status: int) -> web.Response:
    control = request.app[CONSENT]
    settings = request.app[PORTAL]
    caller = the_caller(request, "portal")
    assert caller.address is not None
    shown = control.shown
    language = pick(request, control)
    rules = request.app[RULES]
    entries = {s["id"]: s["entries"] for s in rules.status()} if rules is not None else {}
    req = portal_page.Request(language, portal_page.form_token(settings.form_key, caller.address, settings.wall()),
                              caller.sec_gpc, request.query.get("return_to"), request.query.get("layout", ""),
                              done if done in portal_page.DONE else "", error, entries)
    context = portal_page.page_context(control.view(caller.address), shown, control.catalog, req)
    return web.Response(text=_template().render(context), status=status, content_type="text/html",
                        charset="utf-8", headers=_page_headers(settings))


def pick(request: web.Request, control: Any) -> str:
    """The page's language: the browser's (Accept-Language) among those the whole page exists in."""
    shown = control.shown
    return portal_page.pick_language(request.headers.get("Accept-Language", ""),
                                     portal_page.offered(shown.languages), shown.default_language)


async def choose_by_form(request: web.Request) -> web.StreamResponse:
    """The page's forms, for browsers without JavaScript: Accept all, Reject all, per category,
    Withdraw, End session. The API guard's Origin check has run; the per-page token proves the post
    comes from a page dnsgate gave this address. The choice records what the page showed."""
    control = request.app[CONSENT]
    settings = request.app[PORTAL]
    if request.content_type != "application/x-www-form-urlencoded":
        raise ApiError(415, "unsupported_media_type", "the page's forms send application/x-www-form-urlencoded")
    form = await request.post()
    action = str(form.get("action", ""))
    if action not in FORM_ACTIONS or "token" not in form:
        raise ApiError(400, "invalid_field", f"a form of the portal page: token and action (one of "
                       f"{', '.join(FORM_ACTIONS)}) are required", "action")
    caller = the_caller(request, "portal")
    assert caller.address is not None
    back = {k: str(form[k]) for k in ("return_to", "layout") if form.get(k)}
    token = str(form.get("token", ""))
    if not portal_page.token_valid(settings.form_key, token, caller.address, settings.wall()):
        raise web.HTTPSeeOther("/?" + urlencode({**back, "done": "expired"}))
    shown = ChoiceRequest({}, notice_sha256=str(form.get("notice_sha256", "")) or None,
                          notice_version=str(form.get("notice_version", "")) or None,
                          language=str(form.get("language", "")) or None)
    subject = Subject(caller.address, caller.mac)
    before = control.view(caller.address)
    had_grant = any(d.allowed and d.by_choice for _, d in (*before.decisions, *before.lists))
    try:
        if action in ("accept_all", "reject_all", "save"):
            granted = set(map(str, form.getall("grant", [])))
            categories = {c.id: action == "accept_all" or (action == "save" and c.id in granted)
                          for c in control.catalog.categories}
            view = await control.choose(subject, dataclasses.replace(shown, categories=categories), caller)
            done = ("granted" if view.choice is not None and view.choice.grants_anything else
                    "held" if view.held else "withdrawn" if had_grant else "refused")
        elif action == "withdraw":
            view = await control.withdraw(subject, caller, shown)
            done = "held" if view.held else "withdrawn" if had_grant else "refused"
        elif before.profile == "kiosk":
            await control.end_session(subject, caller, "session ended on the portal page")
            done = "session_ended"
        else:  # the kiosk layout on another network: the next person starts with nothing allowed
            view = await control.withdraw(subject, caller, shown)
            done = "held" if view.held else "session_withdrawn"
    except ApiError as exc:
        if exc.code == "notice_changed":
            raise web.HTTPSeeOther("/?" + urlencode({**back, "done": "notice_changed"})) from None
        return _render_after_post(request, back, exc.message, exc.status)
    except RefusalsHeld as exc:
        return _render_after_post(request, back, f"the consent store is unavailable ({exc}); nothing this choice "
                                  "grants was changed, what it refuses holds here at once and is recorded as soon "
                                  "as the store answers", 503)
    except StoreError as exc:
        return _render_after_post(request, back, f"the consent store is unavailable ({exc}); nothing was changed", 503)
    raise web.HTTPSeeOther("/?" + urlencode({**back, "done": done}))


def _render_after_post(request: web.Request, back: dict[str, str], error: str, status: int) -> web.Response:
    clone = request.clone(rel_url=request.rel_url.with_query(back))
    return _render(clone, "", error, status)


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
    return json_response(body, headers={**_cors(request), "Cache-Control": "no-store"})


def _brief(decision: dict[str, Any]) -> dict[str, Any]:
    """Allowed, and until which day (UTC): to the second, `until` would tell every site that reads
    the status the same rare value for months, an identifier of the visitor across sites."""
    until = decision["until"]
    return {"allowed": decision["allowed"], "by_choice": decision["by_choice"],
            "until": until[:10] if until else None}


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
    return json_response({"captive": held, "user-portal-url": settings.url}, content_type=CAPTIVE_JSON,
                         headers={"Cache-Control": "private, no-store"})


async def openapi(request: web.Request) -> web.Response:
    catalog = request.app[CATALOG]()
    document = openapi_document(tuple(c.id for c in catalog.categories), tuple(v.id for v in catalog.vendors),
                                tuple(request.app[CONSENT].notice.texts), request.app[SETTINGS].max_days)
    return json_response(document, headers={"Cache-Control": "no-cache"})
