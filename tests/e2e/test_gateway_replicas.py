"""Several gateway replicas on one datastore: a token revoked at one is refused by the other, and by
records following the other's revocation feed, within the revocation refresh interval
(`MINDCHART_GATEWAY_REVOCATION_REFRESH_SECONDS`); both append to one audit chain that still
verifies, and synced rate-limit windows share one budget."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from pymongo import AsyncMongoClient

from gateway import ratelimit
from mindchart_cli import stack
from mindchart_core import tokens
from tests.actors import create_user, register_app, run_cli, smart_login
from tests.conftest import RunningStack
from tests.replicas import Replica, running, wait_ready

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


def _records_read(live: RunningStack, token: str) -> int:
    return httpx.get(f"{live.direct_url('records')}/fhir/Patient", params={"_count": "1"},
                     headers={"Authorization": f"Bearer {token}"}, timeout=30).status_code


def _refused_by_records(live: RunningStack, token: str, *, within: float) -> int:
    """records' answer once it refuses the token, or its last answer after `within` seconds."""
    deadline = time.monotonic() + within
    status = _records_read(live, token)
    while status != 401 and time.monotonic() < deadline:
        time.sleep(0.1)
        status = _records_read(live, token)
    return status


def _feed_answers(gateway_url: str) -> float:
    text = httpx.get(f"{gateway_url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("mindchart_http_requests_total{") and 'route="/oauth/revocations"' in line)


def test_token_revoked_at_another_replica_is_refused_by_records(live: RunningStack, replica: str) -> None:
    """records follows the first gateway's feed as a long poll held up to 20 s; a token revoked at
    the replica reaches the first gateway through the datastore within its refresh interval (1 s),
    which answers records' held request at once. The bound allowed here (8 s: the interval plus a
    loaded machine's scheduling) is well under the hold, so a feed that learned only when its
    request timed out would fail."""
    suffix = uuid.uuid4().hex[:6]
    app, user = f"feed-app-{suffix}", f"feed-user-{suffix}"
    register_app(live.cli_env, app, "user/Patient.rs openid fhirUser")
    create_user(live.cli_env, user, PASSWORD, "practitioner", f"Practitioner/p-{suffix}")

    def login() -> str:
        return str(smart_login(live.gateway_url, client_id=app, username=user, password=PASSWORD,
                               scope="user/Patient.rs", aud=live.fhir)["access_token"])

    first, second = login(), login()
    assert _records_read(live, first) == 200 and _records_read(live, second) == 200
    # Revoked at the gateway records follows: delivered at once, and records' next held request
    # starts now, with its whole hold ahead of it.
    assert httpx.post(f"{live.gateway_url}/oauth/revoke", data={"token": first, "client_id": app}).status_code == 200
    assert _refused_by_records(live, first, within=8) == 401
    assert _records_read(live, second) == 200  # a revocation is of one token (another login)

    assert httpx.post(f"{replica}/oauth/revoke", data={"token": second, "client_id": app}).status_code == 200
    assert _refused_by_records(live, second, within=8) == 401
    refused = httpx.get(f"{live.direct_url('records')}/fhir/Patient",
                        headers={"Authorization": f"Bearer {second}"}, timeout=30)
    assert refused.json()["issue"][0]["diagnostics"] == "The access token has been revoked"


def test_backends_at_rest_do_not_poll_the_feed(live: RunningStack) -> None:
    """records and psychnotes each hold one feed request open instead of asking every second (the
    gateway's CPU at rest, bench/idle.py): over 5 quiet seconds the gateway answers at most a held
    request's timeout or two, where polling once a second answered about ten."""
    before = _feed_answers(live.gateway_url)
    time.sleep(5)
    assert _feed_answers(live.gateway_url) - before <= 3


def _feed_client(live: RunningStack) -> httpx.Client:
    """What records and psychnotes read the feed with: the stack's feed secret (development)."""
    secret = tokens.feed_secret("", data_dir=live.config.data_dir, production=False)
    return httpx.Client(headers={"Authorization": f"Bearer {secret}"}, timeout=30)


def test_the_feed_refuses_bad_parameters_and_resumes_by_cursor(live: RunningStack) -> None:
    feed = f"{live.gateway_url}/oauth/revocations"
    with _feed_client(live) as http:
        for params in ({"wait": "soon"}, {"wait": "26"}, {"wait": "-1"}, {"wait": "nan"},
                       {"since": "yesterday"}, {"since": "2026-12-01T10:00:00"}, {"cursor": "x" * 65}):
            refused = http.get(feed, params=params)
            assert refused.status_code == 400, params
            assert refused.json()["resourceType"] == "OperationOutcome"
        everything = http.get(feed).json()
        assert set(everything) == {"revoked", "newest", "cursor"}
        # Up to date and told to wait a second: held, then answered with nothing new and the same cursor.
        held = http.get(feed, params={"cursor": everything["cursor"], "wait": "1"}).json()
        assert held == {"revoked": [], "newest": everything["newest"], "cursor": everything["cursor"]}
        # A cursor this replica never gave (another process's) resumes from `since` instead.
        foreign = http.get(feed, params={"cursor": "0.0", "since": everything["newest"] or
                                          "2026-01-01T00:00:00+00:00"})
        assert foreign.status_code == 200 and foreign.json()["cursor"] == everything["cursor"]
        assert http.get(f"{live.gateway_url}/readyz").status_code == 200


def test_a_gateway_shutting_down_answers_held_feed_requests_at_once(live: RunningStack) -> None:
    """uvicorn's graceful shutdown waits for every request in progress; a held feed request (up to
    20 s) is answered as soon as draining begins (mindchart_core.http_limits.draining), so a
    gateway told to stop answers it and exits well before the hold would have ended."""
    gateway = Replica("gateway", "gateway-drain")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **live.config.service_env("gateway"),
           "MINDCHART_GATEWAY_PORT": str(gateway.port)}
    with open(live.runner.log_dir / "gateway-drain.log", "ab") as log:
        process = subprocess.Popen(stack.service_argv("gateway", "127.0.0.1", gateway.port),
                                   env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(gateway.url, process, "gateway-drain", within=120)
        feed = f"{gateway.url}/oauth/revocations"
        with _feed_client(live) as http, ThreadPoolExecutor(1) as pool:
            cursor = http.get(feed).json()["cursor"]
            held = pool.submit(http.get, feed, params={"cursor": cursor, "wait": "20"}, timeout=60)
            time.sleep(1)  # the request is in, and held
            assert not held.done()
            process.terminate()
            answer = held.result(timeout=12)
            assert answer.status_code == 200 and answer.json()["revoked"] == []
        # uvicorn re-raises the SIGTERM once its graceful shutdown is done
        assert process.wait(timeout=12) in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


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
