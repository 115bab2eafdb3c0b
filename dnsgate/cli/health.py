"""`dnsgate health`: is the dnsgate this configuration describes up? For container HEALTHCHECKs and
service monitors, which must follow the configured addresses rather than assume port 8053.

It reads the configuration exactly as `serve` does (--config or DNSGATE_CONFIG, then the DNSGATE_*
variables, then flags), asks the API's GET /healthz, and, when `local.healthcheck` names a probe
name, asks the first DNS address for it (an A query dnsgate answers itself, never upstream). A
wildcard listen address (0.0.0.0, ::) is asked on loopback. Exit status 0: both answered; 1: one did
not (the reason on standard error); 2: the configuration cannot be read.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import struct
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping

from dnsgate.config import Config, ConfigError, HostPort, Overrides, load_config, merge_overrides, overrides_from_env
from dnsgate.wire import HEADER, NOERROR, QR, RD, A, name_to_wire

WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1"}


def probe_address(listen: HostPort) -> HostPort:
    """Where to reach a server listening on `listen` from the same host."""
    return HostPort(WILDCARDS.get(listen.host, listen.host), listen.port)


def http_url(address: HostPort, path: str) -> str:
    host = f"[{address.host}]" if ":" in address.host else address.host
    return f"http://{host}:{address.port}{path}"


def check_api(cfg: Config, timeout: float) -> str | None:
    """None if GET /healthz answers 200 with status ok, else what went wrong."""
    url = http_url(probe_address(cfg.api_listen), "/healthz")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = json.loads(response.read(65536))
    except urllib.error.HTTPError as exc:
        return f"{url}: HTTP {exc.code}"
    except (OSError, ValueError) as exc:  # URLError, a timeout, a refused connection, a body that is not JSON
        return f"{url}: {getattr(exc, 'reason', None) or exc}"
    if not isinstance(body, dict) or body.get("status") != "ok":
        return f"{url}: status is not ok: {body!r}"
    return None


def check_dns(cfg: Config, timeout: float) -> str | None:
    """None if the first DNS address answers the health probe name, else what went wrong."""
    name = cfg.local.healthcheck
    if not name:
        return None
    address = probe_address(cfg.dns_listen[0])
    qid = secrets.randbits(16)
    query = HEADER.pack(qid, RD, 1, 0, 0, 0) + name_to_wire(name) + struct.pack(">HH", A, 1)
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    where = f"DNS {address}"
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.settimeout(timeout)
            sock.connect((address.host, address.port))
            sock.send(query)
            reply = sock.recv(4096)
    except OSError as exc:
        return f"{where}: {exc.strerror or exc}"
    if len(reply) < 12:
        return f"{where}: a reply shorter than a DNS header"
    rid, flags, _qd, ancount, _ns, _ar = HEADER.unpack_from(reply)
    if rid != qid or not flags & QR:
        return f"{where}: not a reply to the probe"
    if flags & 0xF != NOERROR or ancount == 0:
        return f"{where}: {name} got rcode {flags & 0xF} with {ancount} answers"
    return None


def run(config: str | None, api: str | None, dns: str | None, timeout: float,
        env: Mapping[str, str] | None = None) -> int:
    flags = Overrides(api=api, dns=(dns,) if dns else None)
    try:
        env_config, env_overrides = overrides_from_env(os.environ if env is None else env)
        cfg = load_config(config or env_config, merge_overrides(env_overrides, flags))
    except ConfigError as exc:
        for error in exc.errors:
            print(f"dnsgate: error: {error}", file=sys.stderr)
        return 2
    problems = [p for p in (check_api(cfg, timeout), check_dns(cfg, timeout)) if p]
    for problem in problems:
        print(f"dnsgate: unhealthy: {problem}", file=sys.stderr)
    if not problems:
        print(f"ok: API {probe_address(cfg.api_listen)}" +
              (f", DNS {probe_address(cfg.dns_listen[0])}" if cfg.local.healthcheck else ""))
    return 1 if problems else 0
