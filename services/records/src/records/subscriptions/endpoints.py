"""Where notifications may go. No outbound request goes to an address a client merely names
(DESIGN.md): a `channel.endpoint` must be

1. HTTPS; plain http only to a loopback address in development (the backport IG, channels.md
   "REST-Hook, Security Notes": production SHOULD refuse http endpoints);
2. registered for the subscriber's client at the gateway (`mindchart client create ...
   --subscription-endpoint URL`), compared exactly;
3. at a globally routable address, unless its network is allowed by configuration
   (MINDCHART_RECORDS_SUBSCRIPTION_ALLOW_NETWORKS). The name is resolved and every address checked
   when the subscription is made and again before every delivery, and the delivery connects to the
   address just checked (TLS still verifies the name), so a DNS answer that changes afterwards
   (DNS rebinding) cannot point the request anywhere else.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Refused(ValueError):
    """An endpoint notifications may not go to; the message is safe to show the subscriber."""


@dataclass(frozen=True)
class Target:
    url: str
    host: str
    address: IPAddress  # the checked address to connect to


def networks(allowed: str) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(n.strip(), strict=False) for n in allowed.split(",") if n.strip())


def check_url(url: str, *, development: bool) -> tuple[str, str]:
    """(scheme, host) of an acceptable URL shape, or Refused."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise Refused("channel.endpoint is not a valid URL") from None
    host = parts.hostname or ""
    if (
        parts.scheme not in ("https", "http")
        or not host
        or parts.username
        or parts.password
        or parts.fragment
        or (port is not None and not 0 < port < 65536)
    ):
        raise Refused("channel.endpoint must be an absolute https URL without credentials or fragment")
    if parts.scheme == "http" and not (development and _is_loopback_name(host)):
        raise Refused("channel.endpoint must use https (http only to loopback in development)")
    return parts.scheme, host


def _is_loopback_name(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def permitted(address: IPAddress, *, development: bool, allowed: tuple[Network, ...]) -> bool:
    if any(address in network for network in allowed):
        return True
    if address.is_loopback:
        return development
    return address.is_global and not address.is_multicast


async def resolve(url: str, *, development: bool, allowed: tuple[Network, ...]) -> Target:
    """The address to deliver `url` to, after checking every address its name resolves to."""
    scheme, host = check_url(url, development=development)
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        addresses = [literal]
    else:
        port = urlsplit(url).port or (443 if scheme == "https" else 80)
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            raise Refused("channel.endpoint's host name does not resolve") from None
        addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    if not addresses or not all(permitted(a, development=development, allowed=allowed) for a in addresses):
        raise Refused("channel.endpoint resolves to a private, reserved or loopback address")
    if scheme == "http" and not all(a.is_loopback for a in addresses):
        raise Refused("channel.endpoint must use https (http only to loopback in development)")
    return Target(url, host, addresses[0])


def registered(url: str, endpoints: list[str]) -> bool:
    return url in endpoints
