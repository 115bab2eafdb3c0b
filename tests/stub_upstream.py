"""A DNS server on loopback that the tests control: it plays dnsgate's upstream.

Built on dnslib (the tests may use it freely). Answers come from `zone` (name -> RRs in zone-file
text); unknown names get NXDOMAIN with an SOA. Behaviours for fault tests: `silent` (never
answers), `delay`, `truncate_udp` (UDP replies carry TC=1 and no records; TCP gets the full
answer), `wrong_id_first` (a reply with a wrong ID before the right one), `rcode` (answer every
query with this RCODE). `queries` records (name, type, transport) of every query received.
"""

from __future__ import annotations

import asyncio
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from dnslib import QTYPE, RCODE, RR, DNSRecord


@dataclass
class StubUpstream:
    zone: dict[str, list[str]] = field(default_factory=dict)
    silent: bool = False
    delay: float = 0.0
    truncate_udp: bool = False
    wrong_id_first: bool = False
    rcode: int | None = None
    queries: list[tuple[str, str, str]] = field(default_factory=list)
    port: int = 0
    host: str = "127.0.0.1"
    _udp: asyncio.DatagramTransport | None = None
    _tcp: asyncio.Server | None = None

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
            return self
        raise OSError("no port free for both UDP and TCP")

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()

    def record(self, data: bytes, transport: str) -> None:
        request = DNSRecord.parse(data)
        self.queries.append((str(request.q.qname).lower().rstrip("."), QTYPE.get(request.q.qtype), transport))

    def answer(self, data: bytes, transport: str) -> bytes | None:
        request = DNSRecord.parse(data)
        name = str(request.q.qname).lower().rstrip(".")
        reply = request.reply()
        if self.rcode is not None:
            reply.header.rcode = self.rcode
            return bytes(reply.pack())
        records = [RR.fromZone(text)[0] for text in self.zone.get(name, [])]
        matching = [rr for rr in records if rr.rtype == request.q.qtype or rr.rtype == QTYPE.CNAME]
        if records:
            for rr in matching:
                reply.add_answer(rr)
        else:
            reply.header.rcode = RCODE.NXDOMAIN
        if not matching:
            zone = ".".join(name.split(".")[-2:]) or "."
            reply.add_auth(*RR.fromZone(f"{zone}. 300 IN SOA ns.{zone}. host.{zone}. 1 3600 600 86400 60"))
        if transport == "udp" and self.truncate_udp:
            reply.rr, reply.auth = [], []
            reply.header.tc = 1
        return bytes(reply.pack())

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                length = struct.unpack(">H", await reader.readexactly(2))[0]
                data = await reader.readexactly(length)
                self.record(data, "tcp")
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
        self.stub.record(data, "udp")
        if self.stub.silent:
            return
        if self.stub.delay:
            task = asyncio.get_running_loop().create_task(self._later(data, addr))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            return
        self._send(data, addr)

    async def _later(self, data: bytes, addr: Any) -> None:
        await asyncio.sleep(self.stub.delay)
        self._send(data, addr)

    def _send(self, data: bytes, addr: Any) -> None:
        reply = self.stub.answer(data, "udp")
        if reply is None:
            return
        if self.stub.wrong_id_first:
            self.transport.sendto(bytes([reply[0] ^ 0xFF]) + reply[1:], addr)
        self.transport.sendto(reply, addr)

