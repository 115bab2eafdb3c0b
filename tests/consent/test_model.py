"""The consent model without sockets: decisions, profiles, identity, the table's memo, parsers."""

from __future__ import annotations

import base64
import datetime as dt
from dataclasses import FrozenInstanceError, replace

import dns.edns
import dns.message
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dnsgate.addresses import normalize_mac
from dnsgate.consent import export as consent_log
from dnsgate.consent.export import csv_header, csv_line, jsonl_line, parse_time
from dnsgate.consent.model import Choice, CurrentNotice, Profile, ProfileMap, Subject, decide
from dnsgate.consent.notice import NoticeError, builtin_notice_text, parse_notice_text, sha256_text
from dnsgate.consent.pairing import Pairings
from dnsgate.consent.records import Event
from dnsgate.dns.identity import edns_identity
from dnsgate.neighbours import parse_ip_neigh, parse_proc_arp
from dnsgate.observe import events
from tests.support.consent_fixtures import CATALOG, NOTICE, SHOWN, choice, edns_option, table

AC = CATALOG.vendors[0]
NOW = 1_700_000_000.0
OLD_NOTICE = SHOWN.__class__(CATALOG.version, "test-0", "b" * 64, "en")


# -- decide -----------------------------------------------------------------------------------


def test_vendor_refusal_beats_category_grant() -> None:
    c = choice("10.0.0.1", categories={"marketing": True}, vendors={AC.id: False})
    d = decide(AC, "opt-in", c, NOTICE)
    assert not d.allowed and "vendor activecampaign refused" in d.reason


def test_vendor_grant_opens_that_vendor_even_with_its_category_refused() -> None:
    c = choice("10.0.0.1", categories={"marketing": False}, vendors={AC.id: True})
    assert decide(AC, "opt-in", c, NOTICE).allowed


def test_refusal_is_a_choice_and_blocks_on_opt_out_networks_too() -> None:
    c = choice("10.0.0.1", categories={"marketing": False})
    assert not decide(AC, "opt-out", c, NOTICE).allowed
    assert decide(AC, "opt-out", None, NOTICE).allowed  # opt-out: allowed until the client opts out


def test_grant_under_other_terms_no_longer_counts_but_refusals_do() -> None:
    stale = choice("10.0.0.1", notice=OLD_NOTICE, terms="e" * 64)
    d = decide(AC, "opt-in", stale, NOTICE)
    assert not d.allowed and "changed since" in d.reason
    unmigrated = choice("10.0.0.1", notice=None, items=None)  # recorded before choices named their items
    assert not decide(AC, "opt-in", unmigrated, NOTICE).allowed
    refused = choice("10.0.0.1", categories={"marketing": False}, notice=OLD_NOTICE, terms="e" * 64)
    assert not decide(AC, "opt-out", refused, NOTICE).allowed


def test_a_choice_covers_exactly_its_items() -> None:
    """A grant counts for the items it named, as they were described; anything else is no choice yet."""
    granted = choice("10.0.0.1", categories={"marketing": True})
    assert decide(AC, "opt-in", granted, NOTICE).allowed
    changed = replace(NOTICE, items={**NOTICE.items, "vendor:activecampaign": "0" * 16})
    d = decide(AC, "opt-in", granted, changed)
    assert not d.allowed and not d.by_choice and "changed since" in d.reason
    later = replace(AC, id="newco")  # a marketing vendor the choice never listed
    profiles: tuple[tuple[Profile, bool], ...] = (("opt-in", False), ("opt-out", True), ("kiosk", False))
    for profile, allowed in profiles:
        d = decide(later, profile, granted, replace(NOTICE, items={**NOTICE.items, "vendor:newco": "1" * 16}))
        assert d.allowed is allowed and not d.by_choice and "no choice yet for vendor newco" in d.reason
    refused = choice("10.0.0.1", categories={"marketing": False})
    d = decide(later, "opt-out", refused, NOTICE)  # a refusal is no more general than a grant
    assert d.allowed and not d.by_choice


@pytest.mark.parametrize(("profile", "allowed"), [("deny", False), ("allow", True)])
def test_fixed_profiles_ignore_choices(profile: str, allowed: bool) -> None:
    for c in (None, choice("10.0.0.1"), choice("10.0.0.1", categories={"marketing": False})):
        assert decide(AC, profile, c, NOTICE).allowed is allowed  # type: ignore[arg-type]


def test_undecided_category_falls_back_to_the_profile() -> None:
    c = choice("10.0.0.1", categories={"analytics": True})
    assert not decide(AC, "opt-in", c, NOTICE).allowed
    assert decide(AC, "opt-out", c, NOTICE).allowed


# -- profiles and the table ---------------------------------------------------------------------


def test_profile_map_most_specific_network_wins_and_explains() -> None:
    m = ProfileMap("opt-in", [("10.0.0.0/8", "opt-out"), ("10.0.5.0/24", "kiosk"), ("2001:db8::/32", "deny")])
    assert m.of("10.0.5.9")[0] == "kiosk"
    assert m.of("10.1.0.1")[0] == "opt-out"
    assert m.of("192.0.2.1") == ("opt-in", None)
    assert m.of("2001:db8::5")[0] == "deny"
    assert "10.0.5.0/24" in m.why("10.0.5.9") and "profiles.default is opt-in" in m.why("192.0.2.1")


def test_choice_follows_the_device_and_leaves_the_address() -> None:
    t = table()
    t.set_neighbours({"10.0.0.5": "aa:aa:aa:aa:aa:01"})
    t.put(choice("10.0.0.5", mac="aa:aa:aa:aa:aa:01"))
    assert t.allows("10.0.0.5", AC, NOW)
    # DHCP: the device moved to .6, and .5 now belongs to another device
    t.set_neighbours({"10.0.0.6": "aa:aa:aa:aa:aa:01", "10.0.0.5": "bb:bb:bb:bb:bb:02"})
    assert t.allows("10.0.0.6", AC, NOW)
    assert not t.allows("10.0.0.5", AC, NOW)
    r = t.resolve("10.0.0.5", None, NOW)
    assert any("now belongs to bb:bb:bb:bb:bb:02" in n for n in r.notes)
    # the MAC unknown (a forwarder, an expired ARP entry): the address still carries the choice
    t.set_neighbours({})
    assert t.allows("10.0.0.5", AC, NOW)


def test_device_choice_beats_address_and_network_choices() -> None:
    t = table()
    t.put(choice(network="10.0.0.0/24", categories={"marketing": True}))
    t.put(choice("10.0.0.7", categories={"marketing": False}))
    assert t.allows("10.0.0.8", AC, NOW) and not t.allows("10.0.0.7", AC, NOW)
    assert not t.allows("10.0.1.8", AC, NOW)
    t.put(choice(mac="cc:cc:cc:cc:cc:03", categories={"marketing": True}))
    assert t.allows("10.0.0.7|cc:cc:cc:cc:cc:03", AC, NOW)  # a MAC from a trusted forwarder


def test_memo_holds_until_expiry_then_falls_back() -> None:
    t = table()
    t.put(choice(network="10.0.0.0/24", expires_at=NOW + 100))
    t.put(choice("10.0.0.9", categories={"marketing": False}, expires_at=NOW + 10))
    assert not t.allows("10.0.0.9", AC, NOW)
    assert t.allows("10.0.0.9", AC, NOW + 10)  # own refusal expired: the network's grant applies
    assert not t.allows("10.0.0.9", AC, NOW + 100)


def test_kiosk_session_idles_out_unless_queries_keep_it_alive() -> None:
    t = table(networks=[("10.9.0.0/24", "kiosk")], kiosk_idle=900)
    t.put(choice("10.9.0.2"))
    assert t.allows("10.9.0.2", AC, NOW)
    assert t.kiosk_seen == {"10.9.0.2": NOW}
    t.touch("10.9.0.2", NOW + 600)
    assert t.allows("10.9.0.2", AC, NOW + 1400)  # 800 s after the last query
    t.touch("10.9.0.2", NOW + 2401)  # 1001 s idle: does not revive the session
    assert not t.allows("10.9.0.2", AC, NOW + 2401)
    assert t.kiosk_seen["10.9.0.2"] == NOW + 600


KIOSK_MAC = "02:00:00:00:00:02"


def test_a_kiosk_session_is_judged_by_all_its_identities_on_every_path() -> None:
    """The kiosk (10.9.0.2, its MAC) and the DNS source linked to it (10.8.0.5): the session is in use
    while either asks. Its own queries, a view (no key) and `last_use` (the sweeper's) agree."""
    t = table(networks=[("10.9.0.0/24", "kiosk")], kiosk_idle=900)
    t.set_neighbours({"10.9.0.2": KIOSK_MAC})
    t.put(choice("10.9.0.2", mac=KIOSK_MAC))
    t.set_seen("10.9.0.2", NOW)
    t.set_seen("10.8.0.5", NOW)
    t.set_kiosk_links({KIOSK_MAC: ("10.8.0.5",)})
    assert t.allows("10.9.0.2", AC, NOW)
    for minutes in (10, 20, 30):  # only the DNS source asks
        t.touch("10.8.0.5", NOW + minutes * 60)
    at = NOW + 40 * 60  # 40 minutes after the kiosk's own last query, 10 after its DNS source's
    assert t.last_use("10.9.0.2") == t.last_use("10.8.0.5") == NOW + 30 * 60
    assert t.allows("10.9.0.2", AC, at)
    assert t.resolve("10.9.0.2", None, at).choice is not None
    t.touch("10.9.0.2", at)  # its own query keeps it in use: the session is live
    assert t.kiosk_seen["10.9.0.2"] == at
    idle = at + 901
    assert not t.allows("10.9.0.2", AC, idle)
    r = t.resolve("10.9.0.2", None, idle)
    assert r.choice is None and any("went idle" in n for n in r.notes)
    t.touch("10.8.0.5", idle)  # a query after the session went idle revives nothing
    t.touch("10.9.0.2", idle)
    assert t.last_use("10.9.0.2") == at and not t.allows("10.9.0.2", AC, idle + 1)


def test_a_key_new_to_an_idle_kiosk_session_does_not_revive_it() -> None:
    """A client key first seen after the session went idle (the kiosk's address with its MAC, from a
    trusted forwarder) joins the session at its last query, not at its own first one."""
    t = table(networks=[("10.9.0.0/24", "kiosk")], kiosk_idle=900)
    t.set_neighbours({"10.9.0.2": KIOSK_MAC})
    t.put(choice("10.9.0.2", mac=KIOSK_MAC))
    t.set_seen("10.9.0.2", NOW)
    assert t.allows(f"10.9.0.2|{KIOSK_MAC}", AC, NOW + 600)  # in use: it joins, now
    assert t.kiosk_seen[f"10.9.0.2|{KIOSK_MAC}"] == NOW + 600
    t2 = table(networks=[("10.9.0.0/24", "kiosk")], kiosk_idle=900)
    t2.set_neighbours({"10.9.0.2": KIOSK_MAC})
    t2.put(choice("10.9.0.2", mac=KIOSK_MAC))
    t2.set_seen("10.9.0.2", NOW)
    assert not t2.allows(f"10.9.0.2|{KIOSK_MAC}", AC, NOW + 1000)
    assert t2.kiosk_seen[f"10.9.0.2|{KIOSK_MAC}"] == NOW
    assert not t2.allows("10.9.0.2", AC, NOW + 1000)


def test_a_worker_keeps_an_idle_kiosk_session_until_the_primary_has_ended_it() -> None:
    """A worker forgets an idle session's clocks only past twice the idle time: forgotten sooner, the
    session's next query there would start it again while the primary has it idle."""
    t = table(networks=[("10.9.0.0/24", "kiosk")], kiosk_idle=900)
    t.put(choice("10.9.0.2"))
    t.set_seen("10.9.0.2", NOW)
    t.forget_idle(NOW + 1000)
    assert not t.allows("10.9.0.2", AC, NOW + 1000)
    t.touch("10.9.0.2", NOW + 1001)
    assert not t.allows("10.9.0.2", AC, NOW + 1001)
    t.forget_idle(NOW + 1801)
    assert t.kiosk_seen == {}


def test_superseding_keeps_another_devices_choice_made_at_the_same_address() -> None:
    t = table()
    first = choice("10.0.0.5", mac="aa:aa:aa:aa:aa:01")
    t.put(first)
    assert t.superseded_by(Subject("10.0.0.5", "bb:bb:bb:bb:bb:02")) == []
    assert t.superseded_by(Subject("10.0.0.6", "aa:aa:aa:aa:aa:01")) == [first]
    assert t.superseded_by(Subject("10.0.0.5", None)) == []


# The memo forgets only what a change can affect (a choice's address and device; a network's choice
# forgets everything): whatever the sequence of changes, a memoized answer must equal a fresh
# resolution, and the indexes must hold what a plain "file under each key, remove everywhere"
# model holds.
ADDRESSES = ("10.0.0.1", "10.0.0.2", "10.0.1.1")
MACS = ("aa:aa:aa:aa:aa:01", "aa:aa:aa:aa:aa:02")
OTHER_NOTICE = CurrentNotice(CATALOG.version, "test-2", {"en": "c" * 64}, frozenset({"c" * 64}),
                             NOTICE.items)  # other terms: grants under NOTICE stop counting
CLIENTS = ADDRESSES + tuple(f"{a}|{m}" for a in ADDRESSES for m in MACS)
SUBJECTS = st.one_of(
    st.builds(Subject, st.sampled_from(ADDRESSES)),
    st.builds(Subject, st.none(), st.sampled_from(MACS)),
    st.builds(Subject, st.sampled_from(ADDRESSES), st.sampled_from(MACS)),
    st.builds(Subject, network=st.sampled_from(("10.0.0.0/24", "10.0.0.0/16"))),
)
CHANGES = st.lists(st.one_of(
    st.tuples(st.just("put"), SUBJECTS, st.booleans()),
    st.tuples(st.just("remove"), st.integers(0, 12)),
    st.tuples(st.just("neighbours"), st.dictionaries(st.sampled_from(ADDRESSES), st.sampled_from(MACS))),
    st.tuples(st.just("notice"), st.sampled_from((NOTICE, OTHER_NOTICE))),
), max_size=25)


@settings(max_examples=400, deadline=None)
@given(CHANGES)
def test_memo_and_indexes_follow_every_change(changes: list[tuple[object, ...]]) -> None:
    t = table()
    model: dict[str, dict[str, Choice]] = {"mac": {}, "address": {}, "network": {}}
    made: list[Choice] = []
    for change in changes:
        if change[0] == "put":
            subject, grant = change[1], change[2]
            assert isinstance(subject, Subject) and isinstance(grant, bool)
            c = choice(subject.address, mac=subject.mac, network=subject.network, categories={"marketing": grant},
                       expires_at=NOW + len(made) - 4)  # the first five have expired
            made.append(c)
            t.put(c)
            keys = ({"network": subject.network} if subject.network
                    else {"mac": subject.mac, "address": subject.address})
            for kind, key in keys.items():
                if key is not None:
                    model[kind][key] = c
        elif change[0] == "remove":
            index = change[1]
            assert isinstance(index, int)
            gone = made[index].id if index < len(made) else -1
            removed = t.remove(gone)
            held = [(filed, k) for filed in model.values() for k, c in filed.items() if c.id == gone]
            assert (removed is not None) == bool(held)
            for filed, key in held:
                del filed[key]
        elif change[0] == "neighbours":
            neighbours = change[1]
            assert isinstance(neighbours, dict)
            t.set_neighbours(neighbours)
        else:
            assert isinstance(change[1], CurrentNotice)
            t.set_notice(change[1])
        unique = {c.id: c for filed in model.values() for c in filed.values()}
        assert t.choices() == sorted(unique.values(), key=lambda c: c.id)
        assert all(t.find(i) is c for i, c in unique.items())
        granting = [c for c in unique.values() if t.notice is NOTICE and c.categories["marketing"]]
        assert len(t) == len(granting)
        live = sum(1 for c in granting if c.expires_at > NOW)
        assert t.granted_counts(NOW) == ({"marketing": live} if live else {})
        assert t.granting_now(NOW) == live
        for client in CLIENTS:
            address, _, mac = client.partition("|")
            assert t.allows(client, AC, NOW) == (AC in t.resolve(address, mac or None, NOW).allowed), (client, change)


def test_a_change_forgets_only_the_clients_it_can_apply_to() -> None:
    t = table()
    t.set_neighbours({"10.0.0.3": "aa:aa:aa:aa:aa:01"})
    for client in ("10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4|aa:aa:aa:aa:aa:01"):
        assert not t.allows(client, AC, NOW)
    t.put(choice("10.0.0.1"))
    assert t.memoized() == {"10.0.0.2", "10.0.0.3", "10.0.0.4|aa:aa:aa:aa:aa:01"}
    t.put(choice(mac="aa:aa:aa:aa:aa:01"))  # the device: by the neighbour table, and from a forwarder
    assert t.memoized() == {"10.0.0.2"}
    assert [t.allows(c, AC, NOW) for c in ("10.0.0.1", "10.0.0.3", "10.0.0.4|aa:aa:aa:aa:aa:01")] == [True] * 3
    t.set_neighbours({"10.0.0.3": "aa:aa:aa:aa:aa:01", "10.0.0.1": "bb:bb:bb:bb:bb:02"})
    assert t.memoized() == {"10.0.0.2", "10.0.0.3", "10.0.0.4|aa:aa:aa:aa:aa:01"}
    t.put(choice(network="10.0.0.0/24"))
    assert t.memoized() == set()


# -- identity ----------------------------------------------------------------------------------


def _wire_with_options(*options: dns.edns.Option) -> tuple[bytes, int]:
    q = dns.message.make_query("trackcmp.net", "A", use_edns=0, options=list(options))
    wire = q.to_wire()
    return wire, 12 + len(b"\x08trackcmp\x03net\x00") + 4


def test_edns_mac_options_and_full_length_ecs() -> None:
    raw = bytes.fromhex("0a1b2c3d4e5f")
    wire, end = _wire_with_options(edns_option(65001, raw))
    assert edns_identity(wire, end) == ("0a:1b:2c:3d:4e:5f", None)
    wire, end = _wire_with_options(edns_option(65073, b"0A:1B:2C:3D:4E:5F"))
    assert edns_identity(wire, end)[0] == "0a:1b:2c:3d:4e:5f"
    wire, end = _wire_with_options(edns_option(65073, base64.b64encode(raw)))
    assert edns_identity(wire, end)[0] == "0a:1b:2c:3d:4e:5f"
    wire, end = _wire_with_options(dns.edns.ECSOption("192.0.2.77", 32))
    assert edns_identity(wire, end) == (None, "192.0.2.77")
    wire, end = _wire_with_options(dns.edns.ECSOption("192.0.2.0", 24))  # a network, not a client
    assert edns_identity(wire, end) == (None, None)
    wire, end = _wire_with_options(edns_option(65001, b"\x01\x02"), edns_option(65073, b"zz"))
    assert edns_identity(wire, end) == (None, None)


def test_neighbour_tables_parse() -> None:
    arp = ("IP address       HW type     Flags       HW address            Mask     Device\n"
           "192.168.1.20     0x1         0x2         52:54:00:AA:BB:CC     *        eth0\n"
           "192.168.1.21     0x1         0x0         00:00:00:00:00:00     *        eth0\n"
           "garbage\n")
    assert parse_proc_arp(arp) == {"192.168.1.20": "52:54:00:aa:bb:cc"}
    neigh = ("fe80::1 dev eth0 lladdr 52:54:00:12:34:56 router REACHABLE\n"
             "2001:db8::7 dev eth0 lladdr 52:54:00:12:34:57 STALE\n"
             "2001:db8::8 dev eth0 FAILED\n"
             "192.168.1.30 dev eth0 lladdr 52:54:00:12:34:58 DELAY\n")
    assert parse_ip_neigh(neigh) == {"fe80::1": "52:54:00:12:34:56", "2001:db8::7": "52:54:00:12:34:57",
                                     "192.168.1.30": "52:54:00:12:34:58"}


@pytest.mark.parametrize("text", ["aa:bb:cc:dd:ee", "aa:bb:cc:dd:ee:fg", "aabbccddeeff00", ""])
def test_bad_macs(text: str) -> None:
    with pytest.raises(ValueError, match="MAC"):
        normalize_mac(text)


def test_pairing_tokens_are_one_time_and_expire() -> None:
    p = Pairings("consent.dnsgate.internal", ttl=60)
    offer = p.offer("::1", None, NOW)
    assert offer is not None
    assert offer.name == f"{offer.token}.pair.consent.dnsgate.internal" and offer.token.isalnum()
    assert p.claim(offer.token.upper(), NOW + 1) == offer  # resolvers may change the case
    assert p.claim(offer.token, NOW + 2) is None
    assert p.lookup(offer.token, NOW + 2) == offer  # the page may still name it through another address
    late = p.offer("::1", None, NOW)
    assert late is not None
    assert p.claim(late.token, NOW + 61) is None and p.lookup(late.token, NOW + 61) is None


# -- notice and log formats ---------------------------------------------------------------------


def test_builtin_notice_and_bad_notices() -> None:
    n = parse_notice_text(builtin_notice_text())
    assert n.default_language == "en" and n.hashes["en"] == sha256_text(n.texts["en"])
    with pytest.raises(NoticeError, match="version"):
        parse_notice_text('[text]\nen = "x"')
    with pytest.raises(NoticeError, match="default_language"):
        parse_notice_text('version = "1"\ndefault_language = "de"\n[text]\nen = "x"')


def test_csv_quotes_and_defuses_formulas() -> None:
    e = Event("grant", NOW, Subject("10.0.0.1", "aa:aa:aa:aa:aa:01"), "opt-in", {"marketing": True},
              {AC.id: False}, NOW + 10, SHOWN, "portal", '=HYPERLINK("x"), "quoted"', "1", 4, "", id=5)
    header, line = csv_header(), csv_line(e)
    assert header.startswith("id,time,action,address,mac")
    assert "marketing=granted" in line and "activecampaign=refused" in line
    assert "\"'=HYPERLINK(\"\"x\"\"), \"\"quoted\"\"\"" in line
    assert jsonl_line(e).endswith("\n") and '"sec_gpc":"1"' in jsonl_line(e)


def test_parse_time() -> None:
    assert parse_time("2023-11-14T22:13:20Z") == NOW
    assert parse_time("2023-11-14") == NOW - 80000
    with pytest.raises(ValueError, match="isoformat"):
        parse_time("yesterday")
    assert parse_time(str(consent_log.iso(NOW + 0.75))) == NOW


@settings(max_examples=2000, deadline=None)
@given(st.one_of(st.floats(0, 4e9), st.integers(0, 4_000_000_000).map(lambda s: s - 5e-7), st.just(NOW + 0.9999996)))
def test_timestamps_format_as_datetime_does(ts: float) -> None:
    # time.gmtime does the work (4x cheaper); the text, rounding included, is datetime's
    as_datetime = dt.datetime.fromtimestamp(ts, dt.UTC)
    assert consent_log.iso(ts) == as_datetime.isoformat(timespec="seconds").replace("+00:00", "Z")
    assert events.iso(ts) == as_datetime.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def test_the_state_a_view_leaves_for_the_next_query_is_the_one_a_lookup_finds() -> None:
    """A change's answer shows the client's view, and its next query takes the client's state from
    that resolution: only while it is the one a lookup of its own would find."""
    t = table()
    t.put(choice(network="10.0.0.0/24", expires_at=NOW + 100))
    t.put(choice("10.0.0.9", categories={"marketing": False}, expires_at=NOW + 10))
    t.resolve("10.0.0.9", None, NOW)
    assert not t.allows("10.0.0.9", AC, NOW + 5)
    t.resolve("10.0.0.9", None, NOW)
    assert t.allows("10.0.0.9", AC, NOW + 10)  # its own refusal expired since the view: the network's grant
    t.put(choice("10.0.0.8", categories={"marketing": False}, expires_at=NOW + 10))
    t.resolve("10.0.0.8", None, NOW + 50)
    assert not t.allows("10.0.0.8", AC, NOW)  # asked at a time before the view's: its refusal applies then
    t.resolve("10.0.0.8", None, NOW)
    t.put(choice("10.0.0.8", categories={"marketing": True}))
    assert t.allows("10.0.0.8", AC, NOW)  # a change after the view
    t.put(choice(mac="cc:cc:cc:cc:cc:03", categories={"marketing": True}))
    t.put(choice("10.0.0.7", categories={"marketing": False}))
    assert t.resolve("10.0.0.7", "cc:cc:cc:cc:cc:03", NOW).decisions[0][1].allowed  # a forwarder's MAC: the device
    assert not t.allows("10.0.0.7", AC, NOW)  # the address alone: its own refusal


def test_records_built_plain_are_the_frozen_records_they_were() -> None:
    """Event and Choice are built through a plain twin (built_plain): what comes out is the frozen
    record itself, with its defaults, fresh default mappings, its __post_init__ run, and frozen."""
    subject = Subject("192.0.2.7")
    e = Event("grant", 10.0, subject, "opt-in", {"marketing": True}, expires_at=20.0, reason="r")
    assert type(e) is Event
    assert (e.action, e.at, e.subject, e.profile, e.categories, e.vendors, e.expires_at, e.channel, e.reason,
            e.id, e.items) == ("grant", 10.0, subject, "opt-in", {"marketing": True}, {}, 20.0, "system", "r",
                               None, None)
    assert e.vendors is not Event("grant", 10.0, subject, "opt-in").vendors  # (a default factory per record)
    with pytest.raises(FrozenInstanceError):
        e.reason = "changed"  # type: ignore[misc]
    assert replace(e, id=7) == Event("grant", 10.0, subject, "opt-in", {"marketing": True}, expires_at=20.0,
                                     reason="r", id=7)
    c = e.as_choice(3)
    assert type(c) is Choice and c.id == 3 and c.made_at == 10.0
    # __post_init__ ran: choices share one mapping per content
    assert c.categories is Choice(4, Subject("192.0.2.8"), {"marketing": True}, {}, 1.0, 2.0, None, "device",
                                  "opt-in").categories
    with pytest.raises(FrozenInstanceError):
        c.id = 4  # type: ignore[misc]
    with pytest.raises(TypeError, match="profile"):
        Event("grant", 10.0, subject)  # type: ignore[call-arg]
