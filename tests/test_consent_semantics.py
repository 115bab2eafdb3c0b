"""What a person's choice means for each kind of network, over real sockets: why a name is blocked
(the EDE text), how long a choice lasts per profile, Global Privacy Control on every request, and
exports that no spreadsheet can be made to run.

dnsgate runs in-process on loopback with a fake wall clock; profiles by network as in
tests/consent_fixtures.py (127.0.1.0/24 opt-out, 127.0.2.0/24 kiosk, 127.0.3.0/24 deny,
127.0.4.0/24 allow, else opt-in).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import dns.edns
import dns.message
import dns.rcode
import pytest

from tests.conftest import Gate, make_config, running_gate
from tests.consent_fixtures import DENY, OPT_OUT, PIXEL, FakeClock, consent_config, two_vendor_catalog
from tests.stub_upstream import StubUpstream

DAY = 86_400.0
TRACKER = "trackcmp.net"
GPC = {"Sec-GPC": "1"}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def catalog(tmp_path: Path) -> Path:
    return two_vendor_catalog(tmp_path)


@pytest.fixture
async def gate(upstream: StubUpstream, data_dir: Path, catalog: Path, clock: FakeClock) -> AsyncIterator[Gate]:
    upstream.add(PIXEL, f"{PIXEL}. 300 IN A 198.51.100.9")
    cfg = consent_config(make_config(upstream, data_dir), catalog=catalog)
    async with running_gate(cfg, lambda: cfg, wall=clock) as g:
        yield g


async def blocked_because(g: Gate, source: str, name: str = TRACKER) -> str:
    """The EDE text of a sinkholed answer, the same on the first query and the memoized path after it."""
    texts = set()
    for _ in range(2):
        reply = await g.query(name, source=source, use_edns=0)
        assert reply.rcode() == dns.rcode.NXDOMAIN
        (ede,) = [o for o in reply.options if isinstance(o, dns.edns.EDEOption)]
        assert ede.code == dns.edns.EDECode.BLOCKED
        texts.add(ede.text or "")
    (text,) = texts
    return text


def new_catalog_version(path: Path) -> None:
    path.write_text(path.read_text().replace('version = "', 'version = "9', 1), encoding="utf-8")


# -- why a name is blocked ---------------------------------------------------------------------


async def test_the_ede_says_no_consent_only_where_consenting_would_help(gate: Gate, catalog: Path) -> None:
    undecided, refused, gpc, deny, stale = "127.0.0.80", "127.0.0.81", OPT_OUT + "80", DENY + "80", "127.0.0.82"
    assert await blocked_because(gate, undecided) == \
        "ActiveCampaign (activecampaign) is blocked: no consent for category 'marketing'"

    # granted and resolved first, so the refusal meets a cached answer
    assert (await gate.http("PUT", "/v1/consent", source=refused, json={"categories": ["marketing"]}))[0] == 200
    assert (await gate.query(TRACKER, source=refused, use_edns=0)).rcode() == dns.rcode.NOERROR
    assert (await gate.http("PUT", "/v1/consent", source=refused, json={"categories": []}))[0] == 200
    text = await blocked_because(gate, refused)
    assert text == ("ActiveCampaign (activecampaign) is blocked: refused in the consent choice that applies to "
                    "this client")

    assert (await gate.query(TRACKER, source=gpc)).rcode() == dns.rcode.NOERROR  # opt-out: allowed until...
    await gate.http("GET", "/v1/consent", source=gpc, headers=GPC)
    assert await blocked_because(gate, gpc) == \
        "ActiveCampaign (activecampaign) is blocked: opted out of sale/sharing by Global Privacy Control (Sec-GPC)"

    assert await blocked_because(gate, deny) == \
        "ActiveCampaign (activecampaign) is blocked: this network's policy never lets trackers resolve (profile deny)"

    # a grant made under the notice before a catalog change: choosing again helps, and the text says so
    assert (await gate.http("PUT", "/v1/consent", source=stale, json={"categories": ["marketing"]}))[0] == 200
    assert (await gate.query(TRACKER, source=stale)).rcode() == dns.rcode.NOERROR
    new_catalog_version(catalog)
    assert (await gate.http("POST", "/v1/reload", admin=True))[0] == 200
    assert await blocked_because(gate, stale) == ("ActiveCampaign (activecampaign) is blocked: the consent notice "
                                                  "changed since category 'marketing' was granted; choose again")
