"""The operator's own names end to end: a real dnsgate on loopback answers `[local] records` and a
hosts file authoritatively to dig and dnspython (AA, PTRs, NXDOMAIN below a configured name, NODATA
for another type), a reload (POST /v1/reload, SIGHUP on a real process) changes them, and a local
CNAME into a gated vendor's name stays gated until the client consents."""

from __future__ import annotations

import asyncio
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.flags
import dns.message
import dns.rcode
import pytest

from dnsgate.config import Config, LocalConfig
from tests.conftest import make_config, running_gate
from tests.reliability.process import serve
from tests.support.stub_upstream import StubUpstream
from tests.workers.test_workers import ask, server_ids, sockets, with_workers

DIG = shutil.which("dig")
RECORDS = (
    "nas.home A 192.168.1.10",
    "nas.home AAAA fd00::10",
    "www.home CNAME nas.home",
    "home MX 10 nas.home",
    "_smb._tcp.home SRV 0 0 445 nas.home",
    "analytics.home CNAME trackcmp.net",  # a vendor of the built-in catalog (marketing)
    "mirror.home CNAME host.example.test",  # answered by the upstream
    "prism.app-us1.com A 10.0.0.99",  # the operator's address for a vendor's own name
)


def with_local(cfg: Config, **local: Any) -> Config:
    return replace(cfg, local=replace(cfg.local, **local))


async def dig(gate_port: int, *args: str) -> str:
    assert DIG is not None
    proc = await asyncio.create_subprocess_exec(DIG, "@127.0.0.1", "-p", str(gate_port), "+time=2", "+tries=1", *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    return out.decode()


def answers(output: str) -> list[str]:
    """dig's answer section, one record a line, fields single-spaced."""
    section = output.split(";; ANSWER SECTION:\n", 1)
    if len(section) < 2:
        return []
    return [" ".join(line.split()) for line in section[1].split("\n\n", 1)[0].splitlines()]


@pytest.mark.skipif(DIG is None, reason="dig is not installed (Debian package bind9-dnsutils; .ci/run installs it)")
async def test_dig_gets_local_records_and_their_ptrs_authoritatively(upstream: StubUpstream, data_dir: Path,
                                                                      tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("192.168.1.20 printer.home printer\n")
    cfg = with_local(make_config(upstream, data_dir), records=RECORDS, hosts_file=str(hosts), ttl=120)
    async with running_gate(cfg) as gate:
        port = gate.dns_port
        out = await dig(port, "nas.home", "A")
        assert "flags: qr aa rd ra;" in out and "status: NOERROR" in out
        assert answers(out) == ["nas.home. 120 IN A 192.168.1.10"]
        assert answers(await dig(port, "nas.home", "AAAA")) == ["nas.home. 120 IN AAAA fd00::10"]
        assert answers(await dig(port, "www.home", "A")) == ["www.home. 120 IN CNAME nas.home.",
                                                             "nas.home. 120 IN A 192.168.1.10"]
        assert answers(await dig(port, "home", "MX")) == ["home. 120 IN MX 10 nas.home."]
        assert answers(await dig(port, "_smb._tcp.home", "SRV")) == ["_smb._tcp.home. 120 IN SRV 0 0 445 nas.home."]
        assert answers(await dig(port, "printer", "A")) == ["printer. 120 IN A 192.168.1.20"]
        out = await dig(port, "-x", "192.168.1.10")
        assert "flags: qr aa rd ra;" in out
        assert answers(out) == ["10.1.168.192.in-addr.arpa. 120 IN PTR nas.home."]
        assert answers(await dig(port, "-x", "192.168.1.20")) == ["20.1.168.192.in-addr.arpa. 120 IN PTR printer.home."]
        assert answers(await dig(port, "-x", "fd00::10")) == [
            "0.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa. 120 IN PTR nas.home."]
        # another private address: still the RFC 6303 empty zone, NXDOMAIN
        assert "status: NXDOMAIN" in await dig(port, "-x", "192.168.1.99")
        # NODATA for another type of a configured name; NXDOMAIN below it; both authoritative with an SOA
        out = await dig(port, "nas.home", "TXT")
        assert "status: NOERROR" in out and "ANSWER: 0" in out and "flags: qr aa rd ra;" in out
        assert "nas.home. 120 IN SOA" in " ".join(out.split("AUTHORITY SECTION:")[1].split())
        out = await dig(port, "nothing.nas.home", "A")
        assert "status: NXDOMAIN" in out and "flags: qr aa rd ra;" in out
        assert answers(await dig(port, "+tcp", "nas.home", "A")) == ["nas.home. 120 IN A 192.168.1.10"]
    assert upstream.count("nas.home") == 0 and upstream.count("nothing.nas.home") == 0  # never sent upstream


async def test_a_local_cname_into_a_gated_vendor_is_gated(upstream: StubUpstream, data_dir: Path) -> None:
    cfg = with_local(make_config(upstream, data_dir), records=RECORDS)
    async with running_gate(cfg) as gate:
        me = "127.0.0.7"
        blocked = await gate.query("analytics.home", source=me)
        assert blocked.rcode() == dns.rcode.NXDOMAIN and not blocked.answer  # the sinkhole (gate.mode nxdomain)
        assert upstream.count("trackcmp.net") == 0  # nobody without consent makes dnsgate ask for a vendor's name
        own = await gate.query("prism.app-us1.com", source=me)  # a local record for a vendor's name is gated too
        assert own.rcode() == dns.rcode.NXDOMAIN
        # a local alias of an ungated name goes on upstream and comes back joined (not authoritative: part
        # of it is the upstream's)
        mirror = await gate.query("mirror.home", source=me)
        assert [rr.to_text() for rr in mirror.answer] == ["mirror.home. 300 IN CNAME host.example.test.",
                                                           "host.example.test. 300 IN A 192.0.2.10"]
        assert not mirror.flags & dns.flags.AA
        status, _ = await gate.http("PUT", "/v1/consent", source=me, json={"categories": ["marketing"]})
        assert status == 200
        allowed = await gate.query("analytics.home", source=me)
        assert allowed.rcode() == dns.rcode.NOERROR
        # (a gated answer lives at most gate.allowed_ttl_cap seconds: 10)
        assert [rr.to_text() for rr in allowed.answer] == ["analytics.home. 10 IN CNAME trackcmp.net.",
                                                            "trackcmp.net. 10 IN A 198.51.100.1"]
        own = await gate.query("prism.app-us1.com", source=me)
        assert [rr.to_text() for rr in own.answer] == ["prism.app-us1.com. 300 IN A 10.0.0.99"]  # ours: not capped
        assert own.flags & dns.flags.AA
        # another client, without consent: still the sinkhole, though the target's answer is cached now
        other = await gate.query("analytics.home", source="127.0.0.8")
        assert other.rcode() == dns.rcode.NXDOMAIN and not other.answer
        # the query log (written once a second) has the evidence of both decisions
        deadline = time.monotonic() + 10
        while True:
            status, queries = await gate.http("GET", "/v1/queries?limit=50", admin=True)
            assert status == 200
            logged = {(q["name"].rstrip("."), q["outcome"]) for q in queries["entries"]}
            if {("analytics.home", "sinkholed"), ("analytics.home", "forwarded")} <= logged:
                break
            assert time.monotonic() < deadline, logged
            await asyncio.sleep(0.2)


async def test_a_reload_changes_the_records(upstream: StubUpstream, data_dir: Path, tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("192.168.1.30 tv.home\n")
    current = [with_local(make_config(upstream, data_dir), records=("nas.home A 192.168.1.10",), hosts_file=str(hosts))]
    reread: Callable[[], Config] = lambda: current[0]  # noqa: E731
    async with running_gate(current[0], reread) as gate:
        assert [r.to_text() for r in (await gate.query("nas.home")).answer[0]] == ["192.168.1.10"]
        assert [r.to_text() for r in (await gate.query("tv.home")).answer[0]] == ["192.168.1.30"]
        current[0] = with_local(current[0], records=("nas.home A 192.168.1.11", "new.home TXT hello"))
        hosts.write_text("192.168.1.31 tv.home\n")
        status, report = await gate.http("POST", "/v1/reload", admin=True)
        assert status == 200 and "local.records" in report["applied"], report
        assert [r.to_text() for r in (await gate.query("nas.home")).answer[0]] == ["192.168.1.11"]
        assert [r.to_text() for r in (await gate.query("new.home", "TXT")).answer[0]] == ['"hello"']
        assert [r.to_text() for r in (await gate.query("tv.home")).answer[0]] == ["192.168.1.31"]
        ptr = await gate.query("11.1.168.192.in-addr.arpa", "PTR")
        assert [r.to_text() for r in ptr.answer[0]] == ["nas.home."]
        assert (await gate.query("10.1.168.192.in-addr.arpa", "PTR")).rcode() == dns.rcode.NXDOMAIN
        # a bad record is refused whole: the running records stay
        current[0] = with_local(current[0], records=("nas.home A not-an-address",))
        status, report = await gate.http("POST", "/v1/reload", admin=True)
        assert status == 422 and "local.records[0]: not an IP address" in report["error"]["message"], report
        assert [r.to_text() for r in (await gate.query("nas.home")).answer[0]] == ["192.168.1.11"]
        # without records, the names are the upstream's again
        current[0] = with_local(current[0], records=(), hosts_file="")
        assert (await gate.http("POST", "/v1/reload", admin=True))[0] == 200
        assert (await gate.query("nas.home")).rcode() == dns.rcode.NXDOMAIN
        assert upstream.count("nas.home") == 1


@pytest.mark.skipif(DIG is None, reason="dig is not installed (Debian package bind9-dnsutils; .ci/run installs it)")
async def test_sighup_reloads_the_hosts_file_of_a_running_process(upstream: StubUpstream, tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("192.168.1.40 camera.home\n")
    conf = tmp_path / "dnsgate.toml"
    conf.write_text(f'[local]\nhosts_file = "{hosts}"\nrecords = ["door.home A 192.168.1.41"]\n')
    served = await serve(upstream.address, tmp_path / "data", config=conf)
    try:
        port = served.dns_port
        assert answers(await dig(port, "camera.home", "A")) == ["camera.home. 300 IN A 192.168.1.40"]
        hosts.write_text("192.168.1.42 camera.home\n")
        conf.write_text(f'[local]\nhosts_file = "{hosts}"\nrecords = ["door.home A 192.168.1.43"]\nttl = 60\n')
        served.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while True:
            out = await dig(port, "camera.home", "A")
            if answers(out) == ["camera.home. 60 IN A 192.168.1.42"]:
                break
            assert time.monotonic() < deadline, out
            await asyncio.sleep(0.1)
        assert "flags: qr aa rd ra;" in out
        assert answers(await dig(port, "door.home", "A")) == ["door.home. 60 IN A 192.168.1.43"]
        assert answers(await dig(port, "-x", "192.168.1.42")) == ["42.1.168.192.in-addr.arpa. 60 IN PTR camera.home."]
    finally:
        log = await served.stop()
    assert served.process.returncode == 0, log[-10:]


async def test_a_bad_record_stops_the_start_with_its_name(upstream: StubUpstream, tmp_path: Path) -> None:
    conf = tmp_path / "dnsgate.toml"
    conf.write_text('[local]\nrecords = ["nas.home A 192.168.1.10", "x.home CNAME nas.home", "x.home A 10.0.0.1"]\n')
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dnsgate", "serve", "--config", str(conf), "--dns", "127.0.0.1:0", "--api",
        "127.0.0.1:0", "--upstream", upstream.address, "--data-dir", str(tmp_path / "d"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    assert "local.records: x.home has a CNAME and A: a CNAME stands alone" in err.decode()


def test_local_config_defaults() -> None:
    local = LocalConfig()
    assert local.records == () and local.hosts_file == "" and local.generate_ptr and local.ttl == 300


async def test_every_worker_process_answers_the_records_and_their_reload(upstream: StubUpstream, data_dir: Path,
                                                                          tmp_path: Path) -> None:
    """With dns.workers, the records travel to every process with the rest of the rules."""
    hosts = tmp_path / "hosts"
    hosts.write_text("192.168.1.50 tv.home\n")
    cfg = with_local(with_workers(upstream, data_dir, 3), hosts_file=str(hosts))
    async with running_gate(cfg, reread=lambda: cfg) as g, sockets("127.0.0.60") as socks:
        assert set(await server_ids(g, socks)) == {"dnsgate", "dnsgate worker 1", "dnsgate worker 2"}

        async def addresses() -> set[tuple[str, ...]]:
            replies = await asyncio.gather(*(ask(g, s, "tv.home") for s in socks))
            assert all(r.flags & dns.flags.AA for r in replies)
            return {tuple(rr.to_text() for rr in r.answer[0]) for r in replies}

        assert await addresses() == {("192.168.1.50",)}
        await asyncio.to_thread(hosts.write_text, "192.168.1.51 tv.home\n")
        status, body = await g.http("POST", "/v1/reload", admin=True)
        assert status == 200, body
        assert await addresses() == {("192.168.1.51",)}
