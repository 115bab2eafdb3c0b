"""dns.workers > 1: worker processes answer on the same address, with the primary's consent.

dnsgate runs in-process (the primary) and starts its workers as real processes; queries come
from many UDP sockets, so the kernel's SO_REUSEPORT hash hands them to every process. Each
process has its own cache, so the upstream's count of one fresh name says how many processes
answered. A change through the API must hold on every socket's next query.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import pytest

from dnsgate.app.primary import StartupError
from dnsgate.config import ListsConfig, ListSource
from dnsgate.workers.supervisor import SYNC_TIMEOUT
from tests.conftest import Gate, make_config, running_gate, with_store
from tests.e2e.test_lists import zone_with_listed_names
from tests.support.consent_fixtures import consent_config, eventually
from tests.support.netns import IP, netns_unavailable
from tests.support.redis_server import RedisServer
from tests.support.stub_upstream import StubUpstream

pytestmark = pytest.mark.usefixtures("udp_io")  # every test runs on both UDP paths (dns.udp_io)

TRACKER = "trackcmp.net"
GRANT = {"categories": ["marketing"]}
SOCKETS = 48  # P(a process of three gets none of them) = 3 * (2/3)^48, about 1e-8


def with_workers(upstream: StubUpstream, data_dir: Path, n: int, **sections: Any) -> Any:
    cfg = consent_config(make_config(upstream, data_dir))
    return replace(cfg, dns=replace(cfg.dns, workers=n), **sections)


@contextlib.asynccontextmanager
async def sockets(client: str, n: int = SOCKETS) -> AsyncIterator[list[socket.socket]]:
    """`n` UDP sockets from `client`, each its own source port (so its own process, fixed)."""
    made = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setblocking(False)
            s.bind((client, 0))
            made.append(s)
        yield made
    finally:
        for s in made:
            s.close()


async def ask(g: Gate, s: socket.socket, name: str) -> dns.message.Message:
    loop = asyncio.get_running_loop()
    q = dns.message.make_query(name, dns.rdatatype.A)
    await loop.sock_sendto(s, q.to_wire(), (g.running.dns[0].host, g.dns_port))
    while True:
        data, _ = await asyncio.wait_for(loop.sock_recvfrom(s, 4096), 3.0)
        reply = dns.message.from_wire(data)
        if reply.id == q.id:
            return reply


async def rcodes(g: Gate, socks: list[socket.socket], name: str = TRACKER) -> Counter[str]:
    replies = await asyncio.gather(*(ask(g, s, name) for s in socks))
    return Counter(dns.rcode.to_text(r.rcode()) for r in replies)


async def health(g: Gate) -> dict[str, Any]:
    status, body = await g.http("GET", "/healthz")
    assert status == 200
    return dict(body)


async def metric_sum(g: Gate, prefix: str) -> float:
    status, text = await g.http("GET", "/metrics")
    assert status == 200
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


async def test_every_process_answers_and_each_change_holds_for_the_next_query_on_all_of_them(
        upstream: StubUpstream, data_dir: Path) -> None:
    me = "127.0.0.51"
    async with running_gate(with_workers(upstream, data_dir, 3)) as g, sockets(me) as socks:
        assert (await health(g))["workers"]["listening"] == 2
        # A fresh name: each process asks the upstream once (its own cache), so 3 asks = 3 processes.
        assert await rcodes(g, socks, "host.example.test") == {"NOERROR": SOCKETS}
        assert upstream.count("host.example.test") == 3
        assert await rcodes(g, socks) == {"NXDOMAIN": SOCKETS}
        for _ in range(5):  # the API answers only once every process has the change
            status, _ = await g.http("PUT", "/v1/consent", source=me, json=GRANT)
            assert status == 200
            assert await rcodes(g, socks) == {"NOERROR": SOCKETS}
            status, _ = await g.http("DELETE", "/v1/consent", source=me)
            assert status == 200
            assert await rcodes(g, socks) == {"NXDOMAIN": SOCKETS}
        # An admin's grant for a whole network (its members have no choice of their own).
        async with sockets("127.0.9.7") as members:
            assert await rcodes(g, members) == {"NXDOMAIN": SOCKETS}
            status, _ = await g.http("PUT", "/v1/clients/127.0.9.0/24/consent", admin=True, json=GRANT)
            assert status == 200
            assert await rcodes(g, members) == {"NOERROR": SOCKETS}


async def test_query_log_metrics_and_events_count_the_queries_every_process_answered(
        upstream: StubUpstream, data_dir: Path) -> None:
    cfg = with_workers(upstream, data_dir, 3)
    cfg = replace(cfg, querylog=replace(cfg.querylog, mode="full", flush_interval=0.1))
    async with running_gate(cfg) as g, sockets("127.0.0.52") as socks:
        before = await metric_sum(g, "dnsgate_queries_total{")
        assert await rcodes(g, socks) == {"NXDOMAIN": SOCKETS}
        assert await rcodes(g, socks, "other.example.test") == {"NOERROR": SOCKETS}

        async def counted() -> bool:  # workers send their counts every second
            return await metric_sum(g, "dnsgate_queries_total{") - before >= 2 * SOCKETS

        await eventually(counted, 5.0)
        assert await metric_sum(g, "dnsgate_queries_total{") - before == 2 * SOCKETS
        assert await metric_sum(g, 'dnsgate_gated_queries_total{decision="sinkholed",vendor="activecampaign"}') \
            == SOCKETS
        assert await metric_sum(g, "dnsgate_upstream_queries_total{") == 3  # one per process

        async def logged() -> bool:
            status, body = await g.http("GET", "/v1/queries?client=127.0.0.52&limit=500", admin=True)
            assert status == 200, body
            return len(body["entries"]) == 2 * SOCKETS

        await eventually(logged, 5.0)


@pytest.mark.parametrize("kind", [socket.SOCK_DGRAM, socket.SOCK_STREAM], ids=["udp", "tcp"])
async def test_an_address_another_process_shares_is_in_use(upstream: StubUpstream, data_dir: Path,
                                                           kind: socket.SocketKind) -> None:
    """Another dnsgate of the same user listening there with workers (SO_REUSEPORT): joining its
    group would split the clients' queries between two consent tables, so the address is in use."""
    with socket.socket(socket.AF_INET, kind) as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        if kind == socket.SOCK_STREAM:
            other.listen()
        port = other.getsockname()[1]
        cfg = with_workers(upstream, data_dir, 2)
        cfg = replace(cfg, dns=replace(cfg.dns, listen=(f"127.0.0.1:{port}",)))
        with pytest.raises(StartupError, match=rf"^dns.listen 127.0.0.1:{port}: .*in use"):
            async with running_gate(cfg):
                pass


def test_a_free_port_is_never_one_another_process_shares() -> None:
    """With port 0, the kernel may give an SO_REUSEPORT socket a port another process's group of
    this user holds (it counts as free for it): here the only ephemeral port there is."""
    why = netns_unavailable(f"dnsgate-port-probe-{os.getpid()}")
    if why:
        pytest.skip(why)
    name = f"dnsgate-port-{os.getpid()}"
    subprocess.run([IP, "netns", "add", name], check=True)
    try:
        one_port = ["sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=40000 40000"]
        for command in ([IP, "link", "set", "lo", "up"], one_port):
            subprocess.run([IP, "netns", "exec", name, *command], check=True)
        result = subprocess.run([IP, "netns", "exec", name, sys.executable, "-m", "tests.support.shared_port_helper"],
                                capture_output=True, text=True, timeout=30, check=False,
                                cwd=Path(__file__).resolve().parents[2])
    finally:
        subprocess.run([IP, "netns", "del", name], check=False)
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    assert outcome["held"] == 40000
    assert "bound" not in outcome and "no port free" in outcome["error"]


async def test_a_killed_worker_is_started_again_from_the_consent_in_force(
        upstream: StubUpstream, data_dir: Path) -> None:
    me = "127.0.0.53"
    async with running_gate(with_workers(upstream, data_dir, 2)) as g, sockets(me) as socks:
        (pid,) = (await health(g))["workers"]["pids"]
        os.kill(pid, signal.SIGKILL)  # a worker this test's dnsgate started
        # A change while it is gone is not held up by it, and the new worker starts with it.
        status, _ = await g.http("PUT", "/v1/consent", source=me, json=GRANT)
        assert status == 200

        async def back() -> bool:
            w = (await health(g))["workers"]
            return bool(w["listening"] == 1 and w["restarts"] == 1 and w["pids"] != [pid])

        await eventually(back, 10.0)
        assert await rcodes(g, socks) == {"NOERROR": SOCKETS}
        assert upstream.count(TRACKER) == 2  # both processes answered (each asked once)
        assert await metric_sum(g, "dnsgate_worker_restarts_total") == 1
    assert _state(pid) == "gone"  # (reaped by dnsgate)


async def test_a_reload_reaches_every_worker_before_it_is_reported_done(
        upstream: StubUpstream, data_dir: Path) -> None:
    cfg = with_workers(upstream, data_dir, 3)
    relaxed = replace(cfg, gate=replace(cfg.gate, disabled_domains=(TRACKER,)))
    async with running_gate(cfg, reread=lambda: relaxed) as g, sockets("127.0.0.54") as socks:
        assert await rcodes(g, socks) == {"NXDOMAIN": SOCKETS}
        status, body = await g.http("POST", "/v1/reload", admin=True)
        assert status == 200, body
        assert await rcodes(g, socks) == {"NOERROR": SOCKETS}
        pids = (await health(g))["workers"]["pids"]
        assert len(pids) == 2
    for pid in pids:  # stopped with dnsgate
        assert _state(pid) == "gone"


def _state(pid: int) -> str:
    """The process's state letter, or "gone" ("Z": exited, waiting to be reaped by its new parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return "gone"


async def test_workers_stop_when_the_primary_dies(upstream: StubUpstream, tmp_path: Path) -> None:
    """A worker must never answer from a consent table nobody updates: it exits with its primary."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dnsgate", "serve", "--workers", "3", "--dns", "127.0.0.1:0", "--api", "127.0.0.1:0",
        "--upstream", upstream.address, "--data-dir", str(tmp_path), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL, env={k: v for k, v in os.environ.items() if not k.startswith("DNSGATE_")})
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 20)).decode()
        assert line.startswith("dnsgate ready: dns (udp+tcp, 3 processes) 127.0.0.1:"), line
        api = line.split("api http://", 1)[1].split(";", 1)[0]
        async with aiohttp.ClientSession() as session, session.get(f"http://{api}/healthz") as response:
            pids = (await response.json())["workers"]["pids"]
        assert len(pids) == 2 and all(_state(p) not in ("gone", "Z") for p in pids)
        process.kill()  # the primary, which this test started
        await process.wait()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5.0
        while any(_state(p) not in ("gone", "Z") for p in pids):
            assert loop.time() < deadline, [_state(p) for p in pids]
            await asyncio.sleep(0.05)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_block_lists_reach_every_worker_at_start_and_at_each_reload(
        upstream: StubUpstream, data_dir: Path, tmp_path: Path) -> None:
    zone_with_listed_names(upstream)
    hosts = tmp_path / "trackers.hosts"
    hosts.write_text("0.0.0.0 ads.hosts.test\n")
    lists = ListsConfig(sources=(ListSource(id="hosts", category="analytics", file=str(hosts)),))
    cfg = with_workers(upstream, data_dir, 3, lists=lists)
    async with running_gate(cfg, reread=lambda: cfg) as g, sockets("127.0.0.55") as socks:
        assert await rcodes(g, socks, "ads.hosts.test") == {"NXDOMAIN": SOCKETS}
        assert await rcodes(g, socks, "stats.hosts.test") == {"NOERROR": SOCKETS}
        await asyncio.to_thread(hosts.write_text, "0.0.0.0 ads.hosts.test\n0.0.0.0 stats.hosts.test\n")
        status, body = await g.http("POST", "/v1/reload", admin=True)
        assert status == 200, body
        assert await rcodes(g, socks, "stats.hosts.test") == {"NXDOMAIN": SOCKETS}
        assert (await g.http("PUT", "/v1/consent", source="127.0.0.55", json={"categories": ["analytics"]}))[0] == 200
        assert await rcodes(g, socks, "stats.hosts.test") == {"NOERROR": SOCKETS}


async def server_ids(g: Gate, socks: list[socket.socket]) -> list[str]:
    """Which process answers each socket: `CH TXT id.server` (RFC 4892)."""
    loop = asyncio.get_running_loop()
    out = []
    for s in socks:
        q = dns.message.make_query("id.server", dns.rdatatype.TXT, dns.rdataclass.CH)
        await loop.sock_sendto(s, q.to_wire(), (g.running.dns[0].host, g.dns_port))
        reply = dns.message.from_wire((await asyncio.wait_for(loop.sock_recvfrom(s, 4096), 3.0))[0])
        out.append(b"".join(reply.answer[0][0].strings).decode())
    return out


async def test_a_kiosk_seen_only_by_workers_keeps_its_session_and_loses_it_when_idle(
        upstream: StubUpstream, data_dir: Path) -> None:
    kiosk = "127.0.2.20"  # the kiosk network of consent_config
    cfg = with_workers(upstream, data_dir, 3)
    cfg = replace(cfg, consent=replace(cfg.consent, kiosk_idle_minutes=0.05))  # 3 s
    async with running_gate(cfg) as g, sockets(kiosk) as socks:
        ids = await server_ids(g, socks)
        assert set(ids) == {"dnsgate", "dnsgate worker 1", "dnsgate worker 2"}
        by_workers = [s for s, i in zip(socks, ids, strict=True) if i != "dnsgate"]
        assert (await g.http("PUT", "/v1/consent", source=kiosk, json=GRANT))[0] == 200
        loop = asyncio.get_running_loop()
        until = loop.time() + 6.0  # twice the idle time, the primary never asked
        while loop.time() < until:
            assert await rcodes(g, by_workers, "host.example.test") == {"NOERROR": len(by_workers)}
            await asyncio.sleep(0.5)
        assert await rcodes(g, socks) == {"NOERROR": SOCKETS}  # still in session, on every process

        async def ended() -> bool:
            status, body = await g.http("GET", "/v1/consent", source=kiosk)
            return status == 200 and body["choice"] is None

        await eventually(ended, 10.0)  # no queries: idle after 3 s, whatever process saw the last one

        async def ended_everywhere() -> bool:
            return await rcodes(g, socks) == {"NXDOMAIN": SOCKETS}

        # The primary's sweeper ended it (what GET /v1/consent reads); every worker has the change
        # within the bound on replicating one (SYNC_TIMEOUT: a worker that has not is replaced).
        await eventually(ended_everywhere, SYNC_TIMEOUT + 1.0)
        # The next visitor's session starts afresh on the workers too.
        assert (await g.http("PUT", "/v1/consent", source=kiosk, json=GRANT))[0] == 200
        until = loop.time() + 4.5
        while loop.time() < until:  # (a worker's clock of the session before must not end this one)
            assert await rcodes(g, by_workers) == {"NOERROR": len(by_workers)}
            await asyncio.sleep(0.5)
        assert await rcodes(g, socks) == {"NOERROR": SOCKETS}


async def test_a_pairing_name_asked_through_a_worker_binds_on_the_primary(
        upstream: StubUpstream, data_dir: Path) -> None:
    browser, device = "127.0.0.56", "127.0.8.2"  # the HTTP caller, and its device's DNS source
    async with running_gate(with_workers(upstream, data_dir, 3)) as g, sockets(device) as socks:
        ids = await server_ids(g, socks)
        by_workers = [s for s, i in zip(socks, ids, strict=True) if i != "dnsgate"]
        status, body = await g.http("PUT", "/v1/consent", source=browser, json=GRANT)
        assert status == 200
        assert await rcodes(g, socks) == {"NXDOMAIN": SOCKETS}
        reply = await ask(g, by_workers[0], body["pairing"]["name"])
        assert reply.rcode() == dns.rcode.NOERROR  # heard; the primary binds it

        async def bound() -> bool:
            return (await g.http("GET", "/v1/whoami", source=browser))[1]["dns"] is not None

        await eventually(bound)
        assert (await g.http("GET", "/v1/whoami", source=browser))[1]["dns"]["address"] == device
        assert await rcodes(g, socks) == {"NXDOMAIN": SOCKETS}  # pairing carries no grant
        # the page records the choice through the device's other address itself, naming the token
        status, _ = await g.http("PUT", "/v1/consent", source=device,
                                 json={**GRANT, "pairing": body["pairing"]["token"]})
        assert status == 200
        assert await rcodes(g, socks) == {"NOERROR": SOCKETS}  # on every process
        status, _ = await g.http("DELETE", "/v1/consent", source=browser)  # and a withdrawal reaches it
        assert status == 200
        assert await rcodes(g, socks) == {"NXDOMAIN": SOCKETS}
        assert upstream.count(body["pairing"]["name"]) == 0


async def test_with_redis_a_change_through_another_instance_reaches_every_worker(
        upstream: StubUpstream, tmp_path: Path, redis_server: RedisServer) -> None:
    me = "127.0.0.57"
    with_workers_cfg = with_store(with_workers(upstream, tmp_path / "a", 3), redis_server.url)
    other_cfg = with_store(consent_config(make_config(upstream, tmp_path / "b")), redis_server.url)
    async with running_gate(with_workers_cfg) as a, running_gate(other_cfg) as b, sockets(me) as socks:
        assert await rcodes(a, socks) == {"NXDOMAIN": SOCKETS}
        assert (await a.http("PUT", "/v1/consent", source=me, json=GRANT))[0] == 200  # through a: at once
        assert await rcodes(a, socks) == {"NOERROR": SOCKETS}
        assert (await b.http("DELETE", "/v1/consent", source=me))[0] == 200  # through the other instance

        async def withdrawn_everywhere() -> bool:
            return await rcodes(a, socks) == {"NXDOMAIN": SOCKETS}

        await eventually(withdrawn_everywhere, 1.0)  # the shared store's bound: within a second
