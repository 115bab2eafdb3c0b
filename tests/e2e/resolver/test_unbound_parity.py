"""dnsgate answers like unbound: both forward to the same stub upstream, and for a set of names
that are not gated, on the cache-miss and on the cache-hit path, the replies agree in RCODE, the
flags that matter, the question as the client wrote it, every section (TTLs within a second) and
EDNS. unbound (the Debian package) runs on loopback on a free port, as a plain forwarder.

The stub plays an upstream with the habits real ones have: some names' CNAMEs come alone (the
chain stops short, as from an authoritative server), classes other than IN are refused, QCLASS *
fails, meta-types get FORMERR. Malformed and unusual packets are compared byte for byte in shape.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from tests.conftest import Gate, make_config, running_gate, zone_for_tests
from tests.e2e.resolver.conftest import system_tool, udp_raw
from tests.support.stub_upstream import StubUpstream

UNBOUND = system_tool("unbound")
pytestmark = [
    pytest.mark.usefixtures("udp_io"),  # every test runs on both UDP paths (dns.udp_io)
    pytest.mark.skipif(UNBOUND is None, reason="unbound not installed (apt install unbound)"),
]

CONFIG = """
server:
    interface: 127.0.0.1
    port: {port}
    do-ip6: no
    do-daemonize: no
    use-syslog: no
    logfile: ""
    verbosity: 1
    chroot: ""
    username: ""
    directory: "{dir}"
    pidfile: ""
    num-threads: 1
    so-reuseport: no
    module-config: "iterator"
    do-not-query-localhost: no
    qname-minimisation: no
    access-control: 127.0.0.0/8 allow
    local-zone: "test." nodefault
    edns-buffer-size: 1232
forward-zone:
    name: "."
    forward-addr: 127.0.0.1@{upstream}
"""


def free_port() -> int:
    """A port free for both UDP and TCP right now (unbound binds it a moment later)."""
    for _ in range(20):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise OSError("no free port")


@dataclass
class Unbound:
    port: int
    process: asyncio.subprocess.Process


def upstream_habits(_name: str, qtype: int, qclass: int) -> int | None:
    """What a real upstream says to what dnsgate (and unbound) should not ask it."""
    if qtype in (41, 249, 250, 253, 254):  # OPT and the meta-types
        return int(dns.rcode.FORMERR)
    if qclass == 255:
        return int(dns.rcode.SERVFAIL)
    return int(dns.rcode.REFUSED) if qclass != 1 else None


@pytest.fixture
async def parity_upstream() -> AsyncIterator[StubUpstream]:
    stub = zone_for_tests(StubUpstream())
    stub.add("alias.example.test", "alias.example.test. 300 IN CNAME host.example.test.")
    stub.add("mail.example.test", "mail.example.test. 300 IN MX 10 mx.example.test.",
             'mail.example.test. 300 IN TXT "v=spf1 -all"')
    stub.add("odd.example.test", "odd.example.test. 300 IN TYPE65280 \\# 4 0a0b0c0d")
    stub.add("big.example.test", *(f'big.example.test. 300 IN TXT "{"x" * 200} {i}"' for i in range(8)))
    stub.add("www.example.test", "www.example.test. 300 IN HTTPS 1 . alpn=h2",
             "www.example.test. 300 IN A 192.0.2.80")
    # chains the upstream leaves unfinished (test_chains.py)
    stub.add("partial.example.test", "partial.example.test. 300 IN CNAME host.example.test.")
    stub.add("c1.example.test", "c1.example.test. 300 IN CNAME c2.example.test.")
    stub.add("c2.example.test", "c2.example.test. 200 IN CNAME host.example.test.")
    stub.add("dangle.example.test", "dangle.example.test. 300 IN CNAME gone.example.test.")
    stub.add("loop1.example.test", "loop1.example.test. 300 IN CNAME loop2.example.test.")
    stub.add("loop2.example.test", "loop2.example.test. 300 IN CNAME loop1.example.test.")
    stub.cname_alone = {"partial.example.test", "c1.example.test", "c2.example.test", "dangle.example.test",
                        "loop1.example.test", "loop2.example.test"}
    stub.rcode_for = upstream_habits
    yield await stub.start()
    await stub.stop()


@pytest.fixture
async def unbound(parity_upstream: StubUpstream, tmp_path: Path) -> AsyncIterator[Unbound]:
    conf = tmp_path / "unbound.conf"
    for _ in range(5):
        port = free_port()
        conf.write_text(CONFIG.format(port=port, dir=tmp_path, upstream=parity_upstream.port))
        assert UNBOUND is not None
        process = await asyncio.create_subprocess_exec(UNBOUND, "-d", "-c", str(conf),
                                                       stdout=asyncio.subprocess.DEVNULL,
                                                       stderr=asyncio.subprocess.PIPE)
        assert process.stderr is not None
        log = b""
        async with asyncio.timeout(15):
            while b"start of service" not in log:  # unbound logs this once it listens
                line = await process.stderr.readline()
                if not line:
                    break
                log += line
        if b"start of service" in log:
            try:
                yield Unbound(port, process)
            finally:
                process.terminate()  # the one process this fixture started
                await process.wait()
            return
        await process.wait()
    pytest.fail(f"unbound did not start: {log.decode(errors='replace')}")


@pytest.fixture
async def dnsgate(parity_upstream: StubUpstream, data_dir: Path) -> AsyncIterator[Gate]:
    async with running_gate(make_config(parity_upstream, data_dir)) as g:
        yield g


FLAGS = dns.flags.QR | dns.flags.AA | dns.flags.TC | dns.flags.RD | dns.flags.RA | dns.flags.AD | dns.flags.CD


def shape(reply: dns.message.Message) -> dict[str, Any]:
    """What a client acts on; TTLs are compared apart (the two caches count down independently)."""
    def section(rrsets: list[Any]) -> list[tuple[str, str, str, tuple[str, ...]]]:
        return sorted((r.name.to_text().lower(), dns.rdatatype.to_text(r.rdtype), str(r.rdclass),
                       tuple(sorted(x.to_text() for x in r))) for r in rrsets)
    return {
        "rcode": reply.rcode(), "flags": dns.flags.to_text(reply.flags & FLAGS),
        "question": [q.to_text() for q in reply.question],
        "answer": section(reply.answer), "authority": section(reply.authority),
        "additional": section(reply.additional),
        "edns": (reply.edns, reply.ednsflags & dns.flags.DO, reply.payload if reply.edns >= 0 else None),
    }


def ttls(reply: dns.message.Message) -> list[int]:
    return [r.ttl for r in sorted(reply.answer + reply.authority, key=lambda r: (r.name, r.rdtype))]


CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("host.example.test", "A", {}),
    ("HOST.Example.TEST", "AAAA", {}),
    ("other.example.test", "A", {"use_edns": 0}),
    ("other.example.test", "AAAA", {}),  # NODATA with SOA
    ("gone.example.test", "A", {"use_edns": 0}),  # NXDOMAIN with SOA
    ("alias.example.test", "A", {}),  # CNAME chain
    ("mail.example.test", "MX", {}),
    ("mail.example.test", "TXT", {"use_edns": 0}),
    ("odd.example.test", "TYPE65280", {}),  # unknown type (RFC 3597)
    ("www.example.test", "HTTPS", {"use_edns": 0}),  # what browsers ask besides A and AAAA
    ("www.example.test", "A", {"use_edns": 0, "payload": 4096}),
    ("big.example.test", "TXT", {}),  # does not fit 512: TC=1
    ("nottrackcmp.net", "A", {}),
    # chains that stop short at the upstream: completed
    ("partial.example.test", "A", {}),
    ("Partial.example.test", "AAAA", {"use_edns": 0}),
    ("c1.example.test", "A", {}),  # two names further
    ("dangle.example.test", "A", {"use_edns": 0}),  # the target does not exist: NXDOMAIN
    ("partial.example.test", "MX", {}),  # the target has none: NODATA with its SOA
    ("loop1.example.test", "A", {}),  # SERVFAIL
    # other classes: refused without asking; QCLASS * answered as IN
    ("host.example.test", "A", {"rdclass": "CH"}),
    ("host.example.test", "TXT", {"rdclass": "HS", "use_edns": 0}),
    ("host.example.test", "A", {"rdclass": "NONE"}),
    ("host.example.test", "A", {"rdclass": "CLASS77"}),
    ("host.example.test", "A", {"rdclass": "ANY"}),
    # meta-types: FORMERR, never forwarded; zone transfers: REFUSED; neither with RA
    ("host.example.test", "TKEY", {}),
    ("host.example.test", "TSIG", {"use_edns": 0}),
    ("host.example.test", "MAILB", {}),
    ("host.example.test", "MAILA", {"use_edns": 0}),
    ("host.example.test", "OPT", {}),
    ("host.example.test", "AXFR", {}),
    ("host.example.test", "IXFR", {"use_edns": 0}),
    # special-use names both answer themselves, with AA (RFC 6303 §3)
    ("localhost", "A", {}),
    ("db.localhost", "AAAA", {"use_edns": 0}),
    ("1.0.0.127.in-addr.arpa", "PTR", {}),
]


@pytest.mark.parametrize(("name", "rdtype", "options"), CASES,
                         ids=["-".join([n, t, *(f"{k}={v}" for k, v in o.items())]) for n, t, o in CASES])
async def test_same_answers_as_unbound(unbound: Unbound, dnsgate: Gate, name: str, rdtype: str,
                                       options: dict[str, Any]) -> None:
    for path in ("miss", "hit"):
        replies = []
        for port in (unbound.port, dnsgate.dns_port):
            q = dns.message.make_query(name, rdtype, **options)
            replies.append(await dns.asyncquery.udp(q, "127.0.0.1", port=port, timeout=3))
        theirs, ours = replies
        assert shape(ours) == shape(theirs), path
        assert all(abs(a - b) <= 1 for a, b in zip(ttls(ours), ttls(theirs), strict=True)), path


async def test_same_full_answer_over_tcp(unbound: Unbound, dnsgate: Gate) -> None:
    for path in ("miss", "hit"):
        replies = []
        for port in (unbound.port, dnsgate.dns_port):
            q = dns.message.make_query("big.example.test", "TXT", use_edns=0)
            replies.append(await dns.asyncquery.tcp(q, "127.0.0.1", port=port, timeout=3))
        assert shape(replies[1]) == shape(replies[0]), path
        assert len(replies[1].answer[0]) == 8


QUESTION = " 04686f7374076578616d706c6504746573740000010001"  # host.example.test A IN
OPT = " 00 0029 04d0 00000000 0000"  # root, OPT, 1232 bytes, EDNS 0, no options
OPT_DO = " 00 0029 04d0 00008000 0000"
PACKETS = {  # header (ID, flags, counts) + sections, in hex; spaces for reading
    "qdcount-0-with-opt": "BEEF 0100 0000 0000 0000 0001" + OPT,
    "cookie-probe": "BEEF 0100 0000 0000 0000 0001 00 0029 04d0 00000000 000c 000a 0008 3132333435363738",
    "qdcount-2-with-opt": "BEEF 0100 0002 0000 0000 0001" + QUESTION * 2 + OPT_DO,
    "opcode-status-with-opt": "BEEF 1100 0001 0000 0000 0001" + QUESTION + OPT_DO,
    "opcode-status": "BEEF 1100 0001 0000 0000 0000" + QUESTION,
    "opcode-15-with-opt": "BEEF 7900 0001 0000 0000 0001" + QUESTION + OPT,
    "update-with-opt": "BEEF 2800 0001 0000 0000 0001 04686f7374076578616d706c6504746573740000060001" + OPT,
}


@pytest.mark.parametrize("packet", list(PACKETS.values()), ids=list(PACKETS))
async def test_same_error_replies_as_unbound(unbound: Unbound, dnsgate: Gate, packet: str) -> None:
    """FORMERR and NOTIMP keep the question and answer a query's OPT with one (RFC 6891 §6.1.1)."""
    data = bytes.fromhex(packet.replace(" ", ""))
    theirs, ours = [await udp_raw(port, data, timeout=3) for port in (unbound.port, dnsgate.dns_port)]
    assert theirs is not None and ours is not None
    assert shape(dns.message.from_wire(ours)) == shape(dns.message.from_wire(theirs))
    assert ours[:12] == theirs[:12]  # ID, flags and every count
