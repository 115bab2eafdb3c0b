"""`dnsgate consent …` and `dnsgate explain` as real processes against a running dnsgate's admin API,
with the admin token found in the data dir."""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import io
import json
import os
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import dns.rcode
import pytest

from dnsgate.config import ApiConfig
from tests.conftest import Gate, make_config, running_gate
from tests.support.consent_fixtures import consent_config
from tests.support.stub_upstream import StubUpstream


@pytest.fixture
async def gate(upstream: StubUpstream, data_dir: Path) -> AsyncIterator[Gate]:
    cfg = make_config(upstream, data_dir)
    cfg = consent_config(replace(cfg, api=ApiConfig(listen="127.0.0.1:0")))  # token generated into the data dir
    async with running_gate(cfg) as g:
        yield g


async def cli(g: Gate, *args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DNSGATE_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dnsgate", *args, "--api", str(g.running.api), "--data-dir", g.cfg.storage.data_dir,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    out, err = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_grant_show_list_withdraw(gate: Gate) -> None:
    client = "127.0.0.60"
    code, out, err = await cli(gate, "consent", "grant", client, "marketing", "--refuse", "analytics", "--days", "30")
    assert code == 0, err
    assert "categories: marketing=granted" in out  # Analytics lists nothing here: nothing recorded for it
    assert "analytics=" not in out
    assert "activecampaign (marketing): ALLOWED" in out
    assert (await gate.query("trackcmp.net", source=client)).rcode() == dns.rcode.NOERROR

    code, out, _ = await cli(gate, "consent", "show", client)
    assert code == 0 and f"client {client}" in out and "profile opt-in" in out and "via admin" in out
    code, out, _ = await cli(gate, "consent", "list", "--json")
    assert code == 0 and [c["client"] for c in json.loads(out)] == [client]

    code, out, _ = await cli(gate, "consent", "withdraw", client)
    assert code == 0 and "activecampaign (marketing): BLOCKED" in out
    assert (await gate.query("trackcmp.net", source=client)).rcode() == dns.rcode.NXDOMAIN


async def test_grant_for_a_network_and_a_device_and_reset(gate: Gate) -> None:
    code, out, err = await cli(gate, "consent", "grant", "127.0.10.0/24", "--vendor", "activecampaign")
    assert code == 0, err
    assert (await gate.query("trackcmp.net", source="127.0.10.9")).rcode() == dns.rcode.NOERROR
    code, out, _ = await cli(gate, "consent", "grant", "02-00-00-00-00-61", "marketing")
    assert code == 0 and "client 02:00:00:00:00:61" in out
    code, out, _ = await cli(gate, "consent", "reset", "127.0.10.0/24")
    assert code == 0 and "choice: none recorded" in out
    assert (await gate.query("trackcmp.net", source="127.0.10.9")).rcode() == dns.rcode.NXDOMAIN


async def test_export_as_csv_and_jsonl_with_filters(gate: Gate, tmp_path: Path) -> None:
    await cli(gate, "consent", "grant", "127.0.0.62", "marketing")
    await cli(gate, "consent", "grant", "127.0.0.63", "marketing")
    await cli(gate, "consent", "withdraw", "127.0.0.63")
    code, out, _ = await cli(gate, "consent", "export", "--format", "csv", "--client", "127.0.0.63")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["action"] for r in rows] == ["grant", "withdrawal"] and rows[0]["channel"] == "admin"
    target = tmp_path / "log.jsonl"
    code, out, _ = await cli(gate, "consent", "export", "--since", "2000-01-01", "-o", str(target))
    assert code == 0 and out == ""
    assert len(target.read_text().splitlines()) == 3


async def test_every_since_and_until_is_read_one_way(gate: Gate) -> None:
    # consent export, log and report take the same forms, and refuse the same bad ones the same way.
    await cli(gate, "consent", "grant", "127.0.0.65", "marketing")
    await gate.query("trackcmp.net", source="127.0.0.65")
    future = str(int(time.time()) + 3600)
    for since, events in (("7d", 1), ("2h", 1), ("90s", 1), ("2000-01-01", 1), ("2000-01-01T00:00:00Z", 1),
                          ("946684800", 1), (future, 0)):
        code, out, err = await cli(gate, "consent", "export", "--client", "127.0.0.65", "--since", since)
        assert code == 0 and len(out.splitlines()) == events, (since, err)
        if since != future:
            code, out, err = await cli(gate, "report", "--client", "127.0.0.65", "--since", since)
            assert code == 0 and json.loads(out)["verdict"] == "pass", (since, err)
        code, out, err = await cli(gate, "log", "--client", "127.0.0.65", "--since", since, "--until", future + "0")
        assert code == 0, (since, err)
    code, out, err = await cli(gate, "consent", "export", "--until", "1h")
    assert code == 0 and out == ""  # everything was recorded within the last hour
    for command in (["consent", "export"], ["log"], ["report"]):
        for flag in ("--since", "--until"):
            code, out, err = await cli(gate, *command, flag, "yesterday")
            assert code == 2 and out == "", err
            assert f"argument {flag}: expected ISO 8601 (2026-11-28 or 2026-11-28T10:00:00Z), UNIX seconds, or " \
                   "an age such as 15m, 2h or 7d, got 'yesterday'" in err
    # the API reads them the same way
    token = (Path(gate.cfg.storage.data_dir) / "admin-token").read_text().strip()
    status, _ = await gate.http("GET", "/v1/audit/export?since=7d", headers={"Authorization": f"Bearer {token}"})
    assert status == 200


async def test_report_without_since_covers_the_whole_query_log(gate: Gate) -> None:
    await gate.query("trackcmp.net", source="127.0.0.67")
    deadline = time.monotonic() + 5  # the query log is written every second
    while True:
        code, out, err = await cli(gate, "report", "--client", "127.0.0.67")
        assert code == 0, err
        report = json.loads(out)
        if report["totals"]["queries"] == 1 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert report["totals"]["queries"] == 1
    since = dt.datetime.fromisoformat(report["since"].replace("Z", "+00:00")).timestamp()
    assert abs(since - (time.time() - gate.cfg.querylog.max_age_days * 86400)) < 60  # all the log keeps


def test_every_command_that_calls_the_api_takes_the_same_options() -> None:
    from dnsgate.cli.main import build_parser

    parser = build_parser()

    def leaves(p: argparse.ArgumentParser, path: list[str]) -> list[tuple[list[str], argparse.ArgumentParser]]:
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            return [(path, p)]
        return [leaf for name, child in subs[0].choices.items() for leaf in leaves(child, [*path, name])]

    # `health` asks /healthz and DNS where the configuration says the server listens: no admin API, no token
    calling = [(path, p) for path, p in leaves(parser, []) if path not in (["serve"], ["store", "migrate"])
               and path[0] not in ("config", "health", "cert")]  # (cert init writes files; it calls no server)
    assert {" ".join(path) for path, _ in calling} >= {"consent list", "explain", "log", "report", "store acknowledge"}
    for path, p in calling:
        options = {o for a in p._actions for o in a.option_strings}
        assert {"--api", "--config", "--data-dir", "--token"} <= options, path


async def test_runtime_errors_exit_1_and_usage_errors_exit_2(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens there
    for command in CLIENT_COMMANDS:
        code, out, err = await run(*command, "--api", f"127.0.0.1:{port}", "--token", "t")
        assert code == 1 and out == "" and "cannot reach the dnsgate API" in err, (command, err)
        code, out, err = await run(*command, "--api", f"127.0.0.1:{port}", "--data-dir", str(tmp_path))
        assert code == 1 and "no admin token" in err and str(tmp_path / "admin-token") in err, (command, err)
        code, out, err = await run(*command, "--config", str(tmp_path / "missing.toml"))
        assert code == 2 and "missing.toml" in err, (command, err)


async def test_the_token_is_found_through_the_config_from_any_directory(gate: Gate, tmp_path: Path) -> None:
    # The server's data dir named by its config file (as `serve --config` reads it), the command run elsewhere
    config = tmp_path / "dnsgate.toml"
    config.write_text(f'[storage]\ndata_dir = "{gate.cfg.storage.data_dir}"\n[api]\nlisten = "{gate.running.api}"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for env in ({"DNSGATE_CONFIG": str(config)}, {}):
        args = ["--config", str(config)] if not env else []
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dnsgate", "consent", "list", *args, cwd=elsewhere, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env={**{k: v for k, v in os.environ.items()
                                                    if not k.startswith("DNSGATE_")}, **env})
        out, err = await asyncio.wait_for(process.communicate(), 20)
        assert process.returncode == 0 and b"no choices recorded" in out, err


async def test_explain_prints_the_decision_and_every_reason(gate: Gate) -> None:
    code, out, _ = await cli(gate, "explain", "x.TrackCmp.net.", "--client", "127.0.0.64")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "x.TrackCmp.net. for 127.0.0.64: BLOCKED (sinkhole)"
    assert any("catalog rule 'trackcmp.net'" in line for line in lines)
    assert any("profile opt-in" in line for line in lines)
    assert any("no choice recorded" in line for line in lines)
    await cli(gate, "consent", "grant", "127.0.0.64", "marketing")
    code, out, _ = await cli(gate, "explain", "trackcmp.net", "--client", "127.0.0.64")
    assert out.startswith("trackcmp.net for 127.0.0.64: RESOLVED") and "category marketing granted in choice" in out
    code, out, _ = await cli(gate, "explain", "example.org", "--client", "127.0.0.64")
    assert "RESOLVED" in out and "matches no catalog rule" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [(["consent", "show", "not-a-client"], "not an IP address, MAC address or network"),
     (["consent", "grant", "127.0.0.65", "spying"], "unknown category 'spying'"),
     (["explain", "trackcmp.net", "--client", "nope"], "not an IP address")],
)
async def test_api_refusals_are_one_line(gate: Gate, args: list[str], message: str) -> None:
    code, out, err = await cli(gate, *args)
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err


async def test_no_server_and_no_token_are_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DNSGATE_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dnsgate", "consent", "list", "--data-dir", str(tmp_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    _, err = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 1 and "no admin token" in err.decode() and len(err.decode().splitlines()) == 1
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dnsgate", "consent", "list", "--api", "127.0.0.1:9", "--token", "x",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    _, err = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 1 and "cannot reach the dnsgate API at http://127.0.0.1:9" in err.decode()


async def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DNSGATE_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dnsgate", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**clean, **(env or {})})
    out, err = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_every_command_takes_api_as_a_url_or_host_port(gate: Gate) -> None:
    await cli(gate, "consent", "grant", "127.0.0.66", "marketing")
    data = ("--data-dir", gate.cfg.storage.data_dir)
    port = gate.running.api.port
    # (0.0.0.0:PORT, the Docker image's DNSGATE_API for its server, is called on this host's loopback)
    forms = [f"127.0.0.1:{port}", f"localhost:{port}", f"http://127.0.0.1:{port}", f"http://localhost:{port}/",
             f"0.0.0.0:{port}"]
    for api in forms:
        # the same value as --api and as DNSGATE_API, for every command that calls the API
        for flag, env in ((["--api", api], None), ([], {"DNSGATE_API": api})):
            code, out, err = await run("consent", "export", "--client", "127.0.0.66", *flag, *data, env=env)
            assert code == 0, (api, err)
            assert [json.loads(line)["action"] for line in out.splitlines()] == ["grant"]
            code, out, err = await run("consent", "list", *flag, *data, env=env)
            assert code == 0 and "client 127.0.0.66" in out, (api, err)
            code, out, err = await run("report", "--since", "1h", *flag, *data, env=env)
            assert code == 0 and json.loads(out)["verdict"] == "pass", (api, err)
            code, out, err = await run("log", "--client", "127.0.0.66", *flag, *data, env=env)
            assert code == 0, (api, err)
            code, out, err = await run("explain", "trackcmp.net", "--client", "127.0.0.66", *flag, *data, env=env)
            assert code == 0 and "RESOLVED" in out, (api, err)
            code, out, err = await run("store", "acknowledge", *flag, *data, env=env)
            assert code == 0 and "nothing to acknowledge" in out, (api, err)
    # --api wins over DNSGATE_API
    code, out, err = await run("consent", "list", "--api", f"localhost:{port}", *data,
                               env={"DNSGATE_API": "127.0.0.1:9"})
    assert code == 0 and "client 127.0.0.66" in out, err


CLIENT_COMMANDS = [["consent", "list"], ["explain", "x.test", "--client", "127.0.0.1"], ["report", "--since", "1h"],
                   ["log"], ["store", "acknowledge"]]
BAD_APIS = ["ftp://127.0.0.1:8053", "127.0.0.1", "localhost", "http://127.0.0.1:99999", "http://:80", "::1:8053",
            "bad host:80", "localhost:http"]


@pytest.mark.parametrize("command", CLIENT_COMMANDS)
@pytest.mark.parametrize("api", BAD_APIS)
async def test_a_bad_api_is_one_line_and_exit_2(command: list[str], api: str) -> None:
    code, out, err = await run(*command, "--api", api, "--token", "x")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "--api" in err, err
    code, out, err = await run(*command, "--token", "x", env={"DNSGATE_API": api})
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "DNSGATE_API" in err, err
    assert "api.listen" not in err  # what the command calls, not where a server listens


@pytest.mark.parametrize(("args", "hint"), [
    (["consent", "list", "--bogus"], "see 'dnsgate consent list --help'"),
    (["consent", "grant"], "see 'dnsgate consent grant --help'"),
    (["consent", "export", "--format", "xml"], "see 'dnsgate consent export --help'"),
    (["consent", "list", "--api", "127.0.0.1"], "see 'dnsgate consent list --help'"),
    (["store", "acknowledge", "--bogus"], "see 'dnsgate store acknowledge --help'"),
    (["store", "migrate", "--from", "sqlite:x"], "see 'dnsgate store migrate --help'"),
    (["explain", "x.test"], "see 'dnsgate explain --help'"),
    (["report", "--since", "1h", "--bogus"], "see 'dnsgate report --help'"),
    (["consent"], "see 'dnsgate consent --help'"),
    (["--bogus"], "see 'dnsgate --help'"),
    (["--bogus", "serve"], "see 'dnsgate --help'"),
    (["config", "check", "--bogus"], "see 'dnsgate config check --help'"),
    (["config", "frob"], "see 'dnsgate config --help'"),
])
async def test_a_usage_error_names_the_help_of_its_command(args: list[str], hint: str) -> None:
    code, out, err = await run(*args)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert err.strip().endswith(f"({hint})"), err
    assert "dnsgate dnsgate" not in err
    if args[0] == "--bogus":
        assert "unrecognized arguments: --bogus" in err  # not "the command is missing"


async def test_show_says_an_opt_out_stands_and_since_when_gpc_applies(gate: Gate) -> None:
    client = "127.0.1.70"  # an opt-out network
    await gate.http("GET", "/v1/consent/status", source=client, headers={"Sec-GPC": "1"})
    code, out, err = await cli(gate, "consent", "show", client)
    assert code == 0, err
    assert "expires 9999-12-31T23:59:59Z (in force)" in out
    assert "its refusals are opt-outs: they stand until changed" in out
    assert "Global Privacy Control applies since " in out
    assert "refused: do not ask again before " in out
