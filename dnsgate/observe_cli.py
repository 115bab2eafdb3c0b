"""`dnsgate log` and `dnsgate report`: the query log and the evidence report of a running dnsgate.

Both talk to the admin API (GET /v1/queries, GET /v1/report) with the admin token from --token,
DNSGATE_ADMIN_TOKEN, or <data dir>/admin-token. `report` exits 0 when the verdict passes and 1
when it fails, so a CI job can gate its pipeline on it; 2 means it could not ask (bad flags,
dnsgate unreachable, a refused request).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from .admin_client import api_base_url, api_to_call
from .config import DEFAULT_API_PORT, ConfigError

FOLLOW_INTERVAL = 1.0


class CliError(Exception):
    """The command cannot do its job; the message is one line."""


def add_commands(commands: Any) -> None:
    log = commands.add_parser("log", help="show the query log of a running dnsgate")
    _common(log)
    _filters(log)
    log.add_argument("--limit", type=int, default=50, help="entries to show (default 50, newest last)")
    log.add_argument("-f", "--follow", action="store_true", help="keep printing new entries as they arrive")
    log.add_argument("--json", action="store_true", help="one JSON object per line")
    report = commands.add_parser("report", help="the consent evidence report; exit 1 if its verdict fails")
    _common(report)
    report.add_argument("--since", required=True, metavar="T",
                        help="start: ISO 8601 (2026-11-28T10:00:00Z), UNIX seconds, or an age (15m, 2h, 7d)")
    report.add_argument("--until", metavar="T", help="end (default: now)")
    report.add_argument("--client", metavar="IP", help="only this client")
    report.add_argument("--format", choices=["json", "junit"], default="json", help="output format (default json)")
    report.add_argument("--output", "-o", metavar="FILE", help="write the report here instead of stdout")


def _api_url(text: str) -> str:
    try:
        return api_base_url(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[1]) from None


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api", metavar="URL", type=_api_url,
                        help="the server's API to call, HOST:PORT (a host name or IP address) or "
                             f"http(s)://HOST[:PORT][/PATH] (env DNSGATE_API; default 127.0.0.1:{DEFAULT_API_PORT})")
    parser.add_argument("--token", help="admin token (default: env DNSGATE_ADMIN_TOKEN, else <data dir>/admin-token)")
    parser.add_argument("--data-dir", metavar="DIR", default=os.environ.get("DNSGATE_DATA_DIR", "data"),
                        help="where to find admin-token (env DNSGATE_DATA_DIR; default ./data)")


def _filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--client", metavar="IP", help="only this client")
    parser.add_argument("--name", help="only this name, or '*.example.com' for it and its subdomains")
    parser.add_argument("--vendor", help="only this vendor id (e.g. activecampaign)")
    parser.add_argument("--outcome", help="forwarded, cached, sinkholed, servfail, formerr, notimp, refused")
    parser.add_argument("--since", metavar="T", help="ISO 8601, UNIX seconds, or an age (15m, 2h, 7d)")
    parser.add_argument("--until", metavar="T", help="ISO 8601, UNIX seconds, or an age")


def run(args: argparse.Namespace) -> int:
    try:
        try:
            args.api = api_to_call(args.api, os.environ) or api_base_url(f"127.0.0.1:{DEFAULT_API_PORT}")
        except ConfigError as exc:
            raise CliError(str(exc)) from None
        if args.command == "log":
            return show_log(args)
        if args.command == "report":
            return report(args)
    except CliError as exc:
        print(f"dnsgate {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 2  # pragma: no cover - argparse enforces the command


def _token(args: argparse.Namespace) -> str:
    token = args.token or os.environ.get("DNSGATE_ADMIN_TOKEN")
    if token:
        return str(token)
    path = Path(args.data_dir) / "admin-token"
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        raise CliError(f"no admin token: pass --token, set DNSGATE_ADMIN_TOKEN, or point --data-dir at the "
                       f"directory holding admin-token (tried {path})") from None


def _get(args: argparse.Namespace, path: str, params: dict[str, str]) -> tuple[str, bytes]:
    url = f"{args.api}{path}?{urllib.parse.urlencode(params)}"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {_token(args)}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        raise CliError(f"{exc.code} from {url}: {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CliError(f"cannot reach dnsgate at {args.api}: {reason}") from None


def _params(args: argparse.Namespace, *names: str) -> dict[str, str]:
    return {n: str(getattr(args, n)) for n in names if getattr(args, n, None) is not None}


def format_entry(e: dict[str, Any]) -> str:
    consent = e.get("consent")
    grant = f" consent={consent['category']}:until={consent['expires_at']}" if consent else ""
    vendor = f" vendor={e['vendor']}" if e.get("vendor") else ""
    return (f"{e['at']} {e['client']} {e['name'] or '-'} {e['type'] or '-'} {e['protocol']} {e['outcome']} "
            f"rcode={e['rcode']}{vendor}{grant}")


def show_log(args: argparse.Namespace) -> int:
    if not 1 <= args.limit <= 10_000:
        raise CliError("--limit must be 1..10000")
    params = _params(args, "client", "name", "vendor", "outcome", "since", "until")
    _, body = _get(args, "/v1/queries", {**params, "limit": str(args.limit), "order": "newest"})
    entries = list(reversed(json.loads(body)["entries"]))
    last = _print_entries(entries, args.json, 0)
    while args.follow:
        time.sleep(FOLLOW_INTERVAL)
        _, body = _get(args, "/v1/queries", {**params, "after": str(last), "order": "oldest", "limit": "10000"})
        last = _print_entries(json.loads(body)["entries"], args.json, last)
    return 0


def _print_entries(entries: list[dict[str, Any]], as_json: bool, last: int) -> int:
    for e in entries:
        print(json.dumps(e) if as_json else format_entry(e), flush=True)
        last = max(last, int(e["id"]))
    return last


def report(args: argparse.Namespace) -> int:
    params = {**_params(args, "since", "until", "client"), "format": args.format}
    _, body = _get(args, "/v1/report", params)
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
    return 1 if failed else 0
