"""Helpers for the security suite: requests with a chosen source address, Host and Origin, against
any listener of a running dnsgate (the public API, the admin listener)."""

from __future__ import annotations

from typing import Any

import aiohttp

GRANT = {"categories": ["marketing"]}
TRACKER = "trackcmp.net"


async def request(url: str, method: str = "GET", *, source: str = "127.0.0.1", headers: dict[str, str] | None = None,
                  json: Any = None) -> tuple[int, Any]:
    """One HTTP request from `source`; the JSON body (or text) of the answer."""
    connector = aiohttp.TCPConnector(local_addr=(source, 0))
    async with aiohttp.ClientSession(connector=connector) as session, session.request(
            method, url, headers=headers or {}, json=json) as response:
        body = await response.json() if response.content_type == "application/json" else await response.text()
        return response.status, body
