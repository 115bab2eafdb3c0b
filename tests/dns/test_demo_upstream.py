"""The built-in demo upstream (`dnsgate serve --demo-upstream`): every name gets a documentation
address, the same one each time; other types an empty answer."""

from __future__ import annotations

import ipaddress

import dns.asyncquery
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype

from dnsgate.dns import demo_upstream


async def test_every_name_gets_a_documentation_address() -> None:
    transport, port = await demo_upstream.start("127.0.0.1")
    try:
        async def ask(name: str, qtype: str, edns: bool = True) -> dns.message.Message:
            query = dns.message.make_query(name, qtype, use_edns=0 if edns else False)
            return await dns.asyncquery.udp(query, "127.0.0.1", port=port, timeout=3)

        seen = set()
        for name in ("trackcmp.net", "TrackCmp.NET.", "example.com", "prism.app-us1.com"):
            reply = await ask(name, "A")
            assert reply.rcode() == dns.rcode.NOERROR and reply.flags & dns.flags.AA
            (rrset,) = reply.answer
            assert rrset.name == dns.name.from_text(name) and rrset.ttl == 300
            (address,) = [ipaddress.ip_address(r.address) for r in rrset]
            assert address in ipaddress.ip_network("198.51.100.0/24")
            seen.add((name.lower().rstrip("."), address))
        assert len({a for n, a in seen if n == "trackcmp.net"}) == 1  # the same name, the same address
        (rrset,) = (await ask("trackcmp.net", "AAAA", edns=False)).answer
        assert all(ipaddress.ip_address(r.address) in ipaddress.ip_network("2001:db8::/32") for r in rrset)
        reply = await ask("example.com", "MX")
        assert reply.rcode() == dns.rcode.NOERROR and not reply.answer and reply.edns == 0
    finally:
        transport.close()
