"""The vendor catalog: what is gated, what is not, and what a person is told."""

from __future__ import annotations

from pathlib import Path

import pytest

from dnsgate.rules.catalog import Catalog, CatalogError, builtin_catalog_text, parse_catalog_text
from dnsgate.wire import name_to_wire

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return parse_catalog_text(builtin_catalog_text())


def vendor_of(catalog: Catalog, name: str) -> str | None:
    rule = catalog.match(name_to_wire(name))
    return None if rule is None else rule.vendor.id


@pytest.mark.parametrize(
    "name",
    [
        "trackcmp.net", "TrackCmp.NET.", "x.trackcmp.net", "a.b.c.trackcmp.net",
        "app-us1.com", "prism.app-us1.com", "diffuser-cdn.app-us1.com", "PRISM.App-US1.com.",
        "acct.api-us1.com", "a.b.api-us1.com",
    ],
)
def test_gated_names(catalog: Catalog, name: str) -> None:
    assert vendor_of(catalog, name) == "activecampaign"


@pytest.mark.parametrize(
    "name",
    [
        "api-us1.com",  # the REST API pattern covers subdomains only
        "nottrackcmp.net", "trackcmp.net.example.com", "trackcmp.network", "xtrackcmp.net",
        "api-us1.com.evil.test", "evilapi-us1.com", "app-us1.co", "example.com", "net", ".",
    ],
)
def test_names_not_gated(catalog: Catalog, name: str) -> None:
    assert vendor_of(catalog, name) is None


def test_builtin_catalog_is_the_config_file() -> None:
    assert builtin_catalog_text() == (ROOT / "config" / "vendors.toml").read_text()


def test_activecampaign_facts(catalog: Catalog) -> None:
    vendor = catalog.vendor("activecampaign")
    assert vendor is not None
    assert vendor.category == "marketing"
    assert vendor.tcf_purposes == (1, 3, 4, 7)
    assert {c.name: c.duration for c in vendor.cookies} == {
        "ac_enable_tracking": "1 year", "<account>_contact_id": "1 year", "<account>_hash": "1 year",
        "trackcmp_email": "session",
    }
    assert any("IP address" in d for d in vendor.data_collected)
    assert "USA" in vendor.recipients
    patterns = {d.pattern: d for d in catalog.domains_of(vendor)}
    assert set(patterns) == {"trackcmp.net", "app-us1.com", "*.api-us1.com"}
    assert all(d.serves and d.source for d in patterns.values())


def test_a_deployment_can_switch_one_domain_off(catalog: Catalog) -> None:
    office = catalog.without(["*.api-us1.com"])
    assert office.match(name_to_wire("acct.api-us1.com")) is None
    assert office.match(name_to_wire("trackcmp.net")) is not None
    with pytest.raises(CatalogError, match=r"gate.disabled_domains: api-us1.com not in the catalog"):
        catalog.without(["api-us1.com"])


def test_memo_stays_bounded(catalog: Catalog) -> None:
    from dnsgate.rules import catalog as module

    fresh = parse_catalog_text(builtin_catalog_text())
    for i in range(module.MEMO_LIMIT + 10):
        fresh.match(name_to_wire(f"n{i}.example.com"))
    assert len(fresh.memo) <= module.MEMO_LIMIT
    assert fresh.match(name_to_wire("x.trackcmp.net")) is not None


MINIMAL = """
version = "1"
[[category]]
id = "marketing"
name = "Marketing"
[[vendor]]
id = "v"
name = "V"
category = "marketing"
[[vendor.domain]]
pattern = "v.example"
"""


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('category = "marketing"', 'category = "ads"'), "vendor 'v'.category: 'ads' is not a defined category"),
        (('pattern = "v.example"', 'pattern = "*.*.v.example"'), "vendor 'v'.domain[0].pattern"),
        (('pattern = "v.example"', 'pattern = 5'), "vendor 'v'.domain[0].pattern: expected str"),
        (('name = "V"', 'name = ["V"]'), "vendor 'v'.name: expected str"),
        (('version = "1"', ''), "missing key 'version'"),
        (('[[vendor.domain]]\npattern = "v.example"', ''), "vendor 'v': missing key 'domain'"),
        (('id = "v"', 'id = "v"\ntcf_purposes = [0]'), "vendor 'v'.tcf_purposes"),
    ],
)
def test_catalog_errors_name_vendor_and_key(change: tuple[str, str], message: str) -> None:
    assert parse_catalog_text(MINIMAL).match(name_to_wire("a.v.example")) is not None
    with pytest.raises(CatalogError) as caught:
        parse_catalog_text(MINIMAL.replace(*change), "test.toml")
    assert message in str(caught.value)
    assert str(caught.value).startswith("test.toml")


# -- the catalog in other languages -----------------------------------------------------------------

TRANSLATED = MINIMAL.replace('name = "Marketing"\n', '''name = "Marketing"
description = "Ads."
[category.text.de]
name = "Werbung"
description = "Anzeigen."
''').replace('category = "marketing"\n', '''category = "marketing"
summary = "Tracks you."
recipients = "V, Inc."
data_collected = ["Pages", "Clicks"]
[[vendor.cookie]]
name = "vid"
duration = "1 year"
purpose = "Identifies you."
[[vendor.cookie]]
name = "vsession"
duration = "session"
[vendor.text.de]
summary = "Verfolgt Sie."
data_collected = ["Seiten", "Klicks"]
[vendor.text.de.cookie.vid]
duration = "1 Jahr"
purpose = "Erkennt Sie wieder."
[vendor.text.de.domain]
"v.example" = "Das Skript."
''')


def test_a_translation_shows_each_fact_in_its_language_and_the_catalogs_own_where_it_has_none() -> None:
    catalog = parse_catalog_text(TRANSLATED, "test.toml")
    (vendor,), (category,) = catalog.vendors, catalog.categories
    assert vendor.languages == ("de",) and category.languages == ("de",)
    german = vendor.in_language("de")
    assert (german.summary, german.recipients, german.data_collected) == ("Verfolgt Sie.", "V, Inc.",
                                                                          ("Seiten", "Klicks"))
    assert [(c.name, c.duration, c.purpose) for c in german.cookies] == [
        ("vid", "1 Jahr", "Erkennt Sie wieder."), ("vsession", "session", "")]
    assert vendor.serves_in("de", catalog.domains_of(vendor)[0]) == "Das Skript."
    assert vendor.serves_in("fr", catalog.domains_of(vendor)[0]) == ""
    assert (category.in_language("de").name, category.in_language("de").description) == ("Werbung", "Anzeigen.")
    for other in ("en", "fr"):  # no translation: the catalog's own words
        assert vendor.in_language(other) is vendor and category.in_language(other) is category
    # the gate is the vendor itself, whatever language it is shown in
    assert catalog.match(name_to_wire("v.example")).vendor is vendor  # type: ignore[union-attr]


def test_the_builtin_catalog_speaks_german() -> None:
    catalog = parse_catalog_text(builtin_catalog_text())
    for category in catalog.categories:
        assert "de" in category.languages and category.in_language("de").description != category.description
    vendor = catalog.vendor("activecampaign")
    assert vendor is not None and vendor.languages == ("de",)
    german = vendor.in_language("de")
    assert german.summary != vendor.summary and german.recipients != vendor.recipients
    assert len(german.data_collected) == len(vendor.data_collected)
    assert all(g.purpose != e.purpose for g, e in zip(german.cookies, vendor.cookies, strict=True))
    assert all(vendor.serves_in("de", d) for d in catalog.domains_of(vendor))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("[vendor.text.de]", "[vendor.text.DE]"), "vendor 'v'.text.DE: not a language tag"),
        (("[vendor.text.de]", "[vendor.text.english]"), "vendor 'v'.text.english: not a language tag"),
        (('summary = "Verfolgt Sie."', 'summery = "Verfolgt Sie."'), "vendor 'v'.text.de.summery: unknown key"),
        (('summary = "Verfolgt Sie."', 'summary = 1'), "vendor 'v'.text.de.summary: expected str"),
        (('data_collected = ["Seiten", "Klicks"]', 'data_collected = "Seiten"'),
         "vendor 'v'.text.de.data_collected: expected list"),
        (("[vendor.text.de.cookie.vid]", "[vendor.text.de.cookie.uid]"),
         "vendor 'v'.text.de.cookie.uid: the vendor has no cookie 'uid'"),
        (('duration = "1 Jahr"', 'lifetime = "1 Jahr"'), "vendor 'v'.text.de.cookie.vid.lifetime: unknown key"),
        (('"v.example" = "Das Skript."', '"w.example" = "Das Skript."'),
         "vendor 'v'.text.de.domain.w.example: the vendor has no domain 'w.example'"),
        (('name = "Werbung"', 'title = "Werbung"'), "category 'marketing'.text.de.title: unknown key"),
        (("[category.text.de]", "[category.text.x]"), "category 'marketing'.text.x: not a language tag"),
    ],
)
def test_translation_errors_name_the_file_the_item_and_the_key(change: tuple[str, str], message: str) -> None:
    assert change[0] in TRANSLATED
    with pytest.raises(CatalogError) as caught:
        parse_catalog_text(TRANSLATED.replace(*change), "test.toml")
    assert message in str(caught.value)
    assert str(caught.value).startswith("test.toml")
