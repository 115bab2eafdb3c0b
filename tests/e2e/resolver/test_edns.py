"""EDNS(0) and message sizes over loopback, on both cache paths: OPT iff asked, BADVERS, DO echoed,
unknown options and flag bits not echoed, hop-by-hop options not relayed in either direction,
UDP limits with TC=1, and TCP (to the client and to the upstream) for the full answer."""

from __future__ import annotations

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import pytest
from dnslib import EDNSOption

from tests.conftest import Gate
from tests.e2e.resolver.conftest import ask, on_path, query_wire
from tests.support.stub_upstream import StubUpstream

pytestmark = pytest.mark.usefixtures("udp_io")  # every test runs on both UDP paths (dns.udp_io)

COOKIE, KEEPALIVE, PADDING = 10, 11, 12
HOP_BY_HOP = [
    dns.edns.GenericOption(dns.edns.OptionType.COOKIE, bytes(range(8))),  # a client cookie (RFC 7873)
    dns.edns.GenericOption(dns.edns.OptionType.KEEPALIVE, b""),  # RFC 7828
    dns.edns.GenericOption(dns.edns.OptionType.PADDING, bytes(40)),  # RFC 7830
    dns.edns.GenericOption(dns.edns.OptionType.make(65001), b"private"),  # unknown: ignored
]


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
@pytest.mark.parametrize("edns", [False, True], ids=["no-edns", "edns"])
async def test_opt_in_reply_iff_in_query(gate: Gate, upstream: StubUpstream, path: str, tcp: bool,
                                         edns: bool) -> None:
    reply = await on_path(gate, upstream, path, lambda: query_wire("host.example.test", use_edns=0 if edns else False),
                          tcp=tcp)
    assert reply.answer
    if edns:
        assert reply.edns == 0 and reply.payload == 1232 and not reply.options
    else:
        assert reply.edns == -1  # the upstream's OPT is not passed on


async def test_badvers_for_edns_version_1(gate: Gate, upstream: StubUpstream, path: str) -> None:
    if path == "hit":
        await ask(gate, query_wire("host.example.test", use_edns=0))  # a cached answer changes nothing
    reply = dns.message.from_wire(await ask(gate, query_wire("host.example.test", use_edns=1)))
    assert reply.rcode() == dns.rcode.BADVERS and reply.edns == 0 and not reply.answer
    assert upstream.count("host.example.test") == (1 if path == "hit" else 0)


@pytest.mark.parametrize("do", [False, True], ids=["do0", "do1"])
async def test_do_echoed_unknown_flags_and_options_not(gate: Gate, upstream: StubUpstream, path: str,
                                                       do: bool) -> None:
    flags = 0x4001 | (dns.flags.DO if do else 0)  # two unknown EDNS flag bits
    reply = await on_path(gate, upstream, path, lambda: query_wire(
        "host.example.test", use_edns=0, ednsflags=flags, options=HOP_BY_HOP))
    assert reply.answer and reply.edns == 0
    assert reply.ednsflags == (dns.flags.DO if do else 0)
    assert not reply.options  # neither the client's options nor the upstream's come back


async def test_hop_by_hop_options_not_relayed_to_upstream(gate: Gate, upstream: StubUpstream) -> None:
    reply = await on_path(gate, upstream, "miss", lambda: query_wire("host.example.test", use_edns=0,
                                                                     options=HOP_BY_HOP))
    assert reply.answer
    assert upstream.options_received() == []  # dnsgate asked with its own, empty OPT


async def test_hop_by_hop_options_from_upstream_not_relayed(gate: Gate, upstream: StubUpstream, path: str) -> None:
    upstream.reply_options = [EDNSOption(COOKIE, bytes(24)), EDNSOption(KEEPALIVE, b"\x00\x64"),
                              EDNSOption(PADDING, bytes(100)), EDNSOption(65002, b"x")]
    reply = await on_path(gate, upstream, path, lambda: query_wire("host.example.test", use_edns=0), tcp=False)
    assert reply.answer and reply.edns == 0 and not reply.options


def _big(upstream: StubUpstream, count: int) -> None:
    upstream.add("big.example.test", *(f'big.example.test. 300 IN TXT "{"x" * 200} {i}"' for i in range(count)))


@pytest.mark.parametrize(("payload", "records", "truncated"), [
    (None, 2, False),  # ~470 bytes: fits 512
    (None, 3, True),  # ~690 bytes: over 512 without EDNS
    (1232, 5, False),  # ~1130 bytes: fits 1232
    (4096, 6, True),  # ~1350 bytes: over our 1232 even though the client takes 4096
    (700, 4, True),  # ~910 bytes: over the client's 700
])
async def test_udp_limits(gate: Gate, upstream: StubUpstream, path: str, payload: int | None, records: int,
                          truncated: bool) -> None:
    _big(upstream, records)
    make = (lambda: query_wire("big.example.test", "TXT")) if payload is None else (
        lambda: query_wire("big.example.test", "TXT", use_edns=0, payload=payload))
    reply = await on_path(gate, upstream, path, make)
    if truncated:
        assert reply.flags & dns.flags.TC and not reply.answer and len(reply.question) == 1
        assert reply.edns == (-1 if payload is None else 0)
    else:
        assert not reply.flags & dns.flags.TC and len(reply.answer[0]) == records


async def test_tcp_gets_the_full_answer(gate: Gate, upstream: StubUpstream, path: str) -> None:
    _big(upstream, 30)  # ~6.7 kB
    reply = await on_path(gate, upstream, path, lambda: query_wire("big.example.test", "TXT", use_edns=0), tcp=True)
    assert not reply.flags & dns.flags.TC and len(reply.answer[0]) == 30


async def test_truncated_upstream_reply_fetched_over_tcp(gate: Gate, upstream: StubUpstream, path: str) -> None:
    _big(upstream, 30)
    upstream.truncate_udp = True
    reply = await on_path(gate, upstream, path, lambda: query_wire("big.example.test", "TXT", use_edns=0), tcp=True)
    assert len(reply.answer[0]) == 30
    assert [t for n, _, t in upstream.queries if n == "big.example.test"] == ["udp", "tcp"]
