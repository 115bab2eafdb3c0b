"""The OpenAPI 3.1 description of every route the API server answers (served at /openapi.json).

Written by hand, next to the routes it describes; tests/web/test_openapi.py checks that it names exactly
the routes the server has and runs schemathesis against a live dnsgate to check that the answers
match it. Shapes list the fields a client may rely on; servers may add fields.
"""

from __future__ import annotations

import functools
from typing import Any, Final

from dnsgate import __version__

JSON: Final = "application/json"
NULLABLE_STRING: Final = {"type": ["string", "null"]}
TIME: Final = {"type": ["string", "null"], "description": "ISO 8601, UTC"}
ADMIN: Final[list[dict[str, list[str]]]] = [{"admin": []}]
PROFILE: Final = {"type": "string", "enum": ["opt-in", "opt-out", "kiosk", "deny", "allow"]}


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def obj(required: dict[str, Any], optional: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """An object schema: `required` fields must be present; more fields may follow."""
    return {"type": "object", "required": list(required), "properties": {**required, **(optional or {})}, **extra}


def array(items: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": items}


def mapping(values: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": values}


def json_body(schema: dict[str, Any], description: str = "") -> dict[str, Any]:
    body: dict[str, Any] = {"content": {JSON: {"schema": schema}}}
    if description:
        body["description"] = description
    return body


def ok(schema: dict[str, Any], description: str = "OK", media: str = JSON, **headers: Any) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": description, "content": {media: {"schema": schema}}}
    if headers:
        answer["headers"] = headers
    return answer


def error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": ref("Error")}}}


def query(name: str, description: str, schema: dict[str, Any] | None = None, *,
          required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "description": description,
            "schema": schema or {"type": "string", "minLength": 1}}


CLIENT_PATH: Final = {"name": "client", "in": "path", "required": True,
                      "description": "an IP address, a MAC address, or a network in CIDR notation",
                      "schema": {"type": "string", "pattern": r"^[0-9A-Fa-f:.\-]+(/[0-9]{1,3})?$"}}
SEC_GPC: Final = {"name": "Sec-GPC", "in": "header", "required": False,
                  "description": "Global Privacy Control; `1` on an opt-out network records an opt-out of "
                                 "sale/sharing", "schema": {"type": "string"}}
BAD: Final = error("Invalid input: the `field` names the culprit; nothing changed")
NO_ROUTE: Final = error("No such route (the path holds characters no client name has)")
UNAUTHORIZED: Final = {**error("Admin endpoint without the right `Authorization: Bearer` token (or, for a read, "
                               "the admin dashboard's session cookie)"),
                        "headers": {"WWW-Authenticate": {"schema": {"type": "string"},
                                                         "description": "`Bearer realm=\"dnsgate admin\"`"}}}
FORBIDDEN: Final = error("A browser Origin that may not change consent")
CONFLICT: Final = error("Refused by the consent rules (`notice_changed`, `profile_fixed`, `not_kiosk`, "
                         "`forwarder_address`)")
UNSUPPORTED: Final = error("The body must be application/json")
TOO_LARGE: Final = error("The body is over 16 KiB")
OWN_PREFLIGHT: Final = {
    "tags": ["portal"], "summary": "CORS preflight for dnsgate's own page on another of its addresses "
    "(v4./v6.<portal host>); any other origin is refused",
    "parameters": [{"name": "Origin", "in": "header", "required": True, "schema": {"type": "string"}},
                   {"name": "Access-Control-Request-Method", "in": "header", "schema": {"type": "string"}}],
    "responses": {"204": {"description": "Allowed"}, "403": error("Not a page of dnsgate's")}}
UNAVAILABLE: Final = error("The consent store cannot record the change now (`consent_store_unavailable`): "
                           "nothing changed")
# One reading of a time for every route (timespec).
TIME_PARAMS: Final = [query("since", "ISO 8601, UNIX seconds, or an age such as 15m, 2h or 7d"),
                      query("until", "ISO 8601, UNIX seconds, or an age such as 15m, 2h or 7d")]
LIMIT: Final = query("limit", "at most this many", {"type": "integer", "minimum": 1, "maximum": 10000})


def choice_request_schema(categories: tuple[str, ...], vendors: tuple[str, ...], languages: tuple[str, ...],
                          max_days: int) -> dict[str, Any]:
    """The body of a choice, with the catalog's category and vendor ids and the notice's languages."""
    category = {"type": "string", "enum": list(categories)}
    decided = {"type": "object", "propertyNames": category, "additionalProperties": {"type": "boolean"}}
    by_vendor = {"type": "object", "propertyNames": {"type": "string", "enum": list(vendors)},
                 "additionalProperties": {"type": "boolean"}}
    return {
        "type": "object", "additionalProperties": False,
        "description": "`categories` (exactly these granted, every other refused) or `choices` (only what is "
                       "named is decided), optionally `vendors`",
        "properties": {
            "categories": {"type": "array", "items": category},
            "choices": decided,
            "vendors": by_vendor,
            "days": {"type": ["integer", "null"], "minimum": 1, "maximum": max_days},
            "notice": {"type": "object", "additionalProperties": False,
                       "description": "The notice the device showed the person (GET /v1/notice: version, and "
                                      "the sha256 of the language shown). Without it the choice is recorded "
                                      "as made without a notice shown (notice_shown: false).",
                       "properties": {"version": {"type": "string"},
                                      "sha256": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"}}},
            "language": {"enum": [*languages, None]},
            "channel": {"type": "string", "enum": ["portal", "device"]},
            "pairing": {"type": ["string", "null"], "pattern": "^[a-zA-Z2-7]{1,63}$",
                        "description": "the pairing token another address of this device was given: the portal "
                                       "records a choice through each address family, and this links them"},
        },
        "not": {"required": ["categories", "choices"]},
        "anyOf": [{"required": ["categories"]},
                  {"required": ["choices"], "properties": {"choices": {"minProperties": 1}}},
                  {"required": ["vendors"], "properties": {"vendors": {"minProperties": 1}}}],
    }


def schemas(categories: tuple[str, ...], vendors: tuple[str, ...], languages: tuple[str, ...],
            max_days: int) -> dict[str, Any]:
    decision = obj({"allowed": {"type": "boolean"}, "reason": {"type": "string"}, "by_choice": {"type": "boolean"},
                    "since": TIME, "until": TIME})
    choice = obj({
        "id": {"type": "integer"},
        "subject": obj({"address": NULLABLE_STRING, "mac": NULLABLE_STRING, "network": NULLABLE_STRING}),
        "categories": mapping({"type": "boolean"}), "vendors": mapping({"type": "boolean"}),
        "made_at": TIME, "expires_at": TIME, "active": {"type": "boolean"}, "refusals_stand": {"type": "boolean"},
        "channel": {"type": "string"}, "source": {"type": "string", "enum": ["self", "admin", "paired"]},
        "profile": {"type": "string"}, "sec_gpc": NULLABLE_STRING, "gpc_seen_at": TIME,
        "notice": {"oneOf": [{"type": "null"}, obj({
            "catalog": {"type": "string"}, "version": {"type": "string"}, "sha256": {"type": "string"},
            "language": {"type": "string"}, "current": {"type": "boolean"}})]},
    })
    state = obj({
        "client": {"type": "string"},
        "identity": obj({"address": NULLABLE_STRING, "mac": NULLABLE_STRING, "mac_source": NULLABLE_STRING}),
        "profile": obj({"name": PROFILE, "network": NULLABLE_STRING, "why": {"type": "string"}}),
        "categories": mapping(obj({"granted": {"type": "boolean"}, "granted_at": TIME, "expires_at": TIME,
                                   "source": {"type": "string"}})),
        "choice": {"oneOf": [{"type": "null"}, ref("Choice")]},
        "vendors": array({"allOf": [decision, obj({"id": {"type": "string"}, "name": {"type": "string"},
                                                   "category": {"type": "string"}})]}),
        "by_category": mapping(ref("Decision")),
        "notes": array({"type": "string"}),
        "ask_again_after": TIME,
        "kiosk": {"oneOf": [{"type": "null"}, obj({"idle_minutes": {"type": "number"}, "last_seen": TIME})]},
    }, {"held": {"type": "string", "description": "(202 only) why a refusal in force is not recorded yet"}})
    pairing = obj({"token": {"type": "string"}, "name": {"type": "string"}, "expires_at": TIME})
    own = {"allOf": [ref("ConsentState"), obj({"sec_gpc": NULLABLE_STRING},
                                              {"pairing": {"oneOf": [{"type": "null"}, ref("Pairing")]}})]}
    choice_request = choice_request_schema(categories, vendors, languages, max_days)
    event = obj({"id": {"type": ["integer", "null"]}, "time": TIME, "action": {"type": "string"},
                 "address": NULLABLE_STRING, "mac": NULLABLE_STRING, "network": NULLABLE_STRING,
                 "profile": {"type": "string"}, "vendors": mapping({"type": "boolean"}), "expires_at": TIME,
                 "channel": {"type": "string"}, "sec_gpc": NULLABLE_STRING, "gpc_seen_at": TIME,
                 "supersedes": {"type": ["integer", "null"]}, "reason": {"type": "string"},
                 # the first API's fields: the categories granted (a grant) or decided (anything else)
                 "client": NULLABLE_STRING, "categories": array({"type": "string"}),
                 "decisions": obj({"categories": mapping({"type": "boolean"}),
                                   "vendors": mapping({"type": "boolean"})})})
    rules_report = obj({"status": {"type": "string"}, "reason": {"type": "string"}, "error": NULLABLE_STRING,
                        "applied": array({"type": "string"}), "restart_required": array({"type": "string"}),
                        "changed": array({"type": "string"}),
                        "notice": obj({"version": {"type": "string"}, "previous": {"type": "string"}}),
                        "catalog": obj({"version": {"type": "string"}, "vendors": {"type": "integer"},
                                        "domains": {"type": "integer"}}),
                        "list_entries": {"type": "integer"}, "lists": array(ref("ListStatus")),
                        "seconds": {"type": "number"}})
    list_status = obj({"id": {"type": "string"}, "kind": {"type": "string"}, "loaded": {"type": "boolean"},
                       "fetched_at": TIME, "checked_at": TIME})
    vendor = obj({
        "id": {"type": "string"}, "name": {"type": "string"}, "category": {"type": "string"},
        "tcf_purposes": array({"type": "integer"}), "summary": {"type": "string"},
        "recipients": {"type": "string"}, "privacy_policy": {"type": "string"},
        "data_collected": array({"type": "string"}),
        "cookies": array(obj({"name": {"type": "string"}, "duration": {"type": "string"},
                              "purpose": {"type": "string"}})),
        "domains": array(obj({"pattern": {"type": "string"}, "serves": {"type": "string"},
                              "source": {"type": "string"}})),
        "ip_ranges": array({"type": "string"}), "sources": array({"type": "string"}),
        "ccpa_sale_or_share": {"type": "boolean"},
    })
    return {
        "Error": obj({"error": obj({"status": {"type": "integer"}, "code": {"type": "string"},
                                    "message": {"type": "string"}}, {"field": {"type": "string"}})}),
        "Decision": decision,
        "Choice": choice,
        "ConsentState": state,
        "OwnConsentState": own,
        "Pairing": pairing,
        "ChoiceRequest": choice_request,
        "Event": event,
        "RulesReport": rules_report,
        "ListStatus": list_status,
        "Vendor": vendor,
    }


def paths() -> dict[str, Any]:
    own_state = ok(ref("OwnConsentState"), "The caller's consent state")
    client_state = ok(ref("ConsentState"), "That client's consent state")
    own_held = ok(ref("OwnConsentState"), "A refusal in force on this instance that the consent store has not "
                  "recorded yet (`held`); it is recorded as soon as the store answers")
    client_held = ok(ref("ConsentState"), "A refusal in force on this instance that the consent store has not "
                     "recorded yet (`held`); it is recorded as soon as the store answers")
    html = ok({"type": "string"}, "The page", "text/html")
    return {
        "/": {"get": {"tags": ["portal"], "summary": "The consent portal page, with the caller's state",
                      "responses": {"200": html}},
              "post": {
            "tags": ["portal"], "summary": "The portal page's forms (without JavaScript)",
            "description": "Accept all, Reject all, per category, Withdraw or End session, with the page's "
                           "token and the notice it showed; answers 303 to the page with the outcome.",
            "requestBody": {"required": True, "content": {"application/x-www-form-urlencoded": {"schema": {
                "type": "object", "required": ["action", "token"], "properties": {
                    "action": {"enum": ["accept_all", "reject_all", "save", "withdraw", "end_session"]},
                    "token": {"type": "string"}, "grant": {"type": "string"},
                    "notice_version": {"type": "string"}, "notice_sha256": {"type": "string"},
                    "language": {"type": "string"}, "return_to": {"type": "string"}, "layout": {"type": "string"}}}}}},
            "responses": {"303": {"description": "Back to the page, which says what happened"},
                          "400": BAD, "403": FORBIDDEN, "409": html, "415": UNSUPPORTED, "503": html}}},
        "/portal/{file}": {"get": {
            "tags": ["portal"], "summary": "The portal's script, style sheet, strings and icon",
            "parameters": [{"name": "file", "in": "path", "required": True,
                            "schema": {"type": "string", "enum": ["app.js", "app.css", "strings.json", "icon.svg"]}}],
            "responses": {"200": {"description": "The file", "content": {
                "text/javascript": {"schema": {"type": "string"}}, "text/css": {"schema": {"type": "string"}},
                "application/json": {"schema": {"type": "object"}}, "image/svg+xml": {"schema": {"type": "string"}}}},
                "404": error("No such file")}}},
        "/openapi.json": {"get": {"tags": ["portal"], "summary": "This document",
                                  "responses": {"200": ok({"type": "object", "required": ["openapi", "paths"]})}}},
        "/captive-portal/api": {"get": {
            "tags": ["portal"], "summary": "RFC 8908 captive-portal API (portal.captive)",
            "description": "Captive until the caller's first choice; a refusal releases it like a grant.",
            "responses": {"200": ok(obj({"captive": {"type": "boolean"}, "user-portal-url": {"type": "string"}}),
                                    media="application/captive+json"),
                          "404": error("portal.captive is off")}}},
        "/v1/consent/status": {
            "get": {"tags": ["consent"], "summary": "The caller's consent state without identity; CORS for "
                    "portal.cors_origins",
                    "responses": {"200": ok(obj({
                        "profile": PROFILE, "decided": {"type": "boolean"}, "notice_current": {"type": "boolean"},
                        "categories": mapping(ref("BriefDecision")), "vendors": mapping(ref("BriefDecision")),
                        "portal_url": {"type": "string"}}))}},
            "options": {"tags": ["consent"], "summary": "CORS preflight (answers Private Network Access too)",
                        "parameters": [{"name": "Origin", "in": "header", "required": True,
                                        "schema": {"type": "string"}},
                                       {"name": "Access-Control-Request-Method", "in": "header",
                                        "schema": {"type": "string"}},
                                       {"name": "Access-Control-Request-Private-Network", "in": "header",
                                        "schema": {"type": "string"}}],
                        "responses": {"204": {"description": "Allowed"}, "403": error("Origin not listed"),
                                      "405": error("Only GET may be asked for")}},
        },
        "/healthz": {"get": {"tags": ["server"], "summary": "Liveness and a few numbers",
                             "responses": {"200": ok(obj({"status": {"const": "ok"}}))}}},
        "/v1/vendors": {"get": {"tags": ["consent"], "summary": "The catalog and the imported lists",
                                "parameters": [query("lang", "the language of the facts (default: the notice's "
                                                             "default); the catalog's own words where it has no "
                                                             "translation")],
                                "responses": {"400": BAD, "200": ok(obj({
                                    "version": {"type": "string"}, "language": {"type": "string"},
                                    "categories": array(obj({"id": {"type": "string"}, "name": {"type": "string"},
                                                             "description": {"type": "string"}})),
                                    "vendors": array(ref("Vendor")),
                                    "lists": array(obj({"id": {"type": "string"}, "name": {"type": "string"},
                                                        "category": {"type": "string"},
                                                        "entries": {"type": "integer"}}))}))}}},
        "/v1/notice": {"get": {"tags": ["consent"], "summary": "The consent text, its version and SHA-256",
                               "responses": {"200": ok(obj({
                                   "catalog": {"type": "string"}, "version": {"type": "string"},
                                   "default_language": {"type": "string"},
                                   "languages": mapping(obj({"sha256": {"type": "string"},
                                                             "text": {"type": "string"},
                                                             "categories": array(obj({"id": {"type": "string"},
                                                                                      "name": {"type": "string"}}))})),
                                   "items": array(obj({"id": {"type": "string"}, "fingerprint": {"type": "string"},
                                                       "fingerprints": mapping({"type": "string"})}))}))}}},
        "/v1/consent": {
            "get": {"tags": ["consent"], "summary": "The caller's consent state", "parameters": [SEC_GPC],
                    "responses": {"200": own_state}},
            "put": {"tags": ["consent"], "summary": "Record the caller's choice (replaces the previous one)",
                    "requestBody": {"required": True, **json_body(ref("ChoiceRequest"))},
                    "responses": {"200": own_state, "202": own_held, "400": BAD, "403": FORBIDDEN,
                                  "409": CONFLICT, "413": TOO_LARGE, "415": UNSUPPORTED, "503": UNAVAILABLE}},
            "delete": {"tags": ["consent"], "summary": "Withdraw everything the caller granted",
                       "requestBody": {"required": False, **json_body({
                           "type": "object", "additionalProperties": False,
                           "description": "Optional: the notice the page showed, as for PUT",
                           "properties": {k: v for k, v in choice_request_schema((), (), (), 1)["properties"].items()
                                          if k in ("notice", "language", "channel")}})},
                       "responses": {"200": own_state, "202": own_held, "400": BAD, "403": FORBIDDEN,
                                     "409": CONFLICT, "415": UNSUPPORTED}},
            "options": OWN_PREFLIGHT,
        },
        "/v1/session/end": {"post": {
            "tags": ["consent"], "summary": "A kiosk ends its session: its choice resets",
            "requestBody": {"required": False, **json_body({"type": "object"})},
            "responses": {"200": own_state, "400": BAD, "403": FORBIDDEN, "409": CONFLICT, "413": TOO_LARGE,
                          "415": UNSUPPORTED, "503": UNAVAILABLE}},
            "options": OWN_PREFLIGHT},
        "/v1/whoami": {"get": {"tags": ["consent"], "summary": "The caller as dnsgate sees it on HTTP and DNS",
                               "parameters": [SEC_GPC],
                               "responses": {"200": ok(obj({
                                   "http": obj({"address": {"type": "string"}, "mac": NULLABLE_STRING}),
                                   "dns": {"oneOf": [{"type": "null"}, obj({"address": {"type": "string"},
                                                                           "mac": NULLABLE_STRING,
                                                                           "paired_at": TIME})]},
                                   "profile": obj({"name": PROFILE})}))}}},
        "/v1/clients": {"get": {"tags": ["admin"], "summary": "Every device, address and network with a choice",
                                "security": ADMIN,
                                "responses": {"200": ok(obj({"clients": array(ref("ConsentState"))})),
                                              "401": UNAUTHORIZED}}},
        "/v1/clients/{client}/consent": {
            "parameters": [CLIENT_PATH],
            "get": {"tags": ["admin"], "summary": "A client's consent", "security": ADMIN,
                    "responses": {"200": client_state, "400": BAD, "401": UNAUTHORIZED, "404": NO_ROUTE}},
            "put": {"tags": ["admin"], "summary": "Record a choice for a client", "security": ADMIN,
                    "requestBody": {"required": True, **json_body(ref("ChoiceRequest"))},
                    "responses": {"200": client_state, "202": client_held, "400": BAD, "401": UNAUTHORIZED,
                                  "403": FORBIDDEN, "404": NO_ROUTE, "409": CONFLICT, "413": TOO_LARGE,
                                  "415": UNSUPPORTED, "503": UNAVAILABLE}},
            "delete": {"tags": ["admin"], "summary": "Withdraw a client's consent", "security": ADMIN,
                       "responses": {"200": client_state, "202": client_held, "400": BAD, "401": UNAUTHORIZED,
                                     "403": FORBIDDEN, "404": NO_ROUTE, "409": CONFLICT}},
        },
        "/v1/clients/{client}/session/end": {"post": {
            "tags": ["admin"], "security": ADMIN,
            "summary": "Forget a client's choice and what it reached through pairing (each recorded as a reset)",
            "parameters": [CLIENT_PATH],
            "requestBody": {"required": False, **json_body({"type": "object"})},
            "responses": {"200": client_state, "400": BAD, "401": UNAUTHORIZED, "403": FORBIDDEN,
                          "404": NO_ROUTE, "409": CONFLICT, "413": TOO_LARGE, "415": UNSUPPORTED,
                          "503": UNAVAILABLE}}},
        "/v1/audit": {"get": {"tags": ["admin"], "summary": "The newest consent events", "security": ADMIN,
                              "parameters": [query("client", "an IP address, MAC or network"), LIMIT],
                              "responses": {"200": ok(obj({"events": array(ref("Event"))})), "400": BAD,
                                            "401": UNAUTHORIZED}}},
        "/v1/audit/export": {"get": {
            "tags": ["admin"], "summary": "The consent event log, oldest first", "security": ADMIN,
            "parameters": [query("format", "jsonl (default) or csv", {"type": "string", "enum": ["jsonl", "csv"]}),
                           *TIME_PARAMS, query("client", "an IP address, MAC or network")],
            "responses": {"200": {"description": "JSON Lines or CSV", "content": {
                "application/x-ndjson": {"schema": {"type": "string"}}, "text/csv": {"schema": {"type": "string"}}}},
                "400": BAD, "401": UNAUTHORIZED}}},
        "/v1/explain": {"get": {
            "tags": ["admin"], "summary": "The decision for a name and a client, with every reason",
            "security": ADMIN,
            "parameters": [query("name", "a domain name", required=True), query("client", "an IP address",
                                                                                 required=True),
                           query("mac", "a MAC address")],
            "responses": {"200": ok(obj({"name": {"type": "string"}, "answer": {"enum": ["resolve", "sinkhole"]},
                                         "rule": {"type": ["object", "null"]},
                                         "allowed": {"type": ["boolean", "null"]},
                                         "reasons": array({"type": "string"}), "client": ref("ConsentState")})),
                          "400": BAD, "401": UNAUTHORIZED}}},
        "/v1/reload": {"post": {
            "tags": ["admin"], "summary": "Re-read config, catalog and lists; swap them in whole", "security": ADMIN,
            "responses": {"200": ok(ref("RulesReport")), "401": UNAUTHORIZED, "403": FORBIDDEN,
                          "404": error("Reloading is not available"),
                          "422": error("Invalid configuration: nothing changed")}}},
        "/v1/lists": {"get": {"tags": ["admin"], "summary": "Each imported list's state", "security": ADMIN,
                              "responses": {"200": ok(obj({"lists": array(ref("ListStatus"))})),
                                            "401": UNAUTHORIZED, "404": error("Lists are not available")}}},
        "/v1/lists/refresh": {"post": {
            "tags": ["admin"], "summary": "Re-check every URL list now", "security": ADMIN,
            "responses": {"200": ok(ref("RulesReport")), "401": UNAUTHORIZED, "403": FORBIDDEN,
                          "404": error("Lists are not available"), "422": error("Rejected: nothing changed")}}},
        "/v1/store/acknowledge": {"post": {
            "tags": ["admin"], "summary": "Acknowledge that the shared consent store lost its history (/healthz is "
                                          "ok again)", "security": ADMIN,
            "requestBody": {"required": False, **json_body({"type": "object"})},
            "responses": {"200": ok(obj({"acknowledged": {"oneOf": [{"type": "null"}, obj({
                "at": TIME, "what": {"type": "string"}})]}})), "400": BAD, "401": UNAUTHORIZED,
                "403": FORBIDDEN, "413": TOO_LARGE, "415": UNSUPPORTED}}},
        "/metrics": {"get": {"tags": ["observability"], "summary": "Prometheus metrics",
                             "responses": {"200": ok({"type": "string"}, media="text/plain")}}},
        "/v1/stats": {"get": {"tags": ["observability"], "summary": "The dashboard's numbers (aggregates only)",
                              "responses": {"200": ok(obj({"now": {"type": "number"}, "series": array(
                                  {"type": "object"}), "totals": {"type": "object"}, "vendors": array(
                                  {"type": "object"}), "clients": {"type": "object"},
                                  "upstreams": array({"type": "object"})}))}}},
        "/v1/queries": {"get": {
            "tags": ["observability"], "summary": "The query log", "security": ADMIN,
            "parameters": [query("client", "an IP address"),
                           query("name", "a name, *.name for it and its subdomains, or a search with * for any "
                                 "characters"),
                           query("vendor", "a vendor id"), query("outcome", "forwarded, cached, sinkholed, …"),
                           *TIME_PARAMS, query("after", "only entries newer than this id", {"type": "integer"}),
                           query("before", "only entries older than this id (paging back)", {"type": "integer"}),
                           query("gated", "true: only queries for gated names; false: none of those",
                                 {"type": "string", "enum": ["true", "false"]}),
                           LIMIT, query("order", "newest (default) or oldest",
                                        {"type": "string", "enum": ["newest", "oldest"]})],
            "responses": {"200": ok(obj({"mode": {"type": "string"}, "entries": array(obj({
                "id": {"type": "integer"}, "at": TIME, "client": {"type": "string"}, "name": NULLABLE_STRING,
                "outcome": {"type": "string"}, "vendor": NULLABLE_STRING}))})),
                "400": BAD, "401": UNAUTHORIZED, "409": error("The query log is off")}}},
        "/v1/top": {"get": {
            "tags": ["observability"], "summary": "The admin dashboard's aggregates over a window (default 24h)",
            "description": "From the query log and the consent log: the most queried names, the most queried gated "
                           "names (blocked and allowed), the clients with the most queries and their consent, queries "
                           "per bucket of `step` seconds by kind and by query type, consent changes per bucket.",
            "security": ADMIN,
            "parameters": [*TIME_PARAMS, query("limit", "rows per list", {"type": "integer", "minimum": 1,
                                                                            "maximum": 100})],
            "responses": {"200": ok(obj({
                "mode": {"type": "string"}, "since": TIME, "until": TIME, "step": {"type": "number"},
                "kinds": array({"type": "string"}), "names": array({"type": "object"}),
                "gated_names": array({"type": "object"}), "clients": array({"type": "object"}),
                "timeline": array({"type": "object"}), "consent_changes": array({"type": "object"})})),
                "400": BAD, "401": UNAUTHORIZED, "409": error("The query log is off")}}},
        "/v1/report": {"get": {
            "tags": ["observability"], "summary": "Evidence: trackers per client and vendor, and a verdict",
            "security": ADMIN,
            "parameters": [*TIME_PARAMS, query("format", "json (default) or junit",
                                              {"type": "string", "enum": ["json", "junit"]}),
                           query("client", "an IP address"), LIMIT],
            "responses": {"200": {"description": "The report", "content": {
                JSON: {"schema": obj({"verdict": {"enum": ["pass", "fail"]}, "problems": array({"type": "string"}),
                                      "clients": array({"type": "object"})})},
                "application/xml": {"schema": {"type": "string"}}}},
                "400": BAD, "401": UNAUTHORIZED}}},
        "/v1/events": {"get": {
            "tags": ["observability"], "summary": "Server-sent events: gated decisions and consent changes",
            "security": ADMIN,
            "responses": {"200": ok({"type": "string"}, "An endless event stream", "text/event-stream"),
                          "401": UNAUTHORIZED}}},
        "/dashboard": {"get": {"tags": ["observability"], "summary": "The dashboard page",
                               "responses": {"200": html}}},
        "/dashboard/login": {
            "get": {"tags": ["observability"], "summary": "The admin dashboard's login page",
                    "responses": {"200": html, "303": {"description": "Logged in already: to the admin dashboard"},
                                  "404": error("Served on the admin listener only (api.admin_listen)")}},
            "post": {
                "tags": ["observability"], "summary": "Log in to the admin dashboard with the admin token",
                "description": "Sets an HttpOnly, SameSite=Strict session cookie (Secure over https) that authorizes "
                               "the admin API's reads, never a change. Refused from another site's Origin.",
                "requestBody": {"required": True, "content": {"application/x-www-form-urlencoded": {"schema": {
                    "type": "object", "required": ["token"], "properties": {"token": {"type": "string"}}}}}},
                "responses": {"303": {"description": "Logged in: to the admin dashboard"},
                              "401": {**html, "description": "Not the admin token: the login page again"},
                              "400": BAD, "403": FORBIDDEN, "404": error("Served on the admin listener only"),
                              "415": UNSUPPORTED,
                              "429": {**html, "description": "Too many failed logins from this address"}}}},
        "/dashboard/logout": {"post": {
            "tags": ["observability"], "summary": "End the admin dashboard session",
            "responses": {"303": {"description": "To the login page"}, "403": FORBIDDEN,
                          "404": error("Served on the admin listener only")}}},
        "/dashboard/admin": {"get": {
            "tags": ["observability"], "summary": "The admin dashboard (needs the session cookie)",
            "responses": {"200": html, "303": {"description": "No session: to the login page"},
                          "404": error("Served on the admin listener only")}}},
        "/dashboard/{file}": {"get": {
            "tags": ["observability"], "summary": "The dashboard's scripts, style sheet and icon",
            "parameters": [{"name": "file", "in": "path", "required": True,
                            "schema": {"type": "string",
                                       "enum": ["app.js", "charts.js", "admin.js", "app.css", "icon.svg"]}}],
            "responses": {"200": {"description": "The file", "content": {
                "text/javascript": {"schema": {"type": "string"}}, "text/css": {"schema": {"type": "string"}},
                "image/svg+xml": {"schema": {"type": "string"}}}}, "404": error("No such file")}}},
    }


@functools.lru_cache(maxsize=8)
def openapi_document(categories: tuple[str, ...], vendors: tuple[str, ...], languages: tuple[str, ...],
                     max_days: int) -> dict[str, Any]:
    """The document for the catalog in force (a reload may change its categories and vendors)."""
    components = schemas(categories, vendors, languages, max_days)
    components["BriefDecision"] = obj({"allowed": {"type": "boolean"}, "by_choice": {"type": "boolean"},
                                       "until": {"type": ["string", "null"], "format": "date",
                                                 "description": "the day (UTC) the choice deciding it ends"}})
    return {
        "openapi": "3.1.0",
        "info": {"title": "dnsgate", "version": __version__,
                 "description": "Consent-aware DNS: the consent API, its portal, admin and observability routes. "
                                "Errors are `{\"error\": {\"status\", \"code\", \"message\", \"field\"?}}`; every "
                                "state change answers with the new state."},
        "paths": paths(),
        "components": {"schemas": components,
                       "securitySchemes": {"admin": {"type": "http", "scheme": "bearer",
                                                     "description": "api.admin_token or <data_dir>/admin-token"}}},
    }
