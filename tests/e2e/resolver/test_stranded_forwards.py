"""No state a failure can strand: every error on the way upstream answers the clients waiting for a
name, at once, and leaves nothing registered that later queries for the name could join.

Each error is caused for real where the machine allows it: this process runs out of file
descriptors (its soft limit lowered, then every descriptor taken); a send refused by the kernel (a
broadcast address). ENFILE and ENOBUFS cannot be caused on a shared machine: they are injected at
the socket calls of dns/upstreams.py. A pool closed under waiting queries, a send that fails, and a bug
that leaves an entry behind (the reaper's case) complete the list.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import resource
import socket
import struct
import types
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import dns.edns
import dns.message
import dns.rcode
import pytest

from dnsgate.app import dns_side
from dnsgate.app.dns_side import DnsStack
from dnsgate.dns import upstreams as upstream
from dnsgate.dns.forwarding import REAP_AFTER
from dnsgate.dns.upstreams import QUERIES_PER_SOCKET, Upstreams
from dnsgate.wire import EDE_NOT_READY
from tests.conftest import Gate, make_config, running_gate
from tests.support.stub_upstream import StubUpstream

pytestmark = pytest.mark.usefixtures("udp_io")  # every test runs on both UDP paths (dns.udp_io)

QUICK = 0.5  # "at once": well inside the upstream deadline below
TIMEOUT = 3.0


@pytest.fixture
async def stub() -> AsyncIterator[StubUpstream]:
    s = await StubUpstream(default_a="192.0.2.99").start()
    yield s
    await s.stop()


@contextlib.asynccontextmanager
async def gate_and_stack(cfg: Any, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Gate, DnsStack]]:
    """dnsgate in-process, and its DNS side (kept as app/primary.py builds it) to look inside."""
    built: list[DnsStack] = []
    build = dns_side.build

    def keep(*args: Any, **kwargs: Any) -> DnsStack:
        built.append(build(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(dns_side, "build", keep)
    async with running_gate(cfg) as g:
        yield g, built[0]


def config(stub: StubUpstream, data_dir: Path, server: str | None = None) -> Any:
    cfg = make_config(stub, data_dir)
    return replace(cfg, upstream=replace(cfg.upstream, servers=(server or stub.address,), timeout=TIMEOUT,
                                         attempt_timeout=0.4))


class Client(asyncio.DatagramProtocol):
    """A UDP socket and a TCP connection opened in advance: they keep working while this process
    has no descriptor left to open new ones. Replies are matched to queries by ID."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.waiting: dict[int, asyncio.Future[bytes]] = {}
        self.udp: asyncio.DatagramTransport | None = None
        self.tcp: asyncio.StreamWriter | None = None
        self.reader: asyncio.Task[None] | None = None
        self.next_id = 1

    async def open(self, tcp: bool = False) -> Client:
        loop = asyncio.get_running_loop()
        self.udp, _ = await loop.create_datagram_endpoint(lambda: self, remote_addr=("127.0.0.1", self.port))
        if tcp:
            reader, self.tcp = await asyncio.open_connection("127.0.0.1", self.port)
            self.reader = asyncio.ensure_future(self._read_tcp(reader))
        return self

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._reply(data)

    async def _read_tcp(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                length = struct.unpack(">H", await reader.readexactly(2))[0]
                self._reply(await reader.readexactly(length))

    def _reply(self, data: bytes) -> None:
        future = self.waiting.pop(struct.unpack_from(">H", data)[0], None)
        if future is not None and not future.done():
            future.set_result(data)

    async def ask(self, name: str, *, tcp: bool = False, timeout: float = TIMEOUT + 2) -> tuple[dns.message.Message,
                                                                                                 float]:
        """The reply (EDNS, so an EDE can come back) and how long it took."""
        self.next_id += 1
        wire = dns.message.make_query(name, "A", use_edns=0, id=self.next_id).to_wire()
        loop = asyncio.get_running_loop()
        future = self.waiting[self.next_id] = loop.create_future()
        started = loop.time()
        if tcp:
            assert self.tcp is not None
            self.tcp.write(struct.pack(">H", len(wire)) + wire)
        else:
            assert self.udp is not None
            self.udp.sendto(wire)
        data = await asyncio.wait_for(future, timeout)
        return dns.message.from_wire(data), loop.time() - started

    def close(self) -> None:
        if self.udp is not None:
            self.udp.close()
        if self.tcp is not None:
            self.tcp.close()
        if self.reader is not None:
            self.reader.cancel()


@contextlib.contextmanager
def out_of_descriptors() -> Iterator[None]:
    """This process at its limit on open files: the soft limit lowered near what is open, and the
    rest taken, so the next socket() fails with EMFILE. Restored on the way out."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 16, hard))
    try:
        with pytest.raises(OSError, match="Too many open files"):  # noqa: PT012 -- until the limit
            while True:
                held.append(os.open(os.devnull, os.O_RDONLY))
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def not_ready(reply: dns.message.Message) -> str:
    """The text of the reply's EDE "Not Ready" (it must have one)."""
    assert reply.rcode() == dns.rcode.SERVFAIL
    codes = {int(e.code): e.text or "" for e in reply.extended_errors()}
    assert EDE_NOT_READY in codes, codes
    return codes[EDE_NOT_READY]


def failing_sockets(monkeypatch: pytest.MonkeyPatch, code: int, *, on: str, only: bytes = b"") -> list[bool]:
    """dns/upstreams.py's socket calls fail with `code` (at creation: on="create"; at sendto: on="send",
    for messages that hold `only`) while the returned flag's [0] is True."""
    failing = [True]

    class Socket(socket.socket):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            if failing[0] and on == "create":
                raise OSError(code, os.strerror(code))
            super().__init__(*args, **kwargs)

        def sendto(self, *args: Any) -> int:
            if failing[0] and on == "send" and only in args[0]:
                raise OSError(code, os.strerror(code))
            return super().sendto(*args)

    monkeypatch.setattr(upstream, "socket", types.SimpleNamespace(**{**vars(socket), "socket": Socket}))
    return failing


# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
async def test_out_of_descriptors_servfail_at_once_and_every_name_resolves_after(
        stub: StubUpstream, data_dir: Path, monkeypatch: pytest.MonkeyPatch, tcp: bool) -> None:
    async with gate_and_stack(config(stub, data_dir), monkeypatch) as (g, stack):
        client = await Client(g.dns_port).open(tcp)
        try:
            names = [f"during{i}.example.test" for i in range(3)]
            with out_of_descriptors():
                for name in names + names:  # each name twice: the second must not join a dead entry
                    reply, took = await client.ask(name, tcp=tcp)
                    assert not_ready(reply) == "Too many open files (EMFILE) opening an upstream socket"
                    assert took < QUICK
                assert stack.shortage.short and stack.resolver.waiting == 0
            for name in names:
                reply, _ = await client.ask(name, tcp=tcp)
                assert reply.rcode() == dns.rcode.NOERROR and reply.answer
            assert stack.resolver.short == 6
        finally:
            client.close()


@pytest.mark.parametrize("code", [errno.ENFILE, errno.ENOBUFS], ids=["ENFILE", "ENOBUFS"])
async def test_a_socket_that_cannot_be_created(stub: StubUpstream, data_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                               code: int) -> None:
    async with gate_and_stack(config(stub, data_dir), monkeypatch) as (g, stack):
        client = await Client(g.dns_port).open()
        try:
            failing = failing_sockets(monkeypatch, code, on="create")
            for _ in range(2):
                reply, took = await client.ask("fresh.example.test")
                assert errno.errorcode[code] in not_ready(reply) and took < QUICK
            assert stack.resolver.waiting == 0
            _, health = await g.http("GET", "/healthz")
            fds = health["file_descriptors"]
            assert fds["shortage"].startswith("out of file descriptors or socket buffers for ")
            assert errno.errorcode[code] in fds["shortage"] and 0 < fds["open"] < fds["limit"]
            failing[0] = False
            reply, _ = await client.ask("fresh.example.test")
            assert reply.answer
            _, health = await g.http("GET", "/healthz")
            assert health["upstreams"][0]["healthy"]  # our shortage is not the server's failure
        finally:
            client.close()


async def test_a_send_the_kernel_refuses(stub: StubUpstream, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A broadcast address without SO_BROADCAST: sendto fails with EACCES before anything leaves."""
    async with gate_and_stack(config(stub, data_dir, "255.255.255.255"), monkeypatch) as (g, stack):
        client = await Client(g.dns_port).open()
        try:
            for _ in range(2):
                reply, took = await client.ask("fresh.example.test")
                assert reply.rcode() == dns.rcode.SERVFAIL and took < QUICK
            assert stack.resolver.waiting == 0
        finally:
            client.close()


async def test_a_send_that_fails_for_lack_of_buffers(stub: StubUpstream, data_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    async with gate_and_stack(config(stub, data_dir), monkeypatch) as (g, stack):
        client = await Client(g.dns_port).open()
        try:
            failing = failing_sockets(monkeypatch, errno.ENOBUFS, on="send")
            for _ in range(2):
                reply, took = await client.ask("fresh.example.test")
                assert "ENOBUFS" in not_ready(reply) and took < QUICK
            assert stack.resolver.waiting == 0
            failing[0] = False
            assert (await client.ask("fresh.example.test"))[0].answer
            _, health = await g.http("GET", "/healthz")
            assert health["upstreams"][0]["healthy"]
        finally:
            client.close()


async def test_the_upstream_pool_closed_under_waiting_queries(stub: StubUpstream, data_dir: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """What closing the upstreams (shutdown, or a reload that replaces them) does to the queries
    waiting on them, in their first attempt or later ones: SERVFAIL now, not at the deadline."""
    stub.silent = True
    async with gate_and_stack(config(stub, data_dir), monkeypatch) as (g, stack):
        client = await Client(g.dns_port).open(tcp=True)
        try:
            loop = asyncio.get_running_loop()
            early = [asyncio.ensure_future(client.ask(f"early{i}.example.test")) for i in range(3)]
            await asyncio.sleep(0.6)  # past the first attempt (0.4 s): these wait in `exchange` now
            late = [asyncio.ensure_future(client.ask(f"late{i}.example.test")) for i in range(3)]
            late.append(asyncio.ensure_future(client.ask("late0.example.test", tcp=True)))  # joins late0
            await asyncio.sleep(0.1)
            assert stack.resolver.waiting == 6
            closed_at = loop.time()
            await stack.upstreams.close()
            for reply, _ in await asyncio.gather(*early, *late):
                assert reply.rcode() == dns.rcode.SERVFAIL
            assert loop.time() - closed_at < QUICK
            assert stack.resolver.waiting == 0 and not stack.upstreams.live_sockets
            reply, took = await client.ask("after.example.test")  # and after: at once, nothing registered
            assert reply.rcode() == dns.rcode.SERVFAIL and took < QUICK
            assert stack.resolver.waiting == 0 and not stack.upstreams.live_sockets
        finally:
            client.close()


async def test_a_prefetch_that_cannot_start_leaves_nothing_behind(stub: StubUpstream, data_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config(stub, data_dir)
    cfg = replace(cfg, cache=replace(cfg.cache, prefetch=True))
    begin = Upstreams.begin

    def broken(self: Upstreams, *args: Any) -> float | None:
        if args[0].name.startswith(b"\x03pre"):
            raise RuntimeError("a bug on the way upstream")
        return begin(self, *args)

    async with gate_and_stack(cfg, monkeypatch) as (g, stack):
        client = await Client(g.dns_port).open()
        loop = asyncio.get_running_loop()
        try:
            for attempt in range(5):
                name = f"pre.n{attempt}.example.test"
                stub.add(name, f"{name}. 2 IN A 192.0.2.5")
                asked = loop.time()
                assert (await client.ask(name))[0].answer
                await asyncio.sleep(1.85)  # into the last tenth of its 2 s: the next hit asks for a refresh
                monkeypatch.setattr(Upstreams, "begin", broken)
                hit, _ = await client.ask(name)
                # Within 2 s of the first query it was a hit; later (this process held up on a loaded
                # machine), it went upstream as the entry had expired: then try again with another name.
                in_life = loop.time() - asked < 2.0
                await asyncio.sleep(0.05)
                assert stack.resolver.waiting == 0
                monkeypatch.setattr(Upstreams, "begin", begin)
                if in_life:
                    break
            else:
                raise AssertionError("no query came within an entry's life: the machine held this test up")
            assert hit.answer  # from the cache; the prefetch failed
            await asyncio.sleep(0.2)  # expired now: the next query goes upstream, on a fresh entry
            reply, took = await client.ask(name)
            assert reply.answer and took < QUICK
        finally:
            client.close()


async def test_an_entry_a_bug_left_behind_is_reaped_and_counted(stub: StubUpstream, data_dir: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A first attempt that never reports back (the bug): the sweep answers its clients soon after
    the deadline, counts it in /metrics and logs it; the name is not poisoned."""
    begin = Upstreams.begin
    lost = [True]

    def forgetful(self: Upstreams, *args: Any) -> float | None:
        if lost[0]:
            return self.loop.time() + self.timeout  # "sent", and then nothing ever comes back
        return begin(self, *args)

    monkeypatch.setattr(Upstreams, "begin", forgetful)
    cfg = config(stub, data_dir)
    cfg = replace(cfg, upstream=replace(cfg.upstream, timeout=0.5, attempt_timeout=0.5))
    async with gate_and_stack(cfg, monkeypatch) as (g, stack):
        client = await Client(g.dns_port).open()
        try:
            first = asyncio.ensure_future(client.ask("lost.example.test", timeout=6))
            await asyncio.sleep(0.1)
            second = asyncio.ensure_future(client.ask("lost.example.test", timeout=6))  # joins the entry
            for reply, took in await asyncio.gather(first, second):
                assert reply.rcode() == dns.rcode.SERVFAIL
                assert 0.5 + REAP_AFTER - 0.1 <= took < 0.5 + REAP_AFTER + 1.5  # the sweep runs every second
            assert stack.resolver.reaped == 1 and stack.resolver.waiting == 0
            _, metrics = await g.http("GET", "/metrics")
            assert "dnsgate_forwards_reaped_total 1.0" in metrics
            assert [r.getMessage() for r in caplog.records if r.name == "dnsgate.dns.forwarding"] == [
                "queries left waiting past the upstream deadline, answered by the sweep: 1 (lost.example.test., "
                "...); a bug, counted in dnsgate_forwards_reaped"]
            lost[0] = False
            assert (await client.ask("lost.example.test"))[0].answer
        finally:
            client.close()


async def test_out_of_descriptors_the_pool_serves_from_the_sockets_it_has(stub: StubUpstream, data_dir: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Descriptors run out after the pool has a socket: answers from memory go on, and fresh names
    are asked on the sockets it has, each still retired after its share of queries (so ports keep
    changing); a query that finds none gets SERVFAIL + EDE at once. Nothing times out."""
    stub.add("cached.example.test", "cached.example.test. 300 IN A 192.0.2.6")
    async with gate_and_stack(config(stub, data_dir), monkeypatch) as (g, stack):
        client = await Client(g.dns_port).open()
        try:
            assert (await client.ask("cached.example.test"))[0].answer  # the pool opens its first socket
            outcomes: Counter[str] = Counter()
            with out_of_descriptors():
                assert (await client.ask("cached.example.test"))[0].answer
                for i in range(2 * QUERIES_PER_SOCKET):
                    reply, took = await client.ask(f"fresh{i}.example.test")
                    assert took < QUICK
                    if reply.answer:
                        outcomes["answered"] += 1
                    else:
                        not_ready(reply)
                        outcomes["not ready"] += 1
            assert outcomes["answered"] >= QUERIES_PER_SOCKET - 1
            # 65 queries, none on a port more than its share: the used-up socket closed, and its
            # descriptor went to its replacement
            assert max(Counter(stub.sources).values()) <= QUERIES_PER_SOCKET
            assert stack.resolver.waiting == 0
        finally:
            client.close()


# --------------------------------------------------------------------------------------------
# CNAME completion (test_chains.py): the name a chain stops at is asked through `start` too, and
# every way that lookup can fail answers the query waiting on it and leaves nothing registered.


def chained(stub: StubUpstream) -> StubUpstream:
    stub.add("alias.example.test", "alias.example.test. 300 IN CNAME target.example.test.")
    stub.add("target.example.test", "target.example.test. 300 IN A 192.0.2.7")
    stub.cname_alone = {"alias.example.test"}  # the chain stops short: dnsgate asks for target itself
    return stub


async def test_a_chains_target_that_cannot_be_sent(stub: StubUpstream, data_dir: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    async with gate_and_stack(config(chained(stub), data_dir), monkeypatch) as (g, stack):
        client = await Client(g.dns_port).open(tcp=True)
        try:
            failing = failing_sockets(monkeypatch, errno.ENOBUFS, on="send", only=b"\x06target")
            for tcp in (False, True, False):
                reply, took = await client.ask("alias.example.test", tcp=tcp)
                assert "ENOBUFS" in not_ready(reply) and took < QUICK
                assert stack.resolver.waiting == 0
            failing[0] = False
            reply, _ = await client.ask("alias.example.test")
            assert [str(r) for rrset in reply.answer for r in rrset] == ["target.example.test.", "192.0.2.7"]
        finally:
            client.close()


async def test_a_chains_target_whose_start_raises(stub: StubUpstream, data_dir: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    async with gate_and_stack(config(chained(stub), data_dir), monkeypatch) as (g, stack):
        client = await Client(g.dns_port).open()
        try:
            begin = Upstreams.begin

            def broken(self: Upstreams, *args: Any) -> float | None:
                if args[0].name.startswith(b"\x06target"):
                    raise RuntimeError("a bug on the way upstream")
                return begin(self, *args)

            monkeypatch.setattr(Upstreams, "begin", broken)
            for _ in range(2):
                reply, took = await client.ask("alias.example.test")
                assert reply.rcode() == dns.rcode.SERVFAIL and took < QUICK
                assert stack.resolver.waiting == 0
            monkeypatch.setattr(Upstreams, "begin", begin)
            assert len((await client.ask("alias.example.test"))[0].answer) == 2
        finally:
            client.close()


async def test_a_chains_target_a_bug_left_behind_is_reaped_with_it(stub: StubUpstream, data_dir: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    begin = Upstreams.begin

    def forgetful(self: Upstreams, *args: Any) -> float | None:
        if args[0].name.startswith(b"\x06target"):
            return self.loop.time() + self.timeout  # "sent", and then nothing ever comes back
        return begin(self, *args)

    monkeypatch.setattr(Upstreams, "begin", forgetful)
    cfg = config(chained(stub), data_dir)  # time left for a first attempt at the target: `begin`, the bug
    cfg = replace(cfg, upstream=replace(cfg.upstream, timeout=0.8, attempt_timeout=0.5))
    async with gate_and_stack(cfg, monkeypatch) as (g, stack):
        client = await Client(g.dns_port).open()
        try:
            reply, took = await client.ask("alias.example.test", timeout=6)
            assert reply.rcode() == dns.rcode.SERVFAIL and 0.8 + REAP_AFTER - 0.1 <= took < 0.8 + REAP_AFTER + 1.5
            assert stack.resolver.reaped >= 1 and stack.resolver.waiting == 0
            monkeypatch.setattr(Upstreams, "begin", begin)
            assert len((await client.ask("alias.example.test"))[0].answer) == 2
        finally:
            client.close()
