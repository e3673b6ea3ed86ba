"""A subscriber's grant as it stands now, not as it stood when it subscribed.

A Subscription keeps who made it (`owner`: the subscribing token's client, user, `sid`, scopes,
patient context, fhirUser, expiry), never the token itself. Before fan-out numbers an event for it
and before every delivery, records asks the gateway (gateway/subscribers.py, authenticated with
the secret the two share) whether that client registration still exists, which scopes it is
registered for now, which notification endpoints are registered for it, and, for a user's grant,
whether the grant (`sid`) was revoked and how long its refresh tokens keep it alive. The
subscriber's effective scopes are the subscribing token's scopes capped by the current
registration (mindchart_core.scopes.cap, as the gateway caps token requests). A user's grant
without a refresh token ends when the subscribing access token expires.

Answers are reused for `grant_cache_seconds`. When the gateway cannot be asked, nothing is
delivered (fail closed) and the attempt is retried later without counting against the subscriber.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx

from mindchart_core import scopes, tokens
from records.policy import AccessPolicy


class GatewayUnavailable(RuntimeError):
    """The gateway did not answer: deliver nothing now, try again later."""


@dataclass(frozen=True)
class Grant:
    active: bool
    scope: scopes.ScopeSet
    endpoints: tuple[str, ...]
    reason: str = ""


def owner_of(token: tokens.AccessToken) -> dict[str, Any]:
    """What a Subscription keeps of the token that created it (no token, no signature)."""
    return {
        "client_id": token.client_id,
        "sub": token.subject,
        "sid": token.session_id,
        "scope": str(token.scope),
        "patient": token.patient,
        "fhirUser": token.fhir_user,
        "roles": list(token.roles),
        "exp": token.expires_at,
        "user": bool(token.roles or token.session_id),
    }


def same_owner(owner: dict[str, Any], token: tokens.AccessToken) -> bool:
    """A Subscription belongs to its client, and for a user's subscription to that user too."""
    if owner["client_id"] != token.client_id:
        return False
    return not owner.get("user") or owner["sub"] == token.subject


def policy_for(owner: dict[str, Any], scope: scopes.ScopeSet, base_url: str) -> AccessPolicy:
    """The access policy a read by this subscriber would get, with its current scopes."""
    token = tokens.AccessToken(
        subject=owner["sub"],
        client_id=owner["client_id"],
        scope=scope,
        audience=base_url,
        jti="subscription",
        expires_at=int(owner.get("exp") or 0),
        patient=owner.get("patient"),
        fhir_user=owner.get("fhirUser"),
        roles=tuple(owner.get("roles") or ()),
        session_id=owner.get("sid"),
    )
    return AccessPolicy(token=token, base_url=base_url)


class Grants:
    def __init__(self, gateway_url: str, secret: str, cache_seconds: float) -> None:
        self.url = gateway_url.rstrip("/") + "/internal/subscriber"
        self.secret = secret
        self.cache_seconds = cache_seconds
        self._cache: dict[tuple[str, str | None, str | None], tuple[float, dict[str, Any]]] = {}
        self.http = httpx.AsyncClient(timeout=5.0)

    async def close(self) -> None:
        await self.http.aclose()

    async def _ask(self, client_id: str, username: str | None, sid: str | None) -> dict[str, Any]:
        key = (client_id, username, sid)
        cached = self._cache.get(key)
        if cached is not None and time.monotonic() - cached[0] < self.cache_seconds:
            return cached[1]
        try:
            response = await self.http.post(
                self.url,
                json={"client_id": client_id, "username": username, "sid": sid},
                headers={"Authorization": f"Bearer {self.secret}"},
            )
            response.raise_for_status()
            answer: dict[str, Any] = response.json()
        except (httpx.HTTPError, ValueError):
            raise GatewayUnavailable("the gateway did not answer about the subscriber's grant") from None
        self._cache[key] = (time.monotonic(), answer)
        return answer

    async def current(self, owner: dict[str, Any]) -> Grant:
        user = bool(owner.get("user"))
        answer = await self._ask(
            owner["client_id"], owner["sub"] if user else None, owner.get("sid") if user else None
        )
        if not answer.get("active"):
            return Grant(False, scopes.parse(""), (), "the subscriber's client or grant was revoked")
        if user:
            ends = answer.get("expires") or owner.get("exp") or 0
            if ends <= time.time():
                return Grant(False, scopes.parse(""), (), "the subscriber's grant has expired")
        effective = scopes.cap(scopes.parse(owner["scope"]), scopes.parse(answer.get("scope", "")))
        return Grant(True, effective, tuple(answer.get("subscription_endpoints") or ()))
