"""The kernel's neighbour table: which MAC address an on-link client address belongs to.

Read off the query path, every `identity.neighbour_refresh` seconds, on a worker thread: IPv4 from
/proc/net/arp, IPv6 from `ip -6 neigh show` (iproute2; skipped when missing). The parsers are pure
and the reader is injectable, so tests use a fake table.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final

from dnsgate.addresses import normalize_client, normalize_mac

log = logging.getLogger(__name__)

PROC_ARP: Final = Path("/proc/net/arp")
ATF_COM: Final = 0x2  # the entry is complete (RFC 826 reply seen)
NeighbourReader = Callable[[], Mapping[str, str]]


def parse_proc_arp(text: str) -> dict[str, str]:
    """address -> MAC for the complete entries of a /proc/net/arp listing."""
    table: dict[str, str] = {}
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) < 4:
            continue
        address, flags, mac = parts[0], parts[2], parts[3]
        try:
            if not int(flags, 16) & ATF_COM or mac == "00:00:00:00:00:00":
                continue
            table[normalize_client(address)] = normalize_mac(mac)
        except ValueError:
            continue
    return table


def parse_ip_neigh(text: str) -> dict[str, str]:
    """address -> MAC from `ip neigh show` output (entries without `lladdr` are incomplete)."""
    table: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split()
        if "lladdr" not in parts or "FAILED" in parts or "INCOMPLETE" in parts:
            continue
        i = parts.index("lladdr")
        if i + 1 >= len(parts):
            continue
        try:
            table[normalize_client(parts[0])] = normalize_mac(parts[i + 1])
        except ValueError:
            continue
    return table


class KernelNeighbours:
    """Reads the kernel's IPv4 and IPv6 neighbour tables (blocking: call it on a worker thread)."""

    def __init__(self, arp_path: Path = PROC_ARP, ip_command: str | None = None) -> None:
        self.arp_path = arp_path
        self.ip_command = ip_command if ip_command is not None else shutil.which("ip")
        self._warned: set[str] = set()

    def __call__(self) -> dict[str, str]:
        table: dict[str, str] = {}
        try:
            table.update(parse_proc_arp(self.arp_path.read_text(encoding="ascii", errors="replace")))
        except OSError as exc:
            self._warn(f"cannot read {self.arp_path}: {exc.strerror}; IPv4 clients have no MAC identity")
        if self.ip_command:
            try:
                out = subprocess.run([self.ip_command, "-6", "neigh", "show"], capture_output=True, text=True,
                                     timeout=5, check=False).stdout
                table.update(parse_ip_neigh(out))
            except (OSError, subprocess.SubprocessError) as exc:
                self._warn(f"cannot run '{self.ip_command} -6 neigh show': {exc}; IPv6 clients have no MAC identity")
        else:
            self._warn("no 'ip' command (iproute2): IPv6 clients have no MAC identity")
        return table

    def _warn(self, message: str) -> None:
        if message not in self._warned:  # once per problem, not every refresh
            self._warned.add(message)
            log.warning("neighbour table: %s", message)
