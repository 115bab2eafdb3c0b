"""Network namespaces for the tests that need a real port 53 (tests/e2e/resolver/test_netns.py,
tests/browser/test_portal_netns.py): where `ip` is, and whether this machine can make a namespace."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

IP = shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin") or "ip"


def netns_unavailable(probe: str) -> str | None:
    """Why a network namespace cannot be made here (None if it can): creates and deletes `probe`."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "needs root to create a network namespace"
    if shutil.which(IP) is None:
        return "ip not installed (apt install iproute2)"
    result = subprocess.run([IP, "netns", "add", probe], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return f"cannot create a network namespace: {result.stderr.strip()}"
    subprocess.run([IP, "netns", "del", probe], check=False)
    return None
