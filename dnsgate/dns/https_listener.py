"""DNS over HTTPS (RFC 8484): `GET /dns-query?dns=` and `POST /dns-query` over HTTP/2 (negotiated
by ALPN) or HTTP/1.1, answered by the same pipeline as every other transport.

A connection is a DNS-over-TLS connection's twin: admitted against the same table of TCP
connections when it opens (total, per client, the idle longest making room), the TLS handshake in
memory and bounded by `query_timeout`, then HTTP instead of 2-byte framing. h2 and h11 (sans-I/O)
read and write HTTP; this module decides what a request means (`decode_request`, pure) and what the
answer's headers say (`reply_headers`, pure: RFC 8484 §5.1 caching, never beyond the smallest TTL,
and `private`, since every answer is one client's: its consent decided it).

The client is the connection's address; behind a reverse proxy listed in `dns.trusted_proxies`, the
last address of X-Forwarded-For that is not a trusted proxy.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ipaddress
import logging
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final
from urllib.parse import parse_qs, urlsplit

import h11

# From the package, not `import h2.config`: dnsgate.dns defers HTTP/2 until it is used, and importing
# a deferred module by its dotted name loads it (the import system reads its spec), while a name
# taken from the package stays a placeholder until the first HTTP/2 client.
from h2 import config as h2_config
from h2 import connection as h2_connection
from h2 import errors as h2_errors
from h2 import events as h2_events
from h2 import exceptions as h2_exceptions
from h2 import settings as h2_settings

from dnsgate.addresses import normalize_client
from dnsgate.dns.forwarding import Resolver
from dnsgate.dns.listeners import INTERNAL_ERROR, StreamConnectionBase, TcpTable
from dnsgate.dns.pipeline import Forward, Pipeline
from dnsgate.dns.tally import HTTPS
from dnsgate.dns.tls import TlsFailure, TlsFiles, TlsSession
from dnsgate.tasks import TaskSet
from dnsgate.wire import OPT, SOA, pad_reply, padding_requested, read_rr_header, rejection_reply, scan_name

log = logging.getLogger(__name__)

PATH: Final = "/dns-query"
CONTENT_TYPE: Final = "application/dns-message"
MAX_MESSAGE: Final = 65535  # a DNS message never exceeds it (RFC 1035's 16-bit length)
MAX_TARGET: Final = 8192  # request line's target: a GET's dns= of a query up to about 6 KB
MAX_HEADERS: Final = 16384  # the whole header block (HTTP/1.1) or header list (HTTP/2)
HEADER_SIZE: Final = 12


# ----------------------------------------------------------------------------------------------
# What a request means, and what the reply says: pure


@dataclass(frozen=True, slots=True)
class HttpError:
    status: int
    reason: str  # the body, plain text: DoH clients show it, none parses it
    allow: str = ""  # for 405


def b64url_decode(text: str) -> bytes | None:
    """RFC 4648 §5 base64url, without padding as RFC 8484 §4.1 sends it (padding is tolerated);
    None for anything else (another alphabet, a stray character, an impossible length)."""
    stripped = text.rstrip("=")
    if len(text) - len(stripped) > 2 or len(stripped) % 4 == 1:
        return None
    try:
        raw = stripped.encode("ascii")
    except UnicodeEncodeError:
        return None
    if raw.translate(None, b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"):
        return None
    try:
        return base64.urlsafe_b64decode(raw + b"=" * (-len(raw) % 4))
    except (binascii.Error, ValueError):  # (the alphabet was checked; kept for safety)
        return None


def decode_request(method: str, target: str, content_type: str | None, body: bytes) -> bytes | HttpError:
    """The DNS query a DoH request carries, or the HTTP error it gets (RFC 8484 §4.1)."""
    if len(target) > MAX_TARGET:
        return HttpError(414, f"request target longer than {MAX_TARGET} bytes")
    parts = urlsplit(target)
    if parts.path != PATH:
        return HttpError(404, f"DNS over HTTPS is served at {PATH}")
    if method == "GET":
        values = parse_qs(parts.query, keep_blank_values=True).get("dns")
        if not values:
            return HttpError(400, "missing dns= parameter (the query, base64url without padding)")
        if len(values) > 1:
            return HttpError(400, "more than one dns= parameter")
        message = b64url_decode(values[0])
        if message is None:
            return HttpError(400, "dns= is not base64url")
    elif method == "POST":
        media = (content_type or "").split(";", 1)[0].strip().lower()
        if media != CONTENT_TYPE:
            return HttpError(415, f"Content-Type must be {CONTENT_TYPE}")
        if len(body) > MAX_MESSAGE:
            return HttpError(413, f"a DNS message is at most {MAX_MESSAGE} bytes")
        message = body
    else:
        return HttpError(405, "use GET or POST", allow="GET, POST")
    if len(message) < HEADER_SIZE:
        return HttpError(400, "not a DNS message: shorter than its header")
    if message[2] & 0x80:
        return HttpError(400, "not a DNS query: QR is set")
    return message


def smallest_ttl(reply: bytes) -> int:
    """The freshness lifetime RFC 8484 §5.1 allows: the smallest TTL of the answer section; for an
    answer without records, its SOA's negative TTL (RFC 2308 §5: the smaller of its TTL and
    MINIMUM); 0 for anything else (errors, an unreadable reply)."""
    if len(reply) < HEADER_SIZE:
        return 0
    _, flags, qdcount, ancount, nscount, _ = struct.unpack_from(">HHHHHH", reply)
    offset = HEADER_SIZE
    for _ in range(qdcount):
        end = scan_name(reply, offset)
        if end < 0:
            return 0
        offset = end + 5
    smallest: int | None = None
    for i in range(ancount + nscount):
        rr = read_rr_header(reply, offset)
        if rr is None:
            return 0
        owner_end, rtype, _, ttl, rdlen = rr
        if i < ancount and rtype != OPT:
            smallest = ttl if smallest is None else min(smallest, ttl)
        elif i >= ancount and ancount == 0 and rtype == SOA and rdlen >= 20:
            minimum = struct.unpack_from(">I", reply, owner_end + 10 + rdlen - 4)[0]
            negative = min(ttl, minimum)
            smallest = negative if smallest is None else min(smallest, negative)
        offset = owner_end + 10 + rdlen
    if smallest is None or flags & 0xF not in (0, 3):  # NOERROR or NXDOMAIN only
        return 0
    return min(smallest, 2**31 - 1)


def reply_headers(reply: bytes) -> list[tuple[str, str]]:
    """The headers of a 200 carrying `reply`."""
    return [("content-type", CONTENT_TYPE), ("content-length", str(len(reply))),
            ("cache-control", f"private, max-age={smallest_ttl(reply)}")]


def error_headers(error: HttpError, body: bytes) -> list[tuple[str, str]]:
    headers = [("content-type", "text/plain; charset=utf-8"), ("content-length", str(len(body))),
               ("cache-control", "no-store")]
    if error.allow:
        headers.append(("allow", error.allow))
    return headers


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def proxies(networks: Sequence[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(n, strict=False) for n in networks)


def client_behind(peer: str, forwarded: list[str], trusted: tuple[Network, ...]) -> str | HttpError:
    """Who asked: `peer`, unless it is a trusted proxy and X-Forwarded-For (every header of it, in
    order) names someone; then the last address that is not a trusted proxy (earlier ones can be
    written by anyone)."""
    if not trusted or not forwarded or not _trusted(peer, trusted):
        return peer
    chain = [a.strip() for header in forwarded for a in header.split(",") if a.strip()]
    for address in reversed(chain):
        try:
            client = normalize_client(address.strip("[]"))
        except ValueError:
            return HttpError(400, f"X-Forwarded-For from a trusted proxy names no address: {address!r}")
        if not _trusted(client, trusted):
            return client
    return peer if not chain else normalize_client(chain[0].strip("[]"))


def _trusted(address: str, trusted: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


# ----------------------------------------------------------------------------------------------
# Connections


@dataclass(slots=True)
class Request:
    method: str = ""
    target: str = ""
    content_type: str | None = None
    forwarded: list[str] | None = None
    body: bytearray | None = None
    too_large: bool = False


class HttpsConnection(StreamConnectionBase, asyncio.Protocol):
    """One DoH connection: TLS, then HTTP/2 or HTTP/1.1 by ALPN, each request answered by the
    pipeline as the client's query."""

    def __init__(self, pipeline: Pipeline, resolver: Resolver, tasks: TaskSet, table: TcpTable, tls: TlsFiles,
                 trusted: tuple[Network, ...]) -> None:
        self.pipeline = pipeline
        self.resolver = resolver
        self.tasks = tasks
        self.table = table
        self.limits = table.limits
        self.tls = tls
        self.trusted = trusted
        self.transport: asyncio.Transport | None = None
        self.secure: TlsSession | None = None
        self.http: _Http2 | _Http11 | None = None
        self.client = ""
        self.peer = ""
        self.outstanding = 0
        self.requests = 0
        self.last_active = 0.0
        self.idle_timer: asyncio.TimerHandle | None = None
        self.slow_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream = self._admitted(transport)
        self.peer = self.client  # (the client is the peer until a trusted proxy names another)
        if stream is None:
            return
        context = self.tls.doh
        if context is None:  # (never: the listener starts once a certificate is loaded)
            stream.abort()
            return
        self.secure = TlsSession(context)
        stream.set_write_buffer_limits(high=256 * 1024)
        self.slow_timer = asyncio.get_running_loop().call_later(self.limits.query_timeout, self._too_slow,
                                                                "TLS handshake not finished in time")

    def data_received(self, data: bytes) -> None:
        if self.secure is None or self.transport is None:
            return
        handshaking = not self.secure.established
        try:
            plain = self.secure.receive(data)
        except TlsFailure as exc:
            if handshaking:
                self.table.closed["tls_handshake"] += 1
            log.debug("DoH TLS with %s failed: %s", self.peer, exc)
            self.flush()
            self.abort()
            return
        if handshaking and self.secure.established:
            self._cancel_slow()
            self.http = _Http2(self) if self.secure.alpn == "h2" else _Http11(self)
            self.last_active = asyncio.get_running_loop().time()
            self._arm_idle_timer()
        if self.http is not None and plain:
            self.http.received(plain)
        self.flush()

    def write(self, data: bytes) -> None:
        """Plaintext out, through TLS."""
        self.write_records([data])

    def write_records(self, parts: list[bytes]) -> None:
        """Each part of plaintext in TLS records of its own, all of them in one write."""
        if self.secure is not None and self.transport is not None and not self.transport.is_closing():
            try:
                out = b"".join([self.secure.send(part) for part in parts if part])
            except TlsFailure:
                self.abort()
                return
            if out:
                self.transport.write(out)

    def flush(self) -> None:
        if self.secure is not None and self.transport is not None and not self.transport.is_closing():
            out = self.secure.outgoing()
            if out:
                self.transport.write(out)

    # --- a request's DNS
    def answer(self, request: Request, respond: Callable[[int, list[tuple[str, str]], bytes], None]) -> None:
        """Decode `request`, ask the pipeline as its client, and `respond` now or when the upstream
        answers."""
        self.requests += 1
        self.last_active = asyncio.get_running_loop().time()
        body = bytes(request.body or b"")
        if request.too_large:
            decoded: bytes | HttpError = HttpError(413, f"a DNS message is at most {MAX_MESSAGE} bytes")
        else:
            decoded = decode_request(request.method, request.target, request.content_type, body)
        client = client_behind(self.peer, request.forwarded or [], self.trusted) \
            if not isinstance(decoded, HttpError) else self.peer
        if isinstance(client, HttpError):
            decoded = client
        if isinstance(decoded, HttpError):
            self.table.closed[f"http_{decoded.status}"] += 1
            text = (decoded.reason + "\n").encode()
            respond(decoded.status, error_headers(decoded, text), text)
            return
        assert isinstance(client, str)
        message = decoded
        try:
            result = self.pipeline.answer(message, client, HTTPS)
        except Exception:
            log.exception("internal error answering a DoH query from %s", client)
            result = rejection_reply(message, INTERNAL_ERROR, self.pipeline.udp_max)
        pad = padding_requested(message)
        if result is None:
            text = b"not a DNS query dnsgate answers\n"
            error = HttpError(400, "")
            respond(400, error_headers(error, text), text)
            return
        if isinstance(result, bytes):
            reply = pad_reply(result) if pad else result
            respond(200, reply_headers(reply), reply)
            return
        self.outstanding += 1
        self.tasks.spawn(self._forward(result, pad, respond))

    async def _forward(self, fwd: Forward, pad: bool,
                       respond: Callable[[int, list[tuple[str, str]], bytes], None]) -> None:
        try:
            reply = await self.resolver.forward(fwd)
            if pad:
                reply = pad_reply(reply)
            if self.transport is not None:
                respond(200, reply_headers(reply), reply)
                self.flush()
        finally:
            self.outstanding -= 1
            self._arm_idle_timer()

    # --- timers and closing
    def arm_slow(self, why: str) -> None:
        if self.slow_timer is None and self.transport is not None:
            self.slow_timer = asyncio.get_running_loop().call_later(self.limits.query_timeout, self._too_slow, why)

    def _cancel_slow(self) -> None:
        if self.slow_timer is not None:
            self.slow_timer.cancel()
            self.slow_timer = None

    def request_done(self) -> None:
        self._cancel_slow()
        self._arm_idle_timer()

    def _too_slow(self, why: str) -> None:
        self.slow_timer = None
        self.table.closed["tls_handshake" if self.http is None else "slow"] += 1
        log.debug("closing DoH connection from %s: %s", self.peer, why)
        self.abort()

    def close(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if self.http is not None:
            self.http.goodbye()  # HTTP/2's GOAWAY before TLS's close_notify
        super().close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timers()
        self.transport = None
        self.table.discard(self)


class _Http2:
    """HTTP/2 through h2: streams are requests, answered as each completes."""

    def __init__(self, conn: HttpsConnection) -> None:
        self.conn = conn
        # What the client sends is validated (pseudo-headers, connection-specific fields); what we send
        # is our own few fixed headers, so h2's checks and normalization of them are skipped: they were
        # a third of the cost of a request.
        config = h2_config.H2Configuration(client_side=False, header_encoding=None, validate_inbound_headers=True,
                                           validate_outbound_headers=False, normalize_outbound_headers=False)
        self.h2 = h2_connection.H2Connection(config=config)
        self.h2.local_settings = h2_settings.Settings(client=False, initial_values={
            h2_settings.SettingCodes.MAX_CONCURRENT_STREAMS: conn.limits.max_pipelined,
            h2_settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADERS,
            h2_settings.SettingCodes.ENABLE_PUSH: 0,
        })
        self.h2.initiate_connection()
        self.streams: dict[int, Request] = {}
        # While a read's requests are answered, each answer's frames are kept apart: every answer goes
        # in TLS records of its own (a client that takes one response per record, as dnsperf does,
        # drops the others of a record shared), and all of them leave in one write.
        self.batching = False
        self.answers: list[bytes] = []
        self.pending: dict[int, bytes] = {}  # response bodies waiting for flow-control window
        self.conn.write(self.h2.data_to_send())

    def received(self, data: bytes) -> None:
        self.batching = True  # answers made now go out together at the end, in one write
        try:
            self._received(data)
        finally:
            self.batching = False
            answers, self.answers = self.answers, []
            answers.append(self.h2.data_to_send())
            self.conn.write_records(answers)

    def _received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2_exceptions.ProtocolError as exc:
            log.debug("DoH HTTP/2 error from %s: %s", self.conn.peer, exc)
            self.conn.write(self.h2.data_to_send())
            self.conn.close()
            return
        for event in events:
            if isinstance(event, h2_events.RequestReceived):
                self._headers(event)
            elif isinstance(event, h2_events.DataReceived):
                self._data(event)
            elif isinstance(event, h2_events.StreamEnded):
                if event.stream_id in self.streams:
                    self._ended(event.stream_id)
            elif isinstance(event, h2_events.StreamReset):
                self.streams.pop(event.stream_id, None)
                self.pending.pop(event.stream_id, None)
            elif isinstance(event, h2_events.WindowUpdated):
                self._send_pending()
            elif isinstance(event, h2_events.ConnectionTerminated):
                self.conn.close()
                return
        if any(s.body is not None for s in self.streams.values()):
            self.conn.arm_slow("request not sent in time")
        else:
            self.conn.request_done()

    def _headers(self, event: h2_events.RequestReceived) -> None:
        request = Request(body=bytearray(), forwarded=[])
        size = 0
        for raw_name, raw_value in event.headers or ():
            name, value = bytes(raw_name), bytes(raw_value).decode("latin-1")
            size += len(name) + len(value) + 32  # as HTTP/2 counts a header list (RFC 9113 §6.5.2)
            if name == b":method":
                request.method = value
            elif name == b":path":
                request.target = value
            elif name == b"content-type":
                request.content_type = value
            elif name == b"x-forwarded-for":
                assert request.forwarded is not None
                request.forwarded.append(value)
        assert event.stream_id is not None
        if size > MAX_HEADERS:
            self.conn.table.closed["http_431"] += 1
            self._respond(event.stream_id, *_plain_error(HttpError(431, "request headers too large")))
            return
        self.streams[event.stream_id] = request

    def _data(self, event: h2_events.DataReceived) -> None:
        assert event.stream_id is not None
        if event.flow_controlled_length:
            self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        request = self.streams.get(event.stream_id)
        if request is None or request.body is None:
            return
        if len(request.body) + len(event.data or b"") > MAX_MESSAGE:
            request.too_large = True
            request.body = None  # what else comes is not kept
            self._ended(event.stream_id)
            with contextlib.suppress(h2_exceptions.ProtocolError, h2_exceptions.StreamClosedError):
                self.h2.reset_stream(event.stream_id, h2_errors.ErrorCodes.NO_ERROR)  # stop sending it
            return
        request.body += event.data or b""

    def _ended(self, stream_id: int | None) -> None:
        assert stream_id is not None
        request = self.streams.pop(stream_id, None)
        if request is None:
            return
        self.conn.answer(request, lambda status, headers, body: self._respond(stream_id, status, headers, body))

    def _respond(self, stream_id: int, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        try:
            self.h2.send_headers(stream_id, [(":status", str(status)), *headers])
        except (h2_exceptions.ProtocolError, h2_exceptions.StreamClosedError):
            return  # the client reset the stream meanwhile
        self.pending[stream_id] = body
        self._send_pending()
        if self.batching:
            self.answers.append(self.h2.data_to_send())
        else:  # an answer from upstream, after the requests' batch
            self.conn.write(self.h2.data_to_send())

    def _send_pending(self) -> None:
        for stream_id, body in list(self.pending.items()):
            try:
                window = min(self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size)
                while body and window > 0:
                    chunk, body = body[:window], body[window:]
                    self.h2.send_data(stream_id, chunk)
                    window = min(self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size)
                if body:
                    self.pending[stream_id] = body
                    continue
                self.h2.end_stream(stream_id)
            except (h2_exceptions.ProtocolError, h2_exceptions.StreamClosedError):
                pass
            self.pending.pop(stream_id, None)

    def goodbye(self) -> None:
        self.h2.close_connection()
        self.conn.write(self.h2.data_to_send())


class _Http11:
    """HTTP/1.1 through h11: one request at a time, kept alive between them."""

    def __init__(self, conn: HttpsConnection) -> None:
        self.conn = conn
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADERS)
        self.request: Request | None = None
        self.waiting = False  # a request is being answered: later ones wait in h11's buffer

    def received(self, data: bytes) -> None:
        self.h11.receive_data(data)
        self._next()

    def _next(self) -> None:
        while not self.waiting:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:  # (431 for a header block past MAX_HEADERS)
                self._fail(exc.error_status_hint, str(exc))
                return
            if event is h11.NEED_DATA:
                if self.h11.their_state in (h11.SEND_BODY,) or self.h11.trailing_data[0]:
                    self.conn.arm_slow("request not sent in time")
                return
            if event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                if sum(len(name) + len(value) + 4 for name, value in event.headers) > MAX_HEADERS:
                    self._fail(431, "request headers too large")  # (h11 bounds only a block still arriving)
                    return
                self.request = Request(method=event.method.decode("ascii", "replace"),
                                       target=event.target.decode("ascii", "replace"), body=bytearray(),
                                       forwarded=[])
                for name, value in event.headers:
                    if name == b"content-type":
                        self.request.content_type = value.decode("latin-1")
                    elif name == b"x-forwarded-for":
                        self.request.forwarded.append(value.decode("latin-1"))  # type: ignore[union-attr]
                    elif name == b"content-length" and int(value) > MAX_MESSAGE:
                        self.request.too_large = True
                self.conn.arm_slow("request not sent in time")
                if self.request.too_large:  # answered at once, the body never read
                    self._answer(keep_alive=False)
                    return
            elif isinstance(event, h11.Data) and self.request is not None:
                assert self.request.body is not None
                if len(self.request.body) + len(event.data) > MAX_MESSAGE:
                    self.request.too_large = True
                    self._answer(keep_alive=False)
                    return
                self.request.body += event.data
            elif isinstance(event, h11.EndOfMessage) and self.request is not None:
                self._answer(keep_alive=True)
            elif isinstance(event, h11.ConnectionClosed):
                self.conn.close()
                return

    def _answer(self, keep_alive: bool) -> None:
        request, self.request = self.request, None
        assert request is not None
        self.waiting = True
        self.conn.request_done()
        self.conn.answer(request, lambda status, headers, body: self._respond(status, headers, body, keep_alive))

    def _respond(self, status: int, headers: list[tuple[str, str]], body: bytes, keep_alive: bool) -> None:
        if not keep_alive:
            headers = [*headers, ("connection", "close")]
        try:
            out = self.h11.send(h11.Response(status_code=status, headers=headers, reason=_phrase(status)))
            out += self.h11.send(h11.Data(data=body)) + self.h11.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            self.conn.close()
            return
        self.conn.write(out or b"")
        self.waiting = False
        if not keep_alive or self.h11.our_state is h11.MUST_CLOSE:
            self.conn.close()
            return
        try:
            self.h11.start_next_cycle()
        except h11.LocalProtocolError:
            self.conn.close()
            return
        self._next()
        self.conn.flush()

    def _fail(self, status: int, reason: str) -> None:
        error = HttpError(status, reason)
        text = (reason + "\n").encode()
        self.conn.table.closed[f"http_{status}"] += 1
        try:
            out = self.h11.send(h11.Response(status_code=status, reason=_phrase(status),
                                             headers=[*error_headers(error, text), ("connection", "close")]))
            out += self.h11.send(h11.Data(data=text)) + self.h11.send(h11.EndOfMessage())
            self.conn.write(out or b"")
        except h11.LocalProtocolError:
            pass
        self.conn.close()

    def goodbye(self) -> None:
        pass


def _phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


def _plain_error(error: HttpError) -> tuple[int, list[tuple[str, str]], bytes]:
    text = (error.reason + "\n").encode()
    return error.status, error_headers(error, text), text
