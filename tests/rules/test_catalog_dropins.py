"""Catalog drop-ins, switching vendors off, and vendor IP ranges."""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from pathlib import Path

import pytest

from dnsgate.config import Config, GateConfig
from dnsgate.rules.catalog import Catalog, CatalogError, builtin_catalog_text, parse_catalog_files
from dnsgate.rules.ruleset import read_catalog
from dnsgate.wire import name_to_wire

BASE = ("vendors.toml", builtin_catalog_text())

ADS = """
version = "3"

[[category]]
id = "ads"
name = "Advertising"

[[vendor]]
id = "adco"
name = "AdCo"
category = "ads"
ip_ranges = ["203.0.113.0/25", "2001:db8:ad::/48"]

[[vendor.domain]]
pattern = "adco.example"

[[vendor]]
id = "metrics"
name = "Metrics Inc"
category = "analytics"

[[vendor.domain]]
pattern = "*.metrics.example"
"""


def vendor_of(catalog: Catalog, name: str) -> str | None:
    rule = catalog.match(name_to_wire(name))
    return None if rule is None else rule.vendor.id


def test_a_dropin_adds_categories_and_vendors() -> None:
    catalog = parse_catalog_files(BASE, [("vendors.d/ads.toml", ADS)])
    assert [v.id for v in catalog.vendors] == ["activecampaign", "adco", "metrics"]
    assert {c.id for c in catalog.categories} == {"marketing", "analytics", "ads"}
    assert vendor_of(catalog, "x.adco.example") == "adco"
    assert vendor_of(catalog, "a.metrics.example") == "metrics" and vendor_of(catalog, "metrics.example") is None
    assert vendor_of(catalog, "trackcmp.net") == "activecampaign"
    assert catalog.version == "2026-11-28+ads.toml:3"


@pytest.mark.parametrize(
    ("dropin", "message"),
    [
        (ADS.replace('pattern = "adco.example"', 'pattern = "trackcmp.net"'),
         "vendors.d/ads.toml: vendor 'adco'.domain[0].pattern: 'trackcmp.net' is already listed by "
         "'activecampaign' (vendors.toml)"),
        (ADS.replace('id = "adco"', 'id = "activecampaign"'),
         "vendors.d/ads.toml: vendor 'activecampaign': duplicate vendor id (already defined in vendors.toml)"),
        (ADS.replace('category = "ads"', 'category = "sales"'),
         "vendors.d/ads.toml: vendor 'adco'.category: 'sales' is not a defined category"),
        (ADS.replace('id = "ads"', 'id = "marketing"'),
         "vendors.d/ads.toml: category 'marketing': already defined in vendors.toml"),
        (ADS.replace('name = "AdCo"', 'name = "AdCo"\ncategroy = "ads"'),
         "vendors.d/ads.toml: vendor[0].categroy: unknown key"),
        (ADS.replace('pattern = "adco.example"', 'pattern = "adco.example"\nserve = "x"'),
         "vendors.d/ads.toml: vendor 'adco'.domain[0].serve: unknown key"),
        (ADS.replace('"203.0.113.0/25"', '"203.0.113.1/25"'),
         "vendors.d/ads.toml: vendor 'adco'.ip_ranges[0]: 203.0.113.1/25 has host bits set"),
        (ADS.replace('"2001:db8:ad::/48"', '"203.0.113.64/26"'),
         "vendors.d/ads.toml: vendor 'adco'.ip_ranges: 203.0.113.64/26 overlaps 203.0.113.0/25 of 'adco'"),
        ("version = [", "vendors.d/ads.toml: not valid TOML"),
    ],
)
def test_dropin_errors_name_file_vendor_and_key(dropin: str, message: str) -> None:
    with pytest.raises(CatalogError) as caught:
        parse_catalog_files(BASE, [("vendors.d/ads.toml", dropin)])
    assert message in str(caught.value), str(caught.value)


def test_a_vendor_or_a_domain_can_be_switched_off() -> None:
    catalog = parse_catalog_files(BASE, [("ads.toml", ADS)])
    office = catalog.without_vendors(["activecampaign"]).without(["*.metrics.example"])
    assert [v.id for v in office.vendors] == ["adco", "metrics"]  # metrics is left without domains
    assert vendor_of(office, "trackcmp.net") is None and vendor_of(office, "a.metrics.example") is None
    assert vendor_of(office, "adco.example") == "adco"
    with pytest.raises(CatalogError, match=r"^gate.disabled_vendors: nobody not in the catalog \(known: "):
        catalog.without_vendors(["nobody"])


def test_address_ranges() -> None:
    catalog = parse_catalog_files(BASE, [("ads.toml", ADS)])
    assert catalog.checks_addresses

    def owner(address: str) -> str | None:
        rule = catalog.address_rule(ipaddress.ip_address(address).packed)
        return None if rule is None else f"{rule.vendor.id} {rule.pattern} {rule.via}"

    assert owner("203.0.113.0") == owner("203.0.113.127") == "adco 203.0.113.0/25 address"
    assert owner("203.0.113.128") is None and owner("203.0.112.255") is None
    assert owner("2001:db8:ad:ffff::1") == "adco 2001:db8:ad::/48 address"
    assert owner("2001:db8:ae::1") is None
    assert not parse_catalog_files(BASE).checks_addresses


def test_cloaked_variants_are_built_once_per_rule() -> None:
    catalog = parse_catalog_files(BASE)
    rule = catalog.match(name_to_wire("x.trackcmp.net"))
    assert rule is not None
    cloaked = catalog.cloaked(rule)
    assert cloaked is catalog.cloaked(rule) and cloaked.vendor is rule.vendor
    assert cloaked.via == "cname" and cloaked.apex == b"" and rule.apex == name_to_wire("trackcmp.net")


def test_read_catalog_from_a_directory(tmp_path: Path) -> None:
    dropins = tmp_path / "vendors.d"
    dropins.mkdir()
    (dropins / "10-ads.toml").write_text(ADS)
    (dropins / "20-more.toml").write_text('[[vendor]]\nid = "late"\nname = "Late"\ncategory = "ads"\n'
                                          '[[vendor.domain]]\npattern = "late.example"\n')
    (dropins / "README.md").write_text("not a drop-in")
    cfg = replace(Config(), gate=replace(GateConfig(), vendors_dir=str(dropins), disabled_vendors=("metrics",)))
    catalog = read_catalog(cfg)
    assert [v.id for v in catalog.vendors] == ["activecampaign", "adco", "late"]
    with pytest.raises(CatalogError, match=r"gate.vendors_dir: .* is not a directory"):
        read_catalog(replace(cfg, gate=replace(cfg.gate, vendors_dir=str(tmp_path / "nope"))))
    (dropins / "30-bad.toml").write_text('[[vendor]]\nid = "bad"\nname = "Bad"\ncategory = "ads"\n')
    with pytest.raises(CatalogError, match=r"30-bad.toml: vendor 'bad': missing key 'domain'"):
        read_catalog(cfg)


def test_the_shipped_example_dropin_is_valid() -> None:
    sample = Path(__file__).resolve().parents[2] / "config" / "vendors.d" / "example.toml.sample"
    catalog = parse_catalog_files(BASE, [("example.toml", sample.read_text())])
    assert vendor_of(catalog, "x.ads.example") == "example-ads"
    assert catalog.address_rule(ipaddress.ip_address("192.0.2.5").packed) is not None
