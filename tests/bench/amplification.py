"""How much can dnsgate amplify a spoofed flood? Reply bytes / query bytes, worst case.

    .venv/bin/python -m tests.bench.amplification

Drives Pipeline.answer with the default ACL and rate limit (as `dnsgate serve` runs), from a client
outside the ACL and one inside it, over many query shapes, with the cache holding the largest UDP
answer dnsgate would send (a TXT record filling udp_max_size). Prints the worst factor per packet,
and the factor over a one-second flood of 100 000 queries from one spoofed prefix (rate limit and
slip included).
"""

from __future__ import annotations

from collections.abc import Iterator

import dns.message
import dns.rrset

from dnsgate.config import DEFAULT_ALLOWED, DnsConfig
from dnsgate.dns.admission import Admission
from dnsgate.dns.cache import AnswerCache, TtlPolicy
from dnsgate.dns.pipeline import Forward, Pipeline
from dnsgate.dns.sinkhole import Sinkhole
from tests.support import consent_fixtures

OUTSIDE, INSIDE = "198.51.100.7", "192.168.1.7"
BIG = "big.example.test"


def pipeline() -> Pipeline:
    d = DnsConfig()
    admission = Admission(DEFAULT_ALLOWED, rate=d.rate_limit, slip=d.rate_limit_slip, exempt=d.rate_limit_exempt)
    p = Pipeline(consent_fixtures.CATALOG, consent_fixtures.table(), AnswerCache(1000, 10**7),
                 Sinkhole("nxdomain", 5, d.udp_max_size), udp_max=d.udp_max_size,
                 plain_ttl=TtlPolicy(0, 86400, None), gated_ttl=TtlPolicy(0, 86400, 10), admission=admission)
    for do in (False, True):
        q = dns.message.make_query(BIG, "TXT", use_edns=0, payload=4096, want_dnssec=do)
        fwd = p.answer(q.to_wire(), "127.0.0.1", False)
        assert isinstance(fwd, Forward)
        r = dns.message.make_response(q)
        chunk = '"' + "x" * 250 + '" '
        r.answer.append(dns.rrset.from_text(BIG + ".", 300, "IN", "TXT", chunk * 4))  # ~1.1 KB: fits 1232
        p.admit(fwd, r.to_wire())
    return p


def shapes() -> Iterator[tuple[str, bytes]]:
    for name in (BIG, "host.example.test", "trackcmp.net", "a.b"):
        for rdtype in ("A", "TXT", "ANY", "AXFR", "HTTPS"):
            yield f"{name} {rdtype}", dns.message.make_query(name, rdtype).to_wire()
            yield f"{name} {rdtype} +edns4096 +do", dns.message.make_query(
                name, rdtype, use_edns=0, payload=4096, want_dnssec=True).to_wire()
    yield "header only", bytes(12)
    yield "QR=1", b"\x12\x34\x81\x00" + bytes(8)
    yield "bad opcode", b"\x12\x34\x28\x00" + bytes(8)


def worst(p: Pipeline, client: str) -> tuple[float, str]:
    best = (0.0, "")
    for label, query in shapes():
        p.admission.tick()
        reply = p.answer(query, client, False)
        if isinstance(reply, bytes):
            best = max(best, (len(reply) / len(query), label))
    return best


def flood(p: Pipeline, client: str, query: bytes, n: int = 100_000) -> tuple[float, int]:
    p.admission.tick()
    out = 0
    answered = 0
    for _ in range(n):
        reply = p.answer(query, client, False)
        if isinstance(reply, bytes):
            out += len(reply)
            answered += 1
    return out / (n * len(query)), answered


def main() -> None:
    p = pipeline()
    factor, label = worst(p, OUTSIDE)
    print(f"outside the ACL: worst reply/query {factor:.2f} ({label})")
    factor, label = worst(p, INSIDE)
    print(f"inside the ACL:  worst reply/query {factor:.2f} per packet ({label}: the largest cached UDP answer)")
    big = dns.message.make_query(BIG, "TXT").to_wire()
    any_query = dns.message.make_query("host.example.test", "ANY").to_wire()
    for client, query, what in ((OUTSIDE, big, "outside, TXT"), (INSIDE, big, "inside, largest answer"),
                                (INSIDE, any_query, "inside, ANY")):
        f, answered = flood(pipeline(), client, query)
        print(f"one-second flood of 100000 queries from one spoofed /24 ({what}): {answered} replies, "
              f"bytes out / bytes in {f:.3f}")


if __name__ == "__main__":
    main()
