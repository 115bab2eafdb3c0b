"""Every configuration key refuses a bad value at start with a message naming it. The wrong-type
cases cover every key of every section automatically; the range cases list each numeric limit."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from dnsgate.config import _SECTIONS, ConfigError, parse_config

WRONG_TYPE: dict[str, Any] = {"int": "ten", "float": "ten", "bool": "yes", "str": 5}


def every_key() -> list[tuple[str, str, str]]:
    return [(section, f.name, str(f.type)) for section, cls in _SECTIONS.items() for f in fields(cls)]


@pytest.mark.parametrize(("section", "name", "annotation"), every_key(), ids=lambda v: str(v)[:30])
def test_every_key_refuses_a_wrong_type_naming_itself(section: str, name: str, annotation: str) -> None:
    bad = WRONG_TYPE.get(annotation, 5 if annotation.startswith(("tuple", "Literal")) else "x")
    if annotation.startswith("Literal["):
        bad = "no-such-choice"
    with pytest.raises(ConfigError, match=rf"^{section}\.{name}\b"):
        parse_config({section: {name: bad}})


@pytest.mark.parametrize(("section", "name", "annotation"), [k for k in every_key() if k[2] == "float"],
                         ids=lambda v: str(v)[:30])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_no_float_key_takes_inf_or_nan(section: str, name: str, annotation: str, value: float) -> None:
    with pytest.raises(ConfigError, match=rf"^{section}\.{name}: expected a finite number"):
        parse_config({section: {name: value}})


RANGES = [
    ("dns", "udp_max_size", 511), ("dns", "udp_max_size", 65536), ("dns", "tcp_idle_timeout", 0),
    ("dns", "tcp_idle_timeout", 3601), ("dns", "rate_limit", -1), ("dns", "rate_limit_slip", 11),
    ("dns", "rate_limit_ipv4_prefix", 33), ("dns", "rate_limit_ipv6_prefix", 8), ("dns", "tcp_max_connections", 0),
    ("dns", "tcp_max_connections_per_client", 0), ("dns", "tcp_query_timeout", 0),
    ("dns", "tcp_max_queries_per_connection", 0), ("dns", "tcp_max_pipelined", 0), ("dns", "workers", 0),
    ("dns", "workers", 65),
    ("dns", "allow_clients", ["10.0.0.0/33"]), ("dns", "allow_clients", ["10.0.0.1/8"]),
    ("dns", "rate_limit_exempt", ["nope"]), ("dns", "listen", []), ("api", "max_body_bytes", 100),
    ("api", "consent_changes_per_minute", -1), ("api", "allowed_origins", ["example.com"]),
    ("api", "max_connections", 0), ("api", "max_connections_per_client", 0), ("api", "idle_timeout", 0),
    ("api", "header_timeout", 3601), ("api", "body_timeout", 0),
    ("api", "admin_listen", "localhost:1"), ("api", "listen", "1.2.3.4"), ("api", "hosts", ["evil example"]),
    ("api", "hosts", ["http://dnsgate.lan"]),
    ("upstream", "timeout", 0), ("upstream", "timeout", 61), ("upstream", "attempt_timeout", 0),
    ("upstream", "servers", ["tls://1.1.1.1#bad..name"]), ("upstream", "domains", {"a..b": ["1.1.1.1"]}),
    ("cache", "max_entries", -1), ("cache", "max_bytes", -1), ("cache", "min_ttl", -1),
    ("cache", "min_ttl", 2**31), ("cache", "max_ttl", 0), ("cache", "max_ttl", 2**31), ("cache", "stale_ttl", 0),
    ("cache", "stale_max_age", 0), ("gate", "sinkhole_ttl", 0), ("gate", "allowed_ttl_cap", 0),
    ("consent", "max_days", 400), ("consent", "default_days", 0), ("consent", "opt_out_days", 0),
    ("consent", "kiosk_days", 0), ("consent", "kiosk_idle_minutes", 0), ("consent", "retention_days", -1),
    ("consent", "sweep_interval", 0), ("profiles", "networks", {"10.0.0.0/8": "maybe"}),
    ("profiles", "networks", {"10.0.0.0/88": "opt-in"}), ("identity", "trusted_forwarders", ["x"]),
    ("identity", "neighbour_refresh", 0), ("identity", "pairing_ttl", 5), ("local", "healthcheck", "a..b"),
    ("local", "ttl", -1), ("local", "ttl", 604801),
    ("storage", "data_dir", ""), ("storage", "redis_timeout", 0), ("storage", "redis_timeout", 61),
    ("storage", "store", "ftp://x"),
    ("lists", "refresh_interval", -1), ("lists", "fetch_timeout", 0),
    ("lists", "max_download_bytes", 10), ("lists", "allow", ["*"]), ("lists", "sources", [{"id": "BAD"}]),
    ("querylog", "queue_size", 0), ("querylog", "flush_interval", 0), ("querylog", "max_age_days", 0),
    ("querylog", "max_rows", 0), ("events", "webhook_url", "ftp://x"), ("events", "webhook_timeout", 0),
]


@pytest.mark.parametrize(("section", "name", "value"), RANGES, ids=lambda v: str(v)[:24])
def test_out_of_range_values_name_their_key(section: str, name: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=rf"^{section}\.{name}"):
        parse_config({section: {name: value}})


def test_every_numeric_key_has_a_range_case() -> None:
    numeric = {f"{s}.{n}" for s, n, a in every_key() if a in ("int", "float")}
    covered = {f"{s}.{n}" for s, n, _ in RANGES}
    assert numeric - covered == set()


def test_a_bad_value_stops_a_real_start_with_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[dns]\nrate_limit_slip = 99\n")
    done = subprocess.run([sys.executable, "-m", "dnsgate", "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 2
    assert done.stderr.strip() == "dnsgate: error: dns.rate_limit_slip: must be 0..10, got 99"
