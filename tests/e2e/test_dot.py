"""DNS over TLS end to end on loopback: dnspython, kdig and dig (BIND 9.18) ask a real dnsgate, for a
gated and an allowed name, before and after the same client grants consent; padding; the limits
against garbage, handshakes never finished and piles of idle connections; the certificate reloaded
when its files change and on SIGHUP."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import ssl
import struct
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import dns.edns
import dns.message
import dns.rcode
import dns.rrset
import pytest

from dnsgate.wire import RESPONSE_PAD_BLOCK
from tests.cli.test_serve import _env
from tests.conftest import Gate, running_gate
from tests.support.encrypted import SERVER_NAME, Certs, dot_query, encrypted_config, have, make_certs, run
from tests.support.stub_upstream import StubUpstream

GRANT = {"categories": ["marketing"]}


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return make_certs(tmp_path / "tls")


@pytest.fixture
async def dot(upstream: StubUpstream, data_dir: Path, certs: Certs) -> AsyncIterator[Gate]:
    async with running_gate(encrypted_config(upstream, data_dir, certs)) as g:
        yield g


def ede_text(reply: dns.message.Message) -> str:
    (ede,) = [o for o in reply.options if isinstance(o, dns.edns.EDEOption)]
    return ede.text or ""


async def metric(gate: Gate, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    _, text = await gate.http("GET", "/metrics")
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


async def test_the_gate_over_tls_is_the_clients_own(dot: Gate, certs: Certs, upstream: StubUpstream) -> None:
    """The DoT client's address is the client: sinkhole with EDE, its grant opens the name for it
    alone, and its withdrawal closes it again; counted and logged as tls."""
    me = "127.0.0.2"
    blocked = await dot_query(dot, certs, "trackcmp.net", source=me, use_edns=0)
    assert blocked.rcode() == dns.rcode.NXDOMAIN and "marketing" in ede_text(blocked)
    assert upstream.count("trackcmp.net") == 0
    allowed_name = await dot_query(dot, certs, "host.example.test", source=me)
    assert [rr.to_text() for rr in allowed_name.answer[0]] == ["192.0.2.10"]

    status, _ = await dot.http("PUT", "/v1/consent", source=me, json=GRANT)
    assert status == 200
    allowed = await dot_query(dot, certs, "trackcmp.net", source=me)
    assert allowed.rcode() == dns.rcode.NOERROR and [rr.to_text() for rr in allowed.answer[0]] == ["198.51.100.1"]
    other = await dot_query(dot, certs, "trackcmp.net", source="127.0.0.3")
    assert other.rcode() == dns.rcode.NXDOMAIN  # another client's TLS connection: its own (lack of) consent
    # the same client over plain UDP sees the same consent
    assert (await dot.query("trackcmp.net", source=me)).rcode() == dns.rcode.NOERROR

    status, _ = await dot.http("DELETE", "/v1/consent", source=me)
    assert status == 200
    assert (await dot_query(dot, certs, "trackcmp.net", source=me)).rcode() == dns.rcode.NXDOMAIN

    assert await metric(dot, "dnsgate_queries_total", protocol="tls", outcome="sinkholed", type="A") == 3
    assert await metric(dot, "dnsgate_queries_total", protocol="tls", outcome="forwarded", type="A") == 2
    status, body = await dot.http("GET", "/v1/queries?client=127.0.0.2", admin=True)
    assert status == 200
    assert {e["protocol"] for e in body["entries"] if e["client"] == me} == {"tls", "udp"}


async def test_the_acl_holds_over_tls(upstream: StubUpstream, data_dir: Path, certs: Certs) -> None:
    cfg = encrypted_config(upstream, data_dir, certs, allow_clients=("127.0.0.1/32",))
    async with running_gate(cfg) as g:
        assert (await dot_query(g, certs, "host.example.test")).rcode() == dns.rcode.NOERROR
        assert (await dot_query(g, certs, "host.example.test", source="127.0.0.9")).rcode() == dns.rcode.REFUSED


@pytest.mark.skipif(not have("kdig"), reason="kdig (Debian knot-dnsutils) is not installed")
async def test_kdig_over_tls(dot: Gate, certs: Certs) -> None:
    me = "127.0.0.4"

    async def kdig(name: str) -> str:
        r = await run("kdig", "@127.0.0.1", "-p", str(dot.running.tls[0].port), "-b", me, f"+tls-ca={certs.ca_file}",
                      f"+tls-hostname={SERVER_NAME}", name, "A")
        assert r.code == 0, r.err
        assert "TLS session (TLS1.3)" in r.out or "TLS session (TLS1.2)" in r.out, r.out
        return r.out

    out = await kdig("trackcmp.net")
    assert "status: NXDOMAIN" in out and "no consent for category 'marketing'" in out
    out = await kdig("host.example.test")
    assert "status: NOERROR" in out and "192.0.2.10" in out
    # kdig pads its TLS queries by default: the reply is padded to the block (RFC 8467)
    assert re.search(r"PADDING: \d+ B", out), out
    await dot.http("PUT", "/v1/consent", source=me, json=GRANT)
    out = await kdig("trackcmp.net")
    assert "status: NOERROR" in out and "198.51.100.1" in out


@pytest.mark.skipif(not have("dig"), reason="dig (Debian bind9-dnsutils) is not installed")
async def test_dig_over_tls(dot: Gate, certs: Certs) -> None:
    me = "127.0.0.5"

    async def dig(name: str) -> str:
        r = await run("dig", "@127.0.0.1", "-p", str(dot.running.tls[0].port), "-b", me, "+tls",
                      f"+tls-ca={certs.ca_file}", f"+tls-hostname={SERVER_NAME}", "+tries=1", "+time=3", name, "A")
        assert r.code == 0, r.out + r.err
        assert "(TLS)" in r.out, r.out
        return r.out

    out = await dig("trackcmp.net")
    assert "status: NXDOMAIN" in out and "EDE: 15 (Blocked)" in out
    assert "status: NOERROR" in (out := await dig("host.example.test")) and "192.0.2.10" in out
    await dot.http("PUT", "/v1/consent", source=me, json=GRANT)
    out = await dig("trackcmp.net")
    assert "status: NOERROR" in out and "198.51.100.1" in out


async def raw_exchange(gate: Gate, certs: Certs, query: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.running.tls[0].port,
                                                   ssl=certs.client_context(), server_hostname=SERVER_NAME)
    try:
        writer.write(struct.pack(">H", len(query)) + query)
        length = struct.unpack(">H", await asyncio.wait_for(reader.readexactly(2), 3))[0]
        return await reader.readexactly(length)
    finally:
        writer.close()


@pytest.mark.parametrize("name", ["trackcmp.net", "host.example.test"])
async def test_replies_are_padded_only_when_the_query_was(dot: Gate, certs: Certs, name: str) -> None:
    padded_query = dns.message.make_query(name, "A", use_edns=0, pad=128).to_wire()
    reply = await raw_exchange(dot, certs, padded_query)
    assert len(reply) % RESPONSE_PAD_BLOCK == 0
    parsed = dns.message.from_wire(reply)
    assert any(o.otype == dns.edns.OptionType.PADDING for o in parsed.options)
    plain = await raw_exchange(dot, certs, dns.message.make_query(name, "A", use_edns=0).to_wire())
    assert len(plain) < RESPONSE_PAD_BLOCK
    assert not any(o.otype == dns.edns.OptionType.PADDING for o in dns.message.from_wire(plain).options)


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """Whether the server closes the connection (EOF or reset) within `seconds`."""
    try:
        while await asyncio.wait_for(reader.read(4096), seconds):
            pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


async def test_garbage_and_unfinished_handshakes_are_cut(upstream: StubUpstream, data_dir: Path,
                                                         certs: Certs) -> None:
    cfg = encrypted_config(upstream, data_dir, certs, tcp_query_timeout=0.5)
    async with running_gate(cfg) as g:
        port = g.running.tls[0].port
        # plain DNS over TCP sent to the TLS port
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        query = dns.message.make_query("host.example.test", "A").to_wire()
        writer.write(struct.pack(">H", len(query)) + query)
        assert await closed_within(reader, 3)
        writer.close()
        # a client that connects and never says a word, and one that stops mid-ClientHello
        silent = await asyncio.open_connection("127.0.0.1", port)
        halfway = await asyncio.open_connection("127.0.0.1", port)
        halfway[1].write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        started = asyncio.get_running_loop().time()
        assert await closed_within(silent[0], 3) and await closed_within(halfway[0], 3)
        assert asyncio.get_running_loop().time() - started < 2.5
        for _, w in (silent, halfway):
            w.close()
        # random bytes
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(os.urandom(2048))
        assert await closed_within(reader, 3)
        writer.close()
        assert await metric(g, "dnsgate_tcp_closed_early_total", reason="tls_handshake") == 4
        # and the next client is served
        assert (await dot_query(g, certs, "host.example.test")).rcode() == dns.rcode.NOERROR


async def test_a_thousand_idle_connections_are_held_to_the_limits(upstream: StubUpstream, data_dir: Path,
                                                                  certs: Certs) -> None:
    """1 000 connections that never handshake, from ten addresses: at most tcp_max_connections are
    held, each address at most its share, and a real client still gets its answer at once."""
    cfg = encrypted_config(upstream, data_dir, certs, tcp_max_connections=64, tcp_max_connections_per_client=8,
                           tcp_query_timeout=20.0)
    async with running_gate(cfg) as g:
        port = g.running.tls[0].port
        conns = []
        for i in range(1000):
            conns.append(await asyncio.open_connection("127.0.0.1", port, local_addr=(f"127.0.1.{i % 10 + 1}", 0)))
        await asyncio.sleep(0.3)
        status, health = await g.http("GET", "/healthz")
        assert status == 200 and health["tcp_connections"] <= 64
        started = asyncio.get_running_loop().time()
        reply = await dot_query(g, certs, "host.example.test", source="127.0.0.7")
        assert reply.rcode() == dns.rcode.NOERROR
        assert asyncio.get_running_loop().time() - started < 5  # (the handshakes may hold 20 s)
        cut = sum([await metric(g, "dnsgate_tcp_closed_early_total", reason=reason)
                   for reason in ("per_client_limit", "total_limit", "evicted")])
        assert cut >= 1000 - 64
        open_now = sum([not await closed_within(r, 0.01) for r, _ in conns])
        assert open_now <= 64
        for _, w in conns:
            w.close()
        # one address alone gets its share and no more
        before = await metric(g, "dnsgate_tcp_closed_early_total", reason="per_client_limit")
        mine = [await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.2.1", 0)) for _ in range(20)]
        await asyncio.sleep(0.2)
        assert await metric(g, "dnsgate_tcp_closed_early_total", reason="per_client_limit") - before == 12
        for _, w in mine:
            w.close()


async def wait_until_verified(port: int, context: ssl.SSLContext, seconds: float) -> bool:
    deadline = asyncio.get_running_loop().time() + seconds
    while asyncio.get_running_loop().time() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname=SERVER_NAME)
            writer.close()
            return True
        except (ssl.SSLError, OSError):
            await asyncio.sleep(0.2)
    return False


async def test_a_changed_certificate_is_used_and_a_broken_one_is_not(upstream: StubUpstream, data_dir: Path,
                                                                     certs: Certs, tmp_path: Path) -> None:
    async with running_gate(encrypted_config(upstream, data_dir, certs)) as g:
        port = g.running.tls[0].port
        renewed = make_certs(tmp_path / "renewed")
        assert not await wait_until_verified(port, renewed.client_context(), 0.2)
        # a renewal writes new files over the old ones
        certs.key_file.write_bytes(renewed.key_file.read_bytes())
        certs.cert_file.write_bytes(renewed.cert_file.read_bytes())
        assert await wait_until_verified(port, renewed.client_context(), 8)
        # a broken write leaves the renewed certificate in force, and says so
        certs.cert_file.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n")
        await asyncio.sleep(3.5)
        assert await wait_until_verified(port, renewed.client_context(), 0.5)
        _, health = await g.http("GET", "/healthz")
        assert health["tls_certificate"]["problem"] and health["tls_certificate"]["loads"] == 2
        assert (await dot_query(g, renewed, "host.example.test")).rcode() == dns.rcode.NOERROR


async def test_sighup_reloads_the_certificate(upstream: StubUpstream, data_dir: Path, certs: Certs,
                                              tmp_path: Path) -> None:
    conf = tmp_path / "dnsgate.toml"
    conf.write_text(f'[dns]\ntls_listen = ["127.0.0.1:0"]\ntls_cert = "{certs.cert_file}"\n'
                    f'tls_key = "{certs.key_file}"\n')
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dnsgate", "serve", "--config", str(conf), "--dns", "127.0.0.1:0",
        "--api", "127.0.0.1:0", "--upstream", upstream.address, "--data-dir", str(data_dir),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=_env())
    try:
        assert process.stdout is not None and process.stderr is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 15)).decode()
        match = re.search(r"dns over tls 127\.0\.0\.1:(\d+)", line)
        assert match, line
        port = int(match[1])
        assert await wait_until_verified(port, certs.client_context(), 2)
        renewed = make_certs(tmp_path / "renewed")
        # same size and time stamps cannot be relied on to differ within the watch's interval, so
        # replace and signal at once: the signal's reload comes first
        os.replace(renewed.cert_file, certs.cert_file)
        os.replace(renewed.key_file, certs.key_file)
        process.send_signal(signal.SIGHUP)
        assert await wait_until_verified(port, renewed.client_context(), 5)  # (the log says SIGHUP did it)

        async def logged(needle: str) -> str:
            while True:
                text = (await process.stderr.readline()).decode()  # type: ignore[union-attr]
                assert text, "dnsgate exited"
                if needle in text:
                    return text

        await asyncio.wait_for(logged("tls certificate reloaded (SIGHUP)"), 5)
    finally:
        if process.returncode is None:
            process.terminate()
            await process.wait()


@pytest.mark.parametrize("answers", [0, 1, 30])
def test_pad_reply_keeps_the_message_whole(answers: int) -> None:
    from dnsgate.wire import pad_reply, padding_requested

    q = dns.message.make_query("host.example.test", "A", use_edns=0, pad=64)
    assert padding_requested(q.to_wire())
    assert not padding_requested(dns.message.make_query("host.example.test", "A", use_edns=0).to_wire())
    assert not padding_requested(dns.message.make_query("host.example.test", "A").to_wire())
    r = dns.message.make_response(dns.message.make_query("host.example.test", "A", use_edns=0))
    for i in range(answers):
        r.answer.append(dns.rrset.from_text(f"h{i}.example.test.", 300, "IN", "A", f"192.0.2.{i}"))
    wire = r.to_wire()
    padded = pad_reply(wire)
    assert len(padded) % RESPONSE_PAD_BLOCK == 0 and len(padded) > len(wire)
    parsed = dns.message.from_wire(padded)
    assert parsed.answer == r.answer and parsed.edns == 0
    assert [o.otype for o in parsed.options] == [dns.edns.OptionType.PADDING]
    assert pad_reply(wire, limit=len(wire) + 3) == wire  # no room within the limit: sent as it is
    no_opt = dns.message.make_response(dns.message.make_query("host.example.test", "A")).to_wire()
    assert pad_reply(no_opt) == no_opt
    assert pad_reply(b"\x00" * 5) == b"\x00" * 5
