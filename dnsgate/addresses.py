"""Client addresses and MACs in their one canonical text, as every layer compares them.

A socket's peer, an API caller, a configured forwarder, a kernel neighbour entry and a stored
choice must name the same client the same way: IPv4-mapped IPv6 as IPv4, no zone id, MACs lower
case with colons. Base layer: imports nothing of dnsgate, so the socket layer, the consent model
and the configuration can all use it.
"""

from __future__ import annotations

import functools
import ipaddress


def is_ip(text: str) -> bool:
    """Whether `text` is an IP address as written (a host name is not): the configuration's and the
    commands' test of a value that may be either."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# The same few addresses come with every API request (the caller, the Host header) and choice:
# each is parsed once, not by ipaddress at every request
@functools.lru_cache(maxsize=4096)
def normalize_client(address: str) -> str:
    """The canonical text of a client address: IPv4-mapped IPv6 as IPv4, zone ids dropped.

    Raises ValueError for anything that is not an IP address.
    """
    ip = ipaddress.ip_address(address.split("%", 1)[0] if ":" in address else address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def normalize_mac(text: str) -> str:
    """`AA-BB-CC-DD-EE-FF`, `aabb.ccdd.eeff` or `aa:bb:…` -> `aa:bb:cc:dd:ee:ff`; ValueError otherwise."""
    digits = "".join(c for c in text.strip().lower() if c not in ":-.")
    if len(digits) != 12 or any(c not in "0123456789abcdef" for c in digits) or len(text.strip()) > 17:
        raise ValueError(f"not a MAC address: {text!r}")
    return ":".join(digits[i : i + 2] for i in range(0, 12, 2))


def mac_from_bytes(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)
