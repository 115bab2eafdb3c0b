"""Done when: a person on a fresh network opens http://consent.dnsgate.internal/, chooses, and the
tracker's DNS follows. Everything runs in a network namespace whose resolv.conf points at dnsgate
on port 53, with the portal on port 80 (tests/support/portal_netns_helper.py), so the browser finds the
portal by name through dnsgate like any device would, and nothing touches the host's ports.

Needs root, `ip netns` (iproute2) and chromium; skipped with the reason where they are missing.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.browser import chromium_available
from tests.support.netns import IP, netns_unavailable

ROOT = Path(__file__).resolve().parents[2]
_names = itertools.count()


def _unavailable() -> str | None:
    if not chromium_available():
        return "chromium not installed (apt install chromium)"
    return netns_unavailable(f"dnsgate-portal-probe-{os.getpid()}")


UNAVAILABLE = _unavailable()


@pytest.mark.skipif(UNAVAILABLE is not None, reason=UNAVAILABLE or "")
@pytest.mark.timeout(150)
def test_a_person_on_a_fresh_network_chooses_in_the_portal(tmp_path: Path) -> None:
    name = f"dnsgate-portal-{os.getpid()}-{next(_names)}"
    etc = Path("/etc/netns") / name  # `ip netns exec` bind-mounts these over /etc/*
    subprocess.run([IP, "netns", "add", name], check=True)
    try:
        etc.mkdir(parents=True)
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions attempts:1 timeout:3\n")
        (etc / "nsswitch.conf").write_text("hosts: dns\n")  # every lookup goes to DNS, none to /etc/hosts
        subprocess.run([IP, "netns", "exec", name, IP, "link", "set", "lo", "up"], check=True)
        result = subprocess.run(
            [IP, "netns", "exec", name, sys.executable, "-m", "tests.support.portal_netns_helper",
             str(tmp_path / "data")],
            cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 0, result.stderr[-4000:]
        seen = json.loads(result.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run([IP, "netns", "del", name], check=False)
        shutil.rmtree(etc, ignore_errors=True)

    assert seen["shop_title_before"] == "clean"  # the tracker's script did not load
    assert seen["portal_url"].startswith("http://consent.dnsgate.internal/?return_to=")  # found by name
    assert seen["state_before"] == "blocked"
    assert "127.0.0.1" in seen["device"]
    assert "ActiveCampaign" in seen["result"] and "within seconds" in seen["result"]
    assert seen["dns_after_accept"] == "NOERROR"
    assert seen["shop_title_after"] == "tracked"  # back on the shop, the tracker loads
    assert seen["dns_after_withdraw"] == "NXDOMAIN"
    assert seen["whoami_dns"] is not None and seen["whoami_dns"]["address"] == "127.0.0.1"  # paired via DNS
