"""`dnsgate serve` as a real process: ready line, one-line errors, env, token file, kill -9."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import stat
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import dns.asyncquery
import dns.message
import dns.rcode
import pytest

from tests.support.stub_upstream import StubUpstream

READY = re.compile(r"^dnsgate ready: dns \(udp\+tcp\) 127\.0\.0\.1:(\d+); api http://127\.0\.0\.1:(\d+);")


@dataclass
class Proc:
    process: asyncio.subprocess.Process
    line: str
    dns_port: int
    api_port: int

    async def query(self, name: str, source: str = "127.0.0.1") -> dns.message.Message:
        return await dns.asyncquery.udp(dns.message.make_query(name, "A"), "127.0.0.1", port=self.dns_port,
                                        source=source, timeout=3)

    async def http(self, method: str, path: str, source: str = "127.0.0.1", **kwargs: object) -> int:
        connector = aiohttp.TCPConnector(local_addr=(source, 0))
        async with aiohttp.ClientSession(connector=connector) as session, session.request(
                method, f"http://127.0.0.1:{self.api_port}{path}", **kwargs) as response:  # type: ignore[arg-type]
            return response.status


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DNSGATE_")}
    env.update(extra)
    return env


async def _run(*args: str, env: dict[str, str] | None = None, timeout: float = 15) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dnsgate", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=env or _env())
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@contextlib.asynccontextmanager
async def serving(*args: str, env: dict[str, str] | None = None) -> AsyncIterator[Proc]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dnsgate", "serve", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL, env=env or _env())
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 15)).decode().strip()
        match = READY.match(line)
        assert match, f"no ready line, got {line!r}"
        yield Proc(process, line, int(match[1]), int(match[2]))
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.wait(), 10)


def _args(upstream: StubUpstream, data_dir: Path) -> list[str]:
    return ["--dns", "127.0.0.1:0", "--api", "127.0.0.1:0", "--upstream", upstream.address,
            "--data-dir", str(data_dir)]


async def test_serve_prints_one_ready_line_and_stops_cleanly(upstream: StubUpstream, tmp_path: Path) -> None:
    async with serving(*_args(upstream, tmp_path)) as proc:
        assert f"upstreams {upstream.address}" in proc.line
        assert (await proc.query("host.example.test")).rcode() == dns.rcode.NOERROR
        assert (await proc.query("trackcmp.net")).rcode() == dns.rcode.NXDOMAIN
        proc.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.process.wait(), 10) == 0


async def test_admin_token_is_generated_0600_and_reused(upstream: StubUpstream, tmp_path: Path) -> None:
    async with serving(*_args(upstream, tmp_path)) as proc:
        token_file = tmp_path / "admin-token"
        assert f"admin token in {token_file}" in proc.line
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        assert len(token) >= 32
        assert await proc.http("GET", "/v1/clients", headers={"Authorization": f"Bearer {token}"}) == 200
    async with serving(*_args(upstream, tmp_path)):
        assert token_file.read_text().strip() == token


async def test_environment_configures_docker_style(upstream: StubUpstream, tmp_path: Path) -> None:
    env = _env(DNSGATE_DNS="127.0.0.1:0", DNSGATE_API="127.0.0.1:0", DNSGATE_UPSTREAM=upstream.address,
               DNSGATE_DATA_DIR=str(tmp_path), DNSGATE_ADMIN_TOKEN="from-env")
    async with serving(env=env) as proc:
        assert "admin token in" not in proc.line
        assert await proc.http("GET", "/v1/clients", headers={"Authorization": "Bearer from-env"}) == 200
        assert not (tmp_path / "admin-token").exists()


async def test_serve_takes_the_api_address_as_a_url_too(upstream: StubUpstream, tmp_path: Path) -> None:
    # One form of --api and DNSGATE_API for every command: the server's listen address may be written
    # as the URL the other commands call.
    args = _args(upstream, tmp_path)
    args[3] = "http://127.0.0.1:0/"
    async with serving(*args) as proc:
        assert await proc.http("GET", "/healthz") == 200
    env = _env(DNSGATE_DNS="127.0.0.1:0", DNSGATE_API="http://127.0.0.1:0", DNSGATE_UPSTREAM=upstream.address,
               DNSGATE_DATA_DIR=str(tmp_path))
    async with serving(env=env) as proc:
        assert await proc.http("GET", "/healthz") == 200


@pytest.mark.parametrize("where", ["flag", "env"])
@pytest.mark.parametrize("address", ["localhost:0", "http://localhost:0", "dnsgate.lan:8053"])
async def test_serve_says_it_listens_on_an_ip_address_not_a_name(where: str, address: str, tmp_path: Path) -> None:
    # The server binds the API where it is told; a host name it cannot bind is one clear line, exit 2,
    # whether it came in --api or DNSGATE_API.
    args, env = (["--api", address], _env()) if where == "flag" else ([], _env(DNSGATE_API=address))
    code, out, err = await _run("serve", "--dns", "127.0.0.1:0", "--data-dir", str(tmp_path), *args, env=env)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert "--api" in err if where == "flag" else "api.listen" in err
    assert "listens on an IP address, not a host name" in err and repr(address.split("//")[-1].split(":")[0]) in err


async def test_ack_survives_kill_9(upstream: StubUpstream, tmp_path: Path) -> None:
    async with serving(*_args(upstream, tmp_path)) as proc:
        assert await proc.http("PUT", "/v1/consent", source="127.0.0.6", json={"categories": ["marketing"]}) == 200
        proc.process.send_signal(signal.SIGKILL)  # no chance to flush anything
        await proc.process.wait()
    async with serving(*_args(upstream, tmp_path)) as proc:
        assert (await proc.query("trackcmp.net", source="127.0.0.6")).rcode() == dns.rcode.NOERROR
        assert (await proc.query("trackcmp.net", source="127.0.0.7")).rcode() == dns.rcode.NXDOMAIN


@pytest.mark.parametrize(
    ("args", "culprit"),
    [
        (["serve", "--dns", "localhost:53"], "--dns"),
        (["serve", "--dns", "[::1]"], "--dns"),
        (["serve", "--upstream", "1.1.1.1:99999"], "--upstream"),
        (["serve", "--bogus"], "--bogus"),
        (["serve", "--log-level", "loud"], "--log-level"),
        (["serve", "--api", "https://127.0.0.1:8053"], "--api"),  # the API is plain HTTP
        (["serve", "--api", "http://127.0.0.1:8053/consent"], "--api"),
        (["frobnicate"], "frobnicate"),
    ],
)
async def test_bad_flags_exit_2_with_one_line(args: list[str], culprit: str) -> None:
    code, out, err = await _run(*args)
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert culprit in err


@pytest.mark.parametrize(
    ("text", "culprit"),
    [("[dns]\nlisten_on = []\n", "dns.listen_on"), ("[gate]\nsinkhole_ttl = -1\n", "gate.sinkhole_ttl"),
     ("[gate]\ndisabled_domains = ['nope.example']\n", "gate.disabled_domains"),
     ("not toml [", "not valid TOML")],
)
async def test_bad_config_exits_with_one_line_naming_the_key(tmp_path: Path, upstream: StubUpstream, text: str,
                                                              culprit: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    code, _, err = await _run("serve", "--config", str(path), *_args(upstream, tmp_path / "d"))
    assert code != 0
    assert len(err.strip().splitlines()) == 1, err
    assert culprit in err


async def test_port_in_use_exits_1_naming_it(upstream: StubUpstream, tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        args = _args(upstream, tmp_path)
        args[1] = f"127.0.0.1:{port}"
        code, _, err = await _run("serve", *args)
    assert code == 1
    assert len(err.strip().splitlines()) == 1, err
    assert f"dns.listen 127.0.0.1:{port}" in err and "in use" in err


async def test_upstream_pointing_at_ourselves_is_refused(tmp_path: Path) -> None:
    code, _, err = await _run("serve", "--dns", "127.0.0.1:25399", "--upstream", "127.0.0.1:25399",
                              "--api", "127.0.0.1:0", "--data-dir", str(tmp_path))
    assert code == 2
    assert err.startswith("dnsgate: error: upstream.servers: 127.0.0.1:25399") and "loop" in err


async def test_json_logs_say_start_config_consent_and_stop_but_nothing_per_query(upstream: StubUpstream,
                                                                                 tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dnsgate", "serve", *_args(upstream, tmp_path), "--log-format", "json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=_env())
    assert process.stdout is not None and process.stderr is not None
    line = (await asyncio.wait_for(process.stdout.readline(), 15)).decode()
    match = READY.match(line)
    assert match
    proc = Proc(process, line, int(match[1]), int(match[2]))
    for _ in range(3):
        await proc.query("host.example.test")
        await proc.query("trackcmp.net")
    assert await proc.http("PUT", "/v1/consent", json={"categories": ["marketing"]}) == 200
    process.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(process.communicate(), 10)
    records = [json.loads(line) for line in err.decode().splitlines()]
    messages = [r["msg"] for r in records]
    assert all(r["level"] in ("info", "warning") and r["ts"] for r in records)
    assert any(m.startswith("config: gate.mode=nxdomain") for m in messages)
    assert any(m.startswith("started: dns=127.0.0.1:") for m in messages)
    assert any(m.startswith("consent granted: client=127.0.0.1") for m in messages)
    assert messages[-2:] == ["stopping", "stopped"]
    assert not any("host.example.test" in m or "trackcmp" in m for m in messages)  # never a line per query


async def test_log_command_shows_and_filters_the_query_log(upstream: StubUpstream, tmp_path: Path) -> None:
    async with serving(*_args(upstream, tmp_path)) as proc:
        await proc.query("trackcmp.net", source="127.0.0.61")
        await proc.query("prism.app-us1.com", source="127.0.0.62")
        code, out, err = await _run("log", "--api", f"127.0.0.1:{proc.api_port}", "--data-dir", str(tmp_path),
                                    "--client", "127.0.0.62")
        assert code == 0, err
        (line,) = out.splitlines()
        assert " 127.0.0.62 prism.app-us1.com A udp sinkholed rcode=3 vendor=activecampaign" in line
        code, out, _ = await _run("log", "--api", f"http://127.0.0.1:{proc.api_port}", "--data-dir", str(tmp_path),
                                  "--json", "--name", "*.trackcmp.net")
        assert code == 0 and json.loads(out)["name"] == "trackcmp.net"
        code, _, err = await _run("log", "--api", f"127.0.0.1:{proc.api_port}", "--token", "wrong")
        assert code == 1 and "HTTP 401" in err and len(err.splitlines()) == 1  # a refusal by the API


async def test_log_and_report_say_when_dnsgate_is_unreachable(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, _, err = await _run("report", "--api", f"127.0.0.1:{port}", "--token", "t", "--since", "1h")
    assert code == 1 and "cannot reach the dnsgate API" in err  # as every command that calls the API
    code, _, err = await _run("log", "--api", f"127.0.0.1:{port}", "--data-dir", str(tmp_path))
    assert code == 1 and "no admin token" in err
    code, out, err = await _run("log", "--since", "last tuesday", "--token", "t")
    assert code == 2 and out == "" and "--since: expected ISO 8601" in err  # a usage error


async def test_the_demo_upstream_answers_the_tour_offline(tmp_path: Path) -> None:
    # No upstream at all: the built-in one answers, so a grant turns the sinkhole into an address.
    env = _env()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dnsgate", "serve", "--dns", "127.0.0.1:0", "--api", "127.0.0.1:0", "--demo-upstream",
        "--data-dir", str(tmp_path), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    try:
        assert process.stdout is not None and process.stderr is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 15)).decode().strip()
        match = READY.match(line)
        assert match, line
        api = int(match[2])
        assert f"(on this host http://127.0.0.1:{api}/); dashboard http://127.0.0.1:{api}/dashboard " \
               f"(admin http://127.0.0.1:{api}/dashboard/admin)" in line
        proc = Proc(process, line, int(match[1]), api)
        assert (await proc.query("trackcmp.net")).rcode() == dns.rcode.NXDOMAIN
        assert await proc.http("PUT", "/v1/consent", json={"categories": ["marketing"]}) == 200
        reply = await proc.query("trackcmp.net")
        assert reply.rcode() == dns.rcode.NOERROR
        assert next(r.address for rrset in reply.answer for r in rrset).startswith("198.51.100.")
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0
    code, _out, err = await _run("serve", "--demo-upstream", "--upstream", "9.9.9.9")
    assert code == 2 and "argument --upstream: not allowed with argument --demo-upstream" in err, err


async def test_a_bad_value_says_where_it_was_set(upstream: StubUpstream, tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[dns]\nudp_max_size = 4096\n\n[gate]\nsinkhole_ttl = -1\n")
    args = _args(upstream, tmp_path / "d")
    code, _, err = await _run("serve", "--config", str(path), *args)
    assert (code, err) == (2, "dnsgate: error: gate.sinkhole_ttl: must be 1..3600, got -1\n")  # config check: the line
    code, _, err = await _run("serve", *args, env=_env(DNSGATE_GATE_SINKHOLE_TTL="0"))
    assert (code, err) == (2, "dnsgate: error: DNSGATE_GATE_SINKHOLE_TTL: gate.sinkhole_ttl: must be 1..3600, got 0\n")
    path.write_text('[storage]\nstore = "sqlite"\n')  # the flag set the bad value, not the file
    code, _, err = await _run("serve", "--config", str(path), "--store", "bogus", *args)
    assert code == 2 and err.startswith("dnsgate: error: storage.store: expected \"sqlite\""), err


async def test_the_ready_line_names_the_admin_dashboard_on_its_own_listener(upstream: StubUpstream,
                                                                             tmp_path: Path) -> None:
    env = _env(DNSGATE_API_ADMIN_LISTEN="127.0.0.1:0")  # a key by the environment's one rule
    async with serving(*_args(upstream, tmp_path), env=env) as proc:
        admin = re.search(r"; dashboard http://127\.0\.0\.1:(\d+)/dashboard \(admin http://127\.0\.0\.1:(\d+)"
                          r"/dashboard/admin\)", proc.line)
        assert admin and int(admin[1]) == proc.api_port and int(admin[2]) not in (0, proc.api_port), proc.line
        async with aiohttp.ClientSession() as session, session.get(
                f"http://127.0.0.1:{admin[2]}/dashboard/admin", allow_redirects=False) as response:
            assert response.status in (200, 302, 303), response.status  # the admin page, or its login
