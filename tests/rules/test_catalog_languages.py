"""The catalog's facts in the portal's second language, over real sockets: the API and the notice
give them per language, a choice records the fingerprint of the item as shown in its language, and
a change of a translation (or of the catalog's own words) is a change for exactly the readers it
reaches. The browser side (JavaScript on and off) is in tests/browser/test_portal.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dns.rcode

from dnsgate.config import Config
from dnsgate.consent.notice import Operator, builtin_notice_text, notice_in_force, parse_notice_text
from dnsgate.rules.catalog import builtin_catalog_text, parse_catalog_text
from tests.conftest import Gate, make_config, running_gate
from tests.support.consent_fixtures import consent_config, parse_jsonl
from tests.support.stub_upstream import StubUpstream

TRACKER = "trackcmp.net"
GERMAN_SUMMARY = "ActiveCampaign ist eine CRM- und Marketing-Automatisierungsplattform."
ENGLISH_SUMMARY = "ActiveCampaign is a CRM and marketing-automation platform."


async def choose(g: Gate, source: str, language: str) -> dict[str, Any]:
    """Accept marketing as the portal does: with the notice shown in `language`."""
    _, notice = await g.http("GET", "/v1/notice")
    body = {"categories": ["marketing"], "language": language, "channel": "portal",
            "notice": {"version": notice["version"], "sha256": notice["languages"][language]["sha256"]}}
    status, view = await g.http("PUT", "/v1/consent", source=source, json=body)
    assert status == 200, view
    return dict(view)


async def rcode(g: Gate, source: str) -> int:
    return (await g.query(TRACKER, source=source)).rcode()


def gate_config(upstream: StubUpstream, data_dir: Path, catalog: Path) -> Config:
    return consent_config(make_config(upstream, data_dir), catalog=catalog)


async def test_the_api_and_the_notice_give_the_facts_per_language(upstream: StubUpstream, data_dir: Path) -> None:
    async with running_gate(consent_config(make_config(upstream, data_dir))) as g:
        _, english = await g.http("GET", "/v1/vendors")
        status, german = await g.http("GET", "/v1/vendors?lang=de")
        assert status == 200 and (english["language"], german["language"]) == ("en", "de")
        (ac_en,), (ac_de,) = english["vendors"], german["vendors"]
        assert ac_en["summary"].startswith(ENGLISH_SUMMARY) and ac_de["summary"].startswith(GERMAN_SUMMARY)
        assert ac_de["cookies"][0] == {"name": "ac_enable_tracking", "duration": "1 Jahr",
                                       "purpose": "Merkt sich, ob das Site-Tracking für diesen Browser eingeschaltet "
                                                  "ist."}
        assert ac_de["domains"][0]["serves"].startswith("Das ältere Tracking-Snippet")
        assert [c["name"] for c in german["categories"]] == ["Marketing", "Analyse"]
        assert ac_de["name"] == ac_en["name"] and ac_de["domains"][0]["pattern"] == "trackcmp.net"
        assert (await g.http("GET", "/v1/vendors?lang=fr"))[1]["vendors"] == english["vendors"]  # not translated
        assert (await g.http("GET", "/v1/vendors?lang=DE!"))[0] == 400

        _, notice = await g.http("GET", "/v1/notice")
        assert [c["name"] for c in notice["languages"]["de"]["categories"]] == ["Marketing", "Analyse"]
        assert [c["name"] for c in notice["languages"]["en"]["categories"]] == ["Marketing", "Analytics"]
        (item,) = notice["items"]
        assert set(item["fingerprints"]) == {"de"} and item["fingerprints"]["de"] != item["fingerprint"]


async def test_a_choice_records_what_its_language_showed(upstream: StubUpstream, data_dir: Path,
                                                         tmp_path: Path) -> None:
    catalog = tmp_path / "vendors.toml"
    catalog.write_text(builtin_catalog_text(), encoding="utf-8")
    cfg = gate_config(upstream, data_dir, catalog)
    reader_de, reader_en = "127.0.0.31", "127.0.0.32"
    async with running_gate(cfg, lambda: cfg) as g:
        _, notice = await g.http("GET", "/v1/notice")
        (item,) = notice["items"]
        german = await choose(g, reader_de, "de")
        english = await choose(g, reader_en, "en")
        assert german["choice"]["covers"] == [{"kind": "vendor", "id": "activecampaign",
                                               "fingerprint": item["fingerprints"]["de"]}]
        assert english["choice"]["covers"][0]["fingerprint"] == item["fingerprint"]
        status, text = await g.http("GET", "/v1/audit/export?format=jsonl", admin=True)
        covers = {e["address"]: e["covers"] for e in parse_jsonl(text)}
        assert covers == {reader_de: {"vendor:activecampaign": item["fingerprints"]["de"]},
                          reader_en: {"vendor:activecampaign": item["fingerprint"]}}
        assert await rcode(g, reader_de) == await rcode(g, reader_en) == dns.rcode.NOERROR

        # The German summary changes: the German reader was shown something else, the English one not.
        catalog.write_text(catalog.read_text(encoding="utf-8").replace(
            "ActiveCampaign ist eine CRM-", "ActiveCampaign ist eine Werbe-, CRM-", 1), encoding="utf-8")
        status, report = await g.http("POST", "/v1/reload", admin=True)
        assert status == 200 and report["changed"] == ["vendor activecampaign described differently"]
        assert await rcode(g, reader_de) == dns.rcode.NXDOMAIN
        _, state = await g.http("GET", "/v1/consent", source=reader_de)
        assert [i["id"] for i in state["new"]] == ["activecampaign"]
        assert await rcode(g, reader_en) == dns.rcode.NOERROR
        assert (await g.http("GET", "/v1/consent", source=reader_en))[1]["new"] == []
        await choose(g, reader_de, "de")
        assert await rcode(g, reader_de) == dns.rcode.NOERROR

        # The catalog's own words change: a change for every reader, translated or not.
        catalog.write_text(catalog.read_text(encoding="utf-8").replace(
            '"Session start and end times",', '"Session start and end times",\n    "Mouse movements",', 1),
            encoding="utf-8")
        assert (await g.http("POST", "/v1/reload", admin=True))[0] == 200
        assert await rcode(g, reader_de) == await rcode(g, reader_en) == dns.rcode.NXDOMAIN

        # A translation that does not validate changes nothing, and says where it is wrong.
        catalog.write_text(catalog.read_text(encoding="utf-8").replace(
            "[vendor.text.de.cookie.ac_enable_tracking]", "[vendor.text.de.cookie.ac_enable]", 1), encoding="utf-8")
        status, body = await g.http("POST", "/v1/reload", admin=True)
        assert status == 422
        assert body["error"]["message"].startswith(
            f"{catalog}: vendor 'activecampaign'.text.de.cookie.ac_enable: the vendor has no cookie 'ac_enable'")


UNTRANSLATED = """
version = "1"
[[category]]
id = "marketing"
name = "Marketing"
description = "Ads."
[[vendor]]
id = "v"
name = "V"
category = "marketing"
summary = "Tracks you."
[[vendor.cookie]]
name = "vid"
duration = "1 year"
purpose = "Identifies you."
[[vendor.domain]]
pattern = "v.example"
"""


def test_a_catalog_without_translations_keeps_its_notice_and_fingerprints() -> None:
    # The values the release before translations computed for this catalog: choices recorded then
    # keep their notice and their items.
    shown = notice_in_force(parse_notice_text(builtin_notice_text()), Operator("Café", "c@cafe.test"),
                            parse_catalog_text(UNTRANSLATED))
    assert shown.version == "2026-12-01+80596a779e12"
    assert shown.hashes == {"en": "e87b2c0f643f2ac6ccb57397aecb8d02b9e440b12243e018e348bdedd51e42b2",
                            "de": "17d0ae9f43b5cb19e244712782e0d3f109064b6dfe362641e0d4edc208d65441"}
    assert [(i.key, i.fingerprint, dict(i.fingerprints)) for i in shown.items] == [("vendor:v", "00aadde853c205e7", {})]

    # Translated to German: the English reader's fingerprint stays, the German one covers both.
    german = UNTRANSLATED.replace('pattern = "v.example"',
                                  'pattern = "v.example"\n[vendor.text.de]\nsummary = "Folgt Ihnen."')
    translated = notice_in_force(parse_notice_text(builtin_notice_text()), Operator("Café", "c@cafe.test"),
                                 parse_catalog_text(german))
    (item,) = translated.items
    assert item.fingerprint == "00aadde853c205e7" and item.fingerprint_in("en") == "00aadde853c205e7"
    assert set(item.fingerprints) == {"de"} and item.fingerprint_in("de") != item.fingerprint
    assert translated.version != shown.version
    current = translated.current()
    assert current.items == {"vendor:v": item.fingerprint}
    assert current.translated == {"vendor:v": frozenset({item.fingerprint_in("de")})}
