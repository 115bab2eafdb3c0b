"""HTTP routes for seeing what the gate did: /metrics, the query log, the evidence report, the event
stream, and the dashboard.

Aggregates (/metrics, /v1/stats, the dashboard) carry no client address and no name, so they are
open like any exporter; the query log, the top names and clients, the report and the event stream
name clients and need the admin token. The dashboard is same-origin HTML, CSS and JS under a strict
Content-Security-Policy: no external resources, no inline script.

The admin dashboard (/dashboard/admin) is behind a login: the admin token posted once in a form
(never in a URL) buys a session cookie (HttpOnly, SameSite=Strict, Secure over https) that
authorizes the admin API's reads only (api.require_admin), so no other site can make a browser
change anything with it; logging in and out are form posts checked for dnsgate's own Origin like
every state change.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from aiohttp import web

from dnsgate.addresses import normalize_client
from dnsgate.consent.service import ClientView
from dnsgate.dns.tally import OUTCOMES
from dnsgate.errors import ApiError
from dnsgate.http.consent_api import (
    CONSENT,
    SESSIONS,
    SETTINGS,
    has_session,
    require_admin,
    require_admin_listener,
)
from dnsgate.http.guard import SESSION_COOKIE, SESSION_LIFETIME, ChangeLimiter, json_response, token_matches
from dnsgate.observe.dashboard import Sampler
from dnsgate.observe.events import STREAM_ACTIONS, EventHub, iso
from dnsgate.observe.metrics import CONTENT_TYPE, exposition
from dnsgate.observe.querylog import QueryLog
from dnsgate.observe.querylog_db import KINDS, Filters
from dnsgate.observe.report import Watched, build_report, junit
from dnsgate.rules.catalog import Catalog
from dnsgate.timespec import parse_when

MAX_LIMIT = 10_000
SSE_HEARTBEAT = 15.0
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
# The pages with forms (login, logout) post to themselves; the others post nowhere.
ADMIN_CSP = CSP.replace("form-action 'none'", "form-action 'self'")
DASHBOARD_FILES = {"": ("index.html", "text/html"), "app.js": ("app.js", "text/javascript"),
                   "charts.js": ("charts.js", "text/javascript"), "admin.js": ("admin.js", "text/javascript"),
                   "app.css": ("app.css", "text/css"), "icon.svg": ("icon.svg", "image/svg+xml")}
LOGIN_FAILURES_PER_MINUTE = 10  # per address: the token is long and random, this only keeps logs quiet
TOP_LIMIT = 100
CONSENT_EVENTS = 5000  # the newest consent events the admin dashboard buckets over time


@dataclass(frozen=True, slots=True)
class Observability:
    registry: Any  # prometheus_client.CollectorRegistry
    querylog: QueryLog
    hub: EventHub
    sampler: Sampler
    catalog: Callable[[], Catalog]  # the one in force: a reload swaps it
    watched: tuple[Watched, ...]  # every catalog pattern, including domains switched off
    wall: Callable[[], float] = time.time


OBSERVE: web.AppKey[Observability] = web.AppKey("observability", Observability)
LOGIN_LIMIT: web.AppKey[ChangeLimiter] = web.AppKey("login_limit", ChangeLimiter)
CLOSING: web.AppKey[asyncio.Event] = web.AppKey("closing", asyncio.Event)


def add_routes(app: web.Application, observability: Observability) -> None:
    app[OBSERVE] = observability
    app[CLOSING] = asyncio.Event()
    app.on_shutdown.append(_closing)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/stats", stats)
    app.router.add_get("/v1/queries", queries)
    app.router.add_get("/v1/top", top)
    app.router.add_get("/v1/report", report)
    app.router.add_get("/v1/events", events)
    app[LOGIN_LIMIT] = ChangeLimiter(LOGIN_FAILURES_PER_MINUTE)
    app.router.add_get("/dashboard/login", login_page)
    app.router.add_post("/dashboard/login", login)
    app.router.add_post("/dashboard/logout", logout)
    app.router.add_get("/dashboard/admin", admin_page)
    app.router.add_get("/dashboard", dashboard)
    app.router.add_get(r"/dashboard/{file:[\w-]+\.\w+}", dashboard)  # (the pages above have no dot)


async def _closing(app: web.Application) -> None:
    app[CLOSING].set()  # ends open event streams, so shutdown does not wait for them


def parse_time(text: str, now: float, field: str) -> float:
    """A `since`/`until`: the one reading every command and route shares (timespec)."""
    try:
        return parse_when(text, now)
    except ValueError as exc:
        raise ApiError(400, "invalid_field", f"{field}: {exc}", field) from None


def _limit(request: web.Request, default: int) -> int:
    try:
        limit = int(request.query.get("limit", str(default)))
    except ValueError:
        raise ApiError(400, "invalid_field", "limit must be an integer", "limit") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise ApiError(400, "invalid_field", f"limit must be 1..{MAX_LIMIT}", "limit")
    return limit


def _client(request: web.Request) -> str | None:
    raw = request.query.get("client")
    if raw is None:
        return None
    try:
        return normalize_client(raw)
    except ValueError:
        raise ApiError(400, "invalid_field", f"not an IP address: {raw!r}", "client") from None


def _require_log(o: Observability) -> None:
    if o.querylog.db is None:
        raise ApiError(409, "querylog_off", "the query log is off (querylog.mode = \"off\")")


def filters_from(request: web.Request, now: float) -> Filters:
    q = request.query
    outcome = q.get("outcome")
    if outcome is not None and outcome not in OUTCOMES:
        raise ApiError(400, "invalid_field", f"outcome must be one of {', '.join(OUTCOMES)}", "outcome")
    name = q.get("name")
    if name is not None:
        name = name.strip().lower().rstrip(".")
        if not name:
            raise ApiError(400, "invalid_field", "name must not be empty", "name")
    if q.get("vendor") == "":
        raise ApiError(400, "invalid_field", "vendor must not be empty", "vendor")
    after, before = q.get("after"), q.get("before")
    if after is not None and not after.isdigit():
        raise ApiError(400, "invalid_field", "after must be an entry id", "after")
    if before is not None and not before.isdigit():
        raise ApiError(400, "invalid_field", "before must be an entry id", "before")
    gated = q.get("gated")
    if gated is not None and gated not in ("true", "false"):
        raise ApiError(400, "invalid_field", "gated must be true or false", "gated")
    return Filters(
        client=_client(request), name=name, vendor=q.get("vendor"), outcome=outcome,
        since=parse_time(q["since"], now, "since") if "since" in q else None,
        until=parse_time(q["until"], now, "until") if "until" in q else None,
        after_id=int(after) if after is not None else None,
        before_id=int(before) if before is not None else None,
        gated=None if gated is None else gated == "true",
    )


def entry_json(row: dict[str, Any]) -> dict[str, Any]:
    consent = None
    if row["grant_source"] is not None:  # (an anonymous log keeps no grant times: null)
        consent = {"category": row["category"], "granted_at": iso(row["granted_at"]),
                   "expires_at": iso(row["grant_expires_at"]), "source": row["grant_source"]}
    return {"id": row["id"], "at": iso(row["at"]), "client": row["client"], "name": row["name"],
            "type": row["type"], "protocol": row["protocol"], "outcome": row["outcome"], "rcode": row["rcode"],
            "vendor": row["vendor"], "consent": consent, "duration_ms": row["duration_ms"]}


# ------------------------------------------------------------------------------------------------
# Handlers


async def metrics(request: web.Request) -> web.Response:
    o = request.app[OBSERVE]
    await o.querylog.flush()
    return web.Response(body=exposition(o.registry), headers={"Content-Type": CONTENT_TYPE})


async def stats(request: web.Request) -> web.Response:
    return json_response(request.app[OBSERVE].sampler.stats())


async def queries(request: web.Request) -> web.Response:
    require_admin(request)
    o = request.app[OBSERVE]
    _require_log(o)
    filters = filters_from(request, o.wall())
    order = request.query.get("order", "newest")
    if order not in ("newest", "oldest"):
        raise ApiError(400, "invalid_field", "order must be newest or oldest", "order")
    rows = await o.querylog.entries(filters, _limit(request, 100), newest_first=order == "newest")
    return json_response({"mode": o.querylog.mode, "entries": [entry_json(r) for r in rows]})


def _window(request: web.Request, now: float, default_since: str) -> tuple[float, float]:
    q = request.query
    since = parse_time(q.get("since", default_since), now, "since")
    until = parse_time(q["until"], now, "until") if "until" in q else now
    if until <= since:
        raise ApiError(400, "invalid_field", "until must be after since", "until")
    return since, until


def _step(span: float) -> float:
    """About 48 buckets over the window, each a round number of seconds."""
    for step in (10, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400):
        if span / step <= 48:
            return float(step)
    return 86400.0 * max(1, round(span / 86400 / 48))


def consent_summary(view: ClientView) -> dict[str, Any]:
    """What a client's consent comes to, in short: its profile, and per category whether its own
    choice granted or refused it (the rest follow the profile's default)."""
    choice = view.choice
    in_force = choice is not None and choice.expires_at > view.now
    return {"profile": view.profile, "choice": in_force,
            "granted": [c for c, d in view.by_category if d.by_choice and d.allowed],
            "refused": [c for c, d in view.by_category if d.by_choice and not d.allowed],
            "expires_at": iso(choice.expires_at) if in_force and choice is not None else None}


async def top(request: web.Request) -> web.Response:
    """The admin dashboard's aggregates over a window (default: the last 24 hours) from the query
    log and the consent log: top names, top gated names, top clients with their consent, queries
    over time by kind and type, consent changes over time."""
    require_admin(request)
    o = request.app[OBSERVE]
    _require_log(o)
    now = o.wall()
    since, until = _window(request, now, "24h")
    limit = _limit(request, 10)
    if limit > TOP_LIMIT:
        raise ApiError(400, "invalid_field", f"limit must be 1..{TOP_LIMIT}", "limit")
    step = _step(until - since)
    names, gated, clients, timeline = await o.querylog.aggregate(lambda db: (
        db.top_names(since, until, limit), db.top_gated(since, until, limit), db.top_clients(since, until, limit),
        db.timeline(since, until, step)))
    control = request.app[CONSENT]
    for row in clients:
        row["last_at"] = iso(row["last_at"])
        row["consent"] = None
        if o.querylog.mode != "anonymous":  # (a pseudonym has no consent to look up)
            with contextlib.suppress(ValueError):
                row["consent"] = consent_summary(control.view(normalize_client(row["client"])))
    changes: dict[int, dict[str, int]] = {}
    for event in await control.events(None, CONSENT_EVENTS):
        if since <= event.at < until:
            bucket = changes.setdefault(int((event.at - since) // step), {})
            action = STREAM_ACTIONS.get(event.action, event.action)
            bucket[action] = bucket.get(action, 0) + 1
    return json_response({
        "mode": o.querylog.mode, "since": iso(since), "until": iso(until), "step": step, "kinds": list(KINDS),
        "names": names, "gated_names": gated, "clients": clients,
        "timeline": [{**row, "t": iso(row["t"])} for row in timeline],
        "consent_changes": [{"t": iso(since + b * step), "actions": changes[b]} for b in sorted(changes)],
    })


async def report(request: web.Request) -> web.Response:
    require_admin(request)
    o = request.app[OBSERVE]
    now = o.wall()
    q = request.query
    # Without a start: all the log keeps (querylog.max_age_days), and the report says from when.
    since = parse_time(q["since"], now, "since") if "since" in q else now - o.querylog.cfg.max_age_days * 86400
    until = parse_time(q["until"], now, "until") if "until" in q else now
    if until <= since:
        raise ApiError(400, "invalid_field", "until must be after since", "until")
    fmt = q.get("format", "json")
    if fmt not in ("json", "junit"):
        raise ApiError(400, "invalid_field", "format must be json or junit", "format")
    client = _client(request)
    ql = o.querylog
    if client is not None:
        client = ql.client_label(client)
    gated: list[dict[str, Any]] = []
    ungated: list[dict[str, Any]] = []
    dropped = 0
    if ql.db is not None:
        patterns = [(w.apex, w.subdomains_only) for w in o.watched]
        gated, ungated, dropped = await ql.read(lambda db: (
            db.gated(since, until, client), db.resolved_matching(since, until, client, patterns),
            db.dropped_between(since, until)))
    body = build_report(since=since, until=until, generated_at=now, mode=ql.mode, gated=gated, ungated=ungated,
                        watched=o.watched, dropped=dropped, vendor_names={v.id: v.name for v in o.catalog().vendors},
                        detail_limit=_limit(request, 1000))
    if fmt == "junit":
        return web.Response(text=junit(body), content_type="application/xml")
    return json_response(body)


async def events(request: web.Request) -> web.StreamResponse:
    require_admin(request)
    hub = request.app[OBSERVE].hub
    closing = request.app[CLOSING]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    async with hub.subscribe() as queue:
        await response.write(b": dnsgate events\n\n")  # tells the client the stream is open
        stop = asyncio.ensure_future(closing.wait())
        try:
            while not closing.is_set():
                get = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({get, stop}, timeout=SSE_HEARTBEAT,
                                             return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    if not closing.is_set():
                        await response.write(b": keep-alive\n\n")
                    continue
                event = get.result()
                data = json.dumps(event, separators=(",", ":"))
                await response.write(f"event: {event['type']}\ndata: {data}\n\n".encode())
        except ConnectionResetError:
            pass  # the subscriber went away
        finally:
            stop.cancel()
    return response


def _read(filename: str) -> bytes:
    return resources.files("dnsgate").joinpath(f"data/dashboard/{filename}").read_bytes()


async def dashboard(request: web.Request) -> web.Response:
    name = request.match_info.get("file", "")
    if name not in DASHBOARD_FILES:
        raise web.HTTPNotFound()
    filename, content_type = DASHBOARD_FILES[name]
    return web.Response(body=_read(filename), content_type=content_type, headers={
        "Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache"})


def _page(filename: str, status: int = 200, error: str = "") -> web.Response:
    body = _read(filename).decode()
    if error:
        body = body.replace('<p id="login-error" class="error" role="alert" hidden></p>',
                            f'<p id="login-error" class="error" role="alert">{html.escape(error)}</p>')
    # same-origin: the page's form posts carry its Origin (no-referrer would make it "null")
    return web.Response(status=status, text=body, content_type="text/html", headers={
        "Content-Security-Policy": ADMIN_CSP, "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "same-origin", "Cache-Control": "no-store"})


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location, "Cache-Control": "no-store"})


async def login_page(request: web.Request) -> web.Response:
    require_admin_listener(request)
    if has_session(request):
        return _see_other("/dashboard/admin")
    return _page("login.html")


async def login(request: web.Request) -> web.Response:
    """The admin token, posted in a form, for a session cookie (the origin guard has checked the
    form came from one of dnsgate's own pages)."""
    require_admin_listener(request)
    limiter = request.app[LOGIN_LIMIT]
    address = request.remote or ""
    if request.content_type != "application/x-www-form-urlencoded":
        raise ApiError(415, "unsupported_media_type", "the login form sends application/x-www-form-urlencoded")
    try:
        form = await request.post()
    except ValueError as exc:  # (undecodable bytes among them)
        raise ApiError(400, "invalid_field", f"not a form: {exc}", "token") from None
    token = form.get("token")
    if not isinstance(token, str) or not token_matches(token.strip(), request.app[SETTINGS].admin_token):
        wait = limiter.take(address)
        if wait:
            response = _page("login.html", 429, f"Too many failed logins from this address; try again in "
                                                f"{math.ceil(wait)} s.")
            response.headers["Retry-After"] = str(math.ceil(wait))
            return response
        return _page("login.html", 401, "That is not the admin token.")
    session_id = request.app[SESSIONS].start()
    response = _see_other("/dashboard/admin")
    response.set_cookie(SESSION_COOKIE, session_id, path="/", max_age=int(SESSION_LIFETIME), httponly=True,
                        samesite="Strict", secure=request.secure)
    return response


async def logout(request: web.Request) -> web.Response:
    require_admin_listener(request)
    request.app[SESSIONS].end(request.cookies.get(SESSION_COOKIE))
    response = _see_other("/dashboard/login")
    response.del_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="Strict", secure=request.secure)
    return response


async def admin_page(request: web.Request) -> web.Response:
    require_admin_listener(request)
    if not has_session(request):
        return _see_other("/dashboard/login")
    return _page("admin.html")
