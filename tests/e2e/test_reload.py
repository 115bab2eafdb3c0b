"""Live reload over loopback: POST /v1/reload, SIGHUP on a real process, and a reload under load."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import fields, replace
from pathlib import Path

import dns.asyncquery
import dns.edns
import dns.message
import dns.rcode

from dnsgate.config import Config, Overrides, load_config
from dnsgate.rules.reload import LIVE_KEYS, LIVE_SECTIONS, split_changes
from tests.cli.test_serve import READY, _env
from tests.conftest import TOKEN, Gate, running_gate
from tests.support.stub_upstream import StubUpstream

BASE = """
[upstream]
timeout = 1.5
attempt_timeout = 0.5
"""


def hosts_list(path: Path, *names: str) -> Path:
    path.write_text("".join(f"0.0.0.0 {n}\n" for n in names))
    return path


def list_section(path: Path, category: str = "analytics", list_id: str = "trackers") -> str:
    return f'\n[[lists.sources]]\nid = "{list_id}"\ncategory = "{category}"\nfile = "{path}"\n'


def reread_from(path: Path, stub: StubUpstream, data_dir: Path) -> Callable[[], Config]:
    overrides = Overrides(dns=("127.0.0.1:0",), api="127.0.0.1:0", upstream=(stub.address,),
                          data_dir=str(data_dir), admin_token=TOKEN)
    return lambda: load_config(str(path), overrides)


@contextlib.asynccontextmanager
async def gate_from_file(path: Path, stub: StubUpstream, data_dir: Path) -> AsyncIterator[Gate]:
    reread = reread_from(path, stub, data_dir)
    async with running_gate(reread(), reread) as g:
        yield g


def has_ede(reply: dns.message.Message) -> bool:
    return any(isinstance(o, dns.edns.EDEOption) for o in reply.options)


async def test_reload_applies_live_keys_reports_the_rest_and_keeps_consent(
        upstream: StubUpstream, data_dir: Path, tmp_path: Path) -> None:
    upstream.add("ads.hosts.test", "ads.hosts.test. 300 IN A 192.0.2.50")
    conf = tmp_path / "dnsgate.toml"
    conf.write_text(BASE)
    trackers = hosts_list(tmp_path / "trackers.hosts", "ads.hosts.test")
    async with gate_from_file(conf, upstream, data_dir) as g:
        fan = "127.0.0.2"
        assert (await g.http("PUT", "/v1/consent", source=fan, json={"categories": ["marketing"]}))[0] == 200
        assert (await g.query("trackcmp.net", source=fan)).rcode() == dns.rcode.NOERROR
        assert (await g.query("ads.hosts.test")).rcode() == dns.rcode.NOERROR

        conf.write_text(BASE + "[dns]\nudp_max_size = 1400\n[gate]\nsinkhole_ttl = 7\n" + list_section(trackers))
        status, report = await g.http("POST", "/v1/reload", admin=True)
        assert status == 200, report
        assert report["status"] == "reloaded" and report["reason"] == "POST /v1/reload"
        assert report["applied"] == ["gate.sinkhole_ttl", "lists.sources"]
        assert report["restart_required"] == ["dns.udp_max_size"]
        assert report["list_entries"] == 1 and report["lists"][0]["entries"] == 1
        assert (await g.http("GET", "/healthz"))[1]["cache_entries"] == 0  # emptied with the swap

        blocked = await g.query("ads.hosts.test", use_edns=0, timeout=3)
        assert blocked.rcode() == dns.rcode.NXDOMAIN and blocked.authority[0].ttl == 7
        assert blocked.payload == 1232  # dns.udp_max_size waits for a restart
        assert (await g.query("trackcmp.net", source=fan)).rcode() == dns.rcode.NOERROR  # consent untouched
        assert "marketing" in (await g.http("GET", "/v1/consent", source=fan))[1]["categories"]

        conf.write_text(BASE + "[gate]\nmode = 'refused'\n" + list_section(trackers))
        status, body = await g.http("POST", "/v1/reload", admin=True)
        assert status == 422 and body["error"]["code"] == "reload_rejected"
        assert body["error"]["message"].startswith("gate.mode: must be one of nxdomain, null")
        conf.write_text(BASE + list_section(trackers, category="adverts"))
        status, body = await g.http("POST", "/v1/reload", admin=True)
        assert status == 422
        assert body["error"]["message"].startswith("lists.sources[0].category: 'adverts' is not a category")
        after = await g.query("ads.hosts.test")
        assert after.rcode() == dns.rcode.NXDOMAIN and after.authority[0].ttl == 7  # the old rules stay

        assert (await g.http("POST", "/v1/reload"))[0] == 401
        assert (await g.http("POST", "/v1/reload", admin=True, headers={"Origin": "https://evil.test"}))[0] == 403


ADCO = """
[[category]]
id = "ads"
name = "Advertising"

[[vendor]]
id = "adco"
name = "AdCo"
category = "ads"

[[vendor.domain]]
pattern = "adco.example"
"""


async def test_reload_picks_up_dropins_and_switched_off_vendors(upstream: StubUpstream, data_dir: Path,
                                                               tmp_path: Path) -> None:
    upstream.add("adco.example", "adco.example. 300 IN A 192.0.2.60")
    conf = tmp_path / "dnsgate.toml"
    conf.write_text(BASE)
    dropins = tmp_path / "vendors.d"
    dropins.mkdir()
    (dropins / "adco.toml").write_text(ADCO)
    async with gate_from_file(conf, upstream, data_dir) as g:
        assert (await g.query("adco.example")).rcode() == dns.rcode.NOERROR
        assert (await g.http("PUT", "/v1/consent", json={"categories": ["ads"]}))[0] == 400

        conf.write_text(BASE + f'[gate]\nvendors_dir = "{dropins}"\ndisabled_vendors = ["activecampaign"]\n')
        status, report = await g.http("POST", "/v1/reload", admin=True)
        assert status == 200 and report["catalog"]["vendors"] == 1
        assert report["applied"] == ["gate.vendors_dir", "gate.disabled_vendors"]
        blocked = await g.query("adco.example", use_edns=0)
        assert blocked.rcode() == dns.rcode.NXDOMAIN and "AdCo (adco)" in str(blocked.options[0])
        assert (await g.query("trackcmp.net")).rcode() == dns.rcode.NOERROR  # switched off
        status, vendors = await g.http("GET", "/v1/vendors")
        assert [v["id"] for v in vendors["vendors"]] == ["adco"]
        assert (await g.http("PUT", "/v1/consent", json={"categories": ["ads"]}))[0] == 200
        assert (await g.query("adco.example")).rcode() == dns.rcode.NOERROR
        own = (await g.http("GET", "/v1/consent"))[1]
        assert [{k: v[k] for k in ("id", "name", "category", "allowed")} for v in own["vendors"]] == [
            {"id": "adco", "name": "AdCo", "category": "ads", "allowed": True}]

        (dropins / "broken.toml").write_text('[[vendor]]\nid = "x"\nname = "X"\ncategory = "ads"\nserves = 1\n')
        status, body = await g.http("POST", "/v1/reload", admin=True)
        assert status == 422
        assert body["error"]["message"] == (f"{dropins / 'broken.toml'}: vendor[0].serves: unknown key (known: "
                                            "category, ccpa_sale_or_share, cookie, data_collected, domain, gvl_id, "
                                            "id, ip_ranges, name, privacy_policy, recipients, sources, summary, "
                                            "tcf_purposes, text)")


NOTICE = """version = "{version}"
default_language = "en"
[text]
en = "{text}"
"""


async def granted_under_the_notice(g: Gate, source: str) -> None:
    """A grant made as the portal makes it: with the notice shown."""
    _, shown = await g.http("GET", "/v1/notice")
    body = {"categories": ["marketing"], "language": "en",
            "notice": {"version": shown["version"], "sha256": shown["languages"]["en"]["sha256"]}}
    assert (await g.http("PUT", "/v1/consent", source=source, json=body))[0] == 200
    assert (await g.query("trackcmp.net", source=source)).rcode() == dns.rcode.NOERROR


async def test_reload_applies_the_operator_and_the_notice_text_live(upstream: StubUpstream, data_dir: Path,
                                                                    tmp_path: Path) -> None:
    # The operator and the consent text are part of the notice: a reload shows them at once, and a
    # grant made under the old ones stops counting. The portal's other keys wait for a restart.
    conf = tmp_path / "dnsgate.toml"
    conf.write_text(BASE + '[portal]\noperator = "Old Café"\ncontact = "old@cafe.test"\n')
    text = tmp_path / "notice.toml"
    text.write_text(NOTICE.format(version="1", text="We gate trackers."))
    async with gate_from_file(conf, upstream, data_dir) as g:
        await granted_under_the_notice(g, "127.0.0.20")
        _, before = await g.http("GET", "/v1/notice")
        assert before["operator"]["name"] == "Old Café"

        conf.write_text(BASE + f'[consent]\nnotice = "{text}"\n[portal]\noperator = "New Café"\n'
                        'contact = "new@cafe.test"\nprivacy_url = "https://cafe.test/privacy"\n'
                        'host = "consent.cafe.test"\n')
        status, report = await g.http("POST", "/v1/reload", admin=True)
        assert status == 200, report
        assert report["applied"] == ["consent.notice", "portal.operator", "portal.contact", "portal.privacy_url"]
        assert report["restart_required"] == ["portal.host"]
        assert report["notice"] == {"version": report["notice"]["version"], "previous": before["version"]}
        assert report["notice"]["version"].startswith("1+") and "notice text" in report["changed"]
        assert "operator" in report["changed"]
        _, after = await g.http("GET", "/v1/notice")
        assert after["version"] == report["notice"]["version"]
        assert after["operator"] == {"name": "New Café", "contact": "new@cafe.test",
                                     "privacy_url": "https://cafe.test/privacy"}
        assert after["languages"]["en"]["text"] == "We gate trackers."
        page = (await g.http("GET", "/", headers={"Accept": "text/html"}))[1]
        assert "New Café" in page and "Old Café" not in page and "We gate trackers." in page
        # the grant rested on the old text and operator: it no longer counts
        assert (await g.query("trackcmp.net", source="127.0.0.20")).rcode() == dns.rcode.NXDOMAIN
        assert (await g.query("consent.dnsgate.internal")).rcode() == dns.rcode.NOERROR  # the old host stays
        await granted_under_the_notice(g, "127.0.0.20")

        # the same file with new words: no key changed, the notice did
        text.write_text(NOTICE.format(version="2", text="We gate trackers, and log each choice."))
        status, report = await g.http("POST", "/v1/reload", admin=True)
        assert status == 200 and report["applied"] == [] and report["changed"] == ["notice text"]
        assert report["restart_required"] == ["portal.host"]  # still: the running value is the old one
        assert report["notice"]["previous"] == after["version"] and report["notice"]["version"].startswith("2+")
        assert (await g.query("trackcmp.net", source="127.0.0.20")).rcode() == dns.rcode.NXDOMAIN
        await granted_under_the_notice(g, "127.0.0.20")

        # a notice that does not parse changes nothing
        text.write_text('version = "3"\n[text]\n')
        status, body = await g.http("POST", "/v1/reload", admin=True)
        assert status == 422 and body["error"]["message"].startswith(f"consent.notice: {text}: text:")
        assert (await g.http("GET", "/v1/notice"))[1]["version"] == report["notice"]["version"]
        assert (await g.query("trackcmp.net", source="127.0.0.20")).rcode() == dns.rcode.NOERROR


async def test_a_reload_reports_what_changed_in_the_catalog(upstream: StubUpstream, data_dir: Path,
                                                            tmp_path: Path) -> None:
    # Only a drop-in's content changes: no config key did, and the report says what did.
    dropins = tmp_path / "vendors.d"
    dropins.mkdir()
    conf = tmp_path / "dnsgate.toml"
    conf.write_text(BASE + f'[gate]\nvendors_dir = "{dropins}"\n')
    async with gate_from_file(conf, upstream, data_dir) as g:
        _, before = await g.http("GET", "/v1/notice")
        status, report = await g.http("POST", "/v1/reload", admin=True)
        assert status == 200 and report["applied"] == [] and report["changed"] == []
        assert report["notice"] == {"version": before["version"], "previous": before["version"]}

        (dropins / "adco.toml").write_text(ADCO)
        status, report = await g.http("POST", "/v1/reload", admin=True)
        assert status == 200 and report["applied"] == []
        assert report["changed"] == ["category ads added", "vendor adco added"]
        assert report["notice"]["previous"] == before["version"] != report["notice"]["version"]

        (dropins / "adco.toml").write_text(ADCO.replace('name = "AdCo"', 'name = "AdCo"\nsummary = "Ads."') +
                                           '\n[[vendor.domain]]\npattern = "adco-cdn.example"\n')
        status, report = await g.http("POST", "/v1/reload", admin=True)
        assert report["changed"] == ["vendor adco described differently", "vendor adco names changed"]

        hosts = hosts_list(tmp_path / "t.hosts", "a.hosts.test")
        conf.write_text(BASE + f'[gate]\nvendors_dir = "{dropins}"\n' + list_section(hosts))
        status, report = await g.http("POST", "/v1/reload", admin=True)
        assert report["applied"] == ["lists.sources"] and report["changed"] == ["list trackers added"]
        hosts_list(hosts, "a.hosts.test", "b.hosts.test")
        (dropins / "adco.toml").unlink()
        status, report = await g.http("POST", "/v1/reload", admin=True)
        assert report["applied"] == []
        assert report["changed"] == ["category ads removed", "vendor adco removed", "list trackers entries 1 → 2"]


def test_a_key_that_needs_a_restart_keeps_its_running_value() -> None:
    running = Config()
    new = replace(running, portal=replace(running.portal, host="consent.cafe.test", operator="Café"),
                  profiles=replace(running.profiles, default="kiosk"),
                  identity=replace(running.identity, pairing_ttl=60.0), gate=replace(running.gate, sinkhole_ttl=9))
    effective, applied, restart = split_changes(running, new)
    assert applied == ("gate.sinkhole_ttl", "portal.operator")
    assert restart == ("profiles.default", "identity.pairing_ttl", "portal.host")
    assert effective == replace(running, portal=replace(running.portal, operator="Café"),
                                gate=replace(running.gate, sinkhole_ttl=9))


def test_the_manual_says_what_applies_live_as_the_reload_does() -> None:
    text = (Path(__file__).parents[2] / "docs" / "gate.md").read_text()
    header = "| applies live | needs a restart"
    row = text[text.index(header):].splitlines()[2]
    live, restart = (cell.strip() for cell in row.strip("|").split("|"))
    for section in fields(Config):
        if section.name in LIVE_SECTIONS:
            assert f"`[{section.name}]`" in live and f"`[{section.name}]`" not in restart
        else:
            assert f"`[{section.name}]`" in restart, section.name
    for key in LIVE_KEYS:
        assert f"`{key}`" in live


# ------------------------------------------------------------------------------------------------
# Under load


async def test_a_reload_under_continuous_load_loses_no_query(upstream: StubUpstream, data_dir: Path,
                                                            tmp_path: Path) -> None:
    """Workers query without pause (UDP and TCP) while the lists are swapped back and forth; every
    query must be answered, and every answer must be right for the old or the new rules."""
    upstream.add("metrics.shop.example", "metrics.shop.example. 300 IN CNAME x.trackcmp.net.",
                 "x.trackcmp.net. 300 IN A 198.51.100.2")
    upstream.add("toggle.load.test", "toggle.load.test. 300 IN A 192.0.2.70")
    upstream.add("n1.load-b.test", "n1.load-b.test. 300 IN A 192.0.2.71")
    # Big enough that every build takes a noticeable time on the worker thread.
    list_a = hosts_list(tmp_path / "a.hosts", "toggle.load.test", *(f"n{i}.load-a.test" for i in range(100_000)))
    list_b = hosts_list(tmp_path / "b.hosts", *(f"n{i}.load-b.test" for i in range(100_000)))
    conf = tmp_path / "dnsgate.toml"
    conf.write_text(BASE + list_section(list_a))
    cap = 30.0  # the load runs until enough reloads and queries overlapped (seconds on a slow machine)
    async with gate_from_file(conf, upstream, data_dir) as g:
        assert (await g.http("PUT", "/v1/consent", source="127.0.0.4", json={"categories": ["marketing"]}))[0] == 200
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cap
        # (name, client) -> the outcomes allowed: "gated" (sinkhole with EDE) or "answered"
        cases: list[tuple[str, str, set[str]]] = [
            ("host.example.test", "127.0.0.5", {"answered"}),
            ("trackcmp.net", "127.0.0.5", {"gated"}),
            ("trackcmp.net", "127.0.0.4", {"answered"}),  # consent survives every reload
            ("metrics.shop.example", "127.0.0.5", {"gated"}),  # cloaking, on fresh misses after each swap
            ("toggle.load.test", "127.0.0.5", {"gated", "answered"}),  # list a gates it, list b does not
            ("n1.load-b.test", "127.0.0.5", {"gated", "answered"}),
        ]
        seen: Counter[tuple[str, str, str]] = Counter()
        answered = 0
        reloads = 0

        def enough() -> bool:
            both = all(seen[("toggle.load.test", "127.0.0.5", outcome)] for outcome in ("gated", "answered"))
            return (reloads >= 3 and answered >= 200 and both) or loop.time() >= deadline

        async def worker(n: int, tcp: bool) -> None:
            nonlocal answered
            i = n
            while not enough():
                name, client, allowed = cases[i % len(cases)]
                if i % 7 == 0:
                    name, client, allowed = f"u{n}-{i}.miss.test", "127.0.0.5", {"answered"}
                i += 1
                reply = await g.query(name, source=client, tcp=tcp, use_edns=0, timeout=2.0)
                outcome = "gated" if has_ede(reply) else "answered"
                assert outcome in allowed, (name, client, outcome)
                if name in ("toggle.load.test", "n1.load-b.test"):
                    seen[(name, client, outcome)] += 1
                answered += 1

        async def reloader() -> None:
            nonlocal reloads
            while not enough():
                conf.write_text(BASE + list_section(list_b if reloads % 2 == 0 else list_a))
                status, report = await g.http("POST", "/v1/reload", admin=True)
                assert status == 200, report
                reloads += 1

        await asyncio.gather(reloader(), *(worker(n, tcp=n >= 6) for n in range(8)))
        assert reloads >= 3, reloads
        assert answered >= 200, answered
        # both sets of rules were seen, never a mix within one answer (each is gated or not, by EDE)
        assert seen[("toggle.load.test", "127.0.0.5", "gated")] and seen[("toggle.load.test", "127.0.0.5", "answered")]
        assert (await g.http("GET", "/healthz"))[1]["reloads"] == reloads


# ------------------------------------------------------------------------------------------------
# SIGHUP on a real process


async def _stderr_line(process: asyncio.subprocess.Process, needle: str, timeout: float = 15) -> str:
    assert process.stderr is not None

    async def find() -> str:
        while True:
            line = (await process.stderr.readline()).decode()  # type: ignore[union-attr]
            assert line, f"dnsgate exited before logging {needle!r}"
            if needle in line:
                return line

    return await asyncio.wait_for(find(), timeout)


async def test_sighup_reloads_a_running_process(upstream: StubUpstream, data_dir: Path, tmp_path: Path) -> None:
    upstream.add("ads.hosts.test", "ads.hosts.test. 300 IN A 192.0.2.50")
    trackers = hosts_list(tmp_path / "trackers.hosts", "ads.hosts.test")
    conf = tmp_path / "dnsgate.toml"
    conf.write_text(BASE)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dnsgate", "serve", "--config", str(conf), "--dns", "127.0.0.1:0",
        "--api", "127.0.0.1:0", "--upstream", upstream.address, "--data-dir", str(data_dir),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=_env())
    try:
        assert process.stdout is not None
        match = READY.match((await asyncio.wait_for(process.stdout.readline(), 15)).decode())
        assert match
        port = int(match[1])

        async def ask() -> int:
            q = dns.message.make_query("ads.hosts.test", "A")
            return (await dns.asyncquery.udp(q, "127.0.0.1", port=port, timeout=3)).rcode()

        assert await ask() == dns.rcode.NOERROR
        conf.write_text(BASE + "[consent]\ndefault_days = 30\n" + list_section(trackers))
        process.send_signal(signal.SIGHUP)
        line = await _stderr_line(process, "reload (SIGHUP)")
        assert "applied lists.sources" in line
        assert "need a restart were not applied: consent.default_days" in await _stderr_line(process, "restart")
        assert await ask() == dns.rcode.NXDOMAIN

        conf.write_text(BASE + "[cache]\nmax_ttl = -5\n")
        process.send_signal(signal.SIGHUP)
        line = await _stderr_line(process, "reload (SIGHUP) rejected")
        assert "cache.max_ttl: must be >= 1" in line
        assert await ask() == dns.rcode.NXDOMAIN  # still the previous rules
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), 10)
        if process.returncode is None:
            process.kill()
            await process.wait()

