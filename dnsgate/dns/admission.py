"""Who may ask, and how fast: the client ACL and response rate limiting (RRL), decided per address.

dnsgate is never an open resolver: a client outside `dns.allow_clients` gets REFUSED (over UDP and
TCP), a reply no larger than its query, so reflecting through dnsgate amplifies nothing. Every
client prefix (/24, /56 by default) also has a token bucket of UDP responses, refilled by `tick`
once a second: a spoofed flood against a victim's prefix gets at most `rate` replies a second;
beyond that the replies are dropped, except every `slip`-th one, which is sent truncated (TC=1,
no records) so that a real client behind that prefix retries over TCP, where its source address
is proven by the handshake and no limit applies. This is BIND's RRL, keyed on the prefix alone.

Per query this costs the pipeline one dict lookup (the address's gate, memoized) and an identity
test for a client in the ACL that is not rate limited (loopback by default; every client when
`rate` is 0): its gate is `True`. Any other gate is a small list [tokens, allowed] shared by every
address of a prefix, which adds two subscripts, a comparison and a decrement. Everything else
(parsing an address, matching networks, refilling) happens once per new address or once a second.
Pure: no clock, no I/O; the shell calls `tick` every second.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Final, Literal

from dnsgate.config import DEFAULT_ALLOWED, DEFAULT_EXEMPT
from dnsgate.dns.tally import DROPPED, NONE, REFUSED, Tally, type_slot
from dnsgate.wire import HEADER, QR, RA, RD, TC, Query, Rejection, error_reply, parse_query
from dnsgate.wire import REFUSED as REFUSED_RCODE

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

UNLIMITED: Final = 1 << 62  # tokens of an exempt client's gate: never refilled, never used up
MEMO_LIMIT: Final = 65_536  # addresses remembered; beyond, the memo starts again (buckets are kept)
BUCKET_LIMIT: Final = 65_536  # prefixes tracked; beyond, full buckets (nothing to remember) are dropped

Gate = list[int]  # [tokens left this second, 1 if the ACL allows the client else 0]


class Admission:
    __slots__ = ("allowed", "buckets", "burst", "dropped", "exempt", "gates", "rate", "refused", "slip",
                 "slip_count", "slipped", "v4_prefix", "v6_prefix")

    def __init__(self, allowed: Iterable[str] = DEFAULT_ALLOWED, *, rate: int = 0, burst: int = 0, slip: int = 2,
                 v4_prefix: int = 24, v6_prefix: int = 56, exempt: Iterable[str] = DEFAULT_EXEMPT) -> None:
        self.allowed = tuple(ipaddress.ip_network(n) for n in allowed)
        self.exempt = tuple(ipaddress.ip_network(n) for n in exempt)
        self.rate = rate  # responses per second per prefix; 0: no rate limit
        self.burst = max(burst, rate)
        self.slip = slip  # every slip-th limited reply is sent truncated; 0: none, 1: all
        self.v4_prefix = v4_prefix
        self.v6_prefix = v6_prefix
        # The pipeline reads `gates` directly (one dict lookup per query); `gate` fills it.
        self.gates: dict[str, Gate | Literal[True]] = {}
        self.buckets: dict[tuple[IPNetwork | None, int], Gate] = {}
        self.slip_count = 0
        self.refused = 0  # queries refused by the ACL
        self.dropped = 0  # UDP replies not sent because the prefix was over its rate
        self.slipped = 0  # ... sent truncated instead

    def gate(self, client: str) -> Gate | Literal[True]:
        """The gate of an address not yet seen (memoized in `gates`): True for a client the ACL
        allows and no rate limit applies to, else its prefix's bucket."""
        try:
            ip = ipaddress.ip_address(client)
        except ValueError:  # "unknown" (no peer name): never allowed
            ip = None
        allowed = ip is not None and any(ip in n for n in self.allowed)
        if ip is None or self.rate == 0 or any(ip in n for n in self.exempt):
            key: tuple[IPNetwork | None, int] = (None, int(allowed))
            start = UNLIMITED
        else:
            bits = self.v4_prefix if ip.version == 4 else self.v6_prefix
            key = (ipaddress.ip_network(f"{ip}/{bits}", strict=False), int(allowed))
            start = self.burst
        if len(self.gates) >= MEMO_LIMIT:
            self.gates.clear()
        if start == UNLIMITED and allowed:
            self.gates[client] = True
            return True
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = [start, int(allowed)]
        self.gates[client] = bucket
        return bucket

    def tick(self) -> None:
        """One second passed: refill every bucket (and forget full ones if too many are tracked)."""
        rate, burst = self.rate, self.burst
        for bucket in self.buckets.values():
            if bucket[0] < burst:
                bucket[0] = min(burst, bucket[0] + rate)
        if len(self.buckets) > BUCKET_LIMIT:
            # A full bucket holds nothing worth keeping: it would be created again just as full.
            self.buckets = {k: b for k, b in self.buckets.items() if b[0] < burst or k[0] is None}
            self.gates.clear()  # addresses must find their (possibly new) bucket again
            if len(self.buckets) > 2 * BUCKET_LIMIT:
                self.buckets.clear()

    def turn_away(self, gate: Gate | None, client: str, data: bytes, tcp: int, counts: Tally,
                  udp_max: int) -> bytes | Literal[True] | None:
        """The slow side of the pipeline's check (an address not seen yet, outside the ACL, or out
        of tokens): True to answer normally (TCP is not rate limited; a token was left), else the
        reply to send instead (REFUSED, truncated) or None."""
        if gate is None:
            found = self.gate(client)
            if found is True:
                return True
            gate = found
        limited = not tcp and gate[0] <= 0
        if not limited:
            if gate[0] > 0:
                gate[0] -= 1
            if gate[1]:
                return True
        elif gate[1] and self.slip:
            self.slip_count += 1
            if self.slip_count >= self.slip:
                self.slip_count = 0
                reply = _truncated(data)
                if reply is not None:
                    self.slipped += 1
                    counts.count(DROPPED, NONE, False)
                    return reply
        if limited:
            self.dropped += 1
            counts.count(DROPPED, NONE, tcp)
            return None
        # Outside the ACL: REFUSED with the question echoed (no larger than the query), if it is one.
        self.refused += 1
        q = parse_query(data)
        if isinstance(q, Rejection):
            counts.count(DROPPED, NONE, tcp)
            return None
        counts.count(REFUSED, type_slot(q.qtype), tcp)
        return error_reply(q, REFUSED_RCODE, udp_max)


def _truncated(data: bytes) -> bytes | None:
    """TC=1 and the question only: "ask me over TCP". None for a packet that is not a plain query."""
    q = parse_query(data)
    if not isinstance(q, Query):
        return None
    return HEADER.pack(q.id, QR | RA | TC | (q.flags & RD), 1, 0, 0, 0) + q.question
