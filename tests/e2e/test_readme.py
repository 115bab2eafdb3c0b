"""Every command README.md gives, and the command blocks of the manual's pages, run as written in a fresh
copy of the repository (its tracked files only: no .venv, no data), checked against what the page
says: the output it shows, the ready line, or at least success.

The copy's `./dev` installs its own .venv first (and must say so). Everything else runs inside a
network namespace of its own, so the README's default ports (5353, 8053, and 53) are free whatever
else this machine runs, and nothing there reaches the internet: the tour runs against
`./dev serve --demo-upstream`, as the README says to do offline.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.netns import IP, netns_unavailable
from tests.test_docs import matches, split_fences

ROOT = Path(__file__).resolve().parents[2]
NETNS = f"dnsgate-readme-{os.getpid()}"
# A command the test does not run, and why (every other command the pages give is run).
NOT_RUN = {"./dev test": "the test suite itself, which runs this test"}
# The manual's pages whose command blocks run here, after the README's, and those that cannot.
DOCS_RUN = ("docs/api.md", "docs/consent.md", "docs/observability.md")
DOCS_NOT_RUN = {"docs/install.md": "needs Docker, sudo and systemd on a real host; tests/test_installs.py lints the "
                                   "Dockerfile and verifies the unit, and .ci/run installs and serves the wheel "
                                   "as its block does (tests/install_wheel.py)",
                "docs/encrypted-dns.md": "names a LAN address (192.168.1.2); tests/cli/test_cert.py runs cert init "
                                         "and tests/e2e/test_dot.py, test_doh.py the clients on loopback",
                "docs/redis.md": "needs a Redis server at redis.lan and a stopped dnsgate"}
README_HOME = "/home/me/dnsgate"  # where the README's ready line pretends the checkout is
README_NAMESERVER = "192.168.1.1"  # and the nameserver it shows


@dataclass
class Command:
    text: str
    where: str
    shown: list[str] = field(default_factory=list)  # the output the page shows after `$ command`


def commands(page: Path, prose_too: bool = True) -> Iterator[Command]:
    """Fenced sh blocks: `$ ` lines with the output below them, or, in a block without prompts,
    every line (its `# comment` dropped); in prose (the README's), code spans that start `./dev `
    or `dnsgate `, or set PATH. A span with `…` stands for a family of commands and is not one."""
    text = page.read_text()
    name = page.relative_to(ROOT).as_posix()
    for block in re.finditer(r"```sh\n(.*?)```", text, re.S):
        line_no = text[: block.start()].count("\n") + 2
        lines = block[1].splitlines()
        prompted = any(line.startswith("$ ") for line in lines)
        current: Command | None = None
        for offset, line in enumerate(lines):
            if prompted and line.startswith("$ "):
                current = Command(line[2:], f"{name}:{line_no + offset}")
                yield current
            elif prompted and current is not None:
                current.shown.append(line)
            elif not prompted and line.strip():
                yield Command(re.sub(r"\s+#.*$", "", line).strip(), f"{name}:{line_no + offset}")
    if not prose_too:
        return
    prose, _ = split_fences(text)
    for number, line in prose:
        for span in re.findall(r"`([^`]+)`", line):
            if span.startswith(("./dev ", "dnsgate ", "export PATH=")) and "…" not in span:
                yield Command(span, f"{name}:{number}")


def test_the_extraction() -> None:
    found = {c.text: c for c in commands(ROOT / "README.md")}
    assert "./dev serve" in found and "./dev test" in found  # a block without prompts
    assert found["dig @127.0.0.1 -p 5353 trackcmp.net"].shown[0].startswith(";; ->>HEADER<<-")  # the tour
    assert "./dev serve --demo-upstream" in found and "./dev consent list" in found  # prose
    assert not any("…" in text for text in found)
    api = [c.text for c in commands(ROOT / "docs" / "api.md", prose_too=False)]
    assert "dnsgate consent list" in api and "dnsgate store acknowledge" in api
    with_blocks = {p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md") if "```sh" in p.read_text()}
    assert with_blocks == set(DOCS_RUN) | set(DOCS_NOT_RUN), "a page with commands: run them here, or say why not"


class Namespace:
    def __init__(self, copy: Path) -> None:
        self.copy = copy
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("DNSGATE_", "VIRTUAL_ENV"))}
        self.env["PATH"] = ":".join(p for p in self.env.get("PATH", "").split(":") if ".venv" not in p)

    def run(self, command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([IP, "netns", "exec", NETNS, "bash", "-c", command], cwd=self.copy, env=self.env,
                              capture_output=True, text=True, timeout=timeout, check=False)

    def start(self, command: str) -> tuple[subprocess.Popen[str], str]:
        """A server started as written; its ready line (the first line it prints)."""
        process = subprocess.Popen([IP, "netns", "exec", NETNS, "bash", "-c", f"exec {command}"], cwd=self.copy,
                                   env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        if not line.startswith("dnsgate ready: "):
            stop(process)
            pytest.fail(f"$ {command}\nno ready line: {line!r}\n{process.stderr.read() if process.stderr else ''}")
        return process, line


def stop(process: subprocess.Popen[str]) -> int:
    """SIGTERM to the server this test started (the PID is dnsgate's: ip netns exec, bash and ./dev exec it)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(20)
    finally:
        if process.poll() is None:
            process.kill()


@pytest.fixture
def namespace(tmp_path: Path) -> Iterator[Namespace]:
    if (why := netns_unavailable(f"{NETNS}-probe")) is not None:
        pytest.skip(why)
    for tool in ("dig", "curl", "git"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    copy = tmp_path / "dnsgate"
    copy.mkdir()
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in tracked.decode().split("\0"):
        if name and (ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
    # The namespace's /etc/resolv.conf (ip netns exec mounts it) names the README's nameserver.
    etc = Path("/etc/netns") / NETNS
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "resolv.conf").write_text(f"nameserver {README_NAMESERVER}\n")
    subprocess.run([IP, "netns", "add", NETNS], check=True)
    try:
        subprocess.run([IP, "netns", "exec", NETNS, IP, "link", "set", "lo", "up"], check=True)
        yield Namespace(copy)
    finally:
        subprocess.run([IP, "netns", "del", NETNS], check=False)
        shutil.rmtree(etc, ignore_errors=True)


@pytest.mark.timeout(600)
def test_every_command_of_the_readme_runs_as_written(namespace: Namespace) -> None:
    copy = namespace.copy
    readme = list(commands(ROOT / "README.md"))
    done: set[str] = set()

    # First use: ./dev makes .venv and installs dnsgate, and says so (with the internet: outside the namespace).
    install = subprocess.run(["./dev", "config", "check"], cwd=copy, env=namespace.env, capture_output=True,
                             text=True, timeout=400, check=False)
    assert install.returncode == 0, install.stderr
    assert "dev: creating .venv" in install.stderr and "dev: installing dnsgate" in install.stderr, install.stderr
    assert re.search(r"dev: installed in \d+ s", install.stderr), install.stderr
    assert (copy / ".venv" / "bin" / "dnsgate").exists()

    # The servers the README starts: each gets ready as it says, and stops cleanly.
    shown_ready = re.search(r"```\n(dnsgate ready: .*)\n```", (ROOT / "README.md").read_text())
    assert shown_ready is not None
    servers = {c.text: c for c in readme if c.text.startswith("./dev serve") and "--demo-upstream" not in c.text}
    for command in servers.values():
        process, line = namespace.start(command.text)
        if command.text == "./dev serve":
            assert line == shown_ready[1].replace(README_HOME, str(copy)), f"{command.where}: {line}"
        for flag, value in re.findall(r"--(upstream|dns) (\S+)", command.text):
            label = {"upstream": "upstreams", "dns": "dns (udp+tcp)"}[flag]
            assert f"{label} {value if ':' in value else value + ':53'}" in line, f"{command.where}: {line}"
        assert stop(process) == 0, command.where
        done.add(command.text)

    # The tour, offline as the README says, then every other command against the same server.
    (tour_server,) = {c.text for c in readme if "--demo-upstream" in c.text}
    process, line = namespace.start(tour_server)
    done.add(tour_server)
    try:
        assert "upstreams 127.0.0.1:" in line
        path_setting = next(c.text for c in readme if c.text.startswith("export PATH="))
        done.add(path_setting)
        docs = [c for page in DOCS_RUN for c in commands(ROOT / page, prose_too=False)]
        rest = {c.text: c for c in readme if c.text not in done and c.text not in NOT_RUN}  # each once, in order
        # $TOKEN in the manual's curl lines is the admin token, as its CI job sets it
        namespace.env["TOKEN"] = (copy / "data" / "admin-token").read_text().strip()
        for command in [*rest.values(), *docs]:
            follows = "--follow" in command.text  # a tail: it prints and keeps running until stopped
            typed = f"timeout 3 {command.text}" if follows else command.text
            as_typed = f"{path_setting}; {typed}" if command.text.startswith("dnsgate ") else typed
            deadline = time.monotonic() + 5  # the query log is written every second: a report may wait
            while True:
                result = namespace.run(as_typed)
                changes = re.search(r"-X (PUT|DELETE|POST)", command.text) is not None
                ok = matches(result.stdout, command.shown) if command.shown else \
                    result.returncode == (124 if follows else 0)  # a tail is still following when stopped
                if ok or changes or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert ok, f"{command.where}: $ {command.text}\nexit {result.returncode}\n{result.stdout}\n" \
                       f"{result.stderr}--- the page shows ---\n" + "\n".join(command.shown)
            done.add(command.text)
        assert (copy / "consent-log.csv").read_text().startswith("id,time,action,")  # docs/api.md's -o
    finally:
        assert stop(process) == 0
    missed = {c.text for c in readme} - done - set(NOT_RUN)
    assert not missed, f"README commands this test does not know how to run: {missed}"
