"""The gate's promise with dig as the client: sinkhole before consent, the real answer after."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from tests.conftest import Gate
from tests.support.stub_upstream import StubUpstream

pytestmark = [
    pytest.mark.usefixtures("udp_io"),  # every test runs on both UDP paths (dns.udp_io)
    pytest.mark.skipif(shutil.which("dig") is None, reason="dig not installed (apt install bind9-dnsutils)"),
]


async def dig(gate: Gate, *args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        "dig", "@127.0.0.1", "-p", str(gate.dns_port), "+tries=1", "+time=3", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await process.communicate()
    return out.decode()


async def test_dig_sees_sinkhole_then_real_answer(gate: Gate) -> None:
    out = await dig(gate, "trackcmp.net")
    assert "status: NXDOMAIN" in out
    assert "trackcmp.net.\t\t5\tIN\tSOA\tdnsgate.internal. consent.dnsgate.internal. 1 3600 600 86400 5" in out
    assert "EDE: 15 (Blocked): (ActiveCampaign (activecampaign) is blocked: no consent for category 'marketing')" \
        in out
    status, _ = await gate.http("PUT", "/v1/consent", json={"categories": ["marketing"]})
    assert status == 200
    out = await dig(gate, "trackcmp.net")
    assert "status: NOERROR" in out
    assert "trackcmp.net.\t\t10\tIN\tA\t198.51.100.1" in out


async def test_dig_over_tcp_and_for_aaaa(gate: Gate) -> None:
    out = await dig(gate, "+tcp", "host.example.test", "AAAA")
    assert "status: NOERROR" in out and "2001:db8::10" in out
    out = await dig(gate, "+tcp", "x.trackcmp.net", "HTTPS")
    assert "status: NXDOMAIN" in out


async def test_dig_chaos_id_server_names_the_process_and_nothing_goes_upstream(gate: Gate,
                                                                                 upstream: StubUpstream) -> None:
    for name in ("id.server", "HOSTNAME.bind"):  # RFC 4892
        out = await dig(gate, "CH", "TXT", name)
        assert "status: NOERROR" in out and "flags: qr aa rd ra;" in out, out
        assert f'{name}.\t\t0\tCH\tTXT\t"dnsgate"' in out, out
    out = await dig(gate, "+noedns", "CH", "A", "id.server")
    assert "status: NOERROR" in out and "ANSWER: 0" in out
    assert upstream.count("id.server") == 0 and upstream.count("hostname.bind") == 0
