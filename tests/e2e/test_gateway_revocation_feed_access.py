"""Who may read the gateway's revocation feed (gateway/revocations.py, "Who may read the feed"):
only callers presenting the deployment's feed secret, i.e. records and psychnotes. Anyone else is
refused with 401 and a Bearer challenge (RFC 6750 §3) before anything is held, so a flood of
unauthenticated long polls neither waits out its `wait` nor takes the slots the backends' own
requests are held in."""

from __future__ import annotations

import asyncio

import httpx

from mindchart_core import tokens
from tests.conftest import RunningStack

FLOOD = 300  # more than revocations.MAX_HELD (256): enough to fill every held slot


def _secret(live: RunningStack) -> str:
    """The development feed secret the stack's services share (under its data dir)."""
    return tokens.feed_secret("", data_dir=live.config.data_dir, production=False)


def test_the_feed_refuses_callers_without_the_feed_secret(live: RunningStack) -> None:
    feed = f"{live.gateway_url}/oauth/revocations"
    anonymous = httpx.get(feed, timeout=30)
    assert anonymous.status_code == 401
    assert anonymous.json()["resourceType"] == "OperationOutcome"
    assert anonymous.headers["www-authenticate"].startswith("Bearer")
    assert "error=" not in anonymous.headers["www-authenticate"]  # §3.1: no credentials, no code
    for wrong in ("Bearer not-the-secret", f"Bearer {_secret(live)}x", f"Basic {_secret(live)}"):
        refused = httpx.get(feed, headers={"Authorization": wrong}, timeout=30)
        assert refused.status_code == 401, wrong
        assert refused.json()["issue"][0]["diagnostics"] in (
            "The revocation feed is for Mindchart's own services", "A bearer token is required")
        assert "revoked" not in refused.json()
    # A caller's access token (here: none valid) is not the feed secret either: only records and
    # psychnotes are answered, and they are (records answers this read only while it follows it).
    allowed = httpx.get(feed, headers={"Authorization": f"Bearer {_secret(live)}"}, timeout=30)
    assert allowed.status_code == 200 and set(allowed.json()) == {"revoked", "newest", "cursor"}


def test_an_unauthenticated_flood_is_not_held_and_cannot_starve_a_backend(live: RunningStack) -> None:
    """FLOOD long polls asking to be held 25 s, without the secret: each is refused at once (a
    held one would outlast the client's 10 s timeout and fail here), and a backend's own request
    made in the middle of the flood is still held (a full house would answer it at once with
    nothing new, and its backend would fall back to polling) until its wait ends."""
    feed = f"{live.gateway_url}/oauth/revocations"
    backend = {"Authorization": f"Bearer {_secret(live)}"}
    cursor = httpx.get(feed, headers=backend, timeout=30).json()["cursor"]

    async def scenario() -> tuple[list[int], bool, httpx.Response]:
        limits = httpx.Limits(max_connections=FLOOD + 10, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=10, limits=limits) as attacker, \
                httpx.AsyncClient(timeout=30) as records:
            flood = [asyncio.ensure_future(attacker.get(feed, params={"cursor": cursor, "wait": "25"}))
                     for _ in range(FLOOD)]
            await asyncio.sleep(0)  # the flood is on its way
            held = asyncio.ensure_future(
                records.get(feed, params={"cursor": cursor, "wait": "4"}, headers=backend))
            statuses = [r.status_code for r in await asyncio.gather(*flood)]
            still_held = not held.done()
            return statuses, still_held, await held

    statuses, still_held, answer = asyncio.run(scenario())
    assert statuses == [401] * FLOOD
    assert still_held
    assert answer.status_code == 200 and answer.json()["cursor"] == cursor
