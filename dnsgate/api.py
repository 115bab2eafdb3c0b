"""The HTTP API: a client reads and changes its own consent; an admin manages any client's.

The caller of /v1/consent is the HTTP peer address, so a client changes only its own consent.
State changes take JSON bodies only and refuse a browser `Origin` that is not dnsgate's own or
allow-listed, so no third-party page can forge consent for a visitor's address. The app depends
on the `ConsentControl` protocol, not on the store or the resolver.
"""

from __future__ import annotations

import datetime as dt
import hmac
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from aiohttp import web

from .catalog import Catalog
from .consent import Grant, Source, normalize_client
from .consents import ClientView
from .store import AuditEvent

log = logging.getLogger(__name__)

MAX_BODY = 16 * 1024
STATE_CHANGING = frozenset({"PUT", "POST", "DELETE", "PATCH"})


class ConsentControl(Protocol):
    async def grant(self, client: str, categories: Iterable[str], source: Source, user_agent: str,
                    days: int | None = None) -> ClientView: ...
    async def withdraw(self, client: str, source: Source, user_agent: str) -> ClientView: ...
    def view(self, client: str) -> ClientView: ...
    def views(self) -> list[ClientView]: ...
    async def events(self, client: str | None, limit: int) -> list[AuditEvent]: ...


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
    allowed_origins: frozenset[str]
    api_port: int
    own_hosts: frozenset[str]  # host names that are dnsgate itself (localhost, the portal host)
    max_days: int


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field


CONSENT: web.AppKey[ConsentControl] = web.AppKey("consent", ConsentControl)
CATALOG: web.AppKey[Callable[[], Catalog]] = web.AppKey("catalog")  # the catalog in force (reloads swap it)
RULES: web.AppKey[RulesControl | None] = web.AppKey("rules")
SETTINGS: web.AppKey[ApiSettings] = web.AppKey("settings", ApiSettings)
HEALTH: web.AppKey[Callable[[], Mapping[str, Any]]] = web.AppKey("health")


def create_app(consent: ConsentControl, catalog: Callable[[], Catalog], settings: ApiSettings,
               health: Callable[[], Mapping[str, Any]], rules: RulesControl | None = None) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY, middlewares=[errors_as_json, origin_guard])
    app[CONSENT] = consent
    app[CATALOG] = catalog
    app[RULES] = rules
    app[SETTINGS] = settings
    app[HEALTH] = health
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/v1/vendors", vendors)
    app.router.add_get("/v1/consent", get_own)
    app.router.add_put("/v1/consent", put_own)
    app.router.add_delete("/v1/consent", delete_own)
    app.router.add_get("/v1/clients", list_clients)
    app.router.add_get("/v1/clients/{ip}/consent", get_client)
    app.router.add_put("/v1/clients/{ip}/consent", put_client)
    app.router.add_delete("/v1/clients/{ip}/consent", delete_client)
    app.router.add_get("/v1/audit", audit)
    app.router.add_post("/v1/reload", reload_rules)
    app.router.add_get("/v1/lists", list_status)
    app.router.add_post("/v1/lists/refresh", refresh_lists)
    return app


# ------------------------------------------------------------------------------------------------
# Middlewares

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.code, exc.message, exc.field)
    except web.HTTPRequestEntityTooLarge:
        return error_response(413, "body_too_large", f"request body over {MAX_BODY} bytes")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason)


@web.middleware
async def origin_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.method in STATE_CHANGING:
        origin = request.headers.get("Origin")
        if origin is not None and not origin_allowed(origin, request.app[SETTINGS]):
            raise ApiError(403, "origin_refused",
                           f"Origin {origin!r} may not change consent; add it to api.allowed_origins")
    return await handler(request)


def origin_allowed(origin: str, settings: ApiSettings) -> bool:
    """dnsgate's own pages and allow-listed sites may change consent; other web pages may not.

    Own: an IP literal on the API port (a page can only have that origin if dnsgate served it),
    or localhost / the portal host. A DNS-rebound name is neither, so it is refused.
    """
    if origin in settings.allowed_origins:
        return True
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    host = parts.hostname
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return False
    try:
        ipaddress.ip_address(host)
        return port == settings.api_port
    except ValueError:
        return host in settings.own_hosts


# ------------------------------------------------------------------------------------------------
# Helpers


def error_response(status: int, code: str, message: str, field: str | None = None) -> web.Response:
    body: dict[str, Any] = {"status": status, "code": code, "message": message}
    if field is not None:
        body["field"] = field
    return web.json_response({"error": body}, status=status)


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def view_json(view: ClientView) -> dict[str, Any]:
    return {
        "client": view.client,
        "categories": {c: grant_json(g) for c, g in view.grants.items()},
        "vendors": [
            {"id": v.id, "name": v.name, "category": v.category, "allowed": v.allowed} for v in view.vendors
        ],
    }


def grant_json(g: Grant) -> dict[str, Any]:
    return {"granted": True, "granted_at": iso(g.granted_at), "expires_at": iso(g.expires_at), "source": g.source}


def caller(request: web.Request) -> str:
    if request.remote is None:
        raise ApiError(400, "no_peer", "cannot tell the caller's address")
    return normalize_client(request.remote)


def require_admin(request: web.Request) -> None:
    expected = request.app[SETTINGS].admin_token
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise ApiError(401, "unauthorized", "admin endpoint: send 'Authorization: Bearer <admin token>'")


def path_client(request: web.Request) -> str:
    raw = request.match_info["ip"]
    try:
        return normalize_client(raw)
    except ValueError:
        raise ApiError(400, "invalid_field", f"not an IP address: {raw!r}", "ip") from None


async def json_body(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "send the body as application/json")
    try:
        body = json.loads(await request.read())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, "bad_json", f"body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "bad_json", "body must be a JSON object")
    return body


def parse_choice(body: Mapping[str, Any], catalog: Catalog, max_days: int) -> tuple[list[str], int | None]:
    unknown = set(body) - {"categories", "days"}
    if unknown:
        field = sorted(unknown)[0]
        raise ApiError(400, "invalid_field", f"unknown field {field!r}", field)
    categories = body.get("categories")
    if not isinstance(categories, list):
        raise ApiError(400, "invalid_field", "categories must be a list of category ids", "categories")
    known = {c.id for c in catalog.categories}
    for i, c in enumerate(categories):
        if not isinstance(c, str) or c not in known:
            raise ApiError(400, "invalid_field",
                           f"unknown category {c!r} (known: {', '.join(sorted(known))})", f"categories[{i}]")
    days = body.get("days")
    if days is not None and (isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= max_days):
        raise ApiError(400, "invalid_field", f"days must be an integer 1..{max_days}", "days")
    return categories, days


def user_agent(request: web.Request) -> str:
    return request.headers.get("User-Agent", "")[:512]


# ------------------------------------------------------------------------------------------------
# Handlers


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", **request.app[HEALTH]()})


async def vendors(request: web.Request) -> web.Response:
    catalog = request.app[CATALOG]()
    lists = [s for s in _rules(request).status() if s["kind"] == "block"] if request.app[RULES] else []
    return web.json_response({
        "version": catalog.version,
        "categories": [{"id": c.id, "name": c.name, "description": c.description} for c in catalog.categories],
        "vendors": [
            {
                "id": v.id, "name": v.name, "category": v.category, "tcf_purposes": list(v.tcf_purposes),
                "summary": v.summary, "recipients": v.recipients, "privacy_policy": v.privacy_policy,
                "data_collected": list(v.data_collected),
                "cookies": [{"name": c.name, "duration": c.duration, "purpose": c.purpose} for c in v.cookies],
                "domains": [{"pattern": d.pattern, "serves": d.serves, "source": d.source}
                            for d in catalog.domains_of(v)],
                "ip_ranges": list(v.ip_ranges),
                "sources": list(v.sources),
            }
            for v in catalog.vendors
        ],
        "lists": [{"id": s["id"], "name": s["name"], "category": s["category"], "entries": s["entries"]}
                  for s in lists if s["loaded"]],
    })


async def get_own(request: web.Request) -> web.Response:
    return web.json_response(view_json(request.app[CONSENT].view(caller(request))))


async def put_own(request: web.Request) -> web.Response:
    return await _put(request, caller(request), "self")


async def delete_own(request: web.Request) -> web.Response:
    view = await request.app[CONSENT].withdraw(caller(request), "self", user_agent(request))
    return web.json_response(view_json(view))


async def list_clients(request: web.Request) -> web.Response:
    require_admin(request)
    return web.json_response({"clients": [view_json(v) for v in request.app[CONSENT].views()]})


async def get_client(request: web.Request) -> web.Response:
    require_admin(request)
    return web.json_response(view_json(request.app[CONSENT].view(path_client(request))))


async def put_client(request: web.Request) -> web.Response:
    require_admin(request)
    return await _put(request, path_client(request), "admin")


async def delete_client(request: web.Request) -> web.Response:
    require_admin(request)
    view = await request.app[CONSENT].withdraw(path_client(request), "admin", user_agent(request))
    return web.json_response(view_json(view))


async def _put(request: web.Request, client: str, source: Source) -> web.Response:
    categories, days = parse_choice(await json_body(request), request.app[CATALOG](), request.app[SETTINGS].max_days)
    view = await request.app[CONSENT].grant(client, categories, source, user_agent(request), days)
    return web.json_response(view_json(view))


async def audit(request: web.Request) -> web.Response:
    require_admin(request)
    client = request.query.get("client")
    if client is not None:
        try:
            client = normalize_client(client)
        except ValueError:
            raise ApiError(400, "invalid_field", f"not an IP address: {client!r}", "client") from None
    try:
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        raise ApiError(400, "invalid_field", "limit must be an integer", "limit") from None
    if not 1 <= limit <= 10_000:
        raise ApiError(400, "invalid_field", "limit must be 1..10000", "limit")
    events = await request.app[CONSENT].events(client, limit)
    return web.json_response({"events": [
        {"id": e.id, "at": iso(e.at), "client": e.client, "action": e.action, "categories": list(e.categories),
         "expires_at": iso(e.expires_at), "source": e.source, "user_agent": e.user_agent}
        for e in events
    ]})


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
    return web.json_response(body)


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


async def list_status(request: web.Request) -> web.Response:
    require_admin(request)
    return web.json_response({"lists": [_list_json(s) for s in _rules(request).status()]})
