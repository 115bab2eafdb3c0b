"""The DNS-over-HTTPS upstream client (RFC 8484): one HTTP/2 connection per https:// server, every
query a POST on a stream of its own. A module of its own so that HTTP/2 is imported only by a
process that has such a server (the composition root passes it to Upstreams then)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions

from dnsgate.config import UpstreamAddress
from dnsgate.dns.upstreams import STREAM_IDLE, BadReply, KeptConnection, Upstreams, is_reply_to


class DohStream(KeptConnection):
    """One HTTP/2 connection to a DNS-over-HTTPS server (RFC 8484), reused by every query: each a
    POST of application/dns-message on a stream of its own, answered as each completes."""

    tls: ssl.SSLContext

    def __init__(self, owner: Upstreams, address: UpstreamAddress, tls: ssl.SSLContext) -> None:
        super().__init__(owner, address, tls)
        self.authority = (address.tls_name or (f"[{address.host}]" if ":" in address.host else address.host)) + \
            ("" if address.port == 443 else f":{address.port}")
        self.h2: h2.connection.H2Connection | None = None
        self.pending: dict[int, _DohReply] = {}

    async def query(self, message: bytes, qid: int, question: bytes) -> bytes:
        """POST `message` and wait for its reply; the caller bounds the time."""
        for attempt in range(2):
            reused = self.writer is not None and not self.writer.is_closing()
            conn, writer = await self._connection()
            if self.idle is not None:
                self.idle.cancel()
                self.idle = None
            stream_id = -1
            try:
                stream_id = conn.get_next_available_stream_id()
                reply = self.pending[stream_id] = _DohReply(asyncio.get_running_loop().create_future(), question,
                                                            qid)
                conn.send_headers(stream_id, [
                    (":method", "POST"), (":scheme", "https"), (":authority", self.authority),
                    (":path", self.address.path), ("accept", "application/dns-message"),
                    ("content-type", "application/dns-message"), ("content-length", str(len(message)))])
                conn.send_data(stream_id, message, end_stream=True)
                writer.write(conn.data_to_send())
                await writer.drain()
                return await reply.future
            except (ConnectionError, h2.exceptions.ProtocolError) as exc:
                if not reused or attempt:
                    raise ConnectionError(str(exc) or type(exc).__name__) from exc
                # the server had closed the idle connection (GOAWAY): once more on a new one
                self.close()
            finally:
                self.pending.pop(stream_id, None)
                if not self.pending and self.writer is not None:
                    self.idle = asyncio.get_running_loop().call_later(STREAM_IDLE, self.close)
        raise ConnectionError("unreachable")  # pragma: no cover

    async def _connection(self) -> tuple[h2.connection.H2Connection, asyncio.StreamWriter]:
        async with self.lock:
            if self.writer is None or self.writer.is_closing() or self.h2 is None:
                a = self.address
                reader, writer = await asyncio.open_connection(a.host, a.port, ssl=self.tls,
                                                               server_hostname=a.tls_name or a.host)
                tls = writer.get_extra_info("ssl_object")
                if tls is None or tls.selected_alpn_protocol() != "h2":
                    writer.close()
                    raise ConnectionError("the server does not speak HTTP/2 (ALPN h2)")
                conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
                conn.initiate_connection()
                writer.write(conn.data_to_send())
                self.h2, self.writer = conn, writer
                self.reader_task = asyncio.get_running_loop().create_task(self._read(reader, writer, conn))
            return self.h2, self.writer

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    conn: h2.connection.H2Connection) -> None:
        problem: Exception = ConnectionError("connection closed by the upstream")
        try:
            while data := await reader.read(65536):
                for event in conn.receive_data(data):
                    self._event(event, conn)
                out = conn.data_to_send()
                if out:
                    writer.write(out)
        except (OSError, h2.exceptions.ProtocolError) as exc:
            problem = ConnectionError(f"connection lost: {exc}")
        finally:
            if self.writer is writer:
                self.writer = self.h2 = None
            writer.close()
            for reply in self.pending.values():
                if not reply.future.done():
                    reply.future.set_exception(problem)

    def _event(self, event: h2.events.Event, conn: h2.connection.H2Connection) -> None:
        stream_id = getattr(event, "stream_id", None)
        reply = self.pending.get(stream_id) if stream_id is not None else None
        if isinstance(event, h2.events.ResponseReceived) and reply is not None:
            for name, value in event.headers or ():
                if bytes(name) == b":status":
                    reply.status = int(bytes(value))
                elif bytes(name) == b"content-type":
                    reply.content_type = bytes(value).split(b";")[0].strip().lower()
        elif isinstance(event, h2.events.DataReceived):
            if event.flow_controlled_length and stream_id is not None:
                conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
            if reply is not None:
                reply.body += event.data or b""
                if len(reply.body) > 65535:
                    self._fail(reply, BadReply("a reply larger than a DNS message"))
        elif isinstance(event, h2.events.StreamEnded) and reply is not None:
            body = bytes(reply.body)
            if reply.status != 200:
                self._fail(reply, BadReply(f"HTTP status {reply.status}"))
            elif reply.content_type != b"application/dns-message":
                self._fail(reply, BadReply("not application/dns-message"))
            elif len(body) < 12 or (body[0] << 8) | body[1] != reply.qid or not is_reply_to(body, reply.question):
                self.owner.ignored += 1
                self._fail(reply, BadReply("not the reply to the query"))
            elif not reply.future.done():
                reply.future.set_result(body)
        elif isinstance(event, h2.events.StreamReset) and reply is not None:
            self._fail(reply, ConnectionError(f"stream reset by the upstream ({event.error_code})"))
        elif isinstance(event, h2.events.ConnectionTerminated):
            for waiting in self.pending.values():
                self._fail(waiting, ConnectionError("the upstream closed the connection (GOAWAY)"))

    @staticmethod
    def _fail(reply: _DohReply, exc: Exception) -> None:
        if not reply.future.done():
            reply.future.set_exception(exc)

    def close(self) -> None:
        if self.writer is not None:
            if self.h2 is not None:  # GOAWAY first: the server may end the connection cleanly
                with contextlib.suppress(Exception):
                    self.h2.close_connection()
                    self.writer.write(self.h2.data_to_send())
            self.h2 = None
        super().close()


@dataclass(slots=True)
class _DohReply:
    future: asyncio.Future[bytes]
    question: bytes
    qid: int
    status: int = 0
    content_type: bytes = b""
    body: bytearray = field(default_factory=bytearray)
