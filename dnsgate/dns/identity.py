"""Who is really asking, for queries that arrive through a trusted forwarder.

A forwarder such as dnsmasq can tell us the device behind a query: `add-mac` puts its MAC in an
EDNS option (65001 raw bytes; 65073 as text or base64), `add-subnet=32,128` its address in EDNS
Client Subnet (RFC 7871). Only forwarders listed in `identity.trusted_forwarders` are believed;
from anyone else these options are ignored, or any client could claim another device's consent.

Runs on the general path only: a query with EDNS options never takes the pipeline's fast path.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import time
from collections.abc import Callable, Iterable
from typing import Final

from dnsgate.addresses import mac_from_bytes, normalize_client, normalize_mac
from dnsgate.consent.model import ConsentTable, client_key
from dnsgate.consent.pairing import PAIR_LABEL
from dnsgate.wire import NOERROR, NXDOMAIN, OPT, U16, Query, error_reply, name_to_wire, read_rr_header

OPTION_ECS: Final = 8
OPTION_MAC_RAW: Final = 65001  # dnsmasq add-mac (binary)
OPTION_MAC_TEXT: Final = 65073  # dnsmasq add-mac=text / add-mac=base64


def edns_identity(data: bytes, question_end: int) -> tuple[str | None, str | None]:
    """(MAC, client address) from the OPT record's options, when present and well-formed."""
    mac: str | None = None
    address: str | None = None
    offset = question_end
    arcount = U16.unpack_from(data, 10)[0]
    for _ in range(arcount):
        rr = read_rr_header(data, offset)
        if rr is None:
            break
        owner_end, rtype, _, _, rdlen = rr
        start = owner_end + 10
        if rtype == OPT:
            pos, end = start, start + rdlen
            while pos + 4 <= end:
                code, length = U16.unpack_from(data, pos)[0], U16.unpack_from(data, pos + 2)[0]
                value = data[pos + 4 : pos + 4 + length]
                if code == OPTION_MAC_RAW and len(value) == 6:
                    mac = mac_from_bytes(value)
                elif code == OPTION_MAC_TEXT and mac is None:
                    mac = _mac_text(value)
                elif code == OPTION_ECS:
                    address = _ecs_address(value) or address
                pos += 4 + length
        offset = start + rdlen
    return mac, address


def _mac_text(value: bytes) -> str | None:
    try:
        return normalize_mac(value.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        pass
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return mac_from_bytes(raw) if len(raw) == 6 else None


def _ecs_address(value: bytes) -> str | None:
    """The client address of a full-length ECS option (/32 or /128); a shorter prefix names a
    network, not a client, and is ignored."""
    if len(value) < 4:
        return None
    family, source = U16.unpack_from(value)[0], value[2]
    raw = value[4:]
    if family == 1 and source == 32 and len(raw) == 4:
        return str(ipaddress.IPv4Address(raw))
    if family == 2 and source == 128 and len(raw) == 16:
        return normalize_client(str(ipaddress.IPv6Address(raw)))
    return None


class QueryIdentity:
    """The pipeline's consent-side helpers for the general path: the client behind a trusted
    forwarder, and pairing queries (`<token>.pair.<portal host>`)."""

    __slots__ = ("on_pair", "pair_suffix", "table", "trusted", "wall")

    def __init__(self, table: ConsentTable, trusted: Iterable[str], portal_host: str,
                 on_pair: Callable[[str, str], bool] | None = None,
                 wall: Callable[[], float] = time.time) -> None:
        self.table = table
        self.wall = wall
        self.trusted = frozenset(normalize_client(a) for a in trusted)
        self.pair_suffix = name_to_wire(f"{PAIR_LABEL}.{portal_host}")
        self.on_pair = on_pair

    def client_of(self, data: bytes, q: Query, client: str) -> str:
        """The client key for consent: the source address, or what a trusted forwarder says."""
        if client not in self.trusted or q.edns is None:
            return client
        mac, address = edns_identity(data, 12 + len(q.question))
        if mac is None and address is None:
            return client
        key = client_key(address or client, mac)
        if self.table.tracks_kiosk(key):
            self.table.touch(key, self.wall())  # a kiosk behind the forwarder is in use
        return key

    def pairing_reply(self, q: Query, client: str, udp_max: int) -> bytes | None:
        """Answer `<token>.pair.<portal host>`: bind the token's choice to this DNS client.

        Never forwarded nor cached; NOERROR/NODATA when the token was good, NXDOMAIN otherwise.
        Neither reply carries an SOA, so no resolver caches it (RFC 2308 §5)."""
        name, suffix = q.name, self.pair_suffix
        if not name.endswith(suffix) or len(name) != 1 + name[0] + len(suffix):
            return None
        token = name[1 : 1 + name[0]].decode("ascii", "replace")
        paired = self.on_pair is not None and self.on_pair(token, client)
        return error_reply(q, NOERROR if paired else NXDOMAIN, udp_max)
