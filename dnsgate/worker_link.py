"""The primary's line to one worker: a socketpair carrying length-prefixed pickled messages.

Pickle is safe here: both ends are this program, started by the primary, and the socketpair is
reachable by no one else.
"""

from __future__ import annotations

import asyncio
import pickle
import socket
import struct
from typing import Any, Final

HEADER: Final = struct.Struct("!I")


class LinkClosed(Exception):
    """The other end went away (it exited, or closed the line)."""


class Link:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def over(cls, sock: socket.socket) -> Link:
        reader, writer = await asyncio.open_connection(sock=sock)
        return cls(reader, writer)

    @staticmethod
    def pack(*message: Any) -> bytes:
        data = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
        return HEADER.pack(len(data)) + data

    def send(self, *message: Any) -> None:
        """Queue a message (pickled now: what it refers to may change after this returns)."""
        self.write(self.pack(*message))

    def write(self, packed: bytes) -> None:
        if not self.writer.is_closing():  # (else the reader finds out why)
            self.writer.write(packed)

    async def receive(self) -> tuple[Any, ...]:
        try:
            (size,) = HEADER.unpack(await self.reader.readexactly(HEADER.size))
            message = pickle.loads(await self.reader.readexactly(size))
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise LinkClosed(str(exc)) from None
        if not isinstance(message, tuple) or not message:
            raise LinkClosed(f"unreadable message {type(message).__name__}")
        return message

    async def drain(self) -> None:
        try:
            await self.writer.drain()
        except ConnectionError as exc:
            raise LinkClosed(str(exc)) from None

    def close(self) -> None:
        self.writer.close()
