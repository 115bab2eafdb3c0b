"""The consent log as records a person or a spreadsheet can read: JSON objects, JSON Lines, CSV.

Pure formatting of `records.Event`s; the API and the CLI both export through it. The exports defuse
every text field against formula injection (`defused`); `event_json` keeps the values as recorded.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
import re
import time
from collections.abc import Mapping
from typing import Any, Final

from dnsgate.consent.records import Event

FIELDS: Final = (
    "id", "time", "action", "address", "mac", "network", "profile", "categories", "vendors", "expires_at",
    "notice_catalog", "notice_version", "notice_sha256", "language", "channel", "user_agent", "sec_gpc",
    "gpc_seen_at", "supersedes", "reason", "notice_shown", "covers", "terms_sha256", "operator", "operator_contact",
    "operator_privacy_url",
)
# A cell starting with `=`, `+`, `-`, `@`, a tab or a CR runs as a formula in a spreadsheet (OWASP
# "CSV injection"). A cell starts at a field's start and after any separator some locale or import
# dialog splits on (German Excel on ";", others on "|" or a tab), past the spaces and opening quote
# it may trim.
_CELL_START: Final = re.compile(r"(^|[,;\t|\r\n])([ \"]*)(?=[=+\-@\t\r])")
# How an older dnsgate's reason began for a grant that pairing copied to another identity: such
# grants stop counting at the first start of this version, and `dnsgate consent paired` lists them.
PAIRED_GRANT: Final = "paired with HTTP client"


def iso(ts: float | None) -> str | None:
    """UNIX seconds -> `2026-12-01T10:00:00Z` (UTC)."""
    if ts is None:
        return None
    return f"{utc_stamp(ts)[0]}Z"


def utc_stamp(ts: float) -> tuple[str, int]:
    """UNIX seconds -> (`2026-12-01T10:00:00`, microseconds), rounded as datetime.fromtimestamp
    rounds; through time.gmtime, a quarter of datetime's cost (~1 instead of ~4 µs: a consent
    change formats a dozen times, the event stream once per logged query)."""
    fraction, seconds = math.modf(ts)  # CPython's own split: whole seconds, then the fraction rounded
    micro = round(fraction * 1e6)
    if micro >= 1_000_000:
        seconds, micro = seconds + 1, micro - 1_000_000
    elif micro < 0:
        seconds, micro = seconds - 1, micro + 1_000_000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)), micro


def parse_time(text: str) -> float:
    """`2026-12-01`, `2026-12-01T10:00:00Z` or `…+02:00` -> UNIX seconds (naive means UTC)."""
    parsed = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.timestamp()


def event_json(e: Event) -> dict[str, Any]:
    n = e.notice
    operator = e.operator or {}
    return {
        "id": e.id, "time": iso(e.at), "action": e.action,
        "address": e.subject.address, "mac": e.subject.mac, "network": e.subject.network, "profile": e.profile,
        "categories": dict(e.categories), "vendors": dict(e.vendors), "expires_at": iso(e.expires_at),
        "notice_catalog": n.catalog if n else None, "notice_version": n.version if n else None,
        "notice_sha256": n.sha256 if n else None, "language": e.language or (n.language if n else None),
        "channel": e.channel, "user_agent": e.user_agent, "sec_gpc": e.sec_gpc, "gpc_seen_at": iso(e.gpc_seen_at),
        "supersedes": e.supersedes, "reason": e.reason,
        # false: the client presented no notice with the choice (the notice fields above are empty)
        "notice_shown": n is not None,
        # exactly what the choice covers: item ("vendor:<id>", "list:<id>") -> fingerprint of what was listed
        "covers": None if e.items is None else dict(sorted(e.items.items())),
        "terms_sha256": e.terms or None,
        "operator": operator.get("name") or None, "operator_contact": operator.get("contact") or None,
        "operator_privacy_url": operator.get("privacy_url") or None,
    }


def defused(text: str) -> str:
    """`text` as an export field no spreadsheet runs, however it splits it into cells: every part
    that begins with a formula character, at the start or after a separator, gets a `'` before it."""
    return _CELL_START.sub(r"\1\2'", text)


def export_record(e: Event) -> dict[str, Any]:
    """The event as the exports show it: every text field defused. The user agent, the Sec-GPC value
    and the reasons come from clients, and a JSON Lines file is as likely to end up in a spreadsheet
    (through jq, a SIEM's CSV view) as a CSV one."""
    return {k: defused(v) if isinstance(v, str) else v for k, v in event_json(e).items()}


def jsonl_line(e: Event) -> str:
    return json.dumps(export_record(e), ensure_ascii=False, separators=(",", ":")) + "\n"


def _decisions(d: Mapping[str, bool]) -> str:
    return ";".join(f"{k}={'granted' if v else 'refused'}" for k, v in d.items())


def csv_header() -> str:
    return _csv_row(list(FIELDS))


def csv_line(e: Event) -> str:
    record = export_record(e)
    record["categories"] = defused(_decisions(e.categories))
    record["vendors"] = defused(_decisions(e.vendors))
    record["covers"] = defused(";".join(f"{k}={v}" for k, v in sorted((e.items or {}).items())))
    record["notice_shown"] = "yes" if e.notice is not None else "no"
    return _csv_row(["" if record[f] is None else str(record[f]) for f in FIELDS])


def _csv_row(values: list[str]) -> str:
    """One RFC 4180 row: CRLF ends it, so a field holding a CR or LF is quoted (a bare CR would start
    a new row in a spreadsheet)."""
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerow(values)
    return out.getvalue()
