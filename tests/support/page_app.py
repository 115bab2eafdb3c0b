"""A stand-in for a web page with ActiveCampaign site tracking: it resolves what the page loads.

    python -m tests.support.page_app --server 127.0.0.1 --port 5353 --source 127.0.0.31 [--rest-api]

Like a browser opening the page: the first-party host (A and AAAA), then the tracking loaders and
the beacon host (A, AAAA and HTTPS, as Chrome asks). `--rest-api` also resolves the account's
REST API host (what a site's back-end calls). Prints one JSON object: name/type -> rcode and
addresses. Uses dnspython, a real DNS client, from the given source address.
"""

from __future__ import annotations

import argparse
import json

import dns.message
import dns.query
import dns.rcode

FIRST_PARTY = [("host.example.test", "A"), ("host.example.test", "AAAA")]
TRACKERS = [(name, rdtype) for name in ("prism.app-us1.com", "trackcmp.net") for rdtype in ("A", "AAAA", "HTTPS")]
REST_API = [("acct.api-us1.com", "A")]


def resolve(server: str, port: int, source: str, name: str, rdtype: str) -> dict[str, object]:
    reply = dns.query.udp(dns.message.make_query(name, rdtype), server, port=port, source=source, timeout=3)
    addresses = [rr.to_text() for rrset in reply.answer for rr in rrset if rrset.rdtype in (1, 28)]
    return {"rcode": dns.rcode.to_text(reply.rcode()), "addresses": addresses}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--source", default="127.0.0.1")
    parser.add_argument("--rest-api", action="store_true")
    args = parser.parse_args()
    wanted = FIRST_PARTY + TRACKERS + (REST_API if args.rest_api else [])
    print(json.dumps({f"{name} {rdtype}": resolve(args.server, args.port, args.source, name, rdtype)
                      for name, rdtype in wanted}))


if __name__ == "__main__":
    main()
