"""`dnsgate log` and `dnsgate report`: the query log and the evidence report of a running dnsgate.

Both talk to the admin API (GET /v1/queries, GET /v1/report) as every client command does (cli/main.py:
--api, --config, --data-dir, --token). `report` exits 0 when the verdict passes and 3 when it
fails, so a CI job can gate its pipeline on it and still tell a failed verdict from a dnsgate it
could not ask (1) or a bad flag (2).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dnsgate.cli.admin_client import AdminClient

FOLLOW_INTERVAL = 1.0
VERDICT_FAILED = 3  # `dnsgate report`: the evidence shows a tracker resolved without a grant in force


def add_commands(commands: Any, common: Callable[[argparse.ArgumentParser], None],
                 when: Callable[[str], str]) -> None:
    log = commands.add_parser("log", help="show the query log of a running dnsgate")
    common(log)
    log.add_argument("--client", metavar="IP", help="only this client")
    log.add_argument("--name", help="only this name, or '*.example.com' for it and its subdomains")
    log.add_argument("--vendor", help="only this vendor id (e.g. activecampaign)")
    log.add_argument("--outcome", help="forwarded, cached, sinkholed, servfail, formerr, notimp, refused")
    log.add_argument("--since", metavar="TIME", type=when,
                     help="ISO 8601, UNIX seconds, or an age (15m, 2h, 7d)")
    log.add_argument("--until", metavar="TIME", type=when, help="the same forms, exclusive")
    log.add_argument("--limit", type=_limit, default=50, help="entries to show, 1..10000 (default 50, newest last)")
    log.add_argument("-f", "--follow", action="store_true", help="keep printing new entries as they arrive")
    log.add_argument("--json", action="store_true", help="one JSON object per line")
    report = commands.add_parser("report", help="the consent evidence report; exit 3 if its verdict fails")
    common(report)
    report.add_argument("--since", metavar="TIME", type=when,
                        help="start: ISO 8601 (2026-11-28T10:00:00Z), UNIX seconds, or an age (15m, 2h, 7d); "
                             "default: the oldest entry the query log keeps (querylog.max_age_days)")
    report.add_argument("--until", metavar="TIME", type=when, help="end, the same forms (default: now)")
    report.add_argument("--client", metavar="IP", help="only this client")
    report.add_argument("--format", choices=["json", "junit"], default="json", help="output format (default json)")
    report.add_argument("--output", "-o", metavar="FILE", help="write the report here instead of stdout")


def _limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 1 <= value <= 10_000:
        raise argparse.ArgumentTypeError(f"must be 1..10000, got {value}")
    return value


def run(args: argparse.Namespace, client: AdminClient) -> int:
    try:
        return show_log(args, client) if args.command == "log" else report(args, client)
    except KeyboardInterrupt:
        return 0


def _params(args: argparse.Namespace, *names: str) -> dict[str, str | None]:
    return {n: str(getattr(args, n)) for n in names if getattr(args, n, None) is not None}


def format_entry(e: dict[str, Any]) -> str:
    consent = e.get("consent")
    grant = f" consent={consent['category']}:until={consent['expires_at']}" if consent else ""
    vendor = f" vendor={e['vendor']}" if e.get("vendor") else ""
    return (f"{e['at']} {e['client']} {e['name'] or '-'} {e['type'] or '-'} {e['protocol']} {e['outcome']} "
            f"rcode={e['rcode']}{vendor}{grant}")


def show_log(args: argparse.Namespace, client: AdminClient) -> int:
    params = _params(args, "client", "name", "vendor", "outcome", "since", "until")
    body = client.get("/v1/queries", {**params, "limit": str(args.limit), "order": "newest"})
    last = _print_entries(list(reversed(body["entries"])), args.json, 0)
    while args.follow:
        time.sleep(FOLLOW_INTERVAL)
        body = client.get("/v1/queries", {**params, "after": str(last), "order": "oldest", "limit": "10000"})
        last = _print_entries(body["entries"], args.json, last)
    return 0


def _print_entries(entries: list[dict[str, Any]], as_json: bool, last: int) -> int:
    for e in entries:
        print(json.dumps(e) if as_json else format_entry(e), flush=True)
        last = max(last, int(e["id"]))
    return last


def report(args: argparse.Namespace, client: AdminClient) -> int:
    body = client.read("/v1/report", {**_params(args, "since", "until", "client"), "format": args.format})
    if args.format == "junit":
        failed = b"<failure" in body
        text = body.decode()
    else:
        data = json.loads(body)
        failed = data["verdict"] != "pass"
        text = json.dumps(data, indent=2) + "\n"
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
        stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        print(f"dnsgate report: verdict {'fail' if failed else 'pass'}; written to {args.output} at {stamp}",
              file=sys.stderr)
    else:
        sys.stdout.write(text)
    return VERDICT_FAILED if failed else 0
