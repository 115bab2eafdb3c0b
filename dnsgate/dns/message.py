"""dnslib for the rare packets the byte-level code does not handle, and for readable descriptions.

Nothing here runs for ordinary queries: it earns its cost only on unusual shapes, so dnslib is
imported when one first comes (not at start: ~0.6 MiB of the serving process for a rare packet).
"""

from __future__ import annotations

from dnsgate.dns.cache import UnusableReply


def opt_last(reply: bytes) -> bytes:
    """The same reply re-encoded with its OPT record(s) removed (a kept record followed the OPT)."""
    from dnslib import QTYPE, DNSError, DNSRecord

    try:
        record = DNSRecord.parse(reply)
    except (DNSError, ValueError, IndexError) as exc:
        raise UnusableReply(f"unparsable reply: {exc}") from None
    record.ar = [rr for rr in record.ar if rr.rtype != QTYPE.OPT]
    packed: bytes = record.pack()
    return packed


def describe(wire: bytes) -> str:
    """One line for logs: 'NXDOMAIN trackcmp.net. A (an=0 ns=1 ar=1)', or why it cannot be parsed."""
    from dnslib import QTYPE, RCODE, DNSError, DNSRecord

    try:
        record = DNSRecord.parse(wire)
    except (DNSError, ValueError, IndexError) as exc:
        return f"<unparsable: {exc}>"
    q = record.q
    return (f"{RCODE.get(record.header.rcode)} {q.qname} {QTYPE.get(q.qtype)} "
            f"(an={len(record.rr)} ns={len(record.auth)} ar={len(record.ar)})")
