"""Which address a request comes from: the TCP peer, unless that peer is a proxy this gateway is
configured to trust (`trusted_proxies`), and then the address it reports in `X-Forwarded-For`.

The address feeds the audit record (BALP `agent.network`, 45 CFR 164.312(b)) and the token
endpoint's per-address rate limit, so a client must not choose it. uvicorn's own proxy-header
handling trusts any local peer by default; the stack and the images turn it off
(`--no-proxy-headers`, `UVICORN_PROXY_HEADERS=false`) and this middleware decides instead.

X-Forwarded-For is read right to left (each proxy appends the peer it saw): trusted proxies are
skipped and the first address that is not one is the client (MDN "X-Forwarded-For": the
rightmost untrusted entry is the one a trusted proxy vouches for). Pure ASGI.
"""

from __future__ import annotations

import ipaddress
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(text: str) -> tuple[Network, ...]:
    """`10.0.0.5, 10.1.0.0/16, ::1`: addresses or CIDR blocks; ValueError if one is neither."""
    return tuple(ipaddress.ip_network(part.strip(), strict=False)
                 for part in text.split(",") if part.strip())


def _trusted(address: str, networks: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def resolve_client(scope: dict[str, Any], trusted: tuple[Network, ...]) -> dict[str, Any]:
    """`scope`, or a copy whose `client` is the address a trusted peer reports."""
    peer = scope.get("client")
    if peer and _trusted(str(peer[0]), trusted):
        hops = [h.strip() for raw in (v for k, v in scope.get("headers", []) if k == b"x-forwarded-for")
                for h in raw.decode("latin-1").split(",") if h.strip()]
        for hop in reversed(hops):
            if not _trusted(hop, trusted):
                try:
                    ipaddress.ip_address(hop)
                except ValueError:
                    break  # garbage in the header: keep the proxy's own address
                return {**scope, "client": (hop, 0)}
    return scope


class ForwardedForMiddleware:
    def __init__(self, app: Any, *, trusted: tuple[Network, ...]) -> None:
        self.app = app
        self.trusted = trusted

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket") and self.trusted:
            scope = resolve_client(scope, self.trusted)
        await self.app(scope, receive, send)
