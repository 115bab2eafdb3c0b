"""Imported lists: the formats, what each entry covers, and who wins (allow, specificity, order)."""

from __future__ import annotations

import pytest

from dnsgate.config import ListSource
from dnsgate.rules.blocklists import EXACT, SUBS, TREE, ListIndex, ParsedList, build_index, detect_format, parse_list
from dnsgate.rules.catalog import DomainRule
from dnsgate.rules.ruleset import list_rule
from dnsgate.wire import label_offsets, name_to_wire

HOSTS = b"""# a hosts file
127.0.0.1 localhost
::1 localhost ip6-localhost
0.0.0.0 0.0.0.0
0.0.0.0 Ads.Example.COM
0.0.0.0 tracker.example.net.   # trailing dot and a comment
127.0.0.1\tpixel.example.org beacon.example.org\r
0.0.0.0 bad_name!.example.com
0.0.0.0 under_score.example.com
"""

ADBLOCK = b"""[Adblock Plus 2.0]
! Title: test list
||metrics.example.com^
||ads.example.net^$important
@@||good.ads.example.net^
||thirdparty.example.org^$third-party
||com^
/banner/*
example.com##.ad
|http://example.com/x
"""

DOMAINS = b"""# plain list
plain.example.com
*.wild.example.com
*.com
nope nope
"""


def names(parsed: ParsedList, reach: int) -> set[str]:
    return {n.decode() for n in parsed.names.get(reach, [])}


def test_hosts_file() -> None:
    parsed = parse_list([HOSTS])
    assert parsed.format == "hosts"
    assert names(parsed, EXACT) == {"ads.example.com", "tracker.example.net", "pixel.example.org",
                                    "beacon.example.org", "under_score.example.com"}
    assert parsed.skipped == 1  # bad_name!
    assert names(parse_list([HOSTS], subdomains=True), TREE) == names(parsed, EXACT)


def test_adblock_list() -> None:
    parsed = parse_list([ADBLOCK])
    assert parsed.format == "adblock"
    assert names(parsed, TREE) == {"metrics.example.com", "ads.example.net"}
    assert [e.decode() for e in parsed.exceptions] == ["good.ads.example.net"]
    assert parsed.skipped == 5  # $third-party, ||com^, a URL pattern, a cosmetic rule, a |URL rule


def test_domain_list() -> None:
    parsed = parse_list([DOMAINS])
    assert parsed.format == "domains"
    assert names(parsed, EXACT) == {"plain.example.com"}
    assert names(parsed, SUBS) == {"wild.example.com"}
    assert parsed.skipped == 2  # *.com would cover a TLD; "nope nope" is no name


@pytest.mark.parametrize("size", [1, 7, 64, 1 << 20])
def test_chunk_boundaries_do_not_matter(size: int) -> None:
    for text in (HOSTS, ADBLOCK, DOMAINS):
        whole = parse_list([text])
        parts = parse_list([text[i : i + size] for i in range(0, len(text), size)])
        assert parts.format == whole.format and parts.skipped == whole.skipped
        assert {k: set(v) for k, v in parts.names.items()} == {k: set(v) for k, v in whole.names.items()}
        assert parts.exceptions == whole.exceptions


def test_blocks_are_whole_lines() -> None:
    from dnsgate.rules.blocklists import lines_in_chunks

    blocks = list(lines_in_chunks([b"ab\ncd", b"\nef", b"g"], min_size=3))
    assert blocks == [b"ab\n", b"cd\n", b"efg\n"]


def test_format_detection_and_empty() -> None:
    assert detect_format(b"# only comments\n\n") == "domains"
    assert detect_format(b"0.0.0.0 a.example\n0.0.0.0 b.example\nc.example\n") == "hosts"
    assert detect_format(b"[Adblock Plus 2.0]\nexample.com\n") == "adblock"
    assert parse_list([]).entries == 0
    assert parse_list([b"<html><body>captive portal</body></html>\n"]).entries == 0


def test_blank_and_comment_lines_are_not_skipped_entries() -> None:
    parsed = parse_list([b"a.example\n\n\n  \n\t# indented comment\r\n\r\n! adblock-style comment\nb.example\n"])
    assert names(parsed, EXACT) == {"a.example", "b.example"} and parsed.skipped == 0


def test_names_longer_than_dns_allows_are_skipped() -> None:
    long_name = b".".join([b"a" * 63] * 4)  # 255 characters
    parsed = parse_list([long_name + b"\nok.example\n"])
    assert names(parsed, EXACT) == {"ok.example"} and parsed.skipped == 1


# ------------------------------------------------------------------------------------------------
# The index


def rule(list_id: str, category: str = "analytics") -> DomainRule:
    return list_rule(ListSource(id=list_id, category=category, file=f"/lists/{list_id}"))


def who(index: ListIndex, name: str) -> str | None:
    wire = name_to_wire(name)
    found = index.match(wire, label_offsets(wire))
    return None if found is None else found.vendor.id


def test_what_each_entry_covers() -> None:
    index = build_index([(rule("h"), parse_list([HOSTS])), (rule("a"), parse_list([ADBLOCK])),
                         (rule("d"), parse_list([DOMAINS]))], [])
    assert who(index, "ads.example.com") == "h"
    assert who(index, "ADS.example.com.") == "h"
    assert who(index, "x.ads.example.com") is None  # a hosts entry is that name only
    assert who(index, "metrics.example.com") == "a" and who(index, "a.b.metrics.example.com") == "a"
    assert who(index, "plain.example.com") == "d" and who(index, "x.plain.example.com") is None
    assert who(index, "wild.example.com") is None and who(index, "x.wild.example.com") == "d"
    for lookalike in ("notmetrics.example.com", "metrics.example.com.evil.test", "example.com", "com", "."):
        assert who(index, lookalike) is None, lookalike


def test_allow_wins_over_every_list_however_specific_the_block() -> None:
    index = build_index(
        [(rule("a"), parse_list([ADBLOCK])), (rule("b"), parse_list([b"||deep.good.ads.example.net^\n"]))],
        [parse_list([b"allowed.example.com\n"])],
        ["metrics.example.com", "*.ads.example.net"],
    )
    assert who(index, "good.ads.example.net") is None  # the AdBlock exception
    assert who(index, "deep.good.ads.example.net") is None  # ...covers every list's entries below it
    assert who(index, "x.ads.example.net") is None  # allow "*.ads.example.net"
    assert who(index, "ads.example.net") == "a"  # ...but not the apex
    assert who(index, "metrics.example.com") is None and who(index, "a.metrics.example.com") is None


def test_most_specific_name_then_first_list_wins() -> None:
    index = build_index([
        (rule("first", "marketing"), parse_list([b"||example.org^\n"])),
        (rule("second"), parse_list([b"||x.example.org^\n||example.org^\n"])),
    ], [])
    assert who(index, "example.org") == "first" and who(index, "y.example.org") == "first"
    assert who(index, "x.example.org") == "second" and who(index, "a.x.example.org") == "second"


def test_an_exact_entry_and_a_wildcard_of_different_lists_combine() -> None:
    index = build_index([(rule("exact"), parse_list([b"t.example\n"])),
                         (rule("wild"), parse_list([b"*.t.example\n"]))], [])
    assert who(index, "t.example") == "exact" and who(index, "a.t.example") == "wild"


def test_the_index_shares_one_slot_per_distinct_rule_combination() -> None:
    index = build_index([(rule("h"), parse_list([b"\n".join(b"n%d.example" % i for i in range(1000))]))], [])
    assert len(index) == 1000
    slots = {id(v) for v in index._slots.values()}
    assert len(slots) == 1  # a million names do not cost a million tuples
