"""A small client for the running server's admin API, used by every command that calls it
(`dnsgate consent`, `explain`, `log`, `report`, `store acknowledge`).

Finds the server the way `dnsgate serve` finds its settings (flags, DNSGATE_* variables, the
config file, the defaults) and the admin token in `<data_dir>/admin-token` unless one is given.
Blocking I/O through urllib: it runs once per command, never inside the server.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from dnsgate.addresses import is_ip
from dnsgate.config import ENV_PREFIX, Config, ConfigError, HostPort, parse_host_port
from dnsgate.consent.export import PAIRED_GRANT

TIMEOUT = 10.0
CHUNK = 64 * 1024
# For a client command, DNSGATE_API names the API to call (for `dnsgate serve`, where to listen).
API_VARIABLE = ENV_PREFIX + "API"
HOST_NAME = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*\.?")


class AdminError(Exception):
    """The API cannot be reached or refused the request; the message is one line for the user."""


def api_base_url(text: str, key: str = "--api") -> str:
    """The URL to call for `--api` / DNSGATE_API, one form for every command: `HOST:PORT` (a host
    name or an IP address, IPv6 as `[V6]:PORT`) or a URL `http(s)://HOST[:PORT][/PATH]` (a TLS
    proxy, a path prefix). Raises ConfigError."""
    text = text.strip()
    if "://" not in text:
        host, colon, port = text.rpartition(":")
        if not colon or not port:
            raise ConfigError(f"{key}: missing port in {text!r} (HOST:PORT or http(s)://HOST[:PORT][/PATH])")
        if host.startswith("[") or ":" in host or is_ip(host):
            address = parse_host_port(text, key=key)
            if address.port == 0:
                raise ConfigError(f"{key}: bad port {port!r} in {text!r}")
            return local_url(address)
        if not HOST_NAME.fullmatch(host):
            raise ConfigError(f"{key}: not a host name or IP address: {host!r} (in {text!r})")
        if not port.isdigit() or not 0 < int(port) <= 65535:
            raise ConfigError(f"{key}: bad port {port!r} in {text!r}")
        return f"http://{host}:{int(port)}"
    parts = urllib.parse.urlsplit(text)
    try:
        parts.port  # noqa: B018 -- raises ValueError for a bad port
    except ValueError:
        raise ConfigError(f"{key}: bad port in {text!r}") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname or parts.username is not None \
            or parts.query or parts.fragment:
        raise ConfigError(f"{key}: expected HOST:PORT or http(s)://HOST[:PORT][/PATH], got {text!r}")
    return text.rstrip("/")


def api_to_call(flag: str | None, env: Mapping[str, str]) -> str | None:
    """The base URL a command calls: `--api` (already checked), else DNSGATE_API; None if neither
    names one. Raises ConfigError naming DNSGATE_API for a bad value."""
    if flag:
        return flag
    text = env.get(API_VARIABLE, "").strip()
    return api_base_url(text, key=API_VARIABLE) if text else None


def local_url(address: HostPort) -> str:
    """The URL of an API listening on `address` from this host (0.0.0.0 and :: are every local address)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(address.host, address.host)
    return f"http://[{host}]:{address.port}" if ":" in host else f"http://{host}:{address.port}"


@dataclass(frozen=True, slots=True)
class AdminClient:
    base_url: str
    token: str

    @classmethod
    def for_config(cls, cfg: Config, token: str | None = None, base_url: str | None = None) -> AdminClient:
        """The client of the server `cfg` describes (its admin listener, else its API), or of
        `base_url` when the command names one (--api)."""
        base = base_url or local_url(cfg.admin_listen or cfg.api_listen)
        if not token:
            token = cfg.api.admin_token
        if not token:
            path = Path(cfg.storage.data_dir) / "admin-token"
            try:
                token = path.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise AdminError(f"no admin token: pass --token, set DNSGATE_ADMIN_TOKEN, or point --data-dir at "
                                 f"the server's data dir ({path}: {exc.strerror})") from None
        return cls(base, token)

    def get(self, path: str, query: Mapping[str, str | None] | None = None) -> Any:
        return self._json("GET", path, query)

    def put(self, path: str, body: Mapping[str, Any]) -> Any:
        return self._json("PUT", path, None, body)

    def delete(self, path: str) -> Any:
        return self._json("DELETE", path)

    def post(self, path: str) -> Any:
        return self._json("POST", path)

    def read(self, path: str, query: Mapping[str, str | None]) -> bytes:
        """A whole answer as it came (a report in JSON or JUnit XML)."""
        with self._open("GET", path, query) as response:
            data: bytes = response.read()
            return data

    def lines(self, path: str, query: Mapping[str, str | None]) -> Iterator[str]:
        """A streamed answer (JSON Lines), line by line."""
        with self._open("GET", path, query) as response:
            for line in response:
                if line.strip():
                    yield line.decode("utf-8")

    def stream(self, path: str, query: Mapping[str, str | None], out: BinaryIO) -> None:
        with self._open("GET", path, query) as response:
            for chunk in iter(lambda: response.read(CHUNK), b""):
                out.write(chunk)

    def _json(self, method: str, path: str, query: Mapping[str, str | None] | None = None,
              body: Mapping[str, Any] | None = None) -> Any:
        with self._open(method, path, query, body) as response:
            return json.loads(response.read())

    def _open(self, method: str, path: str, query: Mapping[str, str | None] | None = None,
              body: Mapping[str, Any] | None = None) -> Any:
        url = self.base_url + urllib.parse.quote(path, safe="/:")
        params = {k: v for k, v in (query or {}).items() if v is not None}
        if params:
            url += "?" + urllib.parse.urlencode(params)
        headers = {"Authorization": f"Bearer {self.token}", "User-Agent": "dnsgate-cli"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            return urllib.request.urlopen(request, timeout=TIMEOUT)
        except urllib.error.HTTPError as exc:
            raise AdminError(_api_message(exc)) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AdminError(f"cannot reach the dnsgate API at {self.base_url}: {reason} "
                             "(is 'dnsgate serve' running? see --api)") from None


def _api_message(exc: urllib.error.HTTPError) -> str:
    try:
        error = json.loads(exc.read())["error"]
    except (ValueError, KeyError, TypeError):
        return f"the API answered HTTP {exc.code} {exc.reason}"
    field = f" (field {error['field']})" if error.get("field") else ""
    return f"{error.get('message', exc.reason)}{field} [HTTP {exc.code} {error.get('code', '')}]"


def lines_of_copied_grants(events: list[Mapping[str, Any]], in_force: set[int]) -> Iterator[str]:
    """The grants an older dnsgate's pairing copied to another identity (`consent paired`): who got
    one and from whom, and what became of it. Events: the whole log, oldest first."""
    ended = {e["supersedes"]: e for e in events if e.get("supersedes") is not None}
    copies = [e for e in events if e["action"] == "grant" and (e.get("reason") or "").startswith(PAIRED_GRANT)]
    for e in copies:
        who = e["address"] or e["mac"]
        granted = [k for k, v in {**e["categories"], **e["vendors"]}.items() if v]
        yield f"#{e['id']} {e['time']} {who}: granted {', '.join(granted) or 'nothing'} ({e['reason']})"
        later = ended.get(e["id"])
        if e["id"] in in_force:
            yield "  IN FORCE"
        elif later is not None:
            yield f"  ended by #{later['id']} ({later['action']}, {later['time']}): {later['reason']}"
        else:
            yield "  no longer in force"
    if not copies:
        yield "no grant was ever copied by pairing"


def lines_of_view(view: Mapping[str, Any]) -> Iterator[str]:
    """A client's consent in a few readable lines (the CLI's `consent show`)."""
    ident = view["identity"]
    mac = f", MAC {ident['mac']} (from the {ident['mac_source']})" if ident.get("mac") and ident.get("mac_source") \
        else (f", MAC {ident['mac']}" if ident.get("mac") else "")
    yield f"client {view['client']}{mac}"
    profile = view["profile"]
    yield f"profile {profile['name']}: {profile['why']}"
    choice = view.get("choice")
    if choice is None:
        yield "choice: none recorded"
    else:
        subject = choice["subject"]
        who = subject["network"] or subject["mac"] or subject["address"]
        state = "in force" if choice["active"] else "expired"
        notice = choice["notice"]
        currency = "current" if notice and notice["current"] else "OUTDATED"
        notice_text = "no notice recorded" if notice is None else (
            f"notice {notice['version']} (catalog {notice['catalog']}), {currency}")
        yield (f"choice #{choice['id']} by {who} via {choice['channel']}, made {choice['made_at']}, "
               f"expires {choice['expires_at']} ({state}); {notice_text}")
        if choice.get("refusals_stand"):
            yield "  its refusals are opt-outs: they stand until changed"
        if choice.get("gpc_seen_at"):
            yield f"  Global Privacy Control applies since {choice['gpc_seen_at']}"
        for scope in ("categories", "vendors"):
            if choice[scope]:
                yield f"  {scope}: " + ", ".join(f"{k}={'granted' if v else 'refused'}"
                                                 for k, v in choice[scope].items())
    if view.get("held"):
        yield f"held: {view['held']}"
    for note in view.get("notes", []):
        yield f"note: {note}"
    if view.get("ask_again_after"):
        yield f"refused: do not ask again before {view['ask_again_after']}"
    if view.get("kiosk"):
        kiosk = view["kiosk"]
        yield f"kiosk: resets after {kiosk['idle_minutes']:g} idle minutes; last seen {kiosk['last_seen']}"
    for v in view["vendors"]:
        yield f"  {v['id']} ({v['category']}): {'ALLOWED' if v['allowed'] else 'BLOCKED'} - {v['reason']}"
