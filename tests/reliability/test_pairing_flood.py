"""Pairing tokens under a flood of addresses, short (the full run: `python -m
tests.reliability.pairing_flood`, 2 600 addresses x 4 changes): after the flood, another device's
"Reject all" carries a token and reaches its other address. (The bound the full run once hit is
proven at its own size by tests/security/test_pairing_tokens.py.)"""

from __future__ import annotations

from tests.reliability.pairing_flood import run


async def test_a_flood_of_addresses_leaves_another_device_its_token() -> None:
    assert await run(addresses=150, changes=4) == 0
