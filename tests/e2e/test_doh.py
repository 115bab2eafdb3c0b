"""DNS over HTTPS end to end on loopback: kdig (HTTP/2 POST and GET), dig +https (BIND 9.18), curl
(HTTP/2 and HTTP/1.1, and `--doh-url` resolving the page it fetches) against a real dnsgate, for a
gated and an allowed name, before and after the same client grants consent; the caching headers;
every refusal a DoH client can meet; X-Forwarded-For only from a trusted proxy; the connection
limits against garbage, handshakes never finished and requests never finished."""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import AsyncIterator
from pathlib import Path

import dns.message
import dns.rcode
import pytest
from aiohttp import web

from tests.conftest import Gate, running_gate
from tests.e2e.test_dot import closed_within, metric
from tests.support.encrypted import SERVER_NAME, Certs, encrypted_config, have, make_certs, run
from tests.support.stub_upstream import StubUpstream

GRANT = {"categories": ["marketing"]}
pytestmark = pytest.mark.skipif(not have("curl"), reason="curl is not installed")


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return make_certs(tmp_path / "tls")


@pytest.fixture
async def doh(upstream: StubUpstream, data_dir: Path, certs: Certs) -> AsyncIterator[Gate]:
    async with running_gate(encrypted_config(upstream, data_dir, certs, tls=False, https=True)) as g:
        yield g


def url(gate: Gate, path: str = "/dns-query") -> str:
    return f"https://{SERVER_NAME}:{gate.running.https[0].port}{path}"


def b64(wire: bytes) -> str:
    return base64.urlsafe_b64encode(wire).rstrip(b"=").decode()


async def curl(gate: Gate, certs: Certs, *args: str, source: str = "127.0.0.1", path: str = "/dns-query",
               data: bytes | None = None) -> tuple[int, dict[str, str], bytes, str]:
    """(status, headers, body, HTTP version) of one curl request to the DoH server from `source`."""
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--cacert", str(certs.ca_file), "--resolve",
        f"{SERVER_NAME}:{gate.running.https[0].port}:127.0.0.1", "--interface", source, "-D", "-", "-o", "-",
        "-w", "%{stderr}%{http_version}", "--max-time", "10", *args, url(gate, path),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(data), 20)
    assert proc.returncode == 0, err
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body, err.decode()


async def curl_dns(gate: Gate, certs: Certs, name: str, *args: str, source: str = "127.0.0.1",
                   post: bool = False) -> tuple[dns.message.Message, dict[str, str], str]:
    wire = dns.message.make_query(name, "A", id=0).to_wire()
    if post:
        r = await curl(gate, certs, *args, "-H", "content-type: application/dns-message", "--data-binary", "@-",
                       source=source, data=wire)
    else:
        r = await curl(gate, certs, *args, source=source, path=f"/dns-query?dns={b64(wire)}")
    status, headers, body, version = r
    assert status == 200, body
    assert headers["content-type"] == "application/dns-message"
    return dns.message.from_wire(body), headers, version


def max_age(headers: dict[str, str]) -> int:
    match = re.fullmatch(r"private, max-age=(\d+)", headers["cache-control"])
    assert match, headers
    return int(match[1])


async def test_the_gate_over_https_with_curl_http2_and_http1(doh: Gate, certs: Certs, upstream: StubUpstream) -> None:
    me = "127.0.0.2"
    blocked, headers, version = await curl_dns(doh, certs, "trackcmp.net", source=me)
    assert version == "2"  # HTTP/2 by ALPN
    assert blocked.rcode() == dns.rcode.NXDOMAIN and max_age(headers) == 5  # the sinkhole: never beyond 5 s
    assert upstream.count("trackcmp.net") == 0
    plain, headers, version = await curl_dns(doh, certs, "other.example.test", "--http1.1", source=me, post=True)
    assert version == "1.1" and [rr.to_text() for rr in plain.answer[0]] == ["192.0.2.11"]
    assert max_age(headers) == 60  # the smallest TTL of the answer
    status, _ = await doh.http("PUT", "/v1/consent", source=me, json=GRANT)
    assert status == 200
    allowed, headers, _ = await curl_dns(doh, certs, "trackcmp.net", source=me, post=True)
    assert [rr.to_text() for rr in allowed.answer[0]] == ["198.51.100.1"]
    assert max_age(headers) <= 10  # a gated name's answer, capped so that a withdrawal takes hold
    other, _, _ = await curl_dns(doh, certs, "trackcmp.net", source="127.0.0.3")
    assert other.rcode() == dns.rcode.NXDOMAIN
    await doh.http("DELETE", "/v1/consent", source=me)
    again, _, _ = await curl_dns(doh, certs, "trackcmp.net", source=me, post=True)
    assert again.rcode() == dns.rcode.NXDOMAIN
    assert await metric(doh, "dnsgate_queries_total", protocol="https", outcome="sinkholed", type="A") == 3
    _, body = await doh.http("GET", "/v1/queries?client=127.0.0.2", admin=True)
    assert {e["protocol"] for e in body["entries"]} == {"https"}


@pytest.mark.skipif(not have("kdig"), reason="kdig (Debian knot-dnsutils) is not installed")
@pytest.mark.parametrize("method", ["POST", "GET"])
async def test_kdig_over_https(doh: Gate, certs: Certs, method: str) -> None:
    me = "127.0.0.4"

    async def kdig(name: str) -> str:
        r = await run("kdig", "@127.0.0.1", "-p", str(doh.running.https[0].port), "-b", me,
                      f"+tls-ca={certs.ca_file}", f"+tls-hostname={SERVER_NAME}", "+https=/dns-query",
                      *(["+https-get"] if method == "GET" else []), name, "A")
        assert r.code == 0, r.err
        assert f"(HTTP/2-{method})" in r.out and "(status: 200)" in r.out, r.out
        return r.out

    out = await kdig("trackcmp.net")
    assert "status: NXDOMAIN" in out and "no consent for category 'marketing'" in out
    assert "status: NOERROR" in (out := await kdig("host.example.test")) and "192.0.2.10" in out
    assert re.search(r"PADDING: \d+ B", out), out  # kdig pads: so does the reply
    await doh.http("PUT", "/v1/consent", source=me, json=GRANT)
    out = await kdig("trackcmp.net")
    assert "status: NOERROR" in out and "198.51.100.1" in out


@pytest.mark.skipif(not have("dig"), reason="dig (Debian bind9-dnsutils) is not installed")
async def test_dig_over_https(doh: Gate, certs: Certs) -> None:
    me = "127.0.0.5"

    async def dig(name: str, *extra: str) -> str:
        r = await run("dig", "@127.0.0.1", "-p", str(doh.running.https[0].port), "-b", me, "+https", *extra,
                      f"+tls-ca={certs.ca_file}", f"+tls-hostname={SERVER_NAME}", "+tries=1", "+time=3", name, "A")
        assert r.code == 0, r.out + r.err
        assert "(HTTPS)" in r.out or "(HTTPS-GET)" in r.out, r.out
        return r.out

    out = await dig("trackcmp.net")
    assert "status: NXDOMAIN" in out and "EDE: 15 (Blocked)" in out
    assert "status: NOERROR" in (out := await dig("host.example.test", "+https-get")) and "192.0.2.10" in out
    await doh.http("PUT", "/v1/consent", source=me, json=GRANT)
    out = await dig("trackcmp.net")
    assert "status: NOERROR" in out and "198.51.100.1" in out


async def test_curl_resolves_its_page_through_dnsgate(data_dir: Path, certs: Certs) -> None:
    """curl --doh-url: the tracker's page cannot even be resolved until the client consents."""
    stub = await StubUpstream().start()
    stub.add("trackcmp.net", "trackcmp.net. 300 IN A 127.0.0.1")
    stub.add("shop.example.test", "shop.example.test. 300 IN A 127.0.0.1")

    async def page(request: web.Request) -> web.Response:
        return web.Response(text=f"page for {request.host}")

    app = web.Application()
    app.router.add_get("/", page)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with running_gate(encrypted_config(stub, data_dir, certs, tls=False, https=True)) as g:
            doh_url = f"https://{SERVER_NAME}:{g.running.https[0].port}/dns-query"

            async def fetch(host: str) -> tuple[int, str]:
                r = await run("curl", "-sS", "--max-time", "10", "--doh-url", doh_url, "--cacert",
                              str(certs.ca_file), "--resolve", f"{SERVER_NAME}:{g.running.https[0].port}:127.0.0.1",
                              f"http://{host}:{port}/")
                return r.code, r.out

            assert await fetch("shop.example.test") == (0, f"page for shop.example.test:{port}")
            code, _ = await fetch("trackcmp.net")
            assert code == 6  # curl: could not resolve host
            await g.http("PUT", "/v1/consent", json=GRANT)  # curl's DoH requests come from 127.0.0.1
            assert await fetch("trackcmp.net") == (0, f"page for trackcmp.net:{port}")
    finally:
        await runner.cleanup()
        await stub.stop()


@pytest.mark.parametrize(("args", "path", "status", "text"), [
    ((), "/dns-query?dns=not*base64", 400, "dns= is not base64url"),
    ((), "/dns-query?dns=AAAB", 400, "shorter than its header"),
    ((), "/dns-query", 400, "missing dns="),
    ((), "/dns-query?dns=AAABAAABAAAAAAAA&dns=AAABAAABAAAAAAAA", 400, "more than one"),
    ((), "/resolve?dns=AAABAAABAAAAAAAA", 404, "/dns-query"),
    (("-X", "PUT", "--data", "x"), "/dns-query", 405, "GET or POST"),
    (("-H", "content-type: application/dns-json", "--data", "{}"), "/dns-query", 415, "application/dns-message"),
    (("--data", "x"), "/dns-query", 415, "application/dns-message"),  # curl's default form type
    ((), "/dns-query?dns=" + "A" * 9000, 414, "longer than"),
    (("-H", "content-type: application/dns-message", "--data-binary", "@BIG"), "/dns-query", 413, "at most 65535"),
    (("-H", "X-Padding: " + "a" * 17000), "/dns-query?dns=AAABAAABAAAAAAAA", 431, ""),
])
@pytest.mark.parametrize("http", ["--http2", "--http1.1"])
async def test_bad_requests_get_the_status_doh_clients_expect(doh: Gate, certs: Certs, tmp_path: Path,
                                                              args: tuple[str, ...], path: str, status: int,
                                                              text: str, http: str) -> None:
    big = tmp_path / "big"
    big.write_bytes(b"\x00" * 70000)
    args = tuple(a.replace("@BIG", f"@{big}") for a in args)
    got, headers, body, _ = await curl(doh, certs, http, *args, path=path)
    assert got == status and text in body.decode(), body
    assert headers["cache-control"] == "no-store"
    if status == 405:
        assert headers["allow"] == "GET, POST"
    # the server is still there for the next request
    reply, _, _ = await curl_dns(doh, certs, "host.example.test", http)
    assert reply.rcode() == dns.rcode.NOERROR


async def test_x_forwarded_for_only_from_a_trusted_proxy(upstream: StubUpstream, data_dir: Path, certs: Certs) -> None:
    cfg = encrypted_config(upstream, data_dir, certs, tls=False, https=True, trusted_proxies=("127.0.0.1/32",))
    async with running_gate(cfg) as g:
        status, _ = await g.http("PUT", "/v1/consent", source="127.0.0.77", json=GRANT)
        assert status == 200
        forwarded = ("-H", "X-Forwarded-For: 203.0.113.9, 127.0.0.77")
        reply, _, _ = await curl_dns(g, certs, "trackcmp.net", *forwarded)  # from the proxy: 127.0.0.77 asked
        assert reply.rcode() == dns.rcode.NOERROR
        reply, _, _ = await curl_dns(g, certs, "trackcmp.net", *forwarded, source="127.0.0.8")  # not a proxy
        assert reply.rcode() == dns.rcode.NXDOMAIN
        reply, _, _ = await curl_dns(g, certs, "trackcmp.net")  # the proxy's own query
        assert reply.rcode() == dns.rcode.NXDOMAIN
        status, _, body, _ = await curl(g, certs, "-H", "X-Forwarded-For: not-an-address",
                                        path="/dns-query?dns=" + b64(dns.message.make_query("a.test", "A").to_wire()))
        assert status == 400 and b"X-Forwarded-For" in body


async def test_garbage_unfinished_handshakes_and_slow_requests_are_cut(upstream: StubUpstream, data_dir: Path,
                                                                      certs: Certs) -> None:
    cfg = encrypted_config(upstream, data_dir, certs, tls=False, https=True, tcp_query_timeout=0.5)
    async with running_gate(cfg) as g:
        port = g.running.https[0].port
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /dns-query?dns=AAAB HTTP/1.1\r\nHost: x\r\n\r\n")  # plain HTTP to the TLS port
        assert await closed_within(reader, 3)
        writer.close()
        silent = await asyncio.open_connection("127.0.0.1", port)
        assert await closed_within(silent[0], 3)
        silent[1].close()
        # TLS done, then half a request, never finished (slow loris)
        context = certs.client_context()
        context.set_alpn_protocols(["http/1.1"])
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname=SERVER_NAME)
        writer.write(b"POST /dns-query HTTP/1.1\r\nHost: x\r\nContent-Type: application/dns-message\r\n"
                     b"Content-Length: 40\r\n\r\n\x00\x00")
        started = asyncio.get_running_loop().time()
        assert await closed_within(reader, 3)
        assert asyncio.get_running_loop().time() - started < 3  # (the limit is 0.5 s)
        writer.close()
        assert await metric(g, "dnsgate_tcp_closed_early_total", reason="tls_handshake") == 2
        assert await metric(g, "dnsgate_tcp_closed_early_total", reason="slow") == 1
        reply, _, _ = await curl_dns(g, certs, "host.example.test")
        assert reply.rcode() == dns.rcode.NOERROR


async def test_idle_connections_are_held_to_the_limits(upstream: StubUpstream, data_dir: Path, certs: Certs) -> None:
    cfg = encrypted_config(upstream, data_dir, certs, tls=False, https=True, tcp_max_connections=32,
                           tcp_max_connections_per_client=4, tcp_query_timeout=20.0)
    async with running_gate(cfg) as g:
        port = g.running.https[0].port
        conns = [await asyncio.open_connection("127.0.0.1", port, local_addr=(f"127.0.3.{i % 20 + 1}", 0))
                 for i in range(500)]
        await asyncio.sleep(0.3)
        _, health = await g.http("GET", "/healthz")
        assert health["tcp_connections"] <= 32
        reply, _, _ = await curl_dns(g, certs, "host.example.test", source="127.0.0.9")
        assert reply.rcode() == dns.rcode.NOERROR
        for _, w in conns:
            w.close()


async def test_http2_many_streams_on_one_connection(doh: Gate, certs: Certs) -> None:
    """One HTTP/2 connection, many queries in flight at once (curl multiplexes parallel transfers)."""
    names = [f"n{i}.example.test" for i in range(20)]
    urls = [url(doh, f"/dns-query?dns={b64(dns.message.make_query(n, 'A', id=0).to_wire())}") for n in names]
    r = await run("curl", "-sS", "--cacert", str(certs.ca_file), "--resolve",
                  f"{SERVER_NAME}:{doh.running.https[0].port}:127.0.0.1", "--parallel", "--parallel-max", "20",
                  "-w", "%{http_version} %{response_code} %{num_connects}\n",
                  *(arg for u in urls for arg in ("-o", "/dev/null", u)))
    assert r.code == 0, r.err
    lines = r.out.split()
    results = [lines[i : i + 3] for i in range(0, len(lines), 3)]
    assert len(results) == 20 and all(v == "2" and code == "200" for v, code, _ in results)
    assert sum(int(n) for _, _, n in results) <= 2  # multiplexed, not one connection per query


async def test_a_padded_query_gets_a_padded_reply(doh: Gate, certs: Certs) -> None:
    from dnsgate.wire import RESPONSE_PAD_BLOCK

    wire = dns.message.make_query("host.example.test", "A", use_edns=0, pad=128, id=0).to_wire()
    status, _, body, _ = await curl(doh, certs, path=f"/dns-query?dns={b64(wire)}")
    assert status == 200 and len(body) % RESPONSE_PAD_BLOCK == 0



async def test_an_http2_request_never_finished_is_cut(upstream: StubUpstream, data_dir: Path, certs: Certs) -> None:
    """Slow loris over HTTP/2: a POST's headers, then no body, ever."""
    import h2.connection
    import h2.events

    cfg = encrypted_config(upstream, data_dir, certs, tls=False, https=True, tcp_query_timeout=0.5)
    async with running_gate(cfg) as g:
        context = certs.client_context()
        context.set_alpn_protocols(["h2"])
        reader, writer = await asyncio.open_connection("127.0.0.1", g.running.https[0].port, ssl=context,
                                                       server_hostname=SERVER_NAME)
        conn = h2.connection.H2Connection()
        conn.initiate_connection()
        conn.send_headers(1, [(":method", "POST"), (":scheme", "https"), (":authority", SERVER_NAME),
                              (":path", "/dns-query"), ("content-type", "application/dns-message"),
                              ("content-length", "40")])
        writer.write(conn.data_to_send())
        started = asyncio.get_running_loop().time()
        assert await closed_within(reader, 3)
        assert asyncio.get_running_loop().time() - started < 3
        writer.close()
        assert await metric(g, "dnsgate_tcp_closed_early_total", reason="slow") == 1


async def test_each_answer_of_a_burst_comes_in_tls_records_of_its_own(doh: Gate, certs: Certs) -> None:
    """Requests that arrive together are answered in one write, but each answer in TLS records of its
    own: a client that takes one HTTP/2 response per record (dnsperf) loses none of them."""
    import ssl

    import h2.connection
    import h2.events

    context = certs.client_context()
    context.set_alpn_protocols(["h2"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=SERVER_NAME)
    reader, writer = await asyncio.open_connection("127.0.0.1", doh.running.https[0].port)
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            writer.write(outgoing.read())
            incoming.write(await asyncio.wait_for(reader.read(65536), 3))
    writer.write(outgoing.read())
    assert tls.selected_alpn_protocol() == "h2"

    pending = bytearray()

    async def record() -> bytes:
        """The plaintext of the next TLS record from the server (b"" for one that carries none)."""
        while len(pending) < 5 or len(pending) < 5 + int.from_bytes(pending[3:5], "big"):
            chunk = await asyncio.wait_for(reader.read(65536), 3)
            assert chunk, "the server closed the connection"
            pending.extend(chunk)
        size = 5 + int.from_bytes(pending[3:5], "big")
        incoming.write(bytes(pending[:size]))
        del pending[:size]
        plain = b""
        try:
            while chunk := tls.read(65536):
                plain += chunk
        except ssl.SSLWantReadError:
            pass
        return plain

    h2c = h2.connection.H2Connection()
    h2c.initiate_connection()
    query = b64(dns.message.make_query("host.example.test", "A", id=0).to_wire())

    def request(stream: int) -> None:
        h2c.send_headers(stream, [(":method", "GET"), (":scheme", "https"), (":authority", SERVER_NAME),
                                  (":path", f"/dns-query?dns={query}")], end_stream=True)

    def send() -> None:
        """What h2 has to send, in one TLS record and one write."""
        if data := h2c.data_to_send():
            tls.write(data)
            writer.write(outgoing.read())

    async def ended_per_record(streams: int) -> list[int]:
        """How many responses each record ends, until `streams` have ended."""
        counts: list[int] = []
        while sum(counts) < streams:
            events = h2c.receive_data(await record())
            counts.append(sum(isinstance(e, h2.events.StreamEnded) for e in events))
            send()  # (window updates, settings acknowledged)
        return counts

    request(1)  # the first answer fills the cache: the burst's are answered at once
    send()
    assert sum(await ended_per_record(1)) == 1
    burst = list(range(3, 3 + 2 * 20, 2))
    for stream in burst:
        request(stream)
    send()  # all 20 requests in one record
    counts = await ended_per_record(len(burst))
    writer.close()
    assert sum(counts) == len(burst) and max(counts) == 1, counts
