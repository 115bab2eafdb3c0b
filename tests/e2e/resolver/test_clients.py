"""Real DNS clients over loopback: BIND's `dig` and Knot's `kdig` see conformant answers on the
cache-miss and the cache-hit path, and the EDNS options they send (cookie, keepalive, padding,
NSID, a private option) neither reach the upstream nor come back."""

from __future__ import annotations

import asyncio
import re
import shutil

import pytest

from tests.conftest import Gate
from tests.support.stub_upstream import StubUpstream

pytestmark = pytest.mark.usefixtures("udp_io")  # every test runs on both UDP paths (dns.udp_io)

needs_dig = pytest.mark.skipif(shutil.which("dig") is None, reason="dig not installed (apt install bind9-dnsutils)")
needs_kdig = pytest.mark.skipif(shutil.which("kdig") is None, reason="kdig not installed (apt install knot-dnsutils)")


async def run(*argv: str) -> str:
    process = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(process.communicate(), timeout=10)
    return out.decode()


async def dig(gate: Gate, *args: str) -> str:
    return await run("dig", "@127.0.0.1", "-p", str(gate.dns_port), "+tries=1", "+time=3", *args)


async def kdig(gate: Gate, *args: str) -> str:
    return await run("kdig", "@127.0.0.1", "-p", str(gate.dns_port), "+retry=0", "+timeout=3", *args)


def flags_of(out: str) -> set[str]:
    match = re.search(r";; [Ff]lags: ([a-z ]*);", out)
    assert match, out
    return set(match.group(1).split())


async def twice(gate: Gate, upstream: StubUpstream, client: str, *args: str) -> list[str]:
    """The client's output on a cache miss, then on a hit."""
    ask = dig if client == "dig" else kdig
    outs = []
    for expected_upstream in (1, 1):
        outs.append(await ask(gate, *args))
        assert len(upstream.queries) == expected_upstream, outs[-1]
    return outs


@needs_dig
@pytest.mark.parametrize("transport", ["+notcp", "+tcp"])
async def test_dig_plain_name(gate: Gate, upstream: StubUpstream, transport: str) -> None:
    for out in await twice(gate, upstream, "dig", transport, "Host.Example.Test", "A"):
        assert "status: NOERROR" in out
        assert flags_of(out) == {"qr", "rd", "ra"}  # no aa
        assert re.search(r"^Host\.Example\.Test\.\s+\d+\s+IN\s+A\s+192\.0\.2\.10$", out, re.M), out
        assert "; COOKIE:" not in out  # dig sent a cookie; dnsgate does not relay cookies


@needs_dig
async def test_dig_dnssec_ok_and_any(gate: Gate, upstream: StubUpstream) -> None:
    for out in await twice(gate, upstream, "dig", "+dnssec", "host.example.test", "AAAA"):
        assert "flags: do;" in out and "2001:db8::10" in out and flags_of(out) == {"qr", "rd", "ra"}
    out = await dig(gate, "host.example.test", "ANY")
    assert re.search(r'IN\s+HINFO\s+"RFC8482" ""', out), out
    assert len(upstream.queries) == 1


@needs_dig
async def test_dig_unknown_type_and_nxdomain(gate: Gate, upstream: StubUpstream) -> None:
    upstream.add("odd.example.test", "odd.example.test. 300 IN TYPE65280 \\# 3 abcdef")
    for out in await twice(gate, upstream, "dig", "odd.example.test", "TYPE65280"):
        assert re.search(r"IN\s+TYPE65280\s+\\# 3 ABCDEF", out), out
    upstream.queries.clear()
    for out in await twice(gate, upstream, "dig", "gone.example.test"):
        assert "status: NXDOMAIN" in out and re.search(r"IN\s+SOA\s+ns\.example\.test\.", out)


@needs_kdig
@pytest.mark.parametrize("transport", ["+notcp", "+tcp"])
async def test_kdig_with_hop_by_hop_options(gate: Gate, upstream: StubUpstream, transport: str) -> None:
    options = ("+cookie", "+ednsopt=11", "+padding=128", "+nsid", "+ednsopt=65001:abcd")  # 11: keepalive
    for out in await twice(gate, upstream, "kdig", transport, *options, "host.example.test", "A"):
        assert "status: NOERROR" in out and re.search(r"IN\s+A\s+192\.0\.2\.10", out), out
        edns = out.split("EDNS PSEUDOSECTION", 1)[1].split("QUESTION SECTION", 1)[0]
        assert "Version: 0" in edns and "UDP size: 1232" in edns
        for option in ("COOKIE", "Option (11)", "PADDING", "NSID", "Option (65001)"):  # as kdig prints them
            assert option not in edns, edns
        assert flags_of(out) == {"qr", "rd", "ra"}
    assert upstream.options_received() == []


@needs_kdig
async def test_kdig_badvers_and_truncation(gate: Gate, upstream: StubUpstream) -> None:
    out = await kdig(gate, "+edns=1", "host.example.test")
    assert "status: BADVERS" in out and not upstream.queries
    upstream.add("big.example.test", *(f'big.example.test. 300 IN TXT "{"x" * 200} {i}"' for i in range(8)))
    out = await kdig(gate, "+notcp", "+ignore", "+bufsize=1232", "big.example.test", "TXT")
    assert "tc" in flags_of(out)
    out = await kdig(gate, "+tcp", "big.example.test", "TXT")
    assert "tc" not in flags_of(out) and out.count("IN\tTXT") + out.count("IN TXT") >= 8
