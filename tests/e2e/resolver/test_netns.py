"""A real application's view: glibc (`getent`, which cannot be told another port) and Chromium in a
network namespace whose resolv.conf points at dnsgate on port 53. Everything runs on the
namespace's own loopback (tests/e2e/resolver/netns_helper.py), so nothing touches the host's port 53.

Needs root and `ip netns` (iproute2); skipped with the reason where they are not available. CI runs
as root on Debian, where it runs.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.resolver.conftest import system_tool
from tests.support.netns import IP, netns_unavailable

ROOT = Path(__file__).resolve().parents[3]
_names = itertools.count()


def _unavailable() -> str | None:
    if system_tool("getent") is None:
        return "getent not installed (apt install libc-bin)"
    return netns_unavailable(f"dnsgate-probe-{os.getpid()}")


UNAVAILABLE = _unavailable()
pytestmark = [pytest.mark.usefixtures("udp_io"), pytest.mark.skipif(UNAVAILABLE is not None, reason=UNAVAILABLE or "")]


class Namespace:
    def __init__(self, name: str, helper: subprocess.Popen[str]) -> None:
        self.name = name
        self.helper = helper

    def run(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run([IP, "netns", "exec", self.name, *argv], capture_output=True, text=True,
                              timeout=timeout, check=False)

    def ask(self, command: str) -> str:
        assert self.helper.stdin is not None and self.helper.stdout is not None
        self.helper.stdin.write(command + "\n")
        self.helper.stdin.flush()
        return self.helper.stdout.readline().strip()


@pytest.fixture
def netns(tmp_path: Path) -> Iterator[Namespace]:
    name = f"dnsgate-test-{os.getpid()}-{next(_names)}"
    etc = Path("/etc/netns") / name  # `ip netns exec` bind-mounts these over /etc/*
    subprocess.run([IP, "netns", "add", name], check=True)
    helper: subprocess.Popen[str] | None = None
    try:
        etc.mkdir(parents=True)
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions edns0 attempts:1 timeout:3\n")
        (etc / "nsswitch.conf").write_text("hosts: dns\n")  # every lookup goes to DNS, even localhost
        subprocess.run([IP, "netns", "exec", name, IP, "link", "set", "lo", "up"], check=True)
        helper = subprocess.Popen(
            [IP, "netns", "exec", name, sys.executable, "-m", "tests.e2e.resolver.netns_helper",
             str(tmp_path / "data")],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert helper.stdout is not None
        line = helper.stdout.readline().strip()  # blocks until the helper serves (or dies: empty line)
        assert line == "ready", f"the helper did not start: {line!r}"
        yield Namespace(name, helper)
    finally:
        if helper is not None:
            try:
                helper.communicate("quit\n", timeout=10)
            except subprocess.TimeoutExpired:
                helper.kill()  # the one process this fixture started
                helper.wait()
        subprocess.run([IP, "netns", "del", name], check=False)
        shutil.rmtree(etc, ignore_errors=True)


def test_getent_resolves_through_dnsgate(netns: Namespace) -> None:
    for round_ in ("miss", "hit"):
        result = netns.run("getent", "ahosts", "host.example.test")
        assert result.returncode == 0, result
        assert "192.0.2.10" in result.stdout and "2001:db8::10" in result.stdout
        assert netns.ask("count host.example.test") == "2", round_  # A and AAAA, asked once each
    localhost = netns.run("getent", "ahosts", "db.localhost")  # ("ahostsv4" would give up: AI_ADDRCONFIG
    assert localhost.returncode == 0 and "127.0.0.1" in localhost.stdout  # finds only loopback addresses here)
    private = netns.run("getent", "hosts", "10.1.2.3")  # a PTR query in 10.in-addr.arpa (RFC 6303)
    assert private.returncode == 2 and netns.ask("count 3.2.1.10.in-addr.arpa") == "0"  # answered locally
    canary = netns.run("getent", "hosts", "use-application-dns.net")
    assert canary.returncode == 2  # "not found": Firefox keeps DNS over HTTPS off


def test_getent_resolves_a_name_whose_upstream_answer_stops_short(netns: Namespace) -> None:
    # The upstream answers cdn.example.test with its CNAME alone; glibc finds no address in that, so
    # dnsgate asks for the target itself and hands back the whole chain.
    result = netns.run("getent", "hosts", "cdn.example.test")
    assert result.returncode == 0, result
    assert "cdn.example.test" in result.stdout and ("2001:db8::10" in result.stdout or "192.0.2.10" in result.stdout)
    both = netns.run("getent", "ahosts", "cdn.example.test")
    assert both.returncode == 0 and "192.0.2.10" in both.stdout and "2001:db8::10" in both.stdout
    assert netns.ask("count host.example.test") == "2"  # the target: once for A, once for AAAA


def test_getent_sees_the_gate(netns: Namespace) -> None:
    assert netns.run("getent", "hosts", "trackcmp.net").returncode == 2  # blocked: not found
    assert netns.ask("count trackcmp.net") == "0"
    assert netns.ask("grant") == "200"
    result = netns.run("getent", "ahosts", "trackcmp.net")
    assert result.returncode == 0 and "127.0.0.1" in result.stdout


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed (apt install chromium)")
def test_a_browser_loads_through_dnsgate_and_the_tracker_waits_for_consent(netns: Namespace, tmp_path: Path) -> None:
    def title() -> str:
        result = netns.run("chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
                           "--dump-dom", "http://page.example.test/", timeout=60)
        assert "<title>" in result.stdout, result.stderr[-2000:]
        return result.stdout.split("<title>", 1)[1].split("</title>", 1)[0]

    assert title() == "clean"  # the page's name resolved; the tracker's did not
    assert netns.ask("count page.example.test") != "0" and netns.ask("count trackcmp.net") == "0"
    assert netns.ask("grant") == "200"
    assert title() == "tracked"  # with consent, the tracker's script loads
