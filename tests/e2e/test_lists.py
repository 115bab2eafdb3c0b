"""Over loopback: a cloaked tracker, imported hosts and AdBlock lists, and lists fetched over HTTP."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import dns.edns
import dns.message
import dns.rcode
import pytest
from aiohttp import web

from dnsgate.config import ListsConfig, ListSource
from tests.conftest import Gate, make_config, running_gate
from tests.support.stub_upstream import StubUpstream

MARKETING = {"categories": ["marketing"]}
ANALYTICS = {"categories": ["analytics"]}


def ede_text(reply: dns.message.Message) -> str:
    (ede,) = [o for o in reply.options if isinstance(o, dns.edns.EDEOption)]
    assert ede.code == dns.edns.EDECode.BLOCKED
    return ede.text or ""


# ------------------------------------------------------------------------------------------------
# CNAME cloaking


@pytest.mark.parametrize("tcp", [False, True])
async def test_a_cloaked_tracker_is_gated_on_miss_and_hit(gate: Gate, upstream: StubUpstream, tcp: bool) -> None:
    upstream.add("metrics.shop.example", "metrics.shop.example. 300 IN CNAME x.trackcmp.net.",
                 "x.trackcmp.net. 300 IN A 198.51.100.2")
    me, other = "127.0.0.2", "127.0.0.3"
    miss = await gate.query("metrics.shop.example", source=me, tcp=tcp, use_edns=0)
    assert miss.rcode() == dns.rcode.NXDOMAIN and not miss.answer
    assert "ActiveCampaign" in ede_text(miss) and "alias (CNAME) of trackcmp.net" in ede_text(miss)
    hit = await gate.query("metrics.shop.example", source=me, tcp=tcp, use_edns=0)
    assert hit.rcode() == dns.rcode.NXDOMAIN and "ActiveCampaign" in ede_text(hit)
    assert upstream.count("metrics.shop.example") == 1  # the second answer came from the cache

    assert (await gate.http("PUT", "/v1/consent", source=me, json=MARKETING))[0] == 200
    allowed = await gate.query("metrics.shop.example", source=me, tcp=tcp)
    assert allowed.rcode() == dns.rcode.NOERROR
    assert [rrset.to_text().split()[3] for rrset in allowed.answer] == ["CNAME", "A"]
    assert all(rrset.ttl <= 10 for rrset in allowed.answer)  # capped like the tracker's own answers
    assert (await gate.query("metrics.shop.example", source=other, tcp=tcp)).rcode() == dns.rcode.NXDOMAIN
    assert upstream.count("metrics.shop.example") == 1

    for rdtype in ("AAAA", "HTTPS", "TXT"):  # each type a miss whose answer is the CNAME alone
        reply = await gate.query("metrics.shop.example", rdtype, source=other, tcp=tcp)
        assert reply.rcode() == dns.rcode.NXDOMAIN, rdtype


# ------------------------------------------------------------------------------------------------
# Lists from files

HOSTS = """# tracker hosts
0.0.0.0 ads.hosts.test
0.0.0.0 stats.hosts.test allowed.hosts.test
"""

ADBLOCK = """[Adblock Plus 2.0]
! Title: test
||tracker.adblock.test^
@@||ok.tracker.adblock.test^
"""

LISTED = ["ads.hosts.test", "stats.hosts.test", "allowed.hosts.test", "tracker.adblock.test",
          "sub.tracker.adblock.test", "ok.tracker.adblock.test", "sub.ads.hosts.test"]


def zone_with_listed_names(stub: StubUpstream) -> None:
    for i, name in enumerate(LISTED):
        stub.add(name, f"{name}. 300 IN A 192.0.2.{100 + i}")


async def test_hosts_and_adblock_lists_gate_per_category(upstream: StubUpstream, data_dir: Path,
                                                         tmp_path: Path) -> None:
    zone_with_listed_names(upstream)
    (tmp_path / "trackers.hosts").write_text(HOSTS)
    (tmp_path / "ads.txt").write_text(ADBLOCK)
    lists = ListsConfig(sources=(
        ListSource(id="hosts", name="Tracker hosts", category="analytics", file=str(tmp_path / "trackers.hosts")),
        ListSource(id="adblock", category="marketing", file=str(tmp_path / "ads.txt")),
    ), allow=("allowed.hosts.test",))
    async with running_gate(replace(make_config(upstream, data_dir), lists=lists)) as g:
        me = "127.0.0.2"

        async def rcodes() -> dict[str, str]:
            return {n: dns.rcode.to_text((await g.query(n, source=me)).rcode()) for n in LISTED}

        blocked = await g.query("ads.hosts.test", source=me, use_edns=0)
        assert ede_text(blocked) == "blocked by list 'Tracker hosts' (hosts): no consent for category 'analytics'"
        assert blocked.authority[0].name.to_text() == "ads.hosts.test."
        assert "(adblock): no consent for category 'marketing'" in ede_text(
            await g.query("sub.tracker.adblock.test", source=me, use_edns=0))
        nothing = {"ads.hosts.test": "NXDOMAIN", "stats.hosts.test": "NXDOMAIN", "allowed.hosts.test": "NOERROR",
                   "tracker.adblock.test": "NXDOMAIN", "sub.tracker.adblock.test": "NXDOMAIN",
                   "ok.tracker.adblock.test": "NOERROR",  # the @@ exception
                   "sub.ads.hosts.test": "NOERROR"}  # a hosts entry is that name only
        assert await rcodes() == nothing
        assert upstream.count("ads.hosts.test") == 0 and upstream.count("tracker.adblock.test") == 0

        assert (await g.http("PUT", "/v1/consent", source=me, json=ANALYTICS))[0] == 200
        assert await rcodes() == {**nothing, "ads.hosts.test": "NOERROR", "stats.hosts.test": "NOERROR"}
        assert (await g.http("PUT", "/v1/consent", source=me, json=MARKETING))[0] == 200
        assert await rcodes() == {**nothing, "tracker.adblock.test": "NOERROR", "sub.tracker.adblock.test": "NOERROR"}
        other = await g.query("tracker.adblock.test", source="127.0.0.3")
        assert other.rcode() == dns.rcode.NXDOMAIN  # the cached answer does not leak

        status, vendors = await g.http("GET", "/v1/vendors")
        assert status == 200
        assert [{k: v for k, v in listed.items() if k not in ("description", "source")}
                for listed in vendors["lists"]] == [
            {"id": "hosts", "name": "Tracker hosts", "category": "analytics", "entries": 3},
            {"id": "adblock", "name": "adblock", "category": "marketing", "entries": 2}]
        assert vendors["lists"][0]["source"].endswith("trackers.hosts")
        status, body = await g.http("GET", "/v1/lists", admin=True)
        assert status == 200 and [(s["id"], s["format"], s["loaded"]) for s in body["lists"]] == [
            ("hosts", "hosts", True), ("adblock", "adblock", True)]
        assert (await g.http("GET", "/v1/lists"))[0] == 401


async def test_an_unreadable_list_file_stops_the_start(upstream: StubUpstream, data_dir: Path,
                                                       tmp_path: Path) -> None:
    from dnsgate.app.primary import StartupError

    lists = ListsConfig(sources=(ListSource(id="gone", category="analytics", file=str(tmp_path / "gone.txt")),))
    with pytest.raises(StartupError, match=r"^lists.sources\[0\] \(gone\): cannot read .*gone.txt"):
        async with running_gate(replace(make_config(upstream, data_dir), lists=lists)):
            pass
    (tmp_path / "bad.txt").write_text("<html>not a list</html>\n")
    lists = ListsConfig(sources=(ListSource(id="bad", category="nope", file=str(tmp_path / "bad.txt")),))
    with pytest.raises(StartupError, match=r"^lists.sources\[0\].category: 'nope' is not a category"):
        async with running_gate(replace(make_config(upstream, data_dir), lists=lists)):
            pass


# ------------------------------------------------------------------------------------------------
# Lists from URLs


class ListServer:
    """A list on http://127.0.0.1:<port>/list.txt with ETag and Last-Modified, honouring both."""

    def __init__(self, body: str) -> None:
        self.body = body
        self.requests: list[dict[str, str]] = []
        self.conditional = asyncio.Event()
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/list.txt"

    @property
    def etag(self) -> str:
        return '"' + hashlib.sha1(self.body.encode()).hexdigest() + '"'

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(dict(request.headers))
        if "If-None-Match" in request.headers:
            self.conditional.set()
            if request.headers["If-None-Match"] == self.etag:
                return web.Response(status=304)
        return web.Response(text=self.body, headers={"ETag": self.etag,
                                                     "Last-Modified": "Wed, 01 Jan 2025 00:00:00 GMT"})

    async def start(self) -> ListServer:
        app = web.Application()
        app.router.add_get("/list.txt", self.handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def list_server() -> AsyncIterator[ListServer]:
    server = await ListServer("||tracker.adblock.test^\n").start()
    yield server
    await server.stop()


def url_lists(server: ListServer, refresh_interval: float = 0.0) -> ListsConfig:
    return ListsConfig(sources=(ListSource(id="remote", category="marketing", url=server.url),),
                       refresh_interval=refresh_interval, fetch_timeout=5.0)


async def test_a_url_list_is_fetched_refreshed_conditionally_and_kept_on_disk(
        upstream: StubUpstream, data_dir: Path, list_server: ListServer) -> None:
    zone_with_listed_names(upstream)
    upstream.add("new.adblock.test", "new.adblock.test. 300 IN A 192.0.2.99")
    cfg = replace(make_config(upstream, data_dir), lists=url_lists(list_server))
    async with running_gate(cfg) as g:
        assert (await g.query("tracker.adblock.test")).rcode() == dns.rcode.NXDOMAIN
        assert "If-None-Match" not in list_server.requests[0]
        assert (data_dir / "lists" / "remote.list").read_text() == list_server.body

        status, report = await g.http("POST", "/v1/lists/refresh", admin=True)
        assert status == 200 and report["status"] == "refreshed"
        assert report["lists"][0]["checked_at"].endswith("Z") and report["lists"][0]["entries"] == 1
        assert list_server.requests[1]["If-None-Match"] == list_server.etag
        assert list_server.requests[1]["If-Modified-Since"] == "Wed, 01 Jan 2025 00:00:00 GMT"
        assert (await g.query("tracker.adblock.test")).rcode() == dns.rcode.NXDOMAIN

        list_server.body = "||new.adblock.test^\n"
        assert (await g.http("POST", "/v1/lists/refresh", admin=True))[0] == 200
        assert (await g.query("new.adblock.test")).rcode() == dns.rcode.NXDOMAIN
        assert (await g.query("tracker.adblock.test")).rcode() == dns.rcode.NOERROR

        list_server.body = "<html><body>Please log in to the hotel Wi-Fi</body></html>\n"
        status, body = await g.http("POST", "/v1/lists/refresh", admin=True)
        assert status == 422 and "holds no usable entries" in body["error"]["message"]
        assert (await g.query("new.adblock.test")).rcode() == dns.rcode.NXDOMAIN  # the good copy stays
        assert "new.adblock.test" in (data_dir / "lists" / "remote.list").read_text()
        status, lists = await g.http("GET", "/v1/lists", admin=True)
        assert "holds no usable entries" in lists["lists"][0]["error"]

    await list_server.stop()  # no network: the copy on disk still gates after a restart
    async with running_gate(cfg) as g:
        assert (await g.query("new.adblock.test")).rcode() == dns.rcode.NXDOMAIN
        status, report = await g.http("POST", "/v1/lists/refresh", admin=True)
        assert status == 200  # a failed download keeps the list in force...
        status, lists = await g.http("GET", "/v1/lists", admin=True)
        assert "cannot fetch" in lists["lists"][0]["error"]  # ...and says so
        assert (await g.query("new.adblock.test")).rcode() == dns.rcode.NXDOMAIN


async def test_start_without_network_and_no_copy_comes_up_without_the_list(
        upstream: StubUpstream, data_dir: Path, list_server: ListServer) -> None:
    zone_with_listed_names(upstream)
    cfg = replace(make_config(upstream, data_dir), lists=url_lists(list_server))
    await list_server.stop()
    async with running_gate(cfg) as g:
        assert (await g.query("tracker.adblock.test")).rcode() == dns.rcode.NOERROR
        status, lists = await g.http("GET", "/v1/lists", admin=True)
        assert status == 200 and lists["lists"][0]["loaded"] is False and "cannot fetch" in lists["lists"][0]["error"]


async def test_the_schedule_refreshes_with_conditional_requests(upstream: StubUpstream, data_dir: Path,
                                                                list_server: ListServer) -> None:
    cfg = replace(make_config(upstream, data_dir), lists=url_lists(list_server, refresh_interval=0.05))
    async with running_gate(cfg) as g:
        await asyncio.wait_for(list_server.conditional.wait(), 10)
        assert (await g.query("tracker.adblock.test")).rcode() == dns.rcode.NXDOMAIN
