"""Where records may send notifications (records/subscriptions/endpoints.py): https only (http to
loopback in development), never an address that is not globally routable unless a network is
allowed, names resolved and every address checked (what delivery connects to is the checked one)."""

from __future__ import annotations

import ipaddress

import pytest

from records.subscriptions import endpoints

NONE: tuple[endpoints.Network, ...] = ()


@pytest.mark.parametrize("url", [
    "https://10.1.2.3/hook", "https://192.168.0.7/hook", "https://172.16.5.5/hook", "https://169.254.169.254/latest",
    "https://[::1]/hook", "https://[fd00::1]/hook", "https://100.64.0.1/hook", "https://0.0.0.0/hook",
])
async def test_private_link_local_and_reserved_addresses_are_refused(url: str) -> None:
    with pytest.raises(endpoints.Refused):
        await endpoints.resolve(url, development=False, allowed=NONE)


@pytest.mark.parametrize("url", [
    "http://93.184.215.14/hook", "ftp://93.184.215.14/hook", "https://user:pw@93.184.215.14/hook",
    "https://93.184.215.14/hook#frag", "not a url", "https:///hook",
])
async def test_plain_http_and_odd_urls_are_refused(url: str) -> None:
    with pytest.raises(endpoints.Refused):
        await endpoints.resolve(url, development=True, allowed=NONE)


async def test_loopback_only_in_development_and_a_name_is_checked_by_its_addresses() -> None:
    target = await endpoints.resolve("http://127.0.0.1:8765/hook", development=True, allowed=NONE)
    assert target.address == ipaddress.ip_address("127.0.0.1")
    with pytest.raises(endpoints.Refused):
        await endpoints.resolve("http://127.0.0.1:8765/hook", development=False, allowed=NONE)
    # `localhost` is a name: it is resolved, and its loopback addresses are what gets checked
    with pytest.raises(endpoints.Refused):
        await endpoints.resolve("https://localhost/hook", development=False, allowed=NONE)


async def test_a_configured_network_is_allowed_and_public_addresses_pass() -> None:
    allowed = endpoints.networks("10.20.0.0/16, fd12::/16")
    target = await endpoints.resolve("https://10.20.3.4:8443/hook", development=False, allowed=allowed)
    assert str(target.address) == "10.20.3.4" and target.host == "10.20.3.4"
    with pytest.raises(endpoints.Refused):
        await endpoints.resolve("https://10.21.3.4/hook", development=False, allowed=allowed)
    public = await endpoints.resolve("https://93.184.215.14/hook", development=False, allowed=NONE)
    assert public.address.is_global
