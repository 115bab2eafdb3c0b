"""Discovery of Designated Resolvers (RFC 9462): what `_dns.resolver.arpa` answers.

A client that knows only the network's plain resolver (DHCP gave it an address) asks for SVCB
records of `_dns.resolver.arpa` there, and upgrades to the encrypted endpoints they name (Windows
11, Android 14+...). With DNS over TLS or HTTPS on, dnsgate names them: ALPN `dot` or `h2`, the
port, `dohpath` for DoH (RFC 9461), and the addresses as `ipv4hint` / `ipv6hint` so that no
further lookup is needed; verified discovery (RFC 9462 §4.2) then checks that the certificate
covers the address the client asked, which `dnsgate cert init --ip` puts there. The same records
answer `_dns.<resolver name>` when the resolver has a name. Off (or DDR switched off), the name is
NODATA as before: clients then have nothing to upgrade to and stay on plain DNS.

Pure: no I/O (the address facing a client comes through the `PortalAddresses` given).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from dnsgate.config import HostPort
from dnsgate.dns.local_answers import POLICY_TTL, LocalZone
from dnsgate.dns.portal_address import A_TYPE, AAAA_TYPE, PortalAddresses, Records
from dnsgate.wire import NOERROR, name_to_wire

SVCB: Final = 64
# SvcParamKeys (RFC 9460 §14.3.2, RFC 9461 §5): written in increasing order, as the RFC requires
ALPN, PORT, IPV4HINT, IPV6HINT, DOHPATH = 1, 3, 4, 6, 7
DOH_PATH_TEMPLATE: Final = "/dns-query{?dns}"  # RFC 9461 §5: the URI template's path and query
RESOLVER_ARPA: Final = "_dns.resolver.arpa"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One protocol on one port, at every address it listens on."""

    alpn: str  # "dot" or "h2"
    port: int
    hosts: tuple[str, ...]


def svcb_rdata(priority: int, target: bytes, alpn: str, port: int, v4: Sequence[bytes], v6: Sequence[bytes],
               dohpath: str = "") -> bytes:
    """One SVCB record's RDATA in ServiceMode (RFC 9460 §2.2)."""
    params = [(ALPN, bytes((len(alpn),)) + alpn.encode("ascii")), (PORT, struct.pack(">H", port))]
    if v4:
        params.append((IPV4HINT, b"".join(v4)))
    if v6:
        params.append((IPV6HINT, b"".join(v6)))
    if dohpath:
        params.append((DOHPATH, dohpath.encode("utf-8")))
    return struct.pack(">H", priority) + target + b"".join(struct.pack(">HH", k, len(v)) + v for k, v in params)


class Designation:
    """The SVCB records for a client: fixed when every endpoint listens on an address, else with
    the address of this host that faces the client (for endpoints on 0.0.0.0 or ::)."""

    def __init__(self, endpoints: Sequence[Endpoint], target: str) -> None:
        self.endpoints = tuple(endpoints)
        self.target = name_to_wire(target) if target else b"\x00"
        self.addresses = [[PortalAddresses(host) for host in e.hosts] for e in self.endpoints]
        self.fixed = all(a.is_fixed for group in self.addresses for a in group)

    def records(self, client: str = "") -> Records:
        rdatas = []
        for priority, (endpoint, group) in enumerate(zip(self.endpoints, self.addresses, strict=True), 1):
            v4: dict[bytes, None] = {}
            v6: dict[bytes, None] = {}
            for addresses in group:
                hints = addresses.fixed if addresses.is_fixed else addresses.records(client)
                v4.update(dict.fromkeys(hints.get(A_TYPE, ())))
                v6.update(dict.fromkeys(hints.get(AAAA_TYPE, ())))
            rdatas.append(svcb_rdata(priority, self.target, endpoint.alpn, endpoint.port, list(v4), list(v6),
                                     DOH_PATH_TEMPLATE if endpoint.alpn == "h2" else ""))
        return {SVCB: tuple(rdatas)}


def endpoints(tls: Sequence[HostPort], https: Sequence[HostPort]) -> list[Endpoint]:
    """One record per protocol and port (DoT first); the listeners on it give its hints."""
    grouped: dict[tuple[str, int], list[str]] = {}
    for alpn, addresses in (("dot", tls), ("h2", https)):
        for address in addresses:
            grouped.setdefault((alpn, address.port), []).append(address.host)
    return [Endpoint(alpn, port, tuple(dict.fromkeys(hosts))) for (alpn, port), hosts in grouped.items()]


def ddr_zones(tls: Sequence[HostPort], https: Sequence[HostPort], resolver_name: str) -> list[LocalZone]:
    """`_dns.resolver.arpa` (and `_dns.<resolver_name>`) naming the encrypted endpoints; none when
    there are none (the NODATA zone stays)."""
    found = endpoints(tls, https)
    if not found:
        return []
    designation = Designation(found, resolver_name)
    names = [RESOLVER_ARPA] + ([f"_dns.{resolver_name}"] if resolver_name else [])
    return [LocalZone(name_to_wire(name), NOERROR, designation.records() if designation.fixed else {}, "nxdomain",
                      POLICY_TTL, "designated encrypted resolvers (RFC 9462)",
                      per_client=None if designation.fixed else designation.records)
            for name in names]
