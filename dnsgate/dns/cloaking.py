"""Answer checks: does an upstream answer lead into a gated vendor? (CNAME cloaking)

Trackers hide behind first-party names (`metrics.shop.example CNAME x.trackcmp.net`): the name the
client asked for is not in the catalog, but its answer is. `answer_rule` walks the answer section of
an upstream reply: every CNAME and DNAME target and every SVCB/HTTPS target name, and, when a vendor
lists IP ranges, every A/AAAA address and SVCB/HTTPS address hint. The first one that is gated
gives the rule the whole answer is gated on; the cache entry keeps it, so hits are gated the same
way. Runs once per upstream reply, never on a cache hit. Pure.
"""

from __future__ import annotations

from typing import Final

from dnsgate.rules.catalog import Catalog, DomainRule
from dnsgate.wire import AAAA, CNAME, DNAME, U16, A, read_name, read_rr_header

SVCB: Final = 64
HTTPS: Final = 65
IPV4HINT: Final = 4
IPV6HINT: Final = 6


def answer_rule(catalog: Catalog, reply: bytes, question_len: int) -> DomainRule | None:
    """The rule an upstream reply's answer section is gated on, or None.

    A record that cannot be walked ends the check quietly: building the cache entry rejects the
    reply anyway (cache.UnusableReply).
    """
    ancount = U16.unpack_from(reply, 6)[0]
    addresses = catalog.checks_addresses
    offset = 12 + question_len
    for _ in range(ancount):
        rr = read_rr_header(reply, offset)
        if rr is None:
            return None
        owner_end, rtype, _rclass, _ttl, rdlen = rr
        rdata = owner_end + 10
        rule: DomainRule | None = None
        if rtype in (CNAME, DNAME):
            rule = _name_rule(catalog, reply, rdata)
        elif rtype in (SVCB, HTTPS):
            rule = _svcb_rule(catalog, reply, rdata, rdata + rdlen, addresses)
        elif addresses and ((rtype == A and rdlen == 4) or (rtype == AAAA and rdlen == 16)):
            rule = catalog.address_rule(reply[rdata : rdata + rdlen])
        if rule is not None:
            return rule
        offset = rdata + rdlen
    return None


def _name_rule(catalog: Catalog, reply: bytes, offset: int) -> DomainRule | None:
    target = read_name(reply, offset)
    if target is None:
        return None
    rule = catalog.match(target[0])
    return None if rule is None else catalog.cloaked(rule)


def _svcb_rule(catalog: Catalog, reply: bytes, rdata: int, end: int, addresses: bool) -> DomainRule | None:
    """SVCB/HTTPS (RFC 9460): the TargetName (an alias or the service host), then the address hints."""
    if rdata + 3 > end:
        return None
    if reply[rdata + 2] != 0:  # TargetName "." means the owner itself
        rule = _name_rule(catalog, reply, rdata + 2)
        if rule is not None or not addresses:
            return rule
    elif not addresses:
        return None
    target = read_name(reply, rdata + 2)
    if target is None:
        return None
    offset = target[1]
    while offset + 4 <= end:
        key, length = U16.unpack_from(reply, offset)[0], U16.unpack_from(reply, offset + 2)[0]
        value = offset + 4
        size = 4 if key == IPV4HINT else 16 if key == IPV6HINT else 0
        if size and value + length <= end:
            for at in range(value, value + length - size + 1, size):
                rule = catalog.address_rule(reply[at : at + size])
                if rule is not None:
                    return rule
        offset = value + length
    return None
