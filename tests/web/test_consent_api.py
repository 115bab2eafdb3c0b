"""The consent API over real HTTP: validation, authorization, origins, audit trail."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import dns.rcode
import pytest

from tests.conftest import Gate

GRANT = {"categories": ["marketing"]}


def stored(data_dir: Path) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    with sqlite3.connect(data_dir / "consent.sqlite3") as db:
        choices = db.execute("SELECT address, categories FROM choices ORDER BY address").fetchall()
        events = db.execute("SELECT client, action, categories, source FROM events ORDER BY id").fetchall()
    return choices, events


async def test_get_own_state_before_and_after(gate: Gate) -> None:
    status, body = await gate.http("GET", "/v1/consent", source="127.0.0.7")
    assert status == 200
    assert body["client"] == "127.0.0.7" and body["categories"] == {} and body["choice"] is None
    (vendor,) = body["vendors"]
    assert {k: vendor[k] for k in ("id", "name", "category", "allowed")} == {
        "id": "activecampaign", "name": "ActiveCampaign", "category": "marketing", "allowed": False}
    assert "no choice recorded" in vendor["reason"]
    status, body = await gate.http("PUT", "/v1/consent", source="127.0.0.7", json=GRANT,
                                   headers={"User-Agent": "kiosk/1.0"})
    assert status == 200
    marketing = body["categories"]["marketing"]
    assert marketing["granted"] is True and marketing["source"] == "self"
    assert marketing["granted_at"].endswith("Z") and marketing["expires_at"] > marketing["granted_at"]
    assert body["vendors"][0]["allowed"] is True
    status, again = await gate.http("GET", "/v1/consent", source="127.0.0.7")
    assert again == {k: v for k, v in body.items() if k != "pairing"}


async def test_audit_trail_records_grant_and_withdrawal(gate: Gate, data_dir: Path) -> None:
    await gate.http("PUT", "/v1/consent", source="127.0.0.7", json=GRANT, headers={"User-Agent": "kiosk/1.0"})
    await gate.http("DELETE", "/v1/consent", source="127.0.0.7")
    await gate.http("PUT", "/v1/clients/127.0.0.8/consent", json=GRANT, admin=True)
    choices, events = stored(data_dir)
    # a withdrawal is a recorded choice too: every category refused (Analytics lists nothing here, so
    # no choice records anything for it)
    assert choices == [("127.0.0.7", '{"marketing": false}'), ("127.0.0.8", '{"marketing": true}')]
    assert events == [
        ("127.0.0.7", "grant", '["marketing"]', "self"),
        ("127.0.0.7", "withdrawal", "[]", "self"),
        ("127.0.0.8", "grant", '["marketing"]', "admin"),
    ]
    status, body = await gate.http("GET", "/v1/audit?client=127.0.0.7", admin=True)
    assert status == 200
    assert [e["action"] for e in body["events"]] == ["withdrawal", "grant"]
    assert body["events"][1]["user_agent"] == "kiosk/1.0"


async def test_audit_trail_is_append_only(gate: Gate, data_dir: Path) -> None:
    await gate.http("PUT", "/v1/consent", json=GRANT)
    with sqlite3.connect(data_dir / "consent.sqlite3") as db:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            db.execute("UPDATE events SET action = 'forged'")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            db.execute("DELETE FROM events")


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "code", "field"),
    [
        ("PUT", "/v1/consent", {"data": b"{not json", "headers": {"Content-Type": "application/json"}},
         400, "bad_json", None),
        ("PUT", "/v1/consent", {"data": b"[1]", "headers": {"Content-Type": "application/json"}},
         400, "bad_json", None),
        ("PUT", "/v1/consent", {"data": b"\xff\xfe", "headers": {"Content-Type": "application/json"}},
         400, "bad_json", None),
        ("PUT", "/v1/consent", {"json": {"categories": ["marketing", "spying"]}}, 400, "invalid_field",
         "categories[1]"),
        ("PUT", "/v1/consent", {"json": {"categories": "marketing"}}, 400, "invalid_field", "categories"),
        ("PUT", "/v1/consent", {"json": {"categories": ["marketing"], "days": 9999}}, 400, "invalid_field", "days"),
        ("PUT", "/v1/consent", {"json": {"categories": ["marketing"], "client": "1.2.3.4"}}, 400, "invalid_field",
         "client"),
        ("PUT", "/v1/consent", {"data": b"categories=marketing",
                                "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
         415, "unsupported_media_type", None),
        ("PUT", "/v1/consent", {"json": GRANT, "headers": {"Origin": "https://evil.example"}},
         403, "origin_refused", None),
        ("DELETE", "/v1/consent", {"headers": {"Origin": "http://rebound.example:8053"}}, 403, "origin_refused", None),
        ("PUT", "/v1/consent", {"data": b"x" * 20000, "headers": {"Content-Type": "application/json"}},
         413, "body_too_large", None),
        ("GET", "/v1/clients", {}, 401, "unauthorized", None),
        ("GET", "/v1/clients", {"headers": {"Authorization": "Bearer wrong"}}, 401, "unauthorized", None),
        ("PUT", "/v1/clients/127.0.0.9/consent", {"json": GRANT}, 401, "unauthorized", None),
        ("DELETE", "/v1/clients/127.0.0.9/consent", {"headers": {"Authorization": "Basic eDp5"}}, 401,
         "unauthorized", None),
        ("GET", "/v1/audit", {}, 401, "unauthorized", None),
        ("GET", "/v1/nothing-here", {}, 404, "not_found", None),
    ],
)
async def test_bad_requests_change_nothing(gate: Gate, data_dir: Path, method: str, path: str,
                                           kwargs: dict[str, object], status: int, code: str,
                                           field: str | None) -> None:
    await gate.http("PUT", "/v1/consent", source="127.0.0.1", json=GRANT)
    before = stored(data_dir)
    got, body = await gate.http(method, path, **kwargs)  # type: ignore[arg-type]
    assert got == status
    assert body["error"]["code"] == code and body["error"]["status"] == status and body["error"]["message"]
    assert body["error"].get("field") == field
    assert stored(data_dir) == before
    assert (await gate.query("trackcmp.net")).rcode() == dns.rcode.NOERROR  # the earlier grant still holds


@pytest.mark.parametrize("ip", ["not-an-ip", "999.1.1.1", "127.0.0.1%25eth0x"])
async def test_admin_bad_ip_is_400(gate: Gate, ip: str) -> None:
    status, body = await gate.http("PUT", f"/v1/clients/{ip}/consent", json=GRANT, admin=True)
    assert status == 400 and body["error"]["field"] == "client"


@pytest.mark.parametrize("origin_of", ["api", "localhost", "portal"])
async def test_dnsgate_own_origins_may_change_consent(gate: Gate, origin_of: str) -> None:
    port = gate.running.api.port  # exactly as served: the API's port (tests/security: anything else is refused)
    origin = {"api": gate.api_url, "localhost": f"http://localhost:{port}",
              "portal": f"http://consent.dnsgate.internal:{port}"}[origin_of]
    status, _ = await gate.http("PUT", "/v1/consent", json=GRANT, headers={"Origin": origin})
    assert status == 200


async def test_allow_listed_origin(upstream: object, data_dir: Path) -> None:
    from dataclasses import replace

    from dnsgate.config import ApiConfig
    from tests.conftest import TOKEN, make_config, running_gate

    cfg = make_config(upstream, data_dir,  # type: ignore[arg-type]
                      api=replace(ApiConfig(listen="127.0.0.1:0", admin_token=TOKEN),
                                  allowed_origins=("https://shop.example",)))
    async with running_gate(cfg) as g:
        assert (await g.http("PUT", "/v1/consent", json=GRANT, headers={"Origin": "https://shop.example"}))[0] == 200
        assert (await g.http("PUT", "/v1/consent", json=GRANT, headers={"Origin": "https://shop.example.evil"}))[0] \
            == 403


async def test_admin_lists_clients(gate: Gate) -> None:
    await gate.http("PUT", "/v1/consent", source="127.0.0.21", json=GRANT)
    await gate.http("PUT", "/v1/clients/::1/consent", json=GRANT, admin=True)
    status, body = await gate.http("GET", "/v1/clients", admin=True)
    assert status == 200
    assert {c["client"] for c in body["clients"]} == {"127.0.0.21", "::1"}
    status, body = await gate.http("GET", "/v1/clients/127.0.0.21/consent", admin=True)
    assert status == 200 and body["vendors"][0]["allowed"] is True


async def test_empty_category_list_withdraws(gate: Gate) -> None:
    await gate.http("PUT", "/v1/consent", json=GRANT)
    status, body = await gate.http("PUT", "/v1/consent", json={"categories": []})
    assert status == 200 and body["categories"] == {}
    assert (await gate.query("trackcmp.net")).rcode() == dns.rcode.NXDOMAIN


async def test_vendors_and_health(gate: Gate) -> None:
    status, body = await gate.http("GET", "/v1/vendors")
    assert status == 200
    (vendor,) = body["vendors"]
    assert vendor["id"] == "activecampaign" and vendor["tcf_purposes"] == [1, 3, 4, 7]
    assert {d["pattern"] for d in vendor["domains"]} == {"trackcmp.net", "app-us1.com", "*.api-us1.com"}
    assert vendor["cookies"] and vendor["data_collected"] and vendor["recipients"]
    status, health = await gate.http("GET", "/healthz")
    assert status == 200 and health["status"] == "ok" and health["dns"] == [str(gate.running.dns[0])]
