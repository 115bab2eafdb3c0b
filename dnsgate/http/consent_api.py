"""The HTTP API: a client reads and changes its own consent; an admin manages any client's.

The caller of /v1/consent is the HTTP peer address (and its MAC, where the neighbour table knows
it), so a client changes only its own consent. State changes take JSON bodies only and refuse a
browser `Origin` that is not dnsgate's own or allow-listed, so no third-party page can forge
consent for a visitor's address. Every state change answers with the new state; the caller's
responses also carry a one-time pairing token. The app depends on the `ConsentControl` protocol
(consents.ConsentService), not on the store or the resolver.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web
from aiohttp.typedefs import Middleware

from dnsgate.addresses import normalize_client, normalize_mac
from dnsgate.consent.export import csv_header, csv_line, event_json, iso, jsonl_line
from dnsgate.consent.model import KEY_SEPARATOR, Choice, Decision, Subject
from dnsgate.consent.notice import Item, Notice, NoticeInForce
from dnsgate.consent.pairing import Offer
from dnsgate.consent.records import Event, EventFilter, StoreError
from dnsgate.consent.service import Caller, ChoiceRequest, ClientView, Explanation, Loss, Paired
from dnsgate.errors import ApiError
from dnsgate.http.guard import (
    SESSION_COOKIE,
    WILDCARDS,
    AdminSessions,
    Boundaries,
    ChangeLimiter,
    bearer,
    error_response,
    host_guard,
    html_error,
    json_response,
    local_address,
    rate_limited,
    security_headers,
    store_error_response,
    token_matches,
)
from dnsgate.rules.catalog import LANGUAGE_TAG, Catalog, Category
from dnsgate.timespec import parse_when

log = logging.getLogger(__name__)

MAX_BODY = 16 * 1024
STATE_CHANGING = frozenset({"PUT", "POST", "DELETE", "PATCH"})
# The state changes dnsgate's own page may make through another of dnsgate's origins (CORS).
OWN_CORS = {"/v1/consent": "PUT, DELETE", "/v1/session/end": "POST"}


class ConsentControl(Protocol):
    catalog: Catalog
    notice: Notice
    shown: NoticeInForce  # the whole notice in force: text, operator, categories, items

    def mac_of(self, address: str) -> str | None: ...
    async def choose(self, subject: Subject, request: ChoiceRequest, caller: Caller) -> ClientView: ...
    async def withdraw(self, subject: Subject, caller: Caller, shown: ChoiceRequest | None = None) -> ClientView: ...
    async def honour_gpc(self, caller: Caller, wait: bool = True) -> bool: ...
    async def end_session(self, subject: Subject, caller: Caller, reason: str) -> ClientView: ...
    def offer_pairing(self, caller: Caller) -> Offer | None: ...
    def view(self, address: str, mac: str | None = None) -> ClientView: ...
    def view_subject(self, subject: Subject) -> ClientView: ...
    def views(self) -> list[ClientView]: ...
    def whoami(self, caller: Caller) -> tuple[ClientView, Paired | None]: ...
    def explain(self, name: str, address: str, mac: str | None) -> Explanation: ...
    async def events(self, address: str | None, limit: int) -> list[Event]: ...
    def export(self, f: EventFilter) -> AsyncIterator[Event]: ...
    def acknowledge_loss(self) -> Loss | None: ...


class RulesReport(Protocol):
    @property
    def ok(self) -> bool: ...
    @property
    def error(self) -> str | None: ...
    def as_json(self) -> dict[str, Any]: ...


class RulesControl(Protocol):
    """Reloading the catalog and lists (reload.Reloader)."""

    async def reload(self, reason: str) -> RulesReport: ...
    async def refresh(self, *, force: bool = False, reason: str = "refresh") -> RulesReport: ...
    def status(self) -> list[dict[str, Any]]: ...


@dataclass(frozen=True, slots=True)
class ApiSettings:
    admin_token: str
    boundaries: Boundaries  # the Host names and Origins that are dnsgate's own
    max_days: int
    max_body: int = MAX_BODY
    consent_changes_per_minute: int = 0  # per client address; 0: no limit
    # (address, port) of the admin listener (api.admin_listen): admin endpoints answer only on the
    # socket bound there. None: on every listener, behind the token.
    admin: tuple[str, int] | None = None


CONSENT: web.AppKey[ConsentControl] = web.AppKey("consent", ConsentControl)
CATALOG: web.AppKey[Callable[[], Catalog]] = web.AppKey("catalog")  # the catalog in force (reloads swap it)
RULES: web.AppKey[RulesControl | None] = web.AppKey("rules")
SETTINGS: web.AppKey[ApiSettings] = web.AppKey("settings", ApiSettings)
HEALTH: web.AppKey[Callable[[], Mapping[str, Any]]] = web.AppKey("health")
SESSIONS: web.AppKey[AdminSessions] = web.AppKey("sessions", AdminSessions)


def create_app(consent: ConsentControl, catalog: Callable[[], Catalog], settings: ApiSettings,
               health: Callable[[], Mapping[str, Any]], rules: RulesControl | None = None,
               deadlines: Middleware | None = None) -> web.Application:
    """`deadlines`: the listeners' middleware that marks a connection busy and reads the body within
    its deadline (http/listener.py); inside errors_as_json, so a body too large is its JSON 413."""
    limiter = ChangeLimiter(settings.consent_changes_per_minute)
    app = web.Application(client_max_size=settings.max_body, middlewares=[
        host_guard(settings.boundaries), errors_as_json, *([deadlines] if deadlines is not None else []),
        global_privacy_control, state_changes(limiter)])
    app.on_response_prepare.append(security_headers)
    app[CONSENT] = consent
    app[CATALOG] = catalog
    app[RULES] = rules
    app[SETTINGS] = settings
    app[HEALTH] = health
    app[SESSIONS] = AdminSessions()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/v1/vendors", vendors)
    app.router.add_get("/v1/notice", notice)
    app.router.add_get("/v1/consent", get_own)
    app.router.add_put("/v1/consent", put_own)
    app.router.add_delete("/v1/consent", delete_own)
    app.router.add_post("/v1/session/end", end_own_session)
    for path in OWN_CORS:
        app.router.add_route("OPTIONS", path, own_preflight)
    app.router.add_get("/v1/whoami", whoami)
    app.router.add_get("/v1/clients", list_clients)
    app.router.add_get("/v1/clients/{client:.+}/consent", get_client)
    app.router.add_put("/v1/clients/{client:.+}/consent", put_client)
    app.router.add_delete("/v1/clients/{client:.+}/consent", delete_client)
    app.router.add_post("/v1/clients/{client:.+}/session/end", end_client_session)
    app.router.add_get("/v1/audit", audit)
    app.router.add_get("/v1/audit/export", export)
    app.router.add_get("/v1/explain", explain)
    app.router.add_post("/v1/reload", reload_rules)
    app.router.add_get("/v1/lists", list_status)
    app.router.add_post("/v1/lists/refresh", refresh_lists)
    app.router.add_post("/v1/store/acknowledge", acknowledge_loss)
    return app


# ------------------------------------------------------------------------------------------------
# Middlewares

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        if exc.status == 404 and wants_html(request):
            return html_error(404, "Not found", exc.message)
        return error_response(exc.status, exc.code, exc.message, exc.field)
    except StoreError as exc:  # the store cannot be reached: nothing changed, trackers stay blocked
        # (the outage itself is logged once, as an error, by the consent service)
        log.debug("consent store unavailable: %s %s answered 503: %s", request.method, request.path, exc)
        return store_error_response(exc)
    except web.HTTPRequestEntityTooLarge:
        return error_response(413, "body_too_large", f"request body over {request.app[SETTINGS].max_body} bytes")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 404 and wants_html(request):
            return html_error(404, "Not found", f"dnsgate has no page at {request.path}.")
        response = error_response(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason)
        if "Allow" in exc.headers:  # 405 names the methods the resource has
            response.headers["Allow"] = exc.headers["Allow"]
        return response


def state_changes(limiter: ChangeLimiter) -> Middleware:
    """A state change is held to its caller's rate limit (an admin's token has none), then refused for a
    browser `Origin` that is neither dnsgate's own nor allow-listed. One middleware for both: each one a
    request passes through is a coroutine of its own on the event loop."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method not in STATE_CHANGING:
            return await handler(request)
        if request.remote is not None and not is_admin(request):
            refused = rate_limited(limiter, request.remote)
            if refused is not None:
                return refused
        origin = request.headers.get("Origin")
        boundaries = request.app[SETTINGS].boundaries
        if origin is not None and not boundaries.origin_allowed(origin):
            raise ApiError(403, "origin_refused",
                           f"Origin {origin!r} may not change consent; add it to api.allowed_origins")
        response = await handler(request)
        if origin is not None and boundaries.own_origin(origin):
            # The portal records a choice through the device's address of the other family too (the
            # page's origin is another of dnsgate's): it may read the answer, as its own.
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers.add("Vary", "Origin")
        return response

    return middleware


async def own_preflight(request: web.Request) -> web.Response:
    """The CORS preflight of a state change from dnsgate's own page on another of its addresses
    (`v4.`/`v6.<portal host>`); every other origin is refused, as its change would be."""
    origin = request.headers.get("Origin", "")
    if not request.app[SETTINGS].boundaries.own_origin(origin):
        raise ApiError(403, "origin_refused", f"Origin {origin!r} is not a page of dnsgate's")
    headers = {"Access-Control-Allow-Origin": origin, "Access-Control-Allow-Methods": OWN_CORS[request.path],
               "Access-Control-Allow-Headers": "Content-Type", "Access-Control-Max-Age": "600", "Vary": "Origin"}
    if request.headers.get("Access-Control-Request-Private-Network", "").lower() == "true":
        headers["Access-Control-Allow-Private-Network"] = "true"
    return web.Response(status=204, headers=headers)


@web.middleware
async def global_privacy_control(request: web.Request, handler: Handler) -> web.StreamResponse:
    """`Sec-GPC: 1` on any request from a device (the portal's page and files, the status sites read,
    whoami, the API) is its opt-out of sale/sharing on opt-out networks, whatever becomes of the
    request: it is honoured before the request is handled, so the answer shows it. A change of the
    caller's own choice applies it within that choice, or, if the change is refused, right after."""
    if sec_gpc(request) != "1" or request.remote is None:
        return await handler(request)
    if not (request.method in ("PUT", "DELETE") and request.path == "/v1/consent"):
        await _honour_gpc(request)
        return await handler(request)
    try:
        response = await handler(request)
    except StoreError:
        await _honour_gpc(request, wait=False)  # (the change had its time with the store: answer now)
        raise
    except Exception:
        await _honour_gpc(request)
        raise
    if response.status >= 400:
        await _honour_gpc(request, wait=response.status != 503)
    return response


async def _honour_gpc(request: web.Request, wait: bool = True) -> None:
    # A store that fails: the opt-out holds in memory (ConsentService), the request is answered all the same.
    with contextlib.suppress(StoreError):
        await request.app[CONSENT].honour_gpc(the_caller(request), wait)


# ------------------------------------------------------------------------------------------------
# Helpers


# ------------------------------------------------------------------------------------------------
# JSON views


# A view formats the same few instants many times (its choice's made_at and expires_at once per vendor,
# list and category), and a change's answer is a view: each instant is formatted once. A view has a
# handful of instants and the next one others: a larger memo would only keep every client's (with
# 10 000 clients changing their choice, 1 024 entries held ~0.5 MiB).
_iso = functools.lru_cache(maxsize=16)(iso)


def view_json(view: ClientView) -> dict[str, Any]:
    choice = view.choice
    granted = {}
    if choice is not None and choice.expires_at > view.now:  # its grants are in force
        granted = {c: {"granted": True, "granted_at": _iso(choice.made_at), "expires_at": _iso(choice.expires_at),
                       "source": choice.source} for c, d in view.by_category if d.allowed and d.by_choice}
    return {
        "client": view.client,
        "identity": {"address": view.address, "mac": view.mac, "mac_source": view.mac_source},
        "profile": {"name": view.profile, "network": str(view.network) if view.network else None,
                    "why": view.why_profile},
        # the categories granted and in force
        "categories": granted,
        "choice": choice_json(choice, view) if choice is not None else None,
        "vendors": [{"id": v.id, "name": v.name, "category": v.category, **decision_json(d, view)}
                    for v, d in view.decisions],
        "lists": [{"id": v.id, "name": v.name, "category": v.category, **decision_json(d, view)}
                  for v, d in view.lists],
        # what the choice says of each category as a whole
        "by_category": {c: decision_json(d, view) for c, d in view.by_category},
        # items in force that the choice in force does not cover (added or changed since): no choice yet
        "new": [item_json(i) for i in view.new],
        "notes": list(view.notes),
        "ask_again_after": _iso(view.ask_again_after),
        "kiosk": None if view.kiosk_idle_minutes is None else {
            "idle_minutes": view.kiosk_idle_minutes, "last_seen": _iso(view.kiosk_last_seen)},
    }


def decision_json(d: Decision, view: ClientView) -> dict[str, Any]:
    """Allowed or not, why, and (when a choice decided it) since and until when that holds."""
    c = view.choice if d.by_choice else None
    # until: null for what has no end, a standing opt-out as much as a profile's default
    until = None if c is None or (c.standing and not d.allowed) else c.expires_at
    return {"allowed": d.allowed, "reason": d.reason, "by_choice": d.by_choice,
            "since": _iso(c.made_at) if c else None, "until": _iso(until)}


def item_json(i: Item) -> dict[str, Any]:
    return i.as_json()


def category_json(c: Category) -> dict[str, Any]:
    return {"id": c.id, "name": c.name, "description": c.description}


def choice_json(c: Choice, view: ClientView) -> dict[str, Any]:
    n = c.notice
    return {
        "id": c.id,
        "subject": {"address": c.subject.address, "mac": c.subject.mac, "network": c.subject.network},
        "categories": dict(c.categories), "vendors": dict(c.vendors),
        "made_at": _iso(c.made_at), "expires_at": _iso(c.expires_at), "active": c.active(view.now),
        "refusals_stand": c.standing, "channel": c.channel, "source": c.source, "profile": c.profile,
        "sec_gpc": c.sec_gpc, "gpc_seen_at": _iso(c.gpc_seen_at), "language": c.language or None,
        # the notice the client presented; null: none was shown (a device that named no notice, GPC)
        "notice": None if n is None else {"catalog": n.catalog, "version": n.version, "sha256": n.sha256,
                                          "language": n.language, "current": view.notice_current},
        # exactly what the choice covers: each vendor and list, with the fingerprint of what was listed
        "covers": [{"kind": key.partition(":")[0], "id": key.partition(":")[2], "fingerprint": fp}
                   for key, fp in sorted((c.items or {}).items())],
        "terms_sha256": c.terms or None,
    }


def offer_json(o: Offer) -> dict[str, Any]:
    return {"token": o.token, "name": o.name, "expires_at": iso(o.expires_at)}


def explanation_json(x: Explanation) -> dict[str, Any]:
    view = view_json(x.view)
    rule = x.rule
    decision = x.decision
    if rule is None:
        answer, reasons = "resolve", [f"{x.name} matches no catalog rule: it is resolved normally for everyone"]
    else:
        vendor = rule.vendor
        answer = "resolve" if decision is not None and decision.allowed else "sinkhole"
        reasons = [f"{x.name} matches catalog rule {rule.pattern!r}: {vendor.name} ({vendor.id}), "
                   f"category {vendor.category}"]
    mac = x.view.mac
    reasons.append(f"client {x.view.address}" + (f", MAC {mac} (from the {x.view.mac_source})" if mac else
                                                  ", MAC unknown"))
    reasons.append(f"profile {x.view.profile}: {x.view.why_profile}")
    reasons.extend(x.view.notes)
    c = x.view.choice
    if c is not None:
        notice = ("no notice shown" if c.notice is None else
                  "the notice in force" if x.view.notice_current else f"notice {c.notice.version}")
        reasons.append(f"choice #{c.id} by {c.subject.describe()} via {c.channel}, made {iso(c.made_at)}, "
                       f"expires {iso(c.expires_at)}, {notice}, covering {len(c.items or {})} items")
    elif rule is not None and x.view.profile not in ("deny", "allow"):
        reasons.append("no choice applies to this client")
    if decision is not None:
        reasons.append(decision.reason)
    return {"name": x.name, "answer": answer,
            "rule": None if rule is None else {"pattern": rule.pattern, "vendor": rule.vendor.id,
                                               "category": rule.vendor.category},
            "allowed": None if decision is None else decision.allowed, "reasons": reasons, "client": view}


# ------------------------------------------------------------------------------------------------
# Requests


def caller_address(request: web.Request) -> str:
    if request.remote is None:
        raise ApiError(400, "no_peer", "cannot tell the caller's address")
    return normalize_client(request.remote)


def the_caller(request: web.Request, channel: str = "device") -> Caller:
    address = caller_address(request)
    return Caller(address, request.app[CONSENT].mac_of(address), channel,  # type: ignore[arg-type]
                  user_agent(request), sec_gpc(request))


def admin_caller(request: web.Request) -> Caller:
    return Caller(None, None, "admin", user_agent(request), sec_gpc(request))


def sec_gpc(request: web.Request) -> str | None:
    """The Sec-GPC value: "1" if any copy of the header says 1 (GPC spec), else what was sent."""
    sent = request.headers.getall("Sec-GPC", ())
    if not sent:
        return None
    values = [v.strip() for v in sent]
    if "1" in values:
        return "1"
    return values[0][:16]


def require_admin(request: web.Request) -> None:
    """The bearer token, or for a read (GET, HEAD) the admin dashboard's session cookie: a cookie
    goes with any request the browser makes, so it never authorizes a change (no forged requests)."""
    require_admin_listener(request)
    if is_admin(request):
        return
    if request.method in ("GET", "HEAD") and has_session(request):
        return
    raise ApiError(401, "unauthorized", "admin endpoint: send 'Authorization: Bearer <admin token>'")


def require_admin_listener(request: web.Request) -> None:
    settings = request.app[SETTINGS]
    if settings.admin is not None and not on_listener(request, settings.admin):
        raise ApiError(404, "not_found", "admin endpoints are served on the admin listener (api.admin_listen)")


def has_session(request: web.Request) -> bool:
    """Whether the request carries a live admin dashboard session."""
    return request.app[SESSIONS].check(request.cookies.get(SESSION_COOKIE))


def wants_html(request: web.Request) -> bool:
    """A browser navigating (Accept names text/html, not JSON): it gets pages, API clients JSON."""
    accept = request.headers.get("Accept", "")
    return "text/html" in accept and "application/json" not in accept


def is_admin(request: web.Request) -> bool:
    token = bearer(request)
    return token is not None and token_matches(token, request.app[SETTINGS].admin_token)


def on_listener(request: web.Request, listener: tuple[str, int]) -> bool:
    """Whether the socket that took `request` is `listener`'s: its port, and its address unless that
    is a wildcard (another address with the same port is another listener)."""
    local = local_address(request)
    host, port = listener
    return local is not None and local[1] == port and (host in WILDCARDS or local[0] == normalize_client(host))


def parse_subject(raw: str, field: str) -> Subject:
    """An IP address, a MAC address, or a network (CIDR, host bits clear)."""
    try:
        return Subject(address=normalize_client(raw))
    except ValueError:
        pass
    try:
        return Subject(mac=normalize_mac(raw))
    except ValueError:
        pass
    if "/" in raw:
        try:
            return Subject(network=str(ipaddress.ip_network(raw)))
        except ValueError as exc:
            raise ApiError(400, "invalid_field", f"not a network: {raw!r} ({exc})", field) from None
    raise ApiError(400, "invalid_field", f"not an IP address, MAC address or network: {raw!r}", field)


def path_subject(request: web.Request) -> Subject:
    return parse_subject(request.match_info["client"], "client")


async def json_body(request: web.Request, *, optional: bool = False) -> dict[str, Any]:
    if optional and not request.can_read_body and request.content_type in ("application/octet-stream", ""):
        return {}
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "send the body as application/json")
    try:
        body = json.loads(await request.read() or (b"{}" if optional else b""))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, "bad_json", f"body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "bad_json", "body must be a JSON object")
    return body


CHOICE_FIELDS = frozenset({"categories", "choices", "vendors", "days", "notice", "language", "channel", "pairing"})
SHA256 = re.compile(r"[0-9a-fA-F]{64}")
TOKEN = re.compile(r"[a-zA-Z2-7]{1,63}")  # base32: a DNS label (consent/pairing.py)


def parse_choice(body: Mapping[str, Any], catalog: Catalog, max_days: int) -> tuple[ChoiceRequest, str]:
    """The choice in a PUT body, and the channel it names ("device" unless it says "portal").

    Either the first API's `{"categories": [...]}` (exactly these granted, every other category refused)
    or `{"choices": {"marketing": true, ...}, "vendors": {"activecampaign": false}}` (only what is
    named is decided)."""
    unknown = set(body) - CHOICE_FIELDS
    if unknown:
        field = sorted(unknown)[0]
        raise ApiError(400, "invalid_field", f"unknown field {field!r}", field)
    known = {c.id for c in catalog.categories}
    categories: dict[str, bool]
    if "categories" in body and "choices" in body:
        raise ApiError(400, "invalid_field", "send either categories (a list) or choices (an object)", "choices")
    if "choices" in body:
        raw = body["choices"]
        if not isinstance(raw, dict):
            raise ApiError(400, "invalid_field", "choices must be an object of category: true|false", "choices")
        for c, v in raw.items():
            if c not in known:
                raise ApiError(400, "invalid_field", f"unknown category {c!r} (known: {', '.join(sorted(known))})",
                               f"choices.{c}")
            if not isinstance(v, bool):
                raise ApiError(400, "invalid_field", "a choice is true (grant) or false (refuse)", f"choices.{c}")
        categories = dict(raw)
    elif "categories" in body or "vendors" not in body:
        listed = body.get("categories")
        if not isinstance(listed, list):
            raise ApiError(400, "invalid_field", "categories must be a list of category ids", "categories")
        for i, c in enumerate(listed):
            if not isinstance(c, str) or c not in known:
                raise ApiError(400, "invalid_field",
                               f"unknown category {c!r} (known: {', '.join(sorted(known))})", f"categories[{i}]")
        categories = {c.id: c.id in listed for c in catalog.categories}
    else:
        categories = {}
    vendors = body.get("vendors", {})
    if not isinstance(vendors, dict):
        raise ApiError(400, "invalid_field", "vendors must be an object of vendor id: true|false", "vendors")
    for v, said in vendors.items():
        if catalog.vendor(v) is None:
            raise ApiError(400, "invalid_field", f"unknown vendor {v!r}", f"vendors.{v}")
        if not isinstance(said, bool):
            raise ApiError(400, "invalid_field", "a choice is true (grant) or false (refuse)", f"vendors.{v}")
    if not categories and not vendors:
        raise ApiError(400, "invalid_field", "choose at least one category or vendor", "choices")
    days = body.get("days")
    if isinstance(days, float) and days.is_integer():
        days = int(days)  # JSON has one number type: 30.0 is 30
    if days is not None and (isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= max_days):
        raise ApiError(400, "invalid_field", f"days must be an integer 1..{max_days}", "days")
    notice = body.get("notice", {})
    if not isinstance(notice, dict) or set(notice) - {"version", "sha256"}:
        raise ApiError(400, "invalid_field", 'notice must be {"version": ..., "sha256": ...}', "notice")
    version, sha = notice.get("version"), notice.get("sha256")
    if "version" in notice and not isinstance(version, str):  # (null is not a version: leave the key out)
        raise ApiError(400, "invalid_field", "notice.version must be a string", "notice.version")
    if "sha256" in notice and (not isinstance(sha, str) or not SHA256.fullmatch(sha)):
        raise ApiError(400, "invalid_field", "notice.sha256 must be 64 hex digits", "notice.sha256")
    language = body.get("language")
    if language is not None and not isinstance(language, str):
        raise ApiError(400, "invalid_field", "language must be a string such as 'en'", "language")
    channel = body.get("channel", "device")
    if channel not in ("portal", "device"):
        raise ApiError(400, "invalid_field", "channel must be 'portal' or 'device'", "channel")
    pairing = body.get("pairing")
    if pairing is not None and (not isinstance(pairing, str) or not TOKEN.fullmatch(pairing)):
        raise ApiError(400, "invalid_field", "pairing must be the token another address of this device was given",
                       "pairing")
    return ChoiceRequest(categories, dict(vendors), days, sha, version, language, pairing), channel


def user_agent(request: web.Request) -> str:
    return request.headers.get("User-Agent", "")[:512]


def client_filter(raw: str | None, field: str) -> tuple[str | None, str | None, str | None]:
    """(address, mac, network) for a `client` query parameter."""
    if raw is None:
        return None, None, None
    s = parse_subject(raw, field)
    return s.address, s.mac, s.network


def time_param(request: web.Request, name: str) -> float | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        return parse_when(raw, time.time())
    except ValueError as exc:
        raise ApiError(400, "invalid_field", f"{name}: {exc}", name) from None


# ------------------------------------------------------------------------------------------------
# Handlers: anyone


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok", **request.app[HEALTH]()})


async def vendors(request: web.Request) -> web.Response:
    """The catalog's facts, in `?lang=` (default: the notice's default language) where the catalog
    translates them, in its own words elsewhere."""
    catalog = request.app[CATALOG]()
    statuses = _rules(request).status() if request.app[RULES] else []
    entries = {s["id"]: s["entries"] for s in statuses if s["kind"] == "block"}
    language = request.query.get("lang", request.app[CONSENT].shown.default_language).strip().lower()
    if not LANGUAGE_TAG.fullmatch(language):
        raise ApiError(400, "invalid_field", f"not a language tag: {language!r} (e.g. 'de')", "lang")
    return json_response({
        "version": catalog.version,
        "language": language,
        "categories": [category_json(c.in_language(language)) for c in catalog.categories],
        "vendors": [
            {
                "id": v.id, "name": v.name, "category": v.category, "tcf_purposes": list(v.tcf_purposes),
                "summary": shown.summary, "recipients": shown.recipients, "privacy_policy": v.privacy_policy,
                "data_collected": list(shown.data_collected),
                "cookies": [{"name": c.name, "duration": c.duration, "purpose": c.purpose} for c in shown.cookies],
                "domains": [{"pattern": d.pattern, "serves": v.serves_in(language, d), "source": d.source}
                            for d in catalog.domains_of(v)],
                "ip_ranges": list(v.ip_ranges),
                "sources": list(v.sources),
                "ccpa_sale_or_share": v.ccpa_sale_or_share,
            }
            for v in catalog.vendors for shown in (v.in_language(language),)
        ],
        "lists": [{"id": v.id, "name": v.name, "category": v.category, "description": v.summary,
                   "source": v.sources[0] if v.sources else "", "entries": entries.get(v.id, 0)}
                  for v in catalog.listed],
    })


async def notice(request: web.Request) -> web.Response:
    """Everything a person is told before choosing, as hashed: a device that shows it sends back
    `version` and its language's `sha256` with the choice (else the choice records "not shown")."""
    shown = request.app[CONSENT].shown
    return json_response({
        "catalog": shown.catalog_version, "version": shown.version, "default_language": shown.default_language,
        "operator": shown.operator.as_json() if shown.operator.named else None,
        # per language: what its hash covers besides the operator and the items' fingerprints in it
        "languages": {lang: {"sha256": shown.hashes[lang], "terms_sha256": shown.terms[lang], "text": text,
                             "categories": [category_json(c) for c in shown.categories_in(lang)]}
                      for lang, text in shown.text.texts.items()},
        "categories": [category_json(c) for c in shown.categories],
        "items": [item_json(i) for i in shown.items],
    })


# ------------------------------------------------------------------------------------------------
# Handlers: the caller's own consent


async def get_own(request: web.Request) -> web.Response:
    control = request.app[CONSENT]
    c = the_caller(request)
    assert c.address is not None
    return json_response({**view_json(control.view(c.address)), "sec_gpc": c.sec_gpc})


async def put_own(request: web.Request) -> web.Response:
    control = request.app[CONSENT]
    choice, channel = parse_choice(await json_body(request), control.catalog, request.app[SETTINGS].max_days)
    c = the_caller(request, channel)
    view = await control.choose(Subject(c.address, c.mac), choice, c)
    return _own_state(control, view, c)


async def delete_own(request: web.Request) -> web.Response:
    """Withdraw everything; an optional body names the notice the page showed (as for PUT)."""
    control = request.app[CONSENT]
    body = await json_body(request, optional=True)
    shown = None
    if body:
        unknown = set(body) - {"notice", "language", "channel"}
        if unknown:
            field = sorted(unknown)[0]
            raise ApiError(400, "invalid_field", f"unknown field {field!r} (a withdrawal refuses everything)", field)
        shown, _ = parse_choice({**body, "categories": []}, control.catalog, request.app[SETTINGS].max_days)
    c = the_caller(request, "portal" if request.headers.get("Origin") else "device")
    view = await control.withdraw(Subject(c.address, c.mac), c, shown)
    return _own_state(control, view, c)


async def end_own_session(request: web.Request) -> web.Response:
    await json_body(request, optional=True)
    control = request.app[CONSENT]
    c = the_caller(request)
    view = await control.end_session(Subject(c.address, c.mac), c, "session ended by the kiosk software")
    return _own_state(control, view, c)


async def whoami(request: web.Request) -> web.Response:
    control = request.app[CONSENT]
    c = the_caller(request)
    view, paired = control.whoami(c)
    dns = None
    if paired is not None:
        address, _, mac = paired.dns_key.partition(KEY_SEPARATOR)
        dns = {"address": address, "mac": mac or control.mac_of(address), "paired_at": iso(paired.at)}
    return json_response({
        "http": {"address": c.address, "mac": c.mac}, "dns": dns, "profile": view_json(view)["profile"],
    })


def _own_state(control: ConsentControl, view: ClientView, c: Caller) -> web.Response:
    """A consent change's answer: the new state, and a pairing token for the page (tokens are minted
    here only, where a page needs one; None when this client had its share)."""
    offer = control.offer_pairing(c)
    return state_response({**view_json(view), "sec_gpc": c.sec_gpc,
                           "pairing": offer_json(offer) if offer is not None else None}, view)


def state_response(body: dict[str, Any], view: ClientView) -> web.Response:
    """The new state after a change: 200 once recorded, 202 for a refusal in force here that the
    store has not recorded yet (`held` says why and what happens next)."""
    if view.held:
        return json_response({**body, "held": view.held}, status=202)
    return json_response(body)


# ------------------------------------------------------------------------------------------------
# Handlers: admin


async def list_clients(request: web.Request) -> web.Response:
    require_admin(request)
    return json_response({"clients": [view_json(v) for v in request.app[CONSENT].views()]})


def _subject_view(control: ConsentControl, subject: Subject) -> ClientView:
    if subject.address is not None:
        return control.view(subject.address)
    return control.view_subject(subject)


async def get_client(request: web.Request) -> web.Response:
    require_admin(request)
    return json_response(view_json(_subject_view(request.app[CONSENT], path_subject(request))))


async def put_client(request: web.Request) -> web.Response:
    require_admin(request)
    subject = path_subject(request)
    control = request.app[CONSENT]
    choice, _ = parse_choice(await json_body(request), control.catalog, request.app[SETTINGS].max_days)
    view = await control.choose(subject, choice, admin_caller(request))
    return state_response(view_json(view), view)


async def delete_client(request: web.Request) -> web.Response:
    require_admin(request)
    subject = path_subject(request)
    view = await request.app[CONSENT].withdraw(subject, admin_caller(request))
    return state_response(view_json(view), view)


async def end_client_session(request: web.Request) -> web.Response:
    require_admin(request)
    subject = path_subject(request)
    await json_body(request, optional=True)
    view = await request.app[CONSENT].end_session(subject, admin_caller(request), "reset by an admin")
    return json_response(view_json(view))


async def audit(request: web.Request) -> web.Response:
    require_admin(request)
    address, mac, _ = client_filter(request.query.get("client"), "client")
    try:
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        raise ApiError(400, "invalid_field", "limit must be an integer", "limit") from None
    if not 1 <= limit <= 10_000:
        raise ApiError(400, "invalid_field", "limit must be 1..10000", "limit")
    events = await request.app[CONSENT].events(address or mac, limit)
    return json_response({"events": [_audit_json(e) for e in events]})


def _audit_json(e: Event) -> dict[str, Any]:
    # the first API's fields first (client, categories granted, source), then the full record
    return {**event_json(e), "at": iso(e.at), "client": e.subject.address or e.subject.network or e.subject.mac,
            "source": e.source, "decisions": {"categories": dict(e.categories), "vendors": dict(e.vendors)},
            "categories": [c for c, granted in e.categories.items() if granted] if e.action == "grant"
            else list(e.categories)}


async def export(request: web.Request) -> web.StreamResponse:
    """The consent log as JSON Lines (default) or CSV, oldest first, with time and client filters."""
    require_admin(request)
    fmt = request.query.get("format", "jsonl")
    if fmt not in ("jsonl", "csv"):
        raise ApiError(400, "invalid_field", "format must be jsonl or csv", "format")
    address, mac, network = client_filter(request.query.get("client"), "client")
    f = EventFilter(time_param(request, "since"), time_param(request, "until"), address, mac, network)
    events: AsyncIterator[Event] = request.app[CONSENT].export(f)
    first = await anext(events, None)  # a store that cannot be read answers 503 before anything is sent
    response = web.StreamResponse(headers={
        "Content-Type": "application/x-ndjson; charset=utf-8" if fmt == "jsonl" else "text/csv; charset=utf-8",
        "Content-Disposition": f'attachment; filename="dnsgate-consent-log.{fmt}"',
    })
    await response.prepare(request)
    if fmt == "csv":
        await response.write(csv_header().encode())
    line = jsonl_line if fmt == "jsonl" else csv_line
    try:
        if first is not None:
            await response.write(line(first).encode())
        async for event in events:
            await response.write(line(event).encode())
    except StoreError as exc:
        # The status is sent already: break the transfer, so a short log is never taken for the whole.
        log.error("consent log export cut short: %s", exc)
        if request.transport is not None:
            request.transport.close()
        return response
    await response.write_eof()
    return response


async def explain(request: web.Request) -> web.Response:
    require_admin(request)
    name = request.query.get("name", "").strip()
    if not name or name == ".":
        raise ApiError(400, "invalid_field", "name is required (a domain name such as trackcmp.net)", "name")
    raw = request.query.get("client")
    if raw is None:
        raise ApiError(400, "invalid_field", "client is required (an IP address)", "client")
    try:
        address = normalize_client(raw)
    except ValueError:
        raise ApiError(400, "invalid_field", f"not an IP address: {raw!r}", "client") from None
    mac = request.query.get("mac")
    if mac is not None:
        try:
            mac = normalize_mac(mac)
        except ValueError:
            raise ApiError(400, "invalid_field", f"not a MAC address: {mac!r}", "mac") from None
    try:
        x = request.app[CONSENT].explain(name, address, mac)
    except ValueError as exc:
        raise ApiError(400, "invalid_field", f"not a domain name: {name!r} ({exc})", "name") from None
    return json_response(explanation_json(x))


def _rules(request: web.Request) -> RulesControl:
    rules = request.app[RULES]
    if rules is None:
        raise ApiError(404, "not_found", "reloading is not available here")
    return rules


def _rules_response(report: RulesReport) -> web.Response:
    if not report.ok:  # the running configuration stays; say why the new one was refused
        return error_response(422, "reload_rejected", report.error or "rejected")
    body = report.as_json()
    body["lists"] = [_list_json(s) for s in body.get("lists", [])]
    return json_response(body)


def _list_json(status: Mapping[str, Any]) -> dict[str, Any]:
    return {**status, "fetched_at": iso(status.get("fetched_at")), "checked_at": iso(status.get("checked_at"))}


async def reload_rules(request: web.Request) -> web.Response:
    """Re-read config, catalog and lists; swap them in whole, or keep the running ones (422)."""
    require_admin(request)
    return _rules_response(await _rules(request).reload("POST /v1/reload"))


async def refresh_lists(request: web.Request) -> web.Response:
    """Re-download every URL list now (conditional requests); new content is swapped in."""
    require_admin(request)
    return _rules_response(await _rules(request).refresh(force=True, reason="POST /v1/lists/refresh"))


async def acknowledge_loss(request: web.Request) -> web.Response:
    """An admin has seen that the shared store lost its history: /healthz stops reporting it."""
    require_admin(request)
    await json_body(request, optional=True)
    loss = request.app[CONSENT].acknowledge_loss()
    return json_response({"acknowledged": None if loss is None else {"at": iso(loss.at), "what": loss.what}})


async def list_status(request: web.Request) -> web.Response:
    require_admin(request)
    return json_response({"lists": [_list_json(s) for s in _rules(request).status()]})
