"""The operator's records, parsed and resolved without a server: the forms of `[local] records` and
of a hosts file, the errors that name the entry, and the RFC rules for what each question gets
(data, NODATA, NXDOMAIN below a configured name, empty non-terminals, CNAME chains in and out of
the local data, PTRs made for addresses). The replies are read back with dnspython."""

from __future__ import annotations

import pickle
import re

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from dnsgate.config import load_config, overrides_from_env
from dnsgate.dns.local_records import (
    MX,
    SRV,
    LocalRecords,
    RecordError,
    build,
    parse_hosts,
    parse_record,
    parse_records,
    reverse_name,
)
from dnsgate.wire import AAAA, CNAME, NOERROR, NXDOMAIN, PTR, TXT, A, Query, name_to_wire, parse_query

RECORDS = (
    "nas.home A 192.168.1.10",
    "nas.home AAAA fd00::10",
    "www.home 600 CNAME nas.home",
    "home MX 10 mail.home",
    "mail.home IN A 192.168.1.11",
    '_ipp._tcp.home SRV 0 5 631 printer.home',
    'home TXT "v=spf1 -all" "second string"',
    "printer.home A 192.168.1.12",
    "a.b.c.home A 192.168.1.13",
    "cdn.home CNAME assets.example.net",
    "ghost.home CNAME missing.nas.home",
)


def table(*lines: str, generate_ptr: bool = True) -> LocalRecords:
    return build(parse_records(lines or RECORDS, 300), generate_ptr, 300, reserved=("dnsgate.internal",))


def ask(t: LocalRecords, name: str, rdtype: str) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, use_edns=0)
    q = parse_query(query.to_wire())
    assert isinstance(q, Query)
    found = t.resolve(q.name, q.qtype)
    assert found is not None, f"{name} is not local"
    assert found.external is None
    return dns.message.from_wire(t.reply(q, found, 1232))


def test_record_forms() -> None:
    r = parse_record("NAS.Home. 60 IN A 192.168.1.10", 300, "k")
    assert (r.owner, r.rtype, r.ttl, r.rdata) == (name_to_wire("nas.home"), A, 60, bytes([192, 168, 1, 10]))
    assert parse_record("x.home AAAA fd00::1", 300, "k").rtype == AAAA
    assert parse_record("x.home cname Y.home.", 300, "k").rdata == name_to_wire("y.home")
    assert parse_record("home MX 10 mail.home", 300, "k").rdata == b"\x00\x0a" + name_to_wire("mail.home")
    srv = parse_record("_ipp._tcp.home SRV 1 2 631 p.home", 300, "k")
    assert srv.rtype == SRV and srv.rdata == b"\x00\x01\x00\x02\x02\x77" + name_to_wire("p.home")
    txt = parse_record('t.home TXT "a \\"quoted\\" word" "b"', 300, "k")
    assert txt.rtype == TXT and txt.rdata == b'\x0fa "quoted" word\x01b'
    assert parse_record("t.home TXT bare words", 300, "k").rdata == b"\x0abare words"
    long = parse_record("t.home TXT " + "x" * 300, 300, "k").rdata
    assert long[0] == 255 and long[256] == 45  # split into strings of at most 255 bytes
    assert parse_record("1.1.168.192.in-addr.arpa PTR nas.home", 300, "k").rtype == PTR


@pytest.mark.parametrize(("line", "says"), [
    ("nas.home", "expected 'NAME [TTL] TYPE DATA'"),
    ("nas.home A", "needs data"),
    ("nas.home HINFO x y", "type must be one of"),
    ("nas.home A 192.168.1", "not an IP address"),
    ("nas.home A fd00::1", "needs an IPv4 address"),
    ("nas.home AAAA 10.0.0.1", "needs an IPv6 address"),
    ("nas.home 99999999 A 10.0.0.1", "TTL must be"),
    ("nas..home A 10.0.0.1", "bad name"),
    ("home MX mail.home", "MX takes"),
    ("home MX 70000 mail.home", "preference must be"),
    ("s.home SRV 0 0 x t.home", "port must be"),
    ('t.home TXT "open', "unclosed quote"),
    ("x.home CNAME a.home b.home", "takes one name"),
])
def test_bad_records_name_the_entry(line: str, says: str) -> None:
    with pytest.raises(RecordError, match=r"local\.records\[1\]: .*" + re.escape(says)):
        parse_records(["ok.home A 10.0.0.1", line], 300)


def test_table_errors() -> None:
    with pytest.raises(RecordError, match="CNAME and A"):
        table("x.home CNAME y.home", "x.home A 10.0.0.1")
    with pytest.raises(RecordError, match="another CNAME"):
        table("x.home CNAME y.home", "x.home CNAME z.home")
    with pytest.raises(RecordError, match="loop at"):
        table("x.home CNAME y.home", "y.home CNAME x.home")
    with pytest.raises(RecordError, match="dnsgate's own names"):
        table("consent.dnsgate.internal A 10.0.0.1")
    chain = [f"n{i}.home CNAME n{i + 1}.home" for i in range(9)]
    with pytest.raises(RecordError, match="longer than"):
        table(*chain)


def test_hosts_file() -> None:
    records = parse_hosts("# the LAN\n192.168.1.10  nas.home nas   # the NAS\n\nfd00::10 nas.home\n"
                          "fe80::1%eth0 router.home\n", 120, "hosts")
    assert [(r.owner, r.rtype, r.ttl) for r in records] == [
        (name_to_wire("nas.home"), A, 120), (name_to_wire("nas"), A, 120), (name_to_wire("nas.home"), AAAA, 120)]
    with pytest.raises(RecordError, match="hosts line 2: not an IP address"):
        parse_hosts("10.0.0.1 a.home\nnas.home 10.0.0.2\n", 120, "hosts")
    with pytest.raises(RecordError, match="hosts line 1: an address without a name"):
        parse_hosts("10.0.0.1\n", 120, "hosts")


def test_data_is_authoritative() -> None:
    t = table()
    reply = ask(t, "NAS.home", "A")
    assert reply.flags & dns.flags.AA and reply.rcode() == dns.rcode.NOERROR
    assert [rr.to_text() for rr in reply.answer] == ["NAS.home. 300 IN A 192.168.1.10"]
    assert [r.to_text() for r in ask(t, "nas.home", "AAAA").answer[0]] == ["fd00::10"]
    assert [r.to_text() for r in ask(t, "home", "MX").answer[0]] == ["10 mail.home."]
    assert [r.to_text() for r in ask(t, "_ipp._tcp.home", "SRV").answer[0]] == ["0 5 631 printer.home."]
    assert [r.to_text() for r in ask(t, "home", "TXT").answer[0]] == ['"v=spf1 -all" "second string"']
    everything = ask(t, "nas.home", "ANY")
    assert {dns.rdatatype.to_text(rrset.rdtype) for rrset in everything.answer} == {"A", "AAAA"}


def test_nodata_and_nxdomain() -> None:
    t = table()
    nodata = ask(t, "nas.home", "MX")  # the name exists, not with this type
    assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer and nodata.flags & dns.flags.AA
    assert nodata.authority[0].rdtype == dns.rdatatype.SOA and nodata.authority[0].name.to_text() == "nas.home."
    nx = ask(t, "nothing.nas.home", "A")  # below a configured name: the subtree is ours
    assert nx.rcode() == dns.rcode.NXDOMAIN and nx.flags & dns.flags.AA
    assert nx.authority[0].name.to_text() == "nas.home." and nx.authority[0].ttl == 300
    assert ask(t, "other.home", "A").rcode() == dns.rcode.NXDOMAIN  # `home` is configured (MX, TXT)
    # b.c.home and c.home lie between a.b.c.home and home: they exist, without records (RFC 8020)
    for name in ("b.c.home", "c.home"):
        ent = ask(t, name, "A")
        assert ent.rcode() == dns.rcode.NOERROR and not ent.answer
    assert ask(t, "x.b.c.home", "A").rcode() == dns.rcode.NXDOMAIN


def test_names_outside_are_not_ours() -> None:
    t = table("nas.home A 192.168.1.10")
    for name in ("home", "other.home", "nas.home.example", "example.com"):
        assert t.resolve(name_to_wire(name), A) is None


def test_cname_chains() -> None:
    t = table()
    reply = ask(t, "www.home", "A")
    assert [rr.to_text() for rr in reply.answer] == ["www.home. 600 IN CNAME nas.home.",
                                                      "nas.home. 300 IN A 192.168.1.10"]
    assert reply.flags & dns.flags.AA
    assert [rr.to_text() for rr in ask(t, "www.home", "CNAME").answer] == ["www.home. 600 IN CNAME nas.home."]
    nx = ask(t, "ghost.home", "A")  # its target is below nas.home and does not exist (RFC 6604)
    assert nx.rcode() == dns.rcode.NXDOMAIN and len(nx.answer) == 1
    out = t.resolve(name_to_wire("cdn.home"), A)
    assert out is not None and out.external == name_to_wire("assets.example.net")
    assert out.names == [name_to_wire("cdn.home"), name_to_wire("assets.example.net")]
    assert [r.rtype for r in out.answers] == [CNAME]


def test_ptrs_are_generated_for_addresses() -> None:
    t = table()
    ptr = ask(t, "10.1.168.192.in-addr.arpa", "PTR")
    assert [r.to_text() for r in ptr.answer[0]] == ["nas.home."] and ptr.flags & dns.flags.AA
    v6 = ask(t, "0.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa", "PTR")
    assert [r.to_text() for r in v6.answer[0]] == ["nas.home."]
    assert reverse_name(bytes([10, 0, 0, 1])) == name_to_wire("1.0.0.10.in-addr.arpa")
    # the first name given for an address is its PTR; one the operator gives wins
    two = table("a.home A 10.0.0.1", "b.home A 10.0.0.1", "c.home A 10.0.0.2", "2.0.0.10.in-addr.arpa PTR named.home")
    assert [r.to_text() for r in ask(two, "1.0.0.10.in-addr.arpa", "PTR").answer[0]] == ["a.home."]
    assert [r.to_text() for r in ask(two, "2.0.0.10.in-addr.arpa", "PTR").answer[0]] == ["named.home."]
    off = table("a.home A 10.0.0.1", generate_ptr=False)
    assert off.resolve(name_to_wire("1.0.0.10.in-addr.arpa"), PTR) is None


def test_the_table_travels_to_workers() -> None:
    t = table()
    copy = pickle.loads(pickle.dumps(t))
    assert copy.owners == t.owners and copy.tails == t.tails and copy.empty == t.empty
    found = copy.resolve(name_to_wire("nas.home"), A)
    assert found is not None and found.rcode == NOERROR
    missing = copy.resolve(name_to_wire("x.nas.home"), MX)
    assert missing is not None and missing.rcode == NXDOMAIN


def test_records_from_the_environment_are_json() -> None:
    """A record may hold a comma, so the environment gives them as JSON (docs/configuration.md)."""
    config, overrides = overrides_from_env({"DNSGATE_LOCAL_RECORDS": '["a.home A 10.0.0.1", "a.home TXT \\"x, y\\""]'})
    cfg = load_config(config, overrides)
    records = parse_records(cfg.local.records, cfg.local.ttl)
    assert [(r.rtype, r.rdata) for r in records] == [(A, bytes([10, 0, 0, 1])), (TXT, b"\x04x, y")]
