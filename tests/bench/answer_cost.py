"""What one `Pipeline.answer` costs on the hot path: a cached answer and a sinkholed one.

    .venv/bin/python -m tests.bench.answer_cost [--rounds 7] [--n 200000]

Builds a pipeline the way tests/dns/test_pipeline.py does, fills the cache through the real
forward/admit/complete steps, then times tight loops of `answer` (best of several rounds, so
scheduler noise only ever makes a round slower). Prints the best ns per call for each case; run
it before and after a change to the per-query path, interleaved, and compare (PYTHONPATH=DIR
points it at another checkout's dnsgate package).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import dns.message
import dns.rdatatype

from dnsgate.dns.cache import AnswerCache, Entry, TtlPolicy
from dnsgate.dns.pipeline import Forward, Pipeline
from dnsgate.dns.sinkhole import Sinkhole
from tests.support import consent_fixtures


def build(setup: Callable[[Pipeline], None] | None = None) -> Pipeline:
    # the built-in catalog, and a consent table whose notice lists its items (as the tests' own)
    p = Pipeline(
        consent_fixtures.CATALOG, consent_fixtures.table(), AnswerCache(1000, 10**7),
        Sinkhole("nxdomain", 5, 1232), udp_max=1232,
        plain_ttl=TtlPolicy(0, 86400, None), gated_ttl=TtlPolicy(0, 86400, 10),
    )
    if setup is not None:
        setup(p)
    return p


def fill(p: Pipeline, name: str, address: str, client: str = "127.0.0.1", rdtype: str = "A",
         dnssec: bool = False) -> None:
    q = dns.message.make_query(name, rdtype, use_edns=0 if dnssec else False, want_dnssec=dnssec)
    out = p.answer(q.to_wire(), client, False)
    assert isinstance(out, Forward), out
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text(name + ".", 300, "IN", rdtype, address))
    entry = p.admit(out, r.to_wire())
    assert isinstance(entry, Entry)
    p.complete(out, entry)


def per_call_ns(p: Pipeline, wire: bytes, client: str, n: int, rounds: int, drain: Callable[[], None]) -> float:
    answer = p.answer
    best = []
    for _ in range(rounds):
        started = time.perf_counter_ns()
        for _ in range(n):
            answer(wire, client, False)
        best.append((time.perf_counter_ns() - started) / n)
        drain()  # as the query log's writer takes its batch, once per flush interval
    return min(best)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--log", choices=["none", "gated", "all"], default="gated",
                        help="query-log sinks to attach: none, gated names only (the default mode), every query")
    args = parser.parse_args()
    p = build()
    sink: list[object] = []
    if args.log != "none" and hasattr(p, "log_gated"):
        p.log_gated = sink.append
        if args.log == "all":
            p.log_all = sink.append
    # 127.0.0.2 granted marketing under the current notice
    p.consent.put(consent_fixtures.choice("127.0.0.2", expires_at=4e9))
    cases = {
        "cached": (dns.message.make_query("host.example.test", dns.rdatatype.A).to_wire(), "127.0.0.1"),
        # a gated name someone with consent had resolved (it is cached), and one nobody has (the
        # bench's "blocked" workload: every name is sinkholed, none reaches the cache)
        "blocked": (dns.message.make_query("trackcmp.net", dns.rdatatype.A).to_wire(), "127.0.0.1"),
        "blocked-unseen": (dns.message.make_query("x.trackcmp.net", dns.rdatatype.A).to_wire(), "127.0.0.1"),
        "gated-allowed": (dns.message.make_query("trackcmp.net", dns.rdatatype.A).to_wire(), "127.0.0.2"),
        # what browsers and validating stubs ask: HTTPS (type 65, the byte "A") and EDNS with DO
        "cached-https": (dns.message.make_query("host.example.test", dns.rdatatype.HTTPS).to_wire(), "127.0.0.1"),
        "cached-do": (dns.message.make_query("host.example.test", dns.rdatatype.A, use_edns=0,
                                             want_dnssec=True).to_wire(), "127.0.0.1"),
    }
    for label, (wire, client) in cases.items():
        ns = []
        for _ in range(3):
            # gated answers live 10 s (the TTL cap): fill again before every timed run
            p.cache.clear()
            fill(p, "host.example.test", "192.0.2.10")
            fill(p, "trackcmp.net", "198.51.100.1", client="127.0.0.2")
            fill(p, "host.example.test", "1 . alpn=h2", rdtype="HTTPS")
            fill(p, "host.example.test", "192.0.2.10", dnssec=True)
            assert isinstance(p.answer(wire, client, False), bytes)
            ns.append(per_call_ns(p, wire, client, args.n, args.rounds, sink.clear))
        print(f"{label:14s} {min(ns):7.1f} ns/query  (runs: {', '.join(f'{x:.1f}' for x in ns)})")


if __name__ == "__main__":
    main()
