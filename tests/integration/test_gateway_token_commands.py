"""What one SMART Backend Services token costs the gateway's datastore (bench figure 5), counted
with command monitoring on the real embedded datastore, and that the checks it keeps still refuse.

A token request (client_credentials with a private_key_jwt assertion, RFC 7523) reads the client's
registration once and records the assertion's jti once, as a plain `insert` command without a
transaction number (not a retryable write: SecantusDB scans and sorts every retryable write it
remembers on each new one). Expired jtis are not deleted per request. A replayed jti, a foreign
signature, an expired or over-long assertion, and scopes beyond the registration are refused
as before; the audit record of the request is the audit middleware's, outside this count.
Housekeeping deletes (expired jtis; expired sessions, codes, launches and revocations on sign-in)
run at most once a minute per process (oauth.Sweep) and drop only what expired.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import ECKey
from pymongo import AsyncMongoClient, monitoring

from gateway import admin, keys, oauth, store
from gateway.settings import GatewaySettings
from mindchart_core import sealing
from tests.actors import JWT_BEARER

BASE = "https://gateway.test"
CLIENT = "counted-backend"
SCOPE = "system/DocumentReference.rs"


class Commands(monitoring.CommandListener):
    """(command name, collection, has a transaction number) of every command while `on`."""

    def __init__(self) -> None:
        self.on = False
        self.seen: list[tuple[str, str, bool]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if self.on:
            target = event.command.get(event.command_name)
            self.seen.append((event.command_name, str(target), "txnNumber" in event.command))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


@pytest.fixture
async def gateway(mongo_url: str) -> AsyncIterator[tuple[Any, Commands, keys.Keyring, ECKey]]:
    commands = Commands()
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_url, tz_aware=True,
                                                                event_listeners=[commands])
    db = client[f"token_commands_{uuid.uuid4().hex[:8]}"]
    try:
        await store.ensure_indexes(db)
        key = ECKey.generate_key("P-384", parameters={"kid": "k1", "alg": "ES384"})
        await admin.create_client(db, client_id=CLIENT, auth="private_key_jwt", scope=SCOPE,
                                  audiences=["records"],
                                  jwks={"keys": [key.as_dict(private=False)]})
        keyring = keys.Keyring(db, sealing.new_key())
        await keyring.ensure_key()
        yield db, commands, keyring, key
    finally:
        await client.drop_database(db.name)
        await client.close()


def settings() -> GatewaySettings:
    return GatewaySettings(public_url=BASE)


def assertion(key: ECKey, **overrides: Any) -> str:
    now = int(time.time())
    claims = {"iss": CLIENT, "sub": CLIENT, "aud": f"{BASE}/oauth/token", "exp": now + 240,
              "iat": now, "jti": uuid.uuid4().hex, **overrides}
    return jwt.encode({"alg": "ES384", "kid": key.kid, "typ": "JWT"}, claims, key, algorithms=["ES384"])


def form(signed: str, scope: str = SCOPE) -> dict[str, str]:
    return {"grant_type": "client_credentials", "scope": scope,
            "client_assertion_type": JWT_BEARER, "client_assertion": signed}


async def issue(db: Any, keyring: keys.Keyring, signed: str, scope: str = SCOPE) -> dict[str, Any]:
    return await oauth.client_credentials(db, keyring, settings(), form(signed, scope), None)


async def test_a_backend_token_costs_one_read_and_one_plain_insert(gateway: Any) -> None:
    db, commands, keyring, key = gateway
    await issue(db, keyring, assertion(key))  # the first request of the process sweeps old jtis
    await keyring.load(force=True)  # the key reload (every 2 s while signing) stays out of the count
    commands.on = True
    body = await issue(db, keyring, assertion(key))
    commands.on = False
    assert body["token_type"] == "bearer" and body["scope"] == SCOPE
    assert commands.seen == [("find", "clients", False), ("insert", "assertion_jtis", False)]
    assert await db.assertion_jtis.count_documents({}) == 2


async def test_a_replayed_assertion_is_refused_and_still_costs_no_delete(gateway: Any) -> None:
    db, commands, keyring, key = gateway
    signed = assertion(key)
    await issue(db, keyring, signed)
    commands.on = True
    with pytest.raises(oauth.OAuthError) as refused:
        await issue(db, keyring, signed)
    commands.on = False
    assert refused.value.error == "invalid_client" and "replay" in refused.value.description
    assert [name for name, _, _ in commands.seen] == ["find", "insert"]
    # The same jti from another client is that client's own (SMART: "for the given iss").
    assert await store.remember_assertion(db, "another-client", "shared-jti", datetime.now(UTC))
    assert not await store.remember_assertion(db, "another-client", "shared-jti", datetime.now(UTC))


async def test_what_the_assertion_must_satisfy_is_still_checked(gateway: Any) -> None:
    db, _, keyring, key = gateway
    stranger = ECKey.generate_key("P-384", parameters={"kid": key.kid, "alg": "ES384"})
    now = int(time.time())
    refused = {
        "foreign signature": (assertion(stranger), SCOPE),
        "expired": (assertion(key, exp=now - 60, iat=now - 300), SCOPE),
        "lives over 5 minutes": (assertion(key, exp=now + 3600), SCOPE),
        "audience not our token URL": (assertion(key, aud="https://elsewhere.test/token"), SCOPE),
        "sub is not the client": (assertion(key, sub="someone-else"), SCOPE),
    }
    for why, (signed, scope) in refused.items():
        with pytest.raises(oauth.OAuthError) as caught:
            await issue(db, keyring, signed, scope)
        assert caught.value.error == "invalid_client", why
    with pytest.raises(oauth.OAuthError) as beyond:
        await issue(db, keyring, assertion(key), "system/Observation.rs")
    assert beyond.value.error == "invalid_scope"
    # None of the refused assertions spent a jti but the scope refusal's (authenticated first).
    assert await db.assertion_jtis.count_documents({}) == 1


async def test_expired_jtis_are_swept_and_recent_ones_kept(gateway: Any) -> None:
    db, _, _, _ = gateway
    now = datetime.now(UTC)
    assert await store.remember_assertion(db, CLIENT, "long-gone", now - timedelta(minutes=11))
    assert await store.remember_assertion(db, CLIENT, "just-expired", now - timedelta(minutes=1))
    await store.forget_expired_assertions(db)
    left = {doc["_id"] async for doc in db.assertion_jtis.find({})}
    assert left == {f"{CLIENT}\njust-expired"}


async def test_a_sweep_runs_at_most_once_per_interval(gateway: Any) -> None:
    db, commands, _, _ = gateway
    sweep = oauth.Sweep(store.forget_expired_assertions, seconds=60.0)
    commands.on = True
    for _ in range(5):
        await sweep(db)
    commands.on = False
    assert commands.seen == [("delete", "assertion_jtis", False)]


async def test_the_sign_in_sweep_drops_only_what_expired(gateway: Any) -> None:
    db, _, _, _ = gateway
    now = datetime.now(UTC)
    await store.put_session(db, {"_id": "old-session", "expires": now - timedelta(seconds=1)})
    await store.put_session(db, {"_id": "live-session", "expires": now + timedelta(minutes=5)})
    await store.put_code(db, {"_id": "old-code", "expires": now - timedelta(hours=2)})
    await store.put_code(db, {"_id": "spent-code", "expires": now - timedelta(minutes=5)})
    await store.forget_expired(db)
    assert [d["_id"] async for d in db.authorization_sessions.find({})] == ["live-session"]
    # A code is kept an hour past its expiry: a replayed code still finds itself used (RFC 6749
    # §4.1.2) and revokes what it issued, rather than being merely unknown.
    assert [d["_id"] async for d in db.authorization_codes.find({})] == ["spent-code"]
