"""A built-in upstream for the tour and for labs without internet (`dnsgate serve --demo-upstream`):
it answers every name, trackers included, with an address of its own, so a grant visibly turns the
sinkhole's NXDOMAIN into an answer where the real upstream is out of reach.

The addresses are documentation ones (198.51.100.0/24, RFC 5737; 2001:db8::/32, RFC 3849): they
look like a tracker's real answer, and route nowhere. Each name always gets the same address. Only
A and AAAA have data; other types get an empty NOERROR answer. UDP only: its answers are small.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
from typing import Final, cast

from dnsgate.wire import AA, AAAA, HEADER, IN, RR_FIXED, A, Query, opt_record, parse_query, reply_flags

TTL: Final = 300
V4_NETWORK: Final = ipaddress.IPv4Network("198.51.100.0/24")
V6_NETWORK: Final = ipaddress.IPv6Network("2001:db8::/32")
NAME_POINTER: Final = b"\xc0\x0c"  # the question's name, right after the header


def address_for(name: bytes, qtype: int) -> bytes:
    """The address `name` (lower-case wire form) gets: 198.51.100.1-254, or 2001:db8:: and 96 bits."""
    digest = hashlib.sha256(name).digest()
    if qtype == A:
        return (V4_NETWORK[1 + digest[0] % 254]).packed
    return V6_NETWORK.network_address.packed[:4] + digest[:12]


def answer(query: Query) -> bytes:
    records = b""
    if query.qclass == IN and query.qtype in (A, AAAA):
        rdata = address_for(query.name, query.qtype)
        records = NAME_POINTER + RR_FIXED.pack(query.qtype, IN, TTL, len(rdata)) + rdata
    additional = b"" if query.edns is None else opt_record(1232, query.edns.do)
    header = HEADER.pack(query.id, reply_flags(query.flags, 0, AA), 1, 1 if records else 0, 0,
                         1 if additional else 0)
    return header + query.question + records + additional


class DemoUpstream(asyncio.DatagramProtocol):
    transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # uvloop's is not a subclass

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        query = parse_query(data)
        if isinstance(query, Query) and self.transport is not None:
            self.transport.sendto(answer(query), addr)


async def start(host: str = "127.0.0.1", port: int = 0) -> tuple[asyncio.DatagramTransport, int]:
    """Listen on `host:port` (0: a free port); returns the transport (close it to stop) and the port."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(DemoUpstream, local_addr=(host, port))
    return transport, transport.get_extra_info("sockname")[1]
