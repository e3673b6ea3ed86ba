"""Several gateway replicas on one datastore: a token revoked at one is refused by the other within
the revocation refresh interval (`MINDCHART_GATEWAY_REVOCATION_REFRESH_SECONDS`), both append to
one audit chain that still verifies, and synced rate-limit windows share one budget."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from pymongo import AsyncMongoClient

from gateway import ratelimit
from tests.actors import create_user, register_app, run_cli, smart_login
from tests.conftest import RunningStack
from tests.replicas import Replica, running

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def replica(live: RunningStack) -> Iterator[str]:
    """A second gateway process: same datastore, same public URL (so the same issuer)."""
    second = Replica("gateway", "gateway-replica", {"MINDCHART_GATEWAY_REVOCATION_REFRESH_SECONDS": "1"})
    with running(live, second):
        yield second.url


def _read(base: str, token: str) -> int:
    return httpx.get(f"{base}/fhir/Patient", params={"_count": "1"},
                     headers={"Authorization": f"Bearer {token}"}, timeout=30).status_code


def test_revoked_token_is_refused_by_every_replica(live: RunningStack, replica: str) -> None:
    suffix = uuid.uuid4().hex[:6]
    app, user = f"replica-app-{suffix}", f"replica-user-{suffix}"
    register_app(live.cli_env, app, "user/Patient.rs openid fhirUser")
    create_user(live.cli_env, user, PASSWORD, "practitioner", f"Practitioner/p-{suffix}")
    token = smart_login(live.gateway_url, client_id=app, username=user, password=PASSWORD,
                        scope="user/Patient.rs", aud=live.fhir)["access_token"]
    assert _read(live.gateway_url, token) == 200
    assert _read(replica, token) == 200

    revoked = httpx.post(f"{live.gateway_url}/oauth/revoke", data={"token": token, "client_id": app})
    assert revoked.status_code == 200
    # The replica that revoked refuses at once; the other once it has refreshed its list.
    assert _read(live.gateway_url, token) == 401
    deadline = time.monotonic() + 10
    status = _read(replica, token)
    while status != 401 and time.monotonic() < deadline:
        time.sleep(0.2)
        status = _read(replica, token)
    assert status == 401
    refused = httpx.get(f"{replica}/fhir/Patient", headers={"Authorization": f"Bearer {token}"})
    assert refused.json()["issue"][0]["diagnostics"] == "The access token has been revoked"


def test_replicas_write_one_verifiable_chain(live: RunningStack, replica: str) -> None:
    tag = uuid.uuid4().hex[:6]
    for i in range(10):
        for base in (live.gateway_url, replica):
            httpx.get(f"{base}/fhir/Patient", headers={"X-Request-ID": f"rep-{tag}-{i}"})
    records = list(live.db("gateway").audit_events.find({"request_id": {"$regex": f"^rep-{tag}-"}}))
    assert len(records) == 20 and all(r["status"] == 401 for r in records)
    result = run_cli(live.cli_env, "audit", "verify")
    assert result.returncode == 0, result.stdout + result.stderr


def test_rate_limit_windows_are_shared_when_synced(live: RunningStack) -> None:
    """Two limiters (as two replicas) syncing through one datastore share one budget; without
    syncing each counts only its own requests."""
    db_name = f"rate_sync_{uuid.uuid4().hex[:8]}"

    async def scenario() -> tuple[list[bool], list[bool]]:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(live.config.mongo_url("gateway"), tz_aware=True)
        try:
            db = client[db_name]
            replicas = [ratelimit.RateLimiter(window_seconds=3600, sync_seconds=1) for _ in range(2)]

            def allowed(limiter: ratelimit.RateLimiter) -> bool:
                try:
                    limiter.hit("client:shared", 6)
                except ratelimit.RateLimited as exc:
                    assert exc.retry_after >= 1
                    return False
                return True

            unsynced = [allowed(replicas[0]) for _ in range(4)] + [allowed(replicas[1]) for _ in range(4)]
            for limiter in replicas:
                await limiter.sync(db)
            await replicas[0].sync(db)  # reads back the other replica's counts too
            synced = [allowed(replicas[0]) for _ in range(2)]
            await client.drop_database(db_name)
            return unsynced, synced
        finally:
            await client.close()

    unsynced, synced = asyncio.run(scenario())
    assert unsynced == [True] * 8  # 4 + 4 requests, each replica under its own 6
    assert synced == [False, False]  # 8 counted across replicas: over the shared 6
