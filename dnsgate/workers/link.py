"""The primary's line to one worker: a socketpair carrying length-prefixed pickled messages.

Pickle is safe here: both ends are this program, started by the primary, and the socketpair is
reachable by no one else.
"""

from __future__ import annotations

import asyncio
import pickle
import select
import socket
import struct
from collections.abc import Callable
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


class LinkGuard:
    """Is the line to the primary still open? A worker asks before each batch of queries it answers
    (once per turn of its event loop), so that it never answers from a table nobody updates: when it
    wakes from a stop, the queries that waited in its socket may come before the line's end is read.

    Calling it costs one attribute read, or one poll(2) without reading (the line's pending messages
    stay for the reader) on the first call of a turn. `on_lost` is called once the line is found
    closed; the guard then answers False for good."""

    __slots__ = ("_checked", "_loop", "_on_lost", "_open", "_poll")

    def __init__(self, sock: socket.socket, on_lost: Callable[[], None]) -> None:
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLRDHUP)  # (hang-ups and errors are always reported)
        self._loop = asyncio.get_running_loop()
        self._on_lost = on_lost
        self._checked = False
        self._open = True

    def __call__(self) -> bool:
        if self._checked:
            return self._open
        if self._poll.poll(0):
            self._open = False
            self._checked = True  # for good
            self._on_lost()
            return False
        self._checked = True
        self._loop.call_soon(self._expire)  # runs before the loop's next wait for I/O
        return True

    def _expire(self) -> None:
        if self._open:
            self._checked = False
