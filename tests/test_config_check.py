"""Every key from the environment by one rule, `dnsgate config check|schema|env`, "did you mean", and
the generated table in docs/configuration.md: all derived from config.py's definitions."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest

from dnsgate.config import (
    ENV_SHORTHANDS,
    Config,
    ConfigError,
    ListsConfig,
    ListSource,
    Overrides,
    env_settings,
    env_variable,
    load_config,
    merge_overrides,
    overrides_from_env,
    parse_config_text,
)
from dnsgate.config_check import (
    TABLE_END,
    TABLE_START,
    check,
    env_table,
    keys,
    locate,
    parse_back,
    schema,
    toml_value,
)

ROOT = Path(__file__).resolve().parent.parent


def env_text(value: Any, annotation: str) -> str:
    """A value as an operator writes it in a variable (lists comma-separated, tables as JSON)."""
    if annotation == "tuple[str, ...]":
        return ",".join(value) if value else "[]"
    if annotation.startswith("tuple["):
        return json.dumps(toml_value(value, annotation))
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value) if value != "" else "x"


@pytest.mark.parametrize(("section", "key", "annotation", "default"), list(keys()),
                         ids=lambda v: str(v)[:32])
def test_every_key_has_a_variable_by_one_rule(section: str, key: str, annotation: str, default: Any) -> None:
    variable = env_variable(section, key)
    assert variable == f"DNSGATE_{section.upper()}_{key.upper()}"
    text = env_text(default, annotation)
    if variable in ENV_SHORTHANDS:  # log.level and log.format: read with their flags (in any case)
        cfg = load_config(None, overrides_from_env({variable: text.upper()})[1])
        assert getattr(getattr(cfg, section), key) == default
        return
    ((name, got_section, got_key, value),) = env_settings({variable: text})
    assert (name, got_section, got_key) == (variable, section, key)
    assert value == (default if text != "x" else "x")


def test_values_from_the_environment() -> None:
    env = {"DNSGATE_PORTAL_ADDRESSES": " 192.0.2.10, 2001:db8::10 ", "DNSGATE_DNS_UDP_MAX_SIZE": "4096",
           "DNSGATE_CACHE_SERVE_STALE": "Yes", "DNSGATE_LOCAL_DDR": "0", "DNSGATE_GATE_MODE": "null",
           "DNSGATE_UPSTREAM_TIMEOUT": "2.5", "DNSGATE_API_HOSTS": '["dnsgate.lan", "10.0.0.2"]',
           "DNSGATE_PROFILES_NETWORKS": '{"10.0.5.0/24": "kiosk"}',
           "DNSGATE_UPSTREAM_DOMAINS": '{"corp.example": ["10.0.0.53"], "lab.example": "10.0.0.54"}',
           "DNSGATE_LISTS_SOURCES": '[{"id": "ads", "file": "/x.txt", "category": "marketing"}]',
           "DNSGATE_PORTAL_URL": "", "DNSGATE_TEST_CHROMIUM": "/usr/bin/chromium"}  # empty: unset; not a section
    _, overrides = overrides_from_env(env)
    cfg = load_config(None, overrides)
    assert cfg.portal.addresses == ("192.0.2.10", "2001:db8::10")
    assert (cfg.dns.udp_max_size, cfg.cache.serve_stale, cfg.local.ddr, cfg.gate.mode) == (4096, True, False, "null")
    assert cfg.upstream.timeout == 2.5 and cfg.api.hosts == ("dnsgate.lan", "10.0.0.2")
    assert cfg.profiles.networks == (("10.0.5.0/24", "kiosk"),)
    assert cfg.upstream.domains == (("corp.example", ("10.0.0.53",)), ("lab.example", ("10.0.0.54",)))
    assert cfg.lists.sources == (ListSource(id="ads", file="/x.txt", category="marketing"),)
    assert cfg.portal.url == ""
    # the file < the environment < flags
    file_cfg = parse_config_text('[dns]\nudp_max_size = 2048\nlisten = ["127.0.0.1:1"]\n')
    assert file_cfg.dns.udp_max_size == 2048
    _, overrides = overrides_from_env({"DNSGATE_DNS_UDP_MAX_SIZE": "4096", "DNSGATE_DNS_LISTEN": "127.0.0.1:2"})
    cfg = load_config(None, merge_overrides(overrides, Overrides(dns=("127.0.0.1:3",))))
    assert cfg.dns.udp_max_size == 4096 and cfg.dns.listen == ("127.0.0.1:3",)


@pytest.mark.parametrize(("env", "message"), [
    ({"DNSGATE_PORTAL_ADRESSES": "192.0.2.1"},
     r"^DNSGATE_PORTAL_ADRESSES: \[portal\] has no key 'adresses' \(did you mean 'DNSGATE_PORTAL_ADDRESSES'\?"),
    ({"DNSGATE_DNS_UDP_MAX_SIZE": "big"}, r"^DNSGATE_DNS_UDP_MAX_SIZE: expected an integer, got 'big'$"),
    ({"DNSGATE_CACHE_PREFETCH": "maybe"}, r"^DNSGATE_CACHE_PREFETCH: expected true or false, got 'maybe'$"),
    ({"DNSGATE_UPSTREAM_TIMEOUT": "nan"}, r"^DNSGATE_UPSTREAM_TIMEOUT: expected a finite number"),
    ({"DNSGATE_GATE_MODE": "drop"}, r"^DNSGATE_GATE_MODE: must be one of nxdomain, null; got 'drop'$"),
    ({"DNSGATE_PROFILES_NETWORKS": "10.0.0.0/8=kiosk"}, r"^DNSGATE_PROFILES_NETWORKS: expected JSON such as"),
    ({"DNSGATE_LISTS_SOURCES": '[{"id": "a", "bogus": 1}]'},
     r"^DNSGATE_LISTS_SOURCES\[0\]\.bogus: unknown key"),
    ({"DNSGATE_DNS": "127.0.0.1:1", "DNSGATE_DNS_LISTEN": "127.0.0.1:2"},
     r"^DNSGATE_DNS and DNSGATE_DNS_LISTEN both set dns\.listen"),
])
def test_a_bad_variable_is_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides_from_env(env)[1])


def test_an_unknown_key_or_section_in_the_file_gets_a_did_you_mean() -> None:
    with pytest.raises(ConfigError, match=r"^dns\.udp_max_sise: unknown key \(did you mean 'udp_max_size'\? known: "):
        parse_config_text("[dns]\nudp_max_sise = 1232\n")
    with pytest.raises(ConfigError, match=r"^portl: unknown section \(did you mean 'portal'\? known: dns, "):
        parse_config_text("[portl]\n")
    with pytest.raises(ConfigError, match=r"^dns\.zzz: unknown key \(known: listen, "):  # nothing close
        parse_config_text("[dns]\nzzz = 1\n")


def test_the_table_in_the_docs_is_current() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert TABLE_START in page and TABLE_END in page
    shown = page.split(TABLE_START + "\n", 1)[1].split(TABLE_END, 1)[0]
    assert shown == env_table(), "regenerate with: ./dev config env"
    assert env_table().count("\n| `") == len(list(keys()))


def test_the_schema_accepts_the_sample_and_refuses_what_dnsgate_refuses() -> None:
    validator = jsonschema_rs.validator_for(schema())
    sample = tomllib.loads((ROOT / "config" / "dnsgate.toml").read_text())
    assert validator.is_valid(sample), list(validator.iter_errors(sample))
    defaults = {section: {key: prop["default"] for key, prop in table["properties"].items()}
                for section, table in schema()["properties"].items()}
    assert parse_back(json_to_toml(defaults)) == Config()  # the schema's defaults are dnsgate's
    assert validator.is_valid({"upstream": {"domains": {"corp.example": ["10.0.0.53"]}},
                               "profiles": {"networks": {"10.0.5.0/24": "kiosk"}},
                               "lists": {"sources": [{"id": "ads", "url": "https://x", "category": "marketing"}]}})
    bad: dict[str, Any]
    for bad in ({"dns": {"udp_max_sise": 1}}, {"portl": {}}, {"dns": {"udp_max_size": "big"}},
                {"gate": {"mode": "drop"}}, {"profiles": {"networks": {"10.0.0.0/8": "maybe"}}},
                {"lists": {"sources": [{"id": "a", "bogus": 1}]}}, {"cache": {"prefetch": "yes"}}):
        assert not validator.is_valid(bad), bad
        with pytest.raises(ConfigError):
            parse_config_text(json_to_toml(bad))
    udp = schema()["properties"]["dns"]["properties"]["udp_max_size"]
    assert "EDNS" in udp["description"] and "DNSGATE_DNS_UDP_MAX_SIZE" in udp["description"]


def json_to_toml(data: dict[str, Any]) -> str:
    from dnsgate.config_check import _toml

    lines: list[str] = []
    for section, table in data.items():
        lines.append(f"[{section}]")
        for key, value in table.items():
            if isinstance(value, list) and value and isinstance(value[0], dict):
                for item in value:
                    lines.append(f"[[{section}.{key}]]")
                    lines.extend(f"{k} = {_toml(v)}" for k, v in item.items())
                lines.append(f"[{section}]")
            else:
                lines.append(f"{key} = {_toml(value)}")
    return "\n".join(lines) + "\n"


def test_config_check_prints_what_serve_would_run_with(tmp_path: Path) -> None:
    path = tmp_path / "dnsgate.toml"
    path.write_text('[dns]\nudp_max_size = 4096\n[upstream]\ndomains = { "corp.example" = ["10.0.0.53"] }\n'
                    '[profiles]\nnetworks = { "10.0.5.0/24" = "kiosk" }\n'
                    '[[lists.sources]]\nid = "ads"\nfile = "ads.txt"\ncategory = "marketing"\n')
    code, text = check(str(path), {"DNSGATE_PORTAL_ADDRESSES": "192.0.2.7", "DNSGATE_DNS": "127.0.0.1:5300"})
    assert code == 0, text
    expected = load_config(str(path), overrides_from_env({"DNSGATE_PORTAL_ADDRESSES": "192.0.2.7",
                                                          "DNSGATE_DNS": "127.0.0.1:5300"})[1])
    assert parse_back(text) == expected  # every key, and it reads back to the same configuration
    assert f"udp_max_size = 4096  # {path}" in text.splitlines()
    assert 'addresses = ["192.0.2.7"]  # DNSGATE_PORTAL_ADDRESSES' in text.splitlines()
    assert 'listen = ["127.0.0.1:5300"]  # DNSGATE_DNS' in text.splitlines()
    assert "max_ttl = 86400" in text.splitlines()  # defaults too, without a note
    assert parse_back(check(None, {})[1]) == Config()
    sources = (ListSource(id="a", url="https://example.com/a.txt", category="marketing"),
               ListSource(id="b", file="b.txt", kind="allow", subdomains=True))
    with_lists = replace(Config(), lists=replace(ListsConfig(), sources=sources))
    as_json = json.dumps(toml_value(sources, "tuple[ListSource, ...]"))
    path.write_text(check(None, {"DNSGATE_LISTS_SOURCES": as_json})[1])
    assert parse_config_text(path.read_text()) == with_lists


@pytest.mark.parametrize(("text", "env", "error"), [
    ("[dns]\nlisten = [\"127.0.0.1:53\"]\n\nudp_max_size = 70000\n", {},
     "{path}:4: dns.udp_max_size: must be 512..65535, got 70000"),
    ("[dns]\nudp_max_sise = 1232\n", {}, "{path}:2: dns.udp_max_sise: unknown key (did you mean 'udp_max_size'?"),
    ("[api]\n[portl]\nx = 1\n", {}, "{path}:2: portl: unknown section (did you mean 'portal'?"),
    ('[[lists.sources]]\nid = "a"\nfile = "a"\ncategory = "m"\n[[lists.sources]]\nid = "b"\n'
     'url = "ftp://x"\ncategory = "m"\n', {},
     "{path}:7: lists.sources[1].url: expected an http:// or https:// URL, got 'ftp://x'"),
    ("[dns]\n", {"DNSGATE_DNS_UDP_MAX_SIZE": "70000"},
     "DNSGATE_DNS_UDP_MAX_SIZE: dns.udp_max_size: must be 512..65535, got 70000"),
    ("[dns]\n", {"DNSGATE_DNS_UPD_MAX_SIZE": "1"}, "environment: DNSGATE_DNS_UPD_MAX_SIZE: [dns] has no key"),
    ("[dns\n", {}, "{path}: not valid TOML"),
])
def test_config_check_names_the_file_line_and_key(tmp_path: Path, text: str, env: dict[str, str],
                                                  error: str) -> None:
    path = tmp_path / "dnsgate.toml"
    path.write_text(text)
    code, out = check(str(path), env)
    assert code == 2 and out.startswith("dnsgate: error: " + error.format(path=path)), out
    assert len(out.strip().splitlines()) == 1


def test_config_check_and_serve_name_every_error_at_once(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[dns]\nlisten = ["localhost:53"]\nudp_max_size = 70000\n\n[cache]\nmax_ttl = 0\n\n'
                    '[gate]\nmode = "refused"\nsinkhole_tll = 5\n\n[portl]\nx = 1\n')
    errors = ["dns.listen: dnsgate listens on an IP address, not a host name: 'localhost'",
              "dns.udp_max_size: must be 512..65535, got 70000",
              "cache.max_ttl: must be >= 1 and >= cache.min_ttl",
              "gate.mode: must be one of nxdomain, null; got 'refused'",
              "gate.sinkhole_tll: unknown key (did you mean 'sinkhole_ttl'?",
              "portl: unknown section (did you mean 'portal'?"]
    lines = [2, 3, 6, 9, 10, 12]
    result = run("config", "check", "--config", str(path))
    assert result.returncode == 2 and result.stdout == ""
    checked = result.stderr.splitlines()
    assert len(checked) == len(errors), checked  # in the file's order, each with its line
    for line, number, error in zip(checked, lines, errors, strict=True):
        assert line.startswith(f"dnsgate: error: {path}:{number}: {error}"), (line, number)
    result = run("serve", "--config", str(path), "--data-dir", str(tmp_path / "d"))
    assert result.returncode == 2 and result.stdout == ""
    served = result.stderr.splitlines()  # the same errors, each naming its key as serve always has
    assert sorted(served) == sorted(re.sub(f"{re.escape(str(path))}:\\d+: ", "", line, count=1)
                                    for line in checked), served
    assert not (tmp_path / "d").exists()  # refused before anything was made
    # one error alone reads as before: one line, serve's without the file
    path.write_text("[dns]\nudp_max_size = 70000\n")
    result = run("serve", "--config", str(path), "--data-dir", str(tmp_path / "d"))
    assert (result.returncode, result.stderr) == (2, "dnsgate: error: dns.udp_max_size: must be 512..65535, "
                                                     "got 70000\n")


def test_every_bad_variable_is_named_at_once() -> None:
    code, out = check(None, {"DNSGATE_CACHE_MAX_TTL": "soon", "DNSGATE_GATE_MODE": "refused"})
    assert code == 2 and out.splitlines() == [
        "dnsgate: error: environment: DNSGATE_CACHE_MAX_TTL: expected an integer, got 'soon'",
        "dnsgate: error: environment: DNSGATE_GATE_MODE: must be one of nxdomain, null; got 'refused'"], out
    code, out = check(None, {"DNSGATE_CACHE_MAX_TTL": "0", "DNSGATE_GATE_SINKHOLE_TTL": "0"})
    assert code == 2 and out.splitlines() == [
        "dnsgate: error: DNSGATE_CACHE_MAX_TTL: cache.max_ttl: must be >= 1 and >= cache.min_ttl, "
        "and at most 2147483647, got 0",
        "dnsgate: error: DNSGATE_GATE_SINKHOLE_TTL: gate.sinkhole_ttl: must be 1..3600, got 0"], out


def test_the_variables_and_the_file_are_checked_in_the_same_run(tmp_path: Path) -> None:
    """Bad DNSGATE_* variables do not hide the file's errors: `config check`, `serve` and `health` (real
    processes) name every one in one run, one line each, the file's at FILE:LINE, the variables' by
    name. A file value that a bad variable was meant to override is still the file's to fix; a
    variable's refused key is not checked further (nothing compares with its default); exit 2."""
    path = tmp_path / "c.toml"
    path.write_text('[dns]\nudp_max_size = 70000\n\n[cache]\nmax_ttl = "x"\n\n[upstream]\ntimeout = -1\n'
                    '\n[gate]\nsinkhole_ttl = 0\n')
    env = {"DNSGATE_CACHE_MAX_TTL": "soon", "DNSGATE_UPSTREAM_TIMEOUT": "fast", "DNSGATE_DNS_UPD_MAX_SIZE": "1"}
    in_file = {2: "dns.udp_max_size: must be 512..65535, got 70000",
               5: "cache.max_ttl: expected an integer, got 'x'",
               11: "gate.sinkhole_ttl: must be 1..3600, got 0"}
    variables = ["DNSGATE_CACHE_MAX_TTL: expected an integer, got 'soon'",
                 "DNSGATE_DNS_UPD_MAX_SIZE: [dns] has no key 'upd_max_size' (did you mean 'DNSGATE_DNS_UDP_MAX_SIZE'?",
                 "DNSGATE_UPSTREAM_TIMEOUT: expected a number, got 'fast'"]
    result = run("config", "check", "--config", str(path), env=env)
    assert result.returncode == 2 and result.stdout == ""
    checked = result.stderr.splitlines()
    assert len(checked) == len(in_file) + len(variables), checked
    for line, (number, error) in zip(checked, in_file.items(), strict=False):
        assert line == f"dnsgate: error: {path}:{number}: {error}", line
    for line, error in zip(checked[len(in_file):], variables, strict=True):
        assert line.startswith(f"dnsgate: error: environment: {error}"), line
    for command in (["serve", "--data-dir", str(tmp_path / "d")], ["health"]):
        result = run(*command, "--config", str(path), env=env)
        assert result.returncode == 2 and result.stdout == "", result
        told = result.stderr.splitlines()  # the same errors, each as this command has always put it
        assert len(told) == len(checked), told
        for error in [*in_file.values(), *variables]:
            assert sum(line.startswith(f"dnsgate: error: {error}") for line in told) == 1, (error, told)
    assert not (tmp_path / "d").exists()


def test_locate() -> None:
    text = '[dns]\nlisten = ["127.0.0.1:53"]  # the LAN\n[api]\n# udp_max_size = 1\nlisten = "x"\n'
    assert locate(text, "dns.listen") == 2 and locate(text, "api.listen") == 5
    assert locate(text, "api.hosts") == 3  # not there: its section
    assert locate(text, "cache.max_ttl") is None


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DNSGATE_")}
    return subprocess.run([sys.executable, "-m", "dnsgate", *args], capture_output=True, text=True, timeout=60,
                          env={**clean, **(env or {})}, check=False)


def test_the_config_commands(tmp_path: Path) -> None:
    result = run("config", "schema")
    assert result.returncode == 0 and json.loads(result.stdout) == schema()
    result = run("config", "env")
    assert result.returncode == 0 and result.stdout == env_table()
    path = tmp_path / "c.toml"
    path.write_text("[cache]\nmax_ttl = 0\n")
    result = run("config", "check", "--config", str(path))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"dnsgate: error: {path}:2: cache.max_ttl: must be >= 1 and >= cache.min_ttl, " \
                            f"and at most 2147483647, got 0\n"
    result = run("config", "check", env={"DNSGATE_CONFIG": str(path), "DNSGATE_CACHE_MAX_TTL": "60"})
    assert result.returncode == 0 and "max_ttl = 60  # DNSGATE_CACHE_MAX_TTL" in result.stdout.splitlines()
    result = run("config", "check", "--config", str(tmp_path / "missing.toml"))
    assert result.returncode == 2 and "missing.toml" in result.stderr
    # serve refuses a misspelt variable as config check does
    result = run("serve", env={"DNSGATE_PORTAL_ADRESSES": "192.0.2.1"})
    assert result.returncode == 2 and "did you mean 'DNSGATE_PORTAL_ADDRESSES'?" in result.stderr
