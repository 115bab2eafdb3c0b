"""Configuration of lists, drop-ins and reload: every bad value names its key."""

from __future__ import annotations

from dataclasses import replace

import pytest

from dnsgate.config import Config, ConfigError, GateConfig, ListsConfig, ListSource, parse_config_text
from dnsgate.rules.reload import split_changes

SOURCE = '[[lists.sources]]\nid = "ep"\ncategory = "analytics"\nurl = "https://lists.example/ep.txt"\n'


def test_a_list_source_parses() -> None:
    cfg = parse_config_text(SOURCE + '[[lists.sources]]\nid = "ok"\nkind = "allow"\nfile = "/etc/ok.txt"\n'
                            'subdomains = true\n')
    assert cfg.lists.sources == (
        ListSource(id="ep", category="analytics", url="https://lists.example/ep.txt"),
        ListSource(id="ok", kind="allow", file="/etc/ok.txt", subdomains=True),
    )


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (SOURCE.replace('id = "ep"', 'id = "EP list"'), "lists.sources[0].id"),
        (SOURCE + SOURCE, "lists.sources[1].id"),
        (SOURCE.replace('category = "analytics"\n', ""), "lists.sources[0].category"),
        (SOURCE.replace('url = "https', 'url = "ftp'), "lists.sources[0].url"),
        (SOURCE + 'file = "/x"\n', "lists.sources[0]"),
        (SOURCE.replace('url = "https://lists.example/ep.txt"\n', ""), "lists.sources[0]"),
        (SOURCE + 'catgory = "x"\n', "lists.sources[0].catgory"),
        (SOURCE + 'kind = "deny"\n', "lists.sources[0].kind"),
        (SOURCE + 'kind = "allow"\n', "lists.sources[0].category"),
        (SOURCE + "subdomains = 1\n", "lists.sources[0].subdomains"),
        ("[lists]\nsources = 'x'", "lists.sources"),
        ("[lists]\nallow = ['*.*.x.com']", "lists.allow"),
        ("[lists]\nallow = ['bad..name']", "lists.allow"),
        ("[lists]\nrefresh_interval = -1", "lists.refresh_interval"),
        ("[lists]\nfetch_timeout = 0", "lists.fetch_timeout"),
        ("[lists]\nmax_download_bytes = 10", "lists.max_download_bytes"),
        ("[gate]\ndisabled_vendors = 'activecampaign'\nvendors_dir = 5", "gate.vendors_dir"),
    ],
)
def test_bad_list_config_names_the_key(text: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config_text(text)
    assert str(caught.value).startswith(key), str(caught.value)


def test_split_changes_applies_live_sections_and_keeps_the_rest() -> None:
    running = Config()
    new = replace(running, gate=replace(GateConfig(), sinkhole_ttl=9),
                  lists=ListsConfig(allow=("ok.example",)),
                  dns=replace(running.dns, listen=("127.0.0.1:53",)),
                  consent=replace(running.consent, default_days=30))
    effective, applied, restart = split_changes(running, new)
    assert applied == ("gate.sinkhole_ttl", "lists.allow")
    assert restart == ("dns.listen", "consent.default_days")
    assert effective.gate.sinkhole_ttl == 9 and effective.lists.allow == ("ok.example",)
    assert effective.dns == running.dns and effective.consent == running.consent
    assert split_changes(running, running) == (running, (), ())
