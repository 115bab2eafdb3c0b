"""A client over TCP that is slow on purpose (slow loris): what the DNS-over-TCP and the API
listeners' limit tests send and how they let go."""

from __future__ import annotations

import asyncio

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def drip(conn: Conn, data: bytes, every: float) -> None:
    """`data` a byte at a time, `every` seconds apart, until it is sent or the server has closed the
    connection (with a FIN, or a reset)."""
    reader, writer = conn
    for byte in data:
        if reader.at_eof() or writer.transport.is_closing():
            return
        writer.write(bytes([byte]))
        await asyncio.sleep(every)


def close_all(*conns: Conn) -> None:
    for _, writer in conns:
        writer.close()
