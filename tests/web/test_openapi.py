"""/openapi.json matches the real API: it names exactly the routes the server has, and schemathesis,
run against a live dnsgate, finds no answer that contradicts it.

Schemathesis checks every documented operation (examples, coverage, fuzzing and stateful phases)
for server errors, undocumented status codes and content types, responses that break their schema,
requests outside the schema that are accepted anyway, and admin routes that work without the
token. Two of its checks do not apply: `positive_data_acceptance` (the API validates meaning the
schema cannot express, such as "an IP address" or "a time"), and the REST resource-lifecycle
checks (`use_after_free`, `ensure_resource_availability`): a client's consent state always exists,
and DELETE withdraws consent rather than deleting the state. /v1/events is an endless event stream;
tests/web/test_observe_api.py tests it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from dnsgate.config import PortalConfig
from tests.conftest import TOKEN, Gate, make_config, running_gate
from tests.support.consent_fixtures import consent_config
from tests.support.stub_upstream import StubUpstream

METHODS = ("get", "put", "post", "delete", "patch", "options", "head")
SCHEMATHESIS = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis")
SEED = os.environ.get("DNSGATE_SCHEMATHESIS_SEED", "20261128")


async def test_document_names_exactly_the_routes_the_server_has(gate: Gate) -> None:
    status, document = await gate.http("GET", "/openapi.json")
    assert status == 200 and document["openapi"].startswith("3.")
    documented = {f"{method.upper()} {path}" for path, item in document["paths"].items()
                  for method in item if method in METHODS}
    assert documented == set(gate.running.routes)
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                assert operation["responses"], f"{method} {path}"
                assert operation.get("summary"), f"{method} {path}"
                if operation.get("security"):  # every admin operation documents the 401
                    assert "401" in operation["responses"], f"{method} {path}"


async def test_document_follows_the_catalog(gate: Gate) -> None:
    _, document = await gate.http("GET", "/openapi.json")
    request = document["components"]["schemas"]["ChoiceRequest"]["properties"]
    assert request["categories"]["items"]["enum"] == ["marketing", "analytics"]
    assert request["vendors"]["propertyNames"]["enum"] == ["activecampaign"]
    assert request["days"]["maximum"] == gate.cfg.consent.max_days


@pytest.mark.timeout(300)
@pytest.mark.skipif(SCHEMATHESIS is None, reason="schemathesis is not installed (pip install -e '.[test]')")
async def test_schemathesis_finds_no_disagreement(upstream: StubUpstream, data_dir: Path) -> None:
    cfg = consent_config(make_config(upstream, data_dir))
    cfg = replace(cfg, portal=PortalConfig(captive=True, cors_origins=("https://shop.example",)))
    async with running_gate(cfg) as gate:
        assert SCHEMATHESIS is not None
        process = await asyncio.create_subprocess_exec(
            SCHEMATHESIS, "run", f"{gate.api_url}/openapi.json",
            "--header", f"Authorization: Bearer {TOKEN}",
            "--checks", "all",
            "--exclude-checks", "positive_data_acceptance,use_after_free,ensure_resource_availability",
            "--exclude-path", "/v1/events",
            "--max-examples", "15", "--request-timeout", "5", "--max-response-time", "5",
            "--seed", SEED, "--workers", "1", "--no-color",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "SCHEMATHESIS_HOOKS": "", "HOME": str(data_dir.parent)})
        try:
            output, _ = await asyncio.wait_for(process.communicate(), timeout=240)
        except TimeoutError:
            process.kill()  # the one process this test started
            await process.wait()
            raise
        text = output.decode(errors="replace")
        assert process.returncode == 0, text[-12000:]
        assert "Tested: 30" in text or "Tested:" in text
        # The server stayed healthy and consistent through it all.
        status, health = await gate.http("GET", "/healthz")
        assert status == 200 and health["status"] == "ok"
