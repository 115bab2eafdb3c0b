"""The answer a client gets for a gated name it has not consented to.

Default (`nxdomain`): NXDOMAIN with the vendor zone's SOA in authority, TTL and MINIMUM both the
sinkhole TTL (5 s), because browsers do not cache negative answers, so a fresh grant applies at
once. `null`: A 0.0.0.0 / AAAA ::, other types NODATA with the SOA. With EDNS, an Extended DNS
Error 15 "Blocked" names the vendor (or list), why it is blocked for this client (no consent for its
category, listed after the client's choice, a grant under an older notice, a refusal, a GPC opt-out,
the network's policy), and how the answer met it (through a CNAME, or an address in the vendor's
ranges). Pieces are built once per rule and cause.
"""

from __future__ import annotations

import struct
from typing import Final, Literal

from dnsgate.consent.model import BLOCK_CAUSES, Verdict
from dnsgate.rules.catalog import DomainRule
from dnsgate.wire import (
    AAAA,
    CD,
    EDE_BLOCKED,
    IN,
    NOERROR,
    NXDOMAIN,
    QR,
    RA,
    RD,
    RR_FIXED,
    A,
    ede_option,
    opt_record,
    soa_record,
)

ID_FLAGS: Final = struct.Struct(">HH")
SOA_MNAME: Final = b"\x07dnsgate\x08internal\x00"
SOA_RNAME: Final = b"\x07consent\x07dnsgate\x08internal\x00"

# edns: -1 no OPT in the query, 0 OPT without DO, 1 OPT with DO
Parts = tuple[int, bytes, bytes]  # flags but RD/CD (QR, RA, RCODE), counts (QD..AR), records after the question
SLOTS: Final = 9  # per rule and cause: (no OPT, OPT, OPT+DO) x (other types, A, AAAA in null mode)
CAUSE_OFFSET: Final[dict[Verdict, int]] = {"": 0, **{cause: i * SLOTS for i, cause in enumerate(BLOCK_CAUSES)}}


QNAME: Final = b"\xc0\x0c"  # a compression pointer to the question's name


def block_reason(rule: DomainRule, cause: Verdict = "undecided") -> str:
    """The EDE text: what is blocked and why, never suggesting that a consent would help where none
    can (a refusal, a GPC opt-out and a network's policy are not lifted by consenting to something)."""
    vendor = rule.vendor
    category = vendor.category
    why = {
        "": f"no consent for category '{category}'",  # (never asked: an allowed name is not sinkholed)
        "undecided": f"no consent for category '{category}'",
        "unlisted": "not covered by this client's choice: listed after it",
        "stale": f"the consent notice changed since category '{category}' was granted; choose again",
        "refused": "refused in the consent choice that applies to this client",
        "gpc": "opted out of sale/sharing by Global Privacy Control (Sec-GPC)",
        "policy": "this network's policy never lets trackers resolve (profile deny)",
    }[cause]
    if vendor.kind == "list":
        reason = f"blocked by list '{vendor.name}' ({vendor.id}): {why}"
    else:
        reason = f"{vendor.name} ({vendor.id}) is blocked: {why}"
    if rule.via == "cname":
        target = "a listed name" if vendor.kind == "list" else rule.pattern
        return f"{reason}; the name is an alias (CNAME) of {target}"
    if rule.via == "address":
        return f"{reason}; the answer points into {rule.pattern}"
    return reason


class Sinkhole:
    __slots__ = ("_parts", "mode", "ttl", "udp_max")

    def __init__(self, mode: Literal["nxdomain", "null"], ttl: int, udp_max: int) -> None:
        self.mode = mode
        self.ttl = ttl
        self.udp_max = udp_max
        # per rule, SLOTS slots per block cause (only queries with EDNS get the cause's text)
        self._parts: dict[DomainRule, list[Parts | None]] = {}

    def reply(self, qid: int, qflags: int, question: bytes, qtype: int, rule: DomainRule, edns: int,
              cause: Verdict = "undecided") -> bytes:
        parts = self.parts(qtype, rule, edns, cause)
        return ID_FLAGS.pack(qid, parts[0] | (qflags & (RD | CD))) + parts[1] + question + parts[2]

    def parts(self, qtype: int, rule: DomainRule, edns: int, cause: Verdict = "undecided") -> Parts:
        """The reply but its ID, RD/CD and question: flags, counts and the records after the question."""
        index = edns + 1
        if self.mode == "null" and qtype in (A, AAAA):
            index += 3 if qtype == A else 6
        slots = self._parts.get(rule)
        if slots is None:
            slots = self._parts[rule] = [None] * (SLOTS * len(BLOCK_CAUSES))
        at = index + CAUSE_OFFSET[cause]
        parts = slots[at]
        if parts is None:
            kind = A if 3 <= index < 6 else AAAA if index >= 6 else 0
            parts = slots[at] = self._build(rule, kind, edns, cause)
        return parts

    def _build(self, rule: DomainRule, kind: int, edns: int, cause: Verdict) -> Parts:
        if kind == A:
            answer, authority = _address_rr(A, bytes(4), self.ttl), b""
        elif kind == AAAA:
            answer, authority = _address_rr(AAAA, bytes(16), self.ttl), b""
        else:
            # The vendor zone's SOA; for lists and cloaked answers the name's own (any other owner
            # would be out of bailiwick for the question).
            answer, authority = b"", soa_record(rule.apex or QNAME, self.ttl, SOA_MNAME, SOA_RNAME, self.ttl)
        additional = b""
        if edns >= 0:
            additional = opt_record(self.udp_max, edns == 1, ede_option(EDE_BLOCKED, block_reason(rule, cause)))
        rcode = NXDOMAIN if self.mode == "nxdomain" else NOERROR
        counts = struct.pack(">HHHH", 1, bool(answer), bool(authority), bool(additional))
        return QR | RA | rcode, counts, answer + authority + additional


def _address_rr(rtype: int, rdata: bytes, ttl: int) -> bytes:
    return b"\xc0\x0c" + RR_FIXED.pack(rtype, IN, ttl, len(rdata)) + rdata
