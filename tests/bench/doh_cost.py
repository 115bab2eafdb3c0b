"""What one DNS-over-HTTPS request costs dnsgate's HTTP/2 side, without sockets or TLS: an h2 client's
request frames fed to the server's `_Http2`, a fixed reply sent back (no pipeline), and separately the
decoding of the request (`decode_request`: URL, base64url) that every request also pays.

    .venv/bin/python -m tests.bench.doh_cost [--requests 5000]
"""

from __future__ import annotations

import argparse
import base64
import time
from collections import Counter
from collections.abc import Callable
from types import SimpleNamespace

import dns.message
import h2.config
import h2.connection
import h2.events

from dnsgate.dns.https_listener import Request, _Http2, decode_request, reply_headers


class Conn:
    """What `_Http2` needs of its connection: answers at once with a fixed reply."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.peer = "127.0.0.1"
        self.reply = dns.message.make_response(dns.message.make_query("host.example.test", "A")).to_wire()

        self.limits = SimpleNamespace(max_pipelined=100)
        self.table = SimpleNamespace(closed=Counter())

    def write(self, data: bytes) -> None:
        self.out += data

    def write_records(self, parts: list[bytes]) -> None:
        for part in parts:
            self.out += part

    def arm_slow(self, why: str) -> None:
        pass

    def request_done(self) -> None:
        pass

    def close(self) -> None:
        pass

    def answer(self, request: Request, respond: Callable[[int, list[tuple[str, str]], bytes], None]) -> None:
        respond(200, reply_headers(self.reply), self.reply)


def http2(requests: int) -> float:
    """Seconds of the server side per request."""
    conn = Conn()
    server = _Http2(conn)  # type: ignore[arg-type]
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    server.received(client.data_to_send())
    client.receive_data(bytes(conn.out))
    conn.out.clear()
    query = base64.urlsafe_b64encode(dns.message.make_query("host.example.test", "A").to_wire()).rstrip(b"=")
    spent = 0.0
    for _ in range(requests):
        stream = client.get_next_available_stream_id()
        client.send_headers(stream, [(":method", "GET"), (":scheme", "https"), (":authority", "dns.home.arpa"),
                                     (":path", "/dns-query?dns=" + query.decode()),
                                     ("accept", "application/dns-message")], end_stream=True)
        frames = client.data_to_send()
        started = time.perf_counter()
        server.received(frames)
        spent += time.perf_counter() - started
        for event in client.receive_data(bytes(conn.out)):
            if isinstance(event, h2.events.DataReceived) and event.flow_controlled_length:
                client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        conn.out.clear()
    return spent / requests


def decoding(requests: int) -> float:
    query = base64.urlsafe_b64encode(dns.message.make_query("host.example.test", "A").to_wire()).rstrip(b"=")
    target = "/dns-query?dns=" + query.decode()
    started = time.perf_counter()
    for _ in range(requests):
        decode_request("GET", target, None, b"")
    return (time.perf_counter() - started) / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    args = parser.parse_args()
    for _ in range(2):  # the second round is the one printed: the first warms up
        h2_cost, decode_cost = http2(args.requests), decoding(args.requests)
    print(f"HTTP/2 request in, response out (h2, _Http2): {h2_cost * 1e6:.1f} µs per request")
    print(f"decode_request (GET, base64url): {decode_cost * 1e6:.2f} µs per request")


if __name__ == "__main__":
    main()
