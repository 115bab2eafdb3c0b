"""HTTP routes for seeing what the gate did: /metrics, the query log, the evidence report, the event
stream, and the dashboard.

Aggregates (/metrics, /v1/stats, the dashboard) carry no client address and no name, so they are
open like any exporter; the query log, the report and the event stream name clients and need the
admin token. The dashboard is same-origin HTML, CSS and JS under a strict Content-Security-Policy:
no external resources, no inline script.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from aiohttp import web

from dnsgate.consent.model import normalize_client
from dnsgate.dns.tally import OUTCOMES
from dnsgate.http.consent_api import ApiError, require_admin
from dnsgate.observe.dashboard import Sampler
from dnsgate.observe.events import EventHub, iso
from dnsgate.observe.metrics import CONTENT_TYPE, exposition
from dnsgate.observe.querylog import QueryLog
from dnsgate.observe.querylog_db import Filters
from dnsgate.observe.report import Watched, build_report, junit
from dnsgate.rules.catalog import Catalog
from dnsgate.timespec import parse_when

MAX_LIMIT = 10_000
SSE_HEARTBEAT = 15.0
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
DASHBOARD_FILES = {"": ("index.html", "text/html"), "app.js": ("app.js", "text/javascript"),
                   "app.css": ("app.css", "text/css"), "icon.svg": ("icon.svg", "image/svg+xml")}


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
CLOSING: web.AppKey[asyncio.Event] = web.AppKey("closing", asyncio.Event)


def add_routes(app: web.Application, observability: Observability) -> None:
    app[OBSERVE] = observability
    app[CLOSING] = asyncio.Event()
    app.on_shutdown.append(_closing)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/stats", stats)
    app.router.add_get("/v1/queries", queries)
    app.router.add_get("/v1/report", report)
    app.router.add_get("/v1/events", events)
    app.router.add_get("/dashboard", dashboard)
    app.router.add_get("/dashboard/{file}", dashboard)


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
    after = q.get("after")
    if after is not None and not after.isdigit():
        raise ApiError(400, "invalid_field", "after must be an entry id", "after")
    return Filters(
        client=_client(request), name=name, vendor=q.get("vendor"), outcome=outcome,
        since=parse_time(q["since"], now, "since") if "since" in q else None,
        until=parse_time(q["until"], now, "until") if "until" in q else None,
        after_id=int(after) if after is not None else None,
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
    return web.json_response(request.app[OBSERVE].sampler.stats())


async def queries(request: web.Request) -> web.Response:
    require_admin(request)
    o = request.app[OBSERVE]
    _require_log(o)
    filters = filters_from(request, o.wall())
    order = request.query.get("order", "newest")
    if order not in ("newest", "oldest"):
        raise ApiError(400, "invalid_field", "order must be newest or oldest", "order")
    rows = await o.querylog.entries(filters, _limit(request, 100), newest_first=order == "newest")
    return web.json_response({"mode": o.querylog.mode, "entries": [entry_json(r) for r in rows]})


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
    return web.json_response(body)


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


async def dashboard(request: web.Request) -> web.Response:
    name = request.match_info.get("file", "")
    if name not in DASHBOARD_FILES:
        raise web.HTTPNotFound()
    filename, content_type = DASHBOARD_FILES[name]
    body = resources.files("dnsgate").joinpath(f"data/dashboard/{filename}").read_bytes()
    return web.Response(body=body, content_type=content_type, headers={
        "Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache"})
