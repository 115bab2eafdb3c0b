"""The API's boundaries against pages in the visitor's browser and other listeners: a DNS-rebound
`Host`, foreign origins (IP literals, other ports and schemes), and admin endpoints reached through
another address on the same port."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from dnsgate.config import PortalConfig
from tests.conftest import TOKEN, Gate, make_config, running_gate
from tests.security.helpers import GRANT, request
from tests.support.consent_fixtures import KIOSK, FakeClock, consent_config
from tests.support.stub_upstream import StubUpstream

SITE = "https://shop.example"


@pytest.fixture
async def gate(upstream: StubUpstream, data_dir: Path) -> AsyncIterator[Gate]:
    base = make_config(upstream, data_dir)
    cfg = consent_config(replace(base, api=replace(base.api, allowed_origins=(SITE,))))
    async with running_gate(cfg, wall=FakeClock()) as g:
        yield g


@pytest.fixture
async def named_gate(upstream: StubUpstream, data_dir: Path) -> AsyncIterator[Gate]:
    """dnsgate also known as dnsgate.lan (api.hosts: a name a proxy or the LAN's own DNS gives it)."""
    base = make_config(upstream, data_dir)
    async with running_gate(replace(base, api=replace(base.api, hosts=("dnsgate.lan",)))) as g:
        yield g


READS = ["/v1/whoami", "/v1/consent", "/v1/consent/status", "/", "/healthz", "/metrics", "/openapi.json",
         "/no/such/page"]


@pytest.mark.parametrize("path", READS)
async def test_a_rebound_host_is_refused_before_routing(gate: Gate, path: str) -> None:
    """A page on attacker.example whose name the attacker re-points at dnsgate reads nothing."""
    port = gate.running.api.port
    status, body = await request(gate.api_url + path, headers={"Host": f"attacker.example:{port}"})
    assert status == 421 and body["error"]["code"] == "misdirected_request"


@pytest.mark.parametrize("host", ["attacker.example", "consent.dnsgate.internal.evil.example",
                                  "localhost.evil.example", "dnsgate", "1.2.3.4.nip.io", "127.0.0.1.attacker.example"])
async def test_hosts_that_are_not_dnsgate(gate: Gate, host: str) -> None:
    status, _ = await request(gate.api_url + "/v1/whoami", headers={"Host": f"{host}:{gate.running.api.port}"})
    assert status == 421


# An IP literal cannot be re-pointed by DNS, and behind a port mapping the address a browser used
# is not the socket's: any address is taken as Host (Origins are another matter: below).
@pytest.mark.parametrize("host", ["consent.dnsgate.internal", "CONSENT.dnsgate.internal.", "localhost", "127.0.0.1",
                                  "198.51.100.7", "[::1]"])
async def test_hosts_that_are_dnsgate(gate: Gate, host: str) -> None:
    status, _ = await request(gate.api_url + "/v1/whoami", headers={"Host": f"{host}:{gate.running.api.port}"})
    assert status == 200


async def test_behind_a_port_mapping_the_configured_address_is_an_origin(upstream: StubUpstream,
                                                                        data_dir: Path) -> None:
    """Docker with -p: people open the host's address, which is not the container's."""
    base = make_config(upstream, data_dir)
    async with running_gate(replace(base, portal=PortalConfig(addresses=("192.0.2.80",)))) as g:
        port = g.running.api.port
        for origin, expected in ((f"http://192.0.2.80:{port}", 200), (f"http://192.0.2.81:{port}", 403)):
            status, _ = await g.http("PUT", "/v1/consent", json=GRANT, headers={"Origin": origin})
            assert status == expected, origin


async def test_configured_host_names(named_gate: Gate) -> None:
    port = named_gate.running.api.port
    assert (await request(named_gate.api_url + "/v1/whoami", headers={"Host": f"dnsgate.lan:{port}"}))[0] == 200
    assert (await request(named_gate.api_url + "/", headers={"Host": f"dnsgate.lan.evil.example:{port}"}))[0] == 421
    origin = {"Origin": f"http://dnsgate.lan:{port}"}
    assert (await named_gate.http("PUT", "/v1/consent", json=GRANT, headers=origin))[0] == 200


def refused_origins(port: int) -> list[str]:
    return [f"http://203.0.113.9:{port}", f"http://127.0.0.2:{port}", f"http://[::1]:{port}",
            "http://localhost:9999", "http://consent.dnsgate.internal:9999", f"https://consent.dnsgate.internal:{port}",
            "http://consent.dnsgate.internal", f"http://127.0.0.1:{port + 1}",
            "https://evil.example", "null"]


async def test_foreign_origins_change_nothing(gate: Gate) -> None:
    port = gate.running.api.port
    for origin in refused_origins(port):
        status, body = await gate.http("PUT", "/v1/consent", json=GRANT, headers={"Origin": origin})
        assert status == 403 and body["error"]["code"] == "origin_refused", origin
    assert (await gate.http("GET", "/v1/consent"))[1]["choice"] is None


async def test_a_foreign_page_cannot_end_a_kiosk_session(gate: Gate) -> None:
    kiosk = KIOSK + "30"
    assert (await gate.http("PUT", "/v1/consent", source=kiosk, json=GRANT))[0] == 200
    for origin in refused_origins(gate.running.api.port):
        status, _ = await gate.http("POST", "/v1/session/end", source=kiosk, headers={"Origin": origin})
        assert status == 403, origin
    assert (await gate.http("GET", "/v1/consent", source=kiosk))[1]["choice"] is not None


async def test_dnsgates_own_origins_and_listed_ones_may_change_consent(gate: Gate) -> None:
    port = gate.running.api.port
    for origin in [f"http://127.0.0.1:{port}", f"http://localhost:{port}", f"http://consent.dnsgate.internal:{port}",
                   SITE]:
        status, _ = await gate.http("PUT", "/v1/consent", json=GRANT, headers={"Origin": origin})
        assert status == 200, origin


def _free_port_on(*hosts: str) -> int:
    """A TCP port free on every one of `hosts` (checked by binding them all)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((hosts[0], 0))
            port = int(probe.getsockname()[1])
        sockets = []
        try:
            for host in hosts:
                s = socket.socket()
                sockets.append(s)
                s.bind((host, port))
            return port
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no common free port")


async def test_admin_endpoints_answer_only_on_the_admin_address(upstream: StubUpstream, data_dir: Path) -> None:
    """api.listen and api.admin_listen on the same port of two addresses: the port alone tells nothing."""
    port = _free_port_on("127.0.0.1", "127.0.0.2")
    base = make_config(upstream, data_dir)
    cfg = replace(base, api=replace(base.api, listen=f"127.0.0.1:{port}", admin_listen=f"127.0.0.2:{port}"))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with running_gate(cfg) as g:
        for path in ("/v1/clients", "/v1/queries", "/v1/audit"):
            status, body = await request(f"http://127.0.0.1:{port}{path}", headers=auth)
            assert status == 404 and body["error"]["code"] == "not_found", path
            assert (await request(f"http://127.0.0.2:{port}{path}", headers=auth))[0] == 200, path
        assert g.running.admin is not None and g.running.admin.host == "127.0.0.2"


async def test_only_dnsgates_own_page_gets_cors_for_a_change(gate: Gate) -> None:
    """The portal records a choice through the device's other address family too: the page's origin
    is then another of dnsgate's. That, and nothing wider, may make the change cross-origin."""
    port = gate.running.api.port
    own = f"http://consent.dnsgate.internal:{port}"
    for path, method in (("/v1/consent", "PUT"), ("/v1/session/end", "POST")):
        status, _ = await request(gate.api_url + path, "OPTIONS", headers={
            "Origin": own, "Access-Control-Request-Method": method, "Access-Control-Request-Headers": "content-type"})
        assert status == 204, path
        for origin in [SITE, *refused_origins(port)]:  # allow-listed sites included: they get no CORS
            status, _ = await request(gate.api_url + path, "OPTIONS", headers={
                "Origin": origin, "Access-Control-Request-Method": method})
            assert status == 403, (path, origin)
    headers = await _headers(gate, "PUT", {"Origin": own})
    assert headers["Access-Control-Allow-Origin"] == own and "Origin" in headers["Vary"]
    assert "Access-Control-Allow-Origin" not in await _headers(gate, "PUT", {"Origin": SITE})
    assert "Access-Control-Allow-Origin" not in await _headers(gate, "PUT", {})


async def _headers(g: Gate, method: str, headers: dict[str, str]) -> dict[str, str]:
    async with aiohttp.ClientSession() as session, session.request(
            method, g.api_url + "/v1/consent", json=GRANT, headers=headers) as response:
        assert response.status == 200
        return dict(response.headers)
