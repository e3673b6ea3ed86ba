"""gateway.forwarded: X-Forwarded-For is believed only from configured proxies, right to left."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.forwarded import ForwardedForMiddleware, parse_networks


def seen_client(peer: str, xff: list[str], trusted: str) -> str:
    seen: dict[str, Any] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.update(scope)

    scope = {"type": "http", "client": (peer, 5555),
             "headers": [(b"x-forwarded-for", v.encode()) for v in xff]}
    asyncio.run(ForwardedForMiddleware(app, trusted=parse_networks(trusted))(scope, None, None))
    return str(seen["client"][0])


@pytest.mark.parametrize(("peer", "xff", "trusted", "client"), [
    ("127.0.0.1", ["203.0.113.9"], "", "127.0.0.1"),                      # nobody trusted
    ("198.51.100.4", ["203.0.113.9"], "10.0.0.0/8", "198.51.100.4"),      # peer is not a proxy
    ("10.0.0.5", ["203.0.113.9"], "10.0.0.0/8", "203.0.113.9"),           # one trusted hop
    ("10.0.0.5", ["6.6.6.6, 203.0.113.9, 10.0.0.7"], "10.0.0.0/8", "203.0.113.9"),  # rightmost untrusted
    ("10.0.0.5", ["6.6.6.6", "203.0.113.9"], "10.0.0.0/8", "203.0.113.9"),  # repeated headers
    ("10.0.0.5", ["not-an-address"], "10.0.0.0/8", "10.0.0.5"),          # garbage: the proxy itself
    ("::1", ["2001:db8::1"], "::1", "2001:db8::1"),
])
def test_forwarded_for(peer: str, xff: list[str], trusted: str, client: str) -> None:
    assert seen_client(peer, xff, trusted) == client


def test_a_bad_proxy_setting_is_refused() -> None:
    with pytest.raises(ValueError):
        parse_networks("10.0.0.0/8, nonsense")
