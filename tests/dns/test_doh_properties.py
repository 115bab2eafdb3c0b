"""Property tests (hypothesis) of DNS-over-HTTPS request decoding, the caching lifetime and the client
behind a proxy: whatever arrives, a DNS query or the HTTP error a DoH client expects, never an
exception; GET and POST carry the same query; max-age never exceeds a TTL of the answer."""

from __future__ import annotations

import base64
import ipaddress

import dns.message
import dns.rcode
import dns.rrset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dnsgate.dns.https_listener import (
    MAX_MESSAGE,
    HttpError,
    b64url_decode,
    client_behind,
    decode_request,
    proxies,
    smallest_ttl,
)
from tests.dns.test_fuzz_properties import dns_packets
from tests.fuzz import checks

SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
STATUSES = {400, 404, 405, 413, 414, 415}


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@SETTINGS
@given(st.binary(max_size=2000))
def test_base64url_round_trip(raw: bytes) -> None:
    assert b64url_decode(b64url(raw)) == raw
    assert b64url_decode(base64.urlsafe_b64encode(raw).decode()) == raw  # padded, tolerated


@SETTINGS
@given(st.text(max_size=200))
def test_base64url_rejects_what_is_not(text: str) -> None:
    decoded = b64url_decode(text)
    alphabet = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    if not set(text.rstrip("=")) <= alphabet:
        assert decoded is None  # '+', '/', spaces, anything else: not base64url
    if decoded is not None:
        assert len(decoded) == len(text.rstrip("=")) * 3 // 4


@SETTINGS
@given(st.sampled_from(["GET", "POST", "PUT", "HEAD", "", "get", "\x00"]),
       st.one_of(st.text(max_size=300), st.builds(lambda q: "/dns-query?" + q, st.text(max_size=300))),
       st.one_of(st.none(), st.text(max_size=60), st.just("application/dns-message; charset=x")),
       st.binary(max_size=300))
def test_any_request_decodes_to_a_query_or_an_http_error(method: str, target: str, content_type: str | None,
                                                         body: bytes) -> None:
    result = decode_request(method, target, content_type, body)
    if isinstance(result, HttpError):
        assert result.status in STATUSES and result.reason
    else:
        assert method in ("GET", "POST") and len(result) >= 12 and not result[2] & 0x80


@SETTINGS
@given(dns_packets())
def test_get_and_post_carry_the_same_query(packet: bytes) -> None:
    got = decode_request("GET", "/dns-query?dns=" + b64url(packet), None, b"")
    posted = decode_request("POST", "/dns-query", "application/dns-message", packet)
    assert got == posted
    if len(packet) >= 12 and not packet[2] & 0x80:
        assert got == packet
    else:
        assert isinstance(got, HttpError) and got.status == 400


@SETTINGS
@given(st.integers(1, 100_000), st.binary(min_size=12, max_size=40))
def test_an_oversize_body_is_413(extra: int, head: bytes) -> None:
    body = head + bytes(MAX_MESSAGE + extra - len(head))
    result = decode_request("POST", "/dns-query", "application/dns-message", body)
    assert isinstance(result, HttpError) and result.status == 413


@SETTINGS
@given(st.binary(max_size=600))
def test_smallest_ttl_of_anything(reply: bytes) -> None:
    assert 0 <= smallest_ttl(reply) <= 2**31 - 1


@SETTINGS
@given(st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=8), st.booleans())
def test_max_age_is_the_smallest_answer_ttl(ttls: list[int], edns: bool) -> None:
    response = dns.message.make_response(dns.message.make_query("a.example.test", "A", use_edns=0 if edns else None))
    for i, ttl in enumerate(ttls):
        response.answer.append(dns.rrset.from_text(f"h{i}.example.test.", ttl, "IN", "A", "192.0.2.1"))
    assert smallest_ttl(response.to_wire()) == min(ttls)


@SETTINGS
@given(st.integers(0, 100_000), st.integers(0, 100_000), st.sampled_from([3, 0, 2]))
def test_a_negative_answer_lives_as_its_soa_says(ttl: int, minimum: int, rcode: int) -> None:
    response = dns.message.make_response(dns.message.make_query("a.example.test", "A"))
    response.set_rcode(dns.rcode.Rcode(rcode))
    response.authority.append(dns.rrset.from_text("example.test.", ttl, "IN", "SOA",
                                                  f"ns.example.test. host.example.test. 1 2 3 4 {minimum}"))
    assert smallest_ttl(response.to_wire()) == (min(ttl, minimum) if rcode in (0, 3) else 0)


addresses = st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str), st.text(max_size=20))


@SETTINGS
@given(st.ip_addresses().map(str), st.lists(st.lists(addresses, max_size=4).map(", ".join), max_size=3),
       st.booleans())
def test_the_client_behind_a_proxy(peer: str, forwarded: list[str], trust_peer: bool) -> None:
    trusted = proxies([peer] if trust_peer else ["192.0.2.0/24"])
    got = client_behind(peer, forwarded, trusted)
    peer_trusted = any(ipaddress.ip_address(peer) in n for n in trusted)
    if not peer_trusted or not any(a.strip() for h in forwarded for a in h.split(",")):
        assert got == peer  # nobody else's word is taken
    elif isinstance(got, str):
        ipaddress.ip_address(got)  # a trusted proxy names an address
    else:
        assert got.status == 400


@SETTINGS
@given(st.binary(max_size=400))
def test_the_fuzzers_doh_target(data: bytes) -> None:
    checks.run_one(PIPELINE, b"\xff" + data)


@SETTINGS
@given(dns_packets(), st.sampled_from(["GET", "POST"]))
def test_decoded_queries_are_answered_like_any_other(packet: bytes, method: str) -> None:
    if method == "GET":
        request = b"GET\n/dns-query?dns=" + b64url(packet).encode() + b"\n\n"
    else:
        request = b"POST\n/dns-query\napplication/dns-message\n" + packet
    checks.run_one(PIPELINE, b"\xff" + request)


PIPELINE = checks.pipeline()
