"""Handler cost of `Pipeline.answer` without sockets: a cached, a blocked and a cloaked-blocked query.

    .venv/bin/python tests/bench/handler_cost.py [--rounds N]

Prints the best of several rounds in ns per call (lower is better). House rule: run before and after
a change to the per-query path and report both.
"""

from __future__ import annotations

import argparse
import time

import dns.message
import dns.rrset

from dnsgate.consent.model import ConsentTable
from dnsgate.dns.cache import AnswerCache, Entry, TtlPolicy
from dnsgate.dns.pipeline import Forward, Pipeline
from dnsgate.dns.sinkhole import Sinkhole
from dnsgate.rules.catalog import builtin_catalog_text, parse_catalog_text


def build() -> Pipeline:
    # A frozen clock: the cloaked entry's TTL is capped at 10 s, longer than a measurement takes.
    return Pipeline(
        parse_catalog_text(builtin_catalog_text()), ConsentTable(), AnswerCache(10_000, 10**8),
        Sinkhole("nxdomain", 5, 1232), udp_max=1232,
        plain_ttl=TtlPolicy(0, 86400, None), gated_ttl=TtlPolicy(0, 86400, 10),
        mono=lambda: 1000.0,
    )


def fill(p: Pipeline, name: str, *records: str) -> bytes:
    """Forward `name` once through the pipeline with an upstream reply holding `records`."""
    q = dns.message.make_query(name, "A")
    out = p.answer(q.to_wire(), "127.0.0.1", False)
    assert isinstance(out, Forward), out
    r = dns.message.make_response(q)
    for text in records:
        owner, ttl, _, rdtype, rdata = text.split(None, 4)
        r.answer.append(dns.rrset.from_text(owner, int(ttl), "IN", rdtype, rdata))
    entry = p.admit(out, r.to_wire())
    assert isinstance(entry, Entry)
    p.complete(out, entry)
    return q.to_wire()


def per_call(p: Pipeline, wire: bytes, n: int, rounds: int) -> float:
    answer = p.answer
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(n):
            answer(wire, "127.0.0.1", False)
        best = min(best, (time.perf_counter() - start) / n)
    return best * 1e9


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("-n", type=int, default=200_000)
    args = parser.parse_args()
    p = build()
    cached = fill(p, "host.example.test", "host.example.test. 3600 IN A 192.0.2.10")
    blocked = dns.message.make_query("x.trackcmp.net", "A").to_wire()
    p.answer(blocked, "127.0.0.1", False)  # warm the memo
    cloaked = fill(p, "metrics.shop.example", "metrics.shop.example. 3600 IN CNAME x.trackcmp.net.",
                   "x.trackcmp.net. 3600 IN A 198.51.100.2")
    results = {"cached": per_call(p, cached, args.n, args.rounds),
               "blocked": per_call(p, blocked, args.n, args.rounds),
               "cloaked (CNAME hit)": per_call(p, cloaked, args.n, args.rounds)}
    for label, ns in results.items():
        reply = p.answer({"cached": cached, "blocked": blocked}.get(label, cloaked), "127.0.0.1", False)
        rcode = reply[3] & 0xF if isinstance(reply, bytes) else type(reply).__name__
        print(f"{label:22s} {ns:7.0f} ns/call  (rcode {rcode})")


if __name__ == "__main__":
    main()
