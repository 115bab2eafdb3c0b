"""Header conformance over loopback, on the cache-miss and the cache-hit path, UDP and TCP:
ID echoed, question echoed byte for byte (0x20 case), RD copied, RA set, AA cleared, Z zero."""

from __future__ import annotations

import struct

import dns.flags
import dns.message
import dns.rcode
import pytest

from tests.conftest import Gate
from tests.e2e.resolver.conftest import on_path, query_wire
from tests.support.stub_upstream import StubUpstream

pytestmark = pytest.mark.usefixtures("udp_io")  # every test runs on both UDP paths (dns.udp_io)

Z = 0x0040


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
async def test_id_question_case_and_flags(gate: Gate, upstream: StubUpstream, path: str, tcp: bool) -> None:
    sent: list[bytes] = []

    def make() -> bytes:
        sent.append(query_wire("HoSt.ExAmPlE.tEsT", flags_set=Z))  # Z set: must come back clear
        return sent[-1]

    reply = await on_path(gate, upstream, path, make, tcp=tcp)
    wire = reply.to_wire()
    query = sent[-1]
    assert reply.id == struct.unpack_from(">H", query)[0]
    assert wire[12 : 12 + len(query) - 12] == query[12:]  # the question, byte for byte (case included)
    assert reply.rcode() == dns.rcode.NOERROR and [r.to_text() for r in reply.answer[0]] == ["192.0.2.10"]
    assert reply.flags & dns.flags.QR and reply.flags & dns.flags.RD and reply.flags & dns.flags.RA
    assert not reply.flags & dns.flags.AA  # the stub sets AA; a forwarder never claims authority
    assert not struct.unpack_from(">H", wire, 2)[0] & Z


async def test_rd_clear_is_copied(gate: Gate, upstream: StubUpstream, path: str) -> None:
    reply = await on_path(gate, upstream, path, lambda: query_wire("host.example.test", flags_clear=0x0100))
    assert not reply.flags & dns.flags.RD and reply.flags & dns.flags.RA
    assert reply.answer  # still answered, as unbound and dnsmasq do for RD=0


async def test_upstream_is_asked_in_lower_case(gate: Gate, upstream: StubUpstream) -> None:
    await on_path(gate, upstream, "miss", lambda: query_wire("HOST.example.test"))
    assert b"\x04host\x07example\x04test\x00" in upstream.received[-1]


async def test_truncated_reply_keeps_header_rules(gate: Gate, upstream: StubUpstream, path: str) -> None:
    upstream.add("big.example.test", *(f'big.example.test. 300 IN TXT "{"x" * 200} {i}"' for i in range(8)))
    reply = await on_path(gate, upstream, path, lambda: query_wire("BIG.example.test", "TXT"))
    assert reply.flags & dns.flags.TC and not reply.answer
    assert reply.question[0].name.to_text() == "BIG.example.test."
    assert not reply.flags & dns.flags.AA and reply.flags & dns.flags.RA
