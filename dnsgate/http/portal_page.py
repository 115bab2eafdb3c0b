"""The consent portal's page as the server renders it: the same page app.js builds, with this device's
current state, in the language the browser asks for, so that it works without JavaScript.

Pure: `page_context` turns a client's view, the notice in force and the page's strings into what the
template (data/portal/index.html, Jinja2 with autoescaping) shows. Strings live in
data/portal/lang/<language>.json, one file per language: a language is offered when that file
exists and the notice has a text in it (`offered`), and picked from Accept-Language (`pick_language`).
The form token (`form_token`) is per page: an HMAC of the client's address and the time the page was
made, so a form post is accepted only from a page dnsgate gave that address within `FORM_TTL`.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final
from urllib.parse import urlsplit

from dnsgate.consent.model import Decision
from dnsgate.consent.notice import NoticeInForce
from dnsgate.consent.service import ClientView
from dnsgate.rules.catalog import Catalog

FORM_TTL: Final = 3600.0  # seconds a page's form may be posted
DONE: Final = ("granted", "refused", "withdrawn", "held", "session_ended", "session_withdrawn", "notice_changed",
                "expired")


@functools.cache
def strings() -> dict[str, dict[str, str]]:
    """language -> the page's strings, from every data/portal/lang/<language>.json."""
    root = resources.files("dnsgate").joinpath("data/portal/lang")
    return {entry.name.removesuffix(".json"): json.loads(entry.read_text(encoding="utf-8"))
            for entry in root.iterdir() if entry.name.endswith(".json")}


def offered(notice_languages: Iterable[str]) -> tuple[str, ...]:
    """Languages the whole page exists in: the page's strings and the notice's text."""
    have = strings()
    return tuple(lang for lang in notice_languages if lang in have)


def pick_language(accept_language: str, languages: Sequence[str], default: str) -> str:
    """The first language of Accept-Language (by q, then order) that is offered ("de-AT" matches
    "de"); else `default` if offered, else the first offered."""
    wanted: list[tuple[float, int, str]] = []
    for i, part in enumerate(accept_language.split(",")):
        tag, _, params = part.strip().partition(";")
        q = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if tag and q > 0:
            wanted.append((-q, i, tag.strip().lower()))
    for _, _, tag in sorted(wanted):
        for candidate in (tag, tag.split("-", 1)[0]):
            if candidate in languages:
                return candidate
    return default if default in languages else (languages[0] if languages else default)


def form_token(key: bytes, address: str, now: float) -> str:
    issued = str(int(now))
    return f"{issued}.{_mac(key, address, issued)}"


def token_valid(key: bytes, token: str, address: str, now: float) -> bool:
    issued, _, mac = token.partition(".")
    if not issued.isdigit() or not 0 <= now - int(issued) <= FORM_TTL:
        return False
    return hmac.compare_digest(mac, _mac(key, address, issued))


def _mac(key: bytes, address: str, issued: str) -> str:
    return hmac.new(key, f"{address}|{issued}".encode(), hashlib.sha256).hexdigest()


def when(ts: float | None) -> str:
    """A time as the server shows it: it does not know the browser's time zone, so UTC, said so."""
    if ts is None:
        return ""
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


def safe_return(raw: str | None) -> dict[str, str] | None:
    """return_to: only an http(s) URL without credentials; shown as its host."""
    if not raw:
        return None
    try:
        parts = urlsplit(raw)
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.netloc or "@" in parts.netloc:
        return None
    return {"href": raw, "host": parts.netloc}


@dataclass(frozen=True, slots=True)
class Request:
    """What the page needs from the HTTP request."""

    language: str
    token: str
    sec_gpc: str | None
    return_to: str | None
    layout: str
    done: str
    error: str  # a form post that could not be recorded, said in the page
    entries: Mapping[str, int]  # list id -> its entries


def summary_of(vendors: int, lists: int, allowed: int) -> str:
    """The key of the sentence that counts what the page lists (app.js picks it the same way)."""
    total = vendors + lists
    if total == 0:
        return "summary_nothing"
    if total == 1 and lists:
        return "summary_one_list_allowed" if allowed else "summary_one_list_blocked"
    if total == 1:
        return "summary_one_allowed" if allowed else "summary_one_blocked"
    keys = (("summary_items_none_allowed", "summary_items_some_allowed", "summary_items_all_allowed") if lists else
            ("summary_none_allowed", "summary_some_allowed", "summary_all_allowed"))
    return keys[0 if allowed == 0 else 2 if allowed == total else 1]


def page_context(view: ClientView, shown: NoticeInForce, catalog: Catalog, req: Request) -> dict[str, Any]:
    s = strings()[req.language]

    def t(key: str, **values: object) -> str:
        text = s.get(key, key)
        for name, value in values.items():
            text = text.replace("{" + name + "}", str(value))
        return text

    fixed = view.profile in ("deny", "allow")
    choice = view.choice if view.choice is not None and view.choice.active(view.now) else None

    def describe(d: Decision) -> str:
        if d.by_choice and choice is not None:
            key = ("state_allowed_choice" if d.allowed else
                   "state_blocked_standing" if choice.standing else "state_blocked_choice")
            return t(key, since=when(choice.made_at), until=when(choice.expires_at))
        if fixed:
            return t("state_allowed_default" if d.allowed else "state_blocked_network")
        return t("state_allowed_default" if d.allowed else "state_blocked_default")

    def state(d: Decision) -> str:
        return "allowed" if d.allowed else "blocked"

    language = req.language  # the catalog's facts as translated to it, its own words where not
    category_names = {c.id: c.in_language(language).name for c in catalog.categories}
    decisions = {v.id: d for v, d in view.decisions}
    # The summary counts what the overview lists: every vendor and every block list.
    allowed = sum(1 for _, d in (*view.decisions, *view.lists) if d.allowed)
    summary_key = summary_of(len(view.decisions), len(view.lists), allowed)
    by_category = dict(view.by_category)
    categories = []
    for c in catalog.categories:
        d = by_category.get(c.id) or Decision(False, "")
        vendors = [{
            "id": v.id, "name": v.name, "summary": shown_v.summary, "state": state(decisions[v.id]),
            "text": describe(decisions[v.id]),
            "purposes": t("list_separator").join(t(f"tcf_{p}") for p in v.tcf_purposes),
            "data": shown_v.data_collected, "cookies": shown_v.cookies, "recipients": shown_v.recipients,
            "sells": v.ccpa_sale_or_share, "policy": v.privacy_policy,
            "domains": [{"pattern": r.pattern, "serves": v.serves_in(language, r)} for r in catalog.domains_of(v)],
        } for v in catalog.vendors if v.category == c.id and v.id in decisions
            for shown_v in (v.in_language(language),)]
        c = c.in_language(language)
        lists = [{"id": v.id, "state": state(ld), "description": v.summary,
                  "text": t("list_item", name=v.name, entries=f"{req.entries.get(v.id, 0):,}", state=describe(ld))}
                 for v, ld in view.lists if v.category == c.id]
        categories.append({"id": c.id, "name": c.name, "description": c.description, "allowed": d.allowed,
                           "state": state(d), "text": describe(d), "vendors": vendors, "lists": lists})

    in_force = t("in_force_none")
    if choice is not None:
        key = ("in_force_network" if choice.subject.network else
               "in_force_admin" if choice.channel == "admin" else "in_force")
        until = t("until_changed") if choice.standing else when(choice.expires_at)  # an opt-out has no end
        in_force = t(key, when=when(choice.made_at), until=until)
    stale = ""
    if choice is not None and choice.grants_anything and choice.terms not in shown.terms.values():
        stale = t("stale", when=when(choice.made_at))
    new = ""
    if view.new and not stale:
        new = t("new_items", what=t("list_separator").join(i.vendor.name for i in view.new))

    result: list[str] = []
    kind = ""
    if req.error:
        result, kind = [t("result_error", message=req.error)], "error"
    elif req.done == "granted":
        opened = [v.name for v, d in view.decisions if d.allowed] + [v.name for v, d in view.lists if d.allowed]
        result = ([t("result_granted", what=t("list_separator").join(opened)), t("result_cache")] if opened
                  else [t("result_refused")])
        kind = "ok"
    elif req.done == "refused":
        result, kind = [t("result_refused")], "ok"
    elif req.done == "withdrawn":
        result, kind = [t("result_withdrawn"), t("result_cache")], "ok"
    elif req.done == "held":  # a refusal in force here that the consent store has not recorded yet
        result, kind = [t("result_held"), t("result_cache")], "warn"
    elif req.done == "session_ended":
        result, kind = [t("result_session_ended")], "ok"
    elif req.done == "session_withdrawn":
        result, kind = [t("result_session_withdrawn")], "ok"
    elif req.done in ("notice_changed", "expired"):
        result, kind = [t(f"result_{req.done}")], "warn"

    text = shown.text.texts.get(req.language) or shown.text.texts[shown.default_language]
    back = safe_return(req.return_to)
    can_withdraw = any(d.allowed and d.by_choice for _, d in (*view.decisions, *view.lists, *view.by_category))
    address = view.address or ""
    return {
        "t": t, "lang": req.language, "token": req.token, "operator": shown.operator,
        "notice_version": shown.version, "notice_sha256": shown.hashes[req.language],
        "kiosk": view.profile == "kiosk" or req.layout == "kiosk",
        "layout": req.layout if req.layout == "kiosk" else "",
        "profile": view.profile, "fixed": fixed,
        "summary": f"{t(summary_key, allowed=allowed, total=len(view.decisions) + len(view.lists))} "
                   f"{t('profile_' + view.profile)}",
        "in_force": in_force,
        "overview": [*({"kind": "vendor", "id": v.id, "state": state(d),
                        "text": t("overview_item", vendor=v.name, category=category_names.get(v.category, v.category),
                                  state=describe(d))} for v, d in view.decisions),
                     *({"kind": "list", "id": v.id, "state": state(d),
                        "text": t("overview_list", list=v.name, category=category_names.get(v.category, v.category),
                                  state=describe(d))} for v, d in view.lists)],
        "new": new, "stale": stale,
        "gpc": f"{t('gpc_sent')} {t('gpc_' + view.profile)}" if req.sec_gpc == "1" else "",
        "ask_again": t("ask_again", when=when(view.choice.made_at if view.choice else None),
                       until=when(view.ask_again_after)) if view.ask_again_after else "",
        "result": result, "result_kind": kind,
        "return_to": {"href": back["href"], "text": t("return_link", host=back["host"])} if back else None,
        # the kiosk layout elsewhere: End session withdraws (no idle reset there)
        "kiosk_text": (t("kiosk_text", minutes=f"{view.kiosk_idle_minutes:g}") if view.kiosk_idle_minutes else
                       t("kiosk_layout_text") if req.layout == "kiosk" else ""),
        "notice_paragraphs": [" ".join(line.strip() for line in p.splitlines())
                              for p in re.split(r"\n\s*\n", text) if p.strip()],
        "categories": categories, "can_withdraw": can_withdraw,
        "device_text": (t("device_mac", address=address, mac=view.mac) if view.mac
                        else t("device_text", address=address)),
    }
