"""A small TCP proxy on loopback, to cut one dnsgate instance off from Redis while others go on.

It runs in the test's event loop, between the instance and the Redis it would otherwise reach:
- `passing()`: bytes flow both ways (the default);
- `partition()`: nothing flows, but nothing is lost either: bytes sent meanwhile wait in the proxy
  and arrive when `heal()` is called, as TCP's retransmissions deliver them after a real network
  partition heals (a command that timed out can still reach Redis late);
- `drop_replies(after)`: requests reach Redis, its replies are thrown away (the answer to a change
  is lost after Redis recorded it), from the first request that contains `after` on;
- `cut()`: every connection is closed and new ones are refused, until `heal()`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class TcpProxy:
    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.host = host
        self.target_port = target_port
        self.port = 0
        self.mode = "pass"
        self._server: asyncio.Server | None = None
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._arm_on = b""

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def passing(self) -> None:
        self.mode = "pass"
        self._arm_on = b""
        self._flowing.set()

    def partition(self) -> None:
        self.mode = "partition"
        self._flowing.clear()

    def drop_replies(self, after: bytes = b"") -> None:
        self._arm_on = after
        self.mode = "drop_replies" if not after else "pass"
        self._flowing.set()

    def cut(self) -> None:
        self.mode = "cut"
        self._flowing.set()
        for client, upstream in list(self._links):
            client.close()
            upstream.close()

    def heal(self) -> None:
        self.passing()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "cut":
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            writer.close()
            return
        link = (writer, up_writer)
        self._links.add(link)
        pumps = [asyncio.create_task(self._pump(reader, up_writer, replies=False)),
                 asyncio.create_task(self._pump(up_reader, writer, replies=True))]
        for task in pumps:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
            self._links.discard(link)
            writer.close()
            up_writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, replies: bool) -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                return
            await self._flowing.wait()  # a partition holds the bytes until it heals
            if self.mode == "cut":
                return
            if not replies and self._arm_on and self._arm_on in data:
                self._arm_on, self.mode = b"", "drop_replies"  # this request's reply is the first one lost
            if replies and self.mode == "drop_replies":
                continue
            writer.write(data)
            await writer.drain()

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def tcp_proxy(target_port: int) -> AsyncIterator[TcpProxy]:
    proxy = await TcpProxy(target_port).start()
    try:
        yield proxy
    finally:
        await proxy.stop()
