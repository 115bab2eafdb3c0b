"""Configuration: the documented file equals the defaults; every bad input names its key."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from dnsgate.addresses import is_ip
from dnsgate.config import (
    Config,
    ConfigError,
    ConfigErrors,
    HostPort,
    Overrides,
    UpstreamAddress,
    load_config,
    merge_overrides,
    overrides_from_env,
    parse_config_text,
    parse_host_port,
    parse_upstream,
    resolv_conf_servers,
)

ROOT = Path(__file__).resolve().parent.parent


def test_documented_config_equals_embedded_defaults() -> None:
    assert parse_config_text((ROOT / "config" / "dnsgate.toml").read_text()) == Config()


def test_documented_config_mentions_every_key() -> None:
    text = (ROOT / "config" / "dnsgate.toml").read_text()
    import dataclasses

    for section in dataclasses.fields(Config):
        assert f"[{section.name}]" in text
        for key in dataclasses.fields(getattr(Config(), section.name)):
            assert f"\n{key.name} = " in text, f"{section.name}.{key.name} is not documented"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[dns]\nlisten = ['127.0.0.1']", "dns.listen"),
        ("[dns]\nlisten = ['not-an-ip:53']", "dns.listen"),
        ("[dns]\nlisten = []", "dns.listen"),
        ("[dns]\nlisten = ['::1:53']", "dns.listen"),
        ("[dns]\nudp_max_size = 100", "dns.udp_max_size"),
        ("[dns]\nudp_max_size = 'big'", "dns.udp_max_size"),
        ("[dns]\ntcp_idle_timeout = 0", "dns.tcp_idle_timeout"),
        ("[dns]\nlisten_on = ['127.0.0.1:53']", "dns.listen_on"),
        ("[dsn]\nlisten = []", "dsn"),
        ("dns = 5", "dns"),
        ("[api]\nlisten = '127.0.0.1:99999'", "api.listen"),
        ("[api]\nallowed_origins = ['example.com']", "api.allowed_origins"),
        ("[upstream]\nservers = ['1.1.1.1:x']", "upstream.servers"),
        ("[upstream]\ntimeout = -1", "upstream.timeout"),
        ("[upstream]\nservers = ['127.0.0.1:5353']", "upstream.servers"),
        ("[dns]\nlisten = ['0.0.0.0:53']\n[upstream]\nservers = ['127.0.0.1']", "upstream.servers"),
        ("[upstream]\nattempt_timeout = 5.0", "upstream.attempt_timeout"),
        ("[cache]\nmax_entries = -1", "cache.max_entries"),
        ("[cache]\nmax_ttl = 0", "cache.max_ttl"),
        ("[cache]\nmin_ttl = true", "cache.min_ttl"),
        ("[gate]\nmode = 'refused'", "gate.mode"),
        ("[gate]\nsinkhole_ttl = 0", "gate.sinkhole_ttl"),
        ("[gate]\nallowed_ttl_cap = 0", "gate.allowed_ttl_cap"),
        ("[gate]\ndisabled_domains = [1]", "gate.disabled_domains"),
        ("[consent]\nmax_days = 400", "consent.max_days"),
        ("[consent]\ndefault_days = 0", "consent.default_days"),
        ("[storage]\ndata_dir = ''", "storage.data_dir"),
        ("[log]\nlevel = 'loud'", "log.level"),
        ("[log]\nformat = 'xml'", "log.format"),
        ("[querylog]\nmode = 'everything'", "querylog.mode"),
        ("[querylog]\nqueue_size = 0", "querylog.queue_size"),
        ("[querylog]\nflush_interval = 0", "querylog.flush_interval"),
        ("[querylog]\nmax_age_days = 0", "querylog.max_age_days"),
        ("[querylog]\nmax_rows = 0", "querylog.max_rows"),
        ("[events]\nwebhook_url = 'ftp://x'", "events.webhook_url"),
        ("[events]\nwebhook_timeout = 0", "events.webhook_timeout"),
        ("[consent]\nkiosk_days = 400", "consent.kiosk_days"),
        ("[consent]\nopt_out_days = 0", "consent.opt_out_days"),
        ("[consent]\nkiosk_idle_minutes = 0", "consent.kiosk_idle_minutes"),
        ("[consent]\nretention_days = -1", "consent.retention_days"),
        ("[consent]\nsweep_interval = 0", "consent.sweep_interval"),
        ("[profiles]\ndefault = 'gdpr'", "profiles.default"),
        ("[profiles]\nnetworks = { '10.0.0.1/8' = 'kiosk' }", "profiles.networks"),
        ("[profiles]\nnetworks = { '10.0.0.0/8' = 'strict' }", "profiles.networks"),
        ("[profiles]\nnetworks = ['10.0.0.0/8']", "profiles.networks"),
        ("[identity]\ntrusted_forwarders = ['router']", "identity.trusted_forwarders"),
        ("[identity]\npairing_ttl = 1", "identity.pairing_ttl"),
        ("[identity]\nneighbour_refresh = 0", "identity.neighbour_refresh"),
        ("[dns", "config"),
        ("[dns]\nany_query = 'all'", "dns.any_query"),
        ("[upstream]\nstrategy = 'random'", "upstream.strategy"),
        ("[upstream]\nservers = ['quic://1.1.1.1']", "upstream.servers"),
        ("[upstream]\nservers = ['1.1.1.1#dns.example']", "upstream.servers"),
        ("[upstream]\nservers = ['tls://1.1.1.1#bad..name']", "upstream.servers"),
        ("[upstream]\ndomains = ['corp.example']", "upstream.domains"),
        ("[upstream]\ndomains = { 'corp.example' = [] }", "upstream.domains.corp.example"),
        ("[upstream]\ndomains = { 'corp.example' = ['not-an-ip'] }", "upstream.domains.corp.example"),
        ("[upstream]\ndomains = { 'a..b' = ['10.0.0.1'] }", "upstream.domains"),
        ("[upstream]\ndomains = { 'corp.example' = ['127.0.0.1:5353'] }", "upstream.domains.corp.example"),
        ("[upstream]\ntrust_ad = 'yes'", "upstream.trust_ad"),
        ("[cache]\nserve_stale = 1", "cache.serve_stale"),
        ("[cache]\nstale_ttl = 0", "cache.stale_ttl"),
        ("[cache]\nstale_max_age = 0", "cache.stale_max_age"),
        ("[local]\nddr = 'no'", "local.ddr"),
        ("[local]\nhealthcheck = 'a..b'", "local.healthcheck"),
    ],
)
def test_bad_config_names_the_key(text: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config_text(text)
    assert str(caught.value).startswith(key), str(caught.value)
    assert "\n" not in str(caught.value)
    assert caught.value.errors == (caught.value,)  # one error alone is raised as itself, once


SEVERAL = """\
[dns]
listen = ["127.0.0.1:5353", "localhost:53", "[::1"]
rate_limit_slip = 99

[cache]
stale_ttl = 0
colour = "blue"

[gate]
mode = "refused"

[portl]
x = 1

[[lists.sources]]
id = "a"
url = "ftp://x"
category = "m"

[[lists.sources]]
id = "B"
file = "b.txt"
category = "m"
"""


def test_independent_errors_are_raised_together(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(SEVERAL)
    with pytest.raises(ConfigErrors) as caught:
        load_config(str(path), Overrides())
    messages = [str(e) for e in caught.value.errors]
    assert [m.split(":", 1)[0] for m in messages] == [
        "cache.colour", "gate.mode", "portl", "dns.listen", "dns.listen", "dns.rate_limit_slip", "cache.stale_ttl",
        "lists.sources[0].url", "lists.sources[1].id"], messages
    assert "'localhost'" in messages[3] and "missing ']'" in messages[4]
    assert str(caught.value) == "; ".join(messages)  # one line for a log
    assert isinstance(caught.value, ConfigError)  # what every caller catches
    same = pickle.loads(pickle.dumps(caught.value))
    assert [str(e) for e in same.errors] == messages


@pytest.mark.parametrize(("text", "messages"), [
    # a refused value keeps its default; a check comparing another key with it is not reported
    ("[upstream]\ntimeout = 'slow'\nattempt_timeout = 5.0\n", ["upstream.timeout: expected a number"]),
    ("[consent]\nmax_days = 'x'\ndefault_days = 400\n", ["consent.max_days: expected an integer"]),
    ("[consent]\ndefault_days = 'x'\nmax_days = 100\nopt_out_days = 30\n",
     ["consent.default_days: expected an integer"]),
    # nor one comparing with a key that fails its own check
    ("[api]\nmax_connections = 0\nmax_connections_per_client = 16\n", ["api.max_connections: must be >= 1"]),
    ("[dns]\nudp_max_size = 'big'\nrate_limit = -1\n",
     ["dns.udp_max_size: expected an integer", "dns.rate_limit: must be >= 0"]),
    # the loop check runs against the listen addresses that are good
    ("[dns]\nlisten = ['127.0.0.1:5300', 'nas:53']\n[upstream]\nservers = ['127.0.0.1:5300', 'x.y:53']\n",
     ["dns.listen: dnsgate listens on an IP address", "upstream.servers: 127.0.0.1:5300 is dnsgate's own",
      "upstream.servers: not an IP address: 'x.y'"]),
])
def test_what_an_error_leaves_checked(text: str, messages: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config_text(text)
    found = [str(e) for e in caught.value.errors]
    assert len(found) == len(messages) and all(f.startswith(m) for f, m in zip(found, messages, strict=True)), found


def test_every_bad_variable_and_flag_is_named() -> None:
    env = {"DNSGATE_CACHE_MAX_TTL": "soon", "DNSGATE_DNS_UDP_MAX_SIZ": "1", "DNSGATE_GATE_MODE": "refused"}
    _, overrides = overrides_from_env(env)  # read without raising: the errors travel to load_config
    assert overrides.refused == ("cache.max_ttl", "gate.mode")
    with pytest.raises(ConfigErrors) as caught:
        load_config(None, overrides)
    assert [str(e).split(":", 1)[0] for e in caught.value.errors] == [
        "DNSGATE_CACHE_MAX_TTL", "DNSGATE_DNS_UDP_MAX_SIZ", "DNSGATE_GATE_MODE"]
    with pytest.raises(ConfigErrors) as caught:  # the variables' and the flags' together
        load_config(None, merge_overrides(overrides, Overrides(workers="two")))
    assert [str(e).split(":", 1)[0] for e in caught.value.errors] == [
        "DNSGATE_CACHE_MAX_TTL", "DNSGATE_DNS_UDP_MAX_SIZ", "DNSGATE_GATE_MODE", "dns.workers"]
    with pytest.raises(ConfigErrors) as caught:
        load_config(None, Overrides(log_level="loud", workers="two", store="bogus"))
    assert [str(e).split(":", 1)[0] for e in caught.value.errors] == ["log.level", "dns.workers", "storage.store"]


@pytest.mark.parametrize(
    ("text", "default", "expected"),
    [
        ("127.0.0.1:53", None, HostPort("127.0.0.1", 53)),
        ("[::1]:5353", None, HostPort("::1", 5353)),
        ("10.0.0.1", 53, HostPort("10.0.0.1", 53)),
        ("2001:db8::1", 53, HostPort("2001:db8::1", 53)),
        ("[2001:db8::1]", 53, HostPort("2001:db8::1", 53)),
        ("[2001:db8::1]:5300", 53, HostPort("2001:db8::1", 5300)),
    ],
)
def test_host_port(text: str, default: int | None, expected: HostPort) -> None:
    assert parse_host_port(text, default_port=default) == expected


def test_host_port_str_round_trips() -> None:
    for hp in (HostPort("127.0.0.1", 53), HostPort("::1", 5353)):
        assert parse_host_port(str(hp)) == hp


def test_layering_defaults_file_env_flags(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[api]\nlisten = "127.0.0.1:9000"\n[storage]\ndata_dir = "/from/file"\n')
    env_path, env = overrides_from_env({"DNSGATE_DATA_DIR": "/from/env", "DNSGATE_DNS": "127.0.0.1:1, [::1]:2",
                                        "DNSGATE_ADMIN_TOKEN": "t0k"})
    assert env_path is None
    cfg = load_config(str(path), merge_overrides(env, Overrides(upstream=("192.0.2.1",))))
    assert cfg.api.listen == "127.0.0.1:9000"  # file
    assert cfg.storage.data_dir == "/from/env"  # env beats file
    assert cfg.dns.listen == ("127.0.0.1:1", "[::1]:2")
    assert cfg.api.admin_token == "t0k"
    assert cfg.upstream.servers == ("192.0.2.1",)  # flag
    cfg2 = load_config(str(path), merge_overrides(env, Overrides(data_dir="/from/flag")))
    assert cfg2.storage.data_dir == "/from/flag"  # flag beats env


def test_profile_networks_parse_from_a_table() -> None:
    cfg = parse_config_text('[profiles]\nnetworks = { "10.0.5.0/24" = "kiosk", "2001:db8::/32" = "opt-out" }')
    assert cfg.profiles.networks == (("10.0.5.0/24", "kiosk"), ("2001:db8::/32", "opt-out"))


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--config: cannot read"):
        load_config(str(tmp_path / "nope.toml"), Overrides())


def test_bad_override_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"^dns\.listen"):
        load_config(None, Overrides(dns=("localhost:53",)))


@pytest.mark.parametrize(("text", "expected"), [
    ("9.9.9.9", UpstreamAddress("9.9.9.9", 53)),
    ("udp://9.9.9.9:5353", UpstreamAddress("9.9.9.9", 5353)),
    ("tcp://[2001:DB8::0001]", UpstreamAddress("2001:db8::1", 53, "tcp")),
    ("TLS://1.1.1.1#Cloudflare-DNS.com.", UpstreamAddress("1.1.1.1", 853, "tls", "cloudflare-dns.com")),
    ("tls://[2620:fe::fe]:8853", UpstreamAddress("2620:fe::fe", 8853, "tls")),
])
def test_upstream_addresses(text: str, expected: UpstreamAddress) -> None:
    assert parse_upstream(text) == expected
    assert parse_upstream(str(expected)) == expected


def test_conditional_domains_table() -> None:
    cfg = parse_config_text('[upstream]\ndomains = { "corp.example" = ["10.0.0.53", "tls://10.0.0.54#dns.corp"], '
                            '"168.192.in-addr.arpa" = "10.0.0.53" }')
    assert cfg.upstream_domains == (
        ("168.192.in-addr.arpa", (UpstreamAddress("10.0.0.53", 53),)),
        ("corp.example", (UpstreamAddress("10.0.0.53", 53), UpstreamAddress("10.0.0.54", 853, "tls", "dns.corp"))),
    )


def test_resolv_conf() -> None:
    text = "# comment\nnameserver 10.0.0.1\nnameserver fe80::1%eth0\nnameserver 2001:db8::53 # v6\nsearch x\n"
    assert resolv_conf_servers(text) == ("10.0.0.1", "[2001:db8::53]")


def test_log_settings_from_env_and_flags() -> None:
    _, env = overrides_from_env({"DNSGATE_LOG_LEVEL": "DEBUG", "DNSGATE_LOG_FORMAT": "json"})
    cfg = load_config(None, env)
    assert (cfg.log.level, cfg.log.format) == ("debug", "json")
    cfg = load_config(None, merge_overrides(env, Overrides(log_format="text")))
    assert (cfg.log.level, cfg.log.format) == ("debug", "text")
    with pytest.raises(ConfigError, match=r"^log\.level"):
        load_config(None, Overrides(log_level="loud"))


def test_workers_from_env_and_flags() -> None:
    _, env = overrides_from_env({"DNSGATE_WORKERS": " 3 "})
    assert load_config(None, env).dns.workers == 3
    assert load_config(None, merge_overrides(env, Overrides(workers="2"))).dns.workers == 2
    assert load_config(None, Overrides()).dns.workers == 1
    with pytest.raises(ConfigError, match=r"^dns\.workers: expected a whole number, got 'four'"):
        load_config(None, Overrides(workers="four"))
    with pytest.raises(ConfigError, match=r"^dns\.workers: must be 1\.\.64, got 0"):
        load_config(None, Overrides(workers="0"))


@pytest.mark.parametrize(("text", "expected"), [
    ("192.0.2.1", True), ("2001:db8::1", True), ("fe80::1%eth0", True), ("::ffff:192.0.2.1", True),
    ("nas.home", False), ("[::1]", False), ("192.0.2", False), ("192.0.2.1:53", False), ("", False),
])
def test_is_ip(text: str, expected: bool) -> None:
    # the one test of "an address, not a host name" that api.hosts, upstream.bootstrap and the commands' --api use
    assert is_ip(text) is expected
