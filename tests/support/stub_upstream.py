"""A DNS server on loopback that the tests control: it plays dnsgate's upstream.

Built on dnslib (the tests may use it freely). Answers come from `zone` (name -> RRs in zone-file
text, generic `TYPE65280 \\# 4 01020304` included); a CNAME is followed within the zone, as a
recursive resolver would; RRSIGs are sent only to DO queries, for the type they cover; unknown
names get NXDOMAIN with an SOA.

Behaviours for fault tests: `silent` (never answers), `delay`, `truncate_udp` (UDP replies carry
TC=1 and no records; TCP gets the full answer), `rcode` (answer every query with this RCODE),
`set_ad` (AD in every reply), `reply_options` (EDNS options added to every reply), `rcode_for(name,
qtype, qclass)` (this RCODE for the questions it returns one for, e.g. REFUSED for class CH or
FORMERR for a meta-type), `cname_alone` (names whose CNAME comes alone, without its target's
records: a chain that stops short, as authoritative servers and some forwarders send it when the
target lies elsewhere). Spoofing, each sent before the genuine reply: `wrong_id_first` (a wrong
ID), `spoof_first` (the right ID and question, but from another address: a different port),
`wrong_question_first` (the right ID and source, another question); forged replies answer
BOGUS_ADDRESS; `forge_only` sends the forgeries but never the genuine reply. `tls` (an
ssl.SSLContext) adds a DNS-over-TLS listener on `tls_port`. Hostile upstreams: `rewrite(query,
reply)` replaces each reply with what it returns (garbage, a compression loop, bad RDATA; None
sends nothing); `reset_tcp` resets every TCP connection (RST) as soon as a query arrives.
`max_in_flight` is the most UDP queries the stub held at once (with `delay`).

`queries` records (name, type, transport) of every query received, `received` the raw queries
and `sources` the (host, port) they came from
(UDP); `connections` counts TCP and TLS connections.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dnslib import QTYPE, RCODE, RR, A, DNSRecord, EDNSOption

BOGUS_ADDRESS = "203.0.113.66"


@dataclass
class StubUpstream:
    zone: dict[str, list[str]] = field(default_factory=dict)
    silent: bool = False
    delay: float = 0.0
    truncate_udp: bool = False
    wrong_id_first: bool = False
    spoof_first: bool = False
    wrong_question_first: bool = False
    forge_only: bool = False
    rcode: int | None = None
    rcode_for: Callable[[str, int, int], int | None] | None = None
    cname_alone: set[str] = field(default_factory=set)
    set_ad: bool = False
    reply_options: list[EDNSOption] = field(default_factory=list)
    tls: ssl.SSLContext | None = None
    rewrite: Callable[[bytes, bytes], bytes | None] | None = None
    reset_tcp: bool = False
    default_a: str = ""  # names not in the zone get this A record (TTL 0: never cached) instead of NXDOMAIN
    in_flight: int = 0
    max_in_flight: int = 0
    queries: list[tuple[str, str, str]] = field(default_factory=list)
    received: list[bytes] = field(default_factory=list)
    sources: list[tuple[str, int]] = field(default_factory=list)
    connections: int = 0  # TCP and TLS connections accepted
    port: int = 0
    tls_port: int = 0
    host: str = "127.0.0.1"
    _udp: asyncio.DatagramTransport | None = None
    _spoofer: asyncio.DatagramTransport | None = None
    _tcp: asyncio.Server | None = None
    _tls_server: asyncio.Server | None = None
    _seen: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, name: str, *records: str) -> None:
        """add('host.example.test', 'host.example.test. 300 IN A 192.0.2.1', ...)"""
        self.zone.setdefault(name.lower().rstrip("."), []).extend(records)

    def count(self, name: str) -> int:
        wanted = name.lower().rstrip(".")
        return sum(1 for n, _, _ in self.queries if n == wanted)

    def counts(self) -> Counter[str]:
        return Counter(n for n, _, _ in self.queries)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> StubUpstream:
        loop = asyncio.get_running_loop()
        for _ in range(20):  # the UDP port the kernel picks may be taken for TCP: try another
            self._udp, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), local_addr=(self.host, 0))
            self.port = self._udp.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, self.host, self.port)
            except OSError:
                self._udp.close()
                continue
            self._spoofer, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol,
                                                                   local_addr=(self.host, 0))
            if self.tls is not None:
                self._tls_server = await asyncio.start_server(self._serve_tcp, self.host, 0, ssl=self.tls)
                self.tls_port = self._tls_server.sockets[0].getsockname()[1]
            return self
        raise OSError("no port free for both UDP and TCP")

    async def stop(self) -> None:
        for transport in (self._udp, self._spoofer):
            if transport is not None:
                transport.close()
        for server in (self._tcp, self._tls_server):
            if server is not None:
                server.close()
                await server.wait_closed()

    async def wait_for(self, name: str, count: int, timeout: float = 3.0) -> None:
        """Wait until `name` has been asked `count` times (bounded)."""
        async with asyncio.timeout(timeout):
            while self.count(name) < count:
                self._seen.clear()
                await self._seen.wait()

    def record(self, data: bytes, transport: str) -> None:
        request = DNSRecord.parse(data)
        self._seen.set()
        self.received.append(data)
        self.queries.append((str(request.q.qname).lower().rstrip("."), QTYPE.get(request.q.qtype), transport))

    def options_received(self) -> list[int]:
        """The EDNS option codes of every query received so far."""
        codes: list[int] = []
        for data in self.received:
            for rr in DNSRecord.parse(data).ar:
                if rr.rtype == QTYPE.OPT:
                    codes += [o.code for o in rr.rdata]
        return codes

    def _records(self, name: str) -> list[Any]:
        return [RR.fromZone(text)[0] for text in self.zone.get(name, [])]

    def answer(self, data: bytes, transport: str) -> bytes | None:
        request = DNSRecord.parse(data)
        name = str(request.q.qname).lower().rstrip(".")
        qtype = request.q.qtype
        reply = request.reply()
        reply.header.aa = 1  # as an authority would: dnsgate must clear it
        do = any(rr.rtype == QTYPE.OPT and rr.ttl & 0x8000 for rr in request.ar)
        reply.header.ad = int(self.set_ad)  # dnslib would echo the query's AD
        rcode = None if self.rcode_for is None else self.rcode_for(name, qtype, request.q.qclass)
        rcode = self.rcode if rcode is None else rcode
        if rcode is not None:
            reply.header.rcode = rcode
            return self._finish(reply, request, transport)
        records = self._records(name)
        if not records and self.default_a and qtype == QTYPE.A:
            records = [RR(name, QTYPE.A, ttl=0, rdata=A(self.default_a))]
            for rr in records:
                reply.add_answer(rr)
            return self._finish(reply, request, transport) if transport == "tcp" or not self.truncate_udp \
                else self._truncated(reply, request)
        matching: list[Any] = []
        owner = name
        for _ in range(8):  # follow CNAMEs within the zone
            here = self._records(owner) if owner != name else records
            found = [rr for rr in here if rr.rtype in (qtype, QTYPE.CNAME) and rr.rtype != QTYPE.RRSIG]
            signatures = [rr for rr in here if rr.rtype == QTYPE.RRSIG and do
                          and str(rr.rdata).split()[0] in (QTYPE.get(qtype), "CNAME")]
            matching += found + signatures
            cname = next((rr for rr in found if rr.rtype == QTYPE.CNAME and qtype != QTYPE.CNAME), None)
            if cname is None or owner in self.cname_alone:
                break
            owner = str(cname.rdata.label).lower().rstrip(".")
        if records:
            for rr in matching:
                reply.add_answer(rr)
        else:
            reply.header.rcode = RCODE.NXDOMAIN
        if not any(rr.rtype == qtype for rr in matching) and (cname is None or owner not in self.cname_alone):
            zone = ".".join(owner.split(".")[-2:]) or "."
            reply.add_auth(*RR.fromZone(f"{zone}. 300 IN SOA ns.{zone}. host.{zone}. 1 3600 600 86400 60"))
        if transport == "udp" and self.truncate_udp:
            reply.rr, reply.auth = [], []
            reply.header.tc = 1
        return self._finish(reply, request, transport)

    def _truncated(self, reply: Any, request: Any) -> bytes | None:
        reply.rr, reply.auth = [], []
        reply.header.tc = 1
        return self._finish(reply, request, "udp")

    def _finish(self, reply: Any, request: Any, transport: str) -> bytes | None:
        if any(rr.rtype == QTYPE.OPT for rr in request.ar):
            reply.add_ar(RR(rtype=QTYPE.OPT, rclass=4096, ttl=0, rdata=list(self.reply_options)))
        packed = bytes(reply.pack())
        return packed if self.rewrite is None else self.rewrite(bytes(request.pack()), packed)

    def forged(self, data: bytes, *, question: str | None = None, id_xor: int = 0) -> bytes:
        """A reply an attacker would send: BOGUS_ADDRESS for the question (or another one)."""
        request = DNSRecord.parse(data)
        if question is not None:
            request.q.qname = question
        reply = request.reply()
        reply.header.id ^= id_xor
        reply.add_answer(RR(request.q.qname, QTYPE.A, ttl=3600, rdata=A(BOGUS_ADDRESS)))
        return bytes(reply.pack())

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                length = struct.unpack(">H", await reader.readexactly(2))[0]
                data = await reader.readexactly(length)
                self.record(data, "tcp")
                if self.reset_tcp:
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    return
                if self.silent:
                    continue
                if self.delay:
                    await asyncio.sleep(self.delay)
                reply = self.answer(data, "tcp")
                if reply is not None:
                    writer.write(struct.pack(">H", len(reply)) + reply)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, stub: StubUpstream) -> None:
        self.stub = stub
        self.transport: Any = None
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            self.stub.record(data, "udp")
        except Exception:  # a name dnslib cannot read (binary labels): an upstream that ignores it
            return
        self.stub.sources.append((addr[0], addr[1]))
        if self.stub.silent:
            return
        if self.stub.delay:
            self.stub.in_flight += 1
            self.stub.max_in_flight = max(self.stub.max_in_flight, self.stub.in_flight)
            task = asyncio.get_running_loop().create_task(self._later(data, addr))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            return
        self._send(data, addr)

    async def _later(self, data: bytes, addr: Any) -> None:
        try:
            await asyncio.sleep(self.stub.delay)
            self._send(data, addr)
        finally:
            self.stub.in_flight -= 1

    def _send(self, data: bytes, addr: Any) -> None:
        stub = self.stub
        try:
            reply = stub.answer(data, "udp")
        except Exception:  # dnslib cannot build an answer for this name: an upstream that ignores it
            return
        if reply is None:
            return
        if stub.wrong_id_first:
            self.transport.sendto(stub.forged(data, id_xor=0xFFFF), addr)
        if stub.spoof_first and stub._spoofer is not None:
            stub._spoofer.sendto(stub.forged(data), addr)  # right ID and question, wrong source port
        if stub.wrong_question_first:
            self.transport.sendto(stub.forged(data, question="bogus.example.test"), addr)
        if not stub.forge_only:
            self.transport.sendto(reply, addr)

