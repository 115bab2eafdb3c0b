"""A DNS listener on `[::]` answers IPv4 clients over TCP as it does over UDP (IPv4-mapped), so a
truncated UDP answer can be retried."""

from __future__ import annotations

from pathlib import Path

import dns.asyncquery
import dns.message
import dns.rcode
import pytest

from dnsgate.config import DnsConfig
from tests.conftest import ipv6_loopback, make_config, running_gate
from tests.support.stub_upstream import StubUpstream


@pytest.mark.skipif(not ipv6_loopback(), reason="IPv6 is not configured on this machine")
async def test_ipv4_clients_of_a_dual_stack_listener_get_tcp_answers(upstream: StubUpstream, data_dir: Path) -> None:
    cfg = make_config(upstream, data_dir, dns=DnsConfig(listen=("[::]:0",)))
    async with running_gate(cfg) as g:
        port = g.dns_port
        q = dns.message.make_query("host.example.test", "A")
        for tcp in (False, True):
            send = dns.asyncquery.tcp if tcp else dns.asyncquery.udp
            for server, source in (("127.0.0.1", "127.0.0.1"), ("::1", "::1")):
                reply = await send(q, server, port=port, source=source, timeout=3.0)
                assert reply.rcode() == dns.rcode.NOERROR and reply.answer, (tcp, server)
