"""Verification of gateway-issued access tokens, done again by every backend (zero trust).

SMART App Launch 2.2 §resource-server: check signature, expiry, scope coverage and that `aud`
equals our own base URL. Keys come from the gateway's JWKS, cached and refreshed on an unknown kid.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import structlog
from joserfc import jwt
from joserfc.errors import InvalidKeyIdError, JoseError
from joserfc.jwk import KeySet
from starlette.requests import Request

from mindchart_core import errors, scopes
from mindchart_core.settings import development_secret

log = structlog.get_logger(__name__)

ACCESS_TOKEN_ALGORITHMS = ["RS256", "ES256", "RS384", "ES384"]
CLOCK_SKEW_SECONDS = 30
FEED_SECRET_NAME = "revocation-feed"  # the development secret's file under <data dir>/keys/


def feed_secret(configured: str, *, data_dir: Path, production: bool) -> str:
    """The secret the gateway's revocation feed is read with (`*_REVOCATIONS_SECRET`, or its
    `_FILE` twin): the gateway answers only callers presenting it (gateway/revocations.py). In
    development one generated under the data dir, shared by the services of one machine; in
    production what is configured (each service refuses to start without it)."""
    if configured or production:
        return configured
    return development_secret(data_dir, FEED_SECRET_NAME)


@dataclass(frozen=True)
class AccessToken:
    """What a verified access token says about its caller."""

    subject: str
    client_id: str
    scope: scopes.ScopeSet
    audience: str
    jti: str
    expires_at: int
    patient: str | None = None
    encounter: str | None = None
    fhir_user: str | None = None
    roles: tuple[str, ...] = ()
    purpose_of_use: str | None = None
    session_id: str | None = None  # `sid`: the grant a user token belongs to (revocable as one)
    # A practitioner whose notes need co-signature: their supervisor (`supervisor` claim,
    # `Practitioner/ID`, set by the gateway from `mindchart user create --supervisor`).
    supervisor: str | None = None
    # A payer client's registered CDex `$submit-attachment` endpoints (gateway registration).
    payer_endpoints: tuple[str, ...] = ()
    payer_token_url: str | None = None  # where records authenticates to call those endpoints
    payer_client_id: str | None = None  # the client id records has at that payer

    @property
    def fhir_user_ref(self) -> str | None:
        """`fhirUser` as a relative reference (Practitioner/123), whatever base it was given in."""
        if not self.fhir_user:
            return None
        parts = self.fhir_user.rstrip("/").split("/")
        return "/".join(parts[-2:]) if len(parts) >= 2 else None


class KeySource(Protocol):
    async def keyset(self, *, refresh: bool = False) -> KeySet: ...


class StaticKeys:
    def __init__(self, keyset: KeySet) -> None:
        self._keyset = keyset

    async def keyset(self, *, refresh: bool = False) -> KeySet:
        return self._keyset


class RemoteJwks:
    """The gateway's JWKS over HTTP; refetched at most every `min_refresh` seconds."""

    def __init__(self, url: str, *, ttl: float = 300.0, min_refresh: float = 5.0) -> None:
        self.url = url
        self.ttl = ttl
        self.min_refresh = min_refresh
        self._keyset: KeySet | None = None
        self._fetched_at = 0.0

    async def keyset(self, *, refresh: bool = False) -> KeySet:
        age = time.monotonic() - self._fetched_at
        stale = self._keyset is None or age > self.ttl or (refresh and age > self.min_refresh)
        if stale:
            try:
                async with httpx.AsyncClient(timeout=5.0) as client:
                    response = await client.get(self.url)
                    response.raise_for_status()
                self._keyset = KeySet.import_key_set(response.json())
                self._fetched_at = time.monotonic()
            except (httpx.HTTPError, ValueError, JoseError) as exc:
                log.warning("jwks_fetch_failed", url=self.url, error_type=type(exc).__name__)
                if self._keyset is None:
                    raise errors.Unavailable("Token keys are not available yet") from None
        assert self._keyset is not None
        return self._keyset


class RevocationFeed:
    """The gateway's revoked access tokens, as every backend keeps them (zero trust includes
    revocation: RFC 7009 §2.2, "the token cannot be used again after the revocation. In practice,
    there could be a propagation delay [...] Implementations should minimize that window", and a
    backend that only checks signatures would keep honouring a revoked token until it expires).

    The feed follows the gateway's `GET /oauth/revocations` as a long poll (gateway/revocations.py):
    each request carries the cursor and the newest stamp of the answer before, and asks the gateway
    to hold it up to `wait` seconds; the gateway answers as soon as it learns of a revocation (its
    own at once, another replica's at its next `revocation_refresh_seconds`), and the feed asks
    again at once. So a revoked token is refused here within about one gateway refresh interval,
    and at rest a backend makes one request per `wait` seconds instead of one a second. An answer
    that came back at once with nothing new (a gateway that does not hold requests, or one
    holding too many) is followed by a pause of `refresh_seconds`, as polling was before.

    The feed is not public: each request carries `secret` (`feed_secret`) as a bearer credential,
    and the gateway refuses any other caller with 401 before holding anything, so nobody outside
    can take the held slots (gateway/revocations.py `check_reader`). A refused request counts as
    a failed one (logged `revocation_feed_refused`, never with the secret).

    The feed knows token ids and grant ids only (`jti:<jti>`, `family:<sid>`), never tokens. Fail
    closed: if no answer has arrived for `stale_after` seconds (more than a held request lasts),
    `check` answers 503 rather than accept a token it cannot vouch for. The gateway answers 503
    itself when its own list cannot be vouched for, so an answer means "nothing else as of now".
    """

    def __init__(self, url: str, *, secret: str = "", refresh_seconds: float = 1.0,
                 wait: float = 20.0) -> None:
        self.url = url
        self._headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        self.refresh_seconds = refresh_seconds
        self.wait = wait
        self.stale_after = max(10 * refresh_seconds, wait + 10.0, 30.0)
        self._expires: dict[str, int] = {}
        self._since: str | None = None
        self._cursor: str | None = None
        self._fresh_at = float("-inf")

    def _timeout(self) -> httpx.Timeout:
        return httpx.Timeout(5.0, read=self.wait + 10.0)

    async def refresh(self, http: httpx.AsyncClient, *, wait: float = 0.0) -> bool:
        """One request; whether its answer held anything this feed did not know."""
        params = {name: value for name, value in (
            ("since", self._since), ("cursor", self._cursor), ("wait", f"{wait:g}" if wait else None))
            if value}
        response = await http.get(self.url, params=params or None, headers=self._headers)
        if response.status_code in (401, 403):  # the feed secret is missing or not the gateway's
            log.warning("revocation_feed_refused", status=response.status_code,
                        secret_sent=bool(self._headers))
        response.raise_for_status()
        body = response.json()
        now = int(time.time())
        news = False
        for entry in body["revoked"]:
            revoked_id, expires = str(entry["id"]), int(entry["expires"])
            news = news or self._expires.get(revoked_id) != expires
            self._expires[revoked_id] = expires
        self._expires = {k: v for k, v in self._expires.items() if v > now}
        self._since = body.get("newest") or self._since
        self._cursor = body.get("cursor") or None
        self._fresh_at = time.monotonic()  # the gateway vouched for its list as it answered
        return news

    async def start(self, *, wait: float = 15.0) -> asyncio.Task[None]:
        """First refresh (retried for up to `wait` seconds, so a service is not ready before it
        knows the revocations: the gateway may still be starting), then the loop as a task."""
        deadline = time.monotonic() + wait
        async with httpx.AsyncClient(timeout=5.0) as http:
            while True:
                try:
                    await self.refresh(http)
                    break
                except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
                    if time.monotonic() > deadline:
                        log.warning("revocation_feed_not_ready", error_type=type(exc).__name__)
                        break
                    await asyncio.sleep(0.2)
        return asyncio.create_task(self.run())

    async def run(self) -> None:
        """The long-poll loop (a lifespan task)."""
        failed = False
        async with httpx.AsyncClient(timeout=self._timeout()) as http:
            while True:
                asked = time.monotonic()
                try:
                    # After a failed request, ask to be answered at once: a held request would
                    # leave this feed stale (and every request refused 503) for up to `wait`
                    # seconds after the gateway is back, with nothing new to report.
                    news = await self.refresh(http, wait=0.0 if failed else self.wait)
                    failed = False
                except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
                    log.warning("revocation_refresh_failed", error_type=type(exc).__name__)
                    failed = True
                    await asyncio.sleep(self.refresh_seconds)
                    continue
                if not news and time.monotonic() - asked < self.wait / 2:
                    await asyncio.sleep(self.refresh_seconds)  # not held: poll as before

    def check(self, token: AccessToken) -> None:
        if time.monotonic() - self._fresh_at > self.stale_after:
            raise errors.Unavailable("Token revocations cannot be checked right now")
        if f"jti:{token.jti}" in self._expires or (
                token.session_id is not None and f"family:{token.session_id}" in self._expires):
            raise errors.Unauthorized("The access token has been revoked")


class TokenVerifier:
    def __init__(self, *, issuer: str, audience: str, keys: KeySource,
                 revocations: RevocationFeed | None = None) -> None:
        self.issuer = issuer.rstrip("/")
        self.audience = audience.rstrip("/")
        self.keys = keys
        self.revocations = revocations

    async def _decode(self, token: str) -> jwt.Token:
        keyset = await self.keys.keyset()
        try:
            return jwt.decode(token, keyset, algorithms=ACCESS_TOKEN_ALGORITHMS)
        except InvalidKeyIdError:
            pass  # an unknown kid after a key rotation: refetch the JWKS once
        keyset = await self.keys.keyset(refresh=True)
        return jwt.decode(token, keyset, algorithms=ACCESS_TOKEN_ALGORITHMS)

    async def verify(self, token: str) -> AccessToken:
        try:
            decoded = await self._decode(token)
            registry = jwt.JWTClaimsRegistry(
                leeway=CLOCK_SKEW_SECONDS,
                iss={"essential": True, "value": self.issuer},
                aud={"essential": True, "value": self.audience},
                exp={"essential": True},
                sub={"essential": True},
                jti={"essential": True},
            )
            registry.validate(decoded.claims)
        except errors.FhirError:
            raise
        except (JoseError, ValueError, TypeError, KeyError):
            raise errors.Unauthorized(
                "The access token is invalid, expired or not for this server") from None
        if decoded.header.get("typ") not in (None, "JWT", "at+jwt"):
            raise errors.Unauthorized("The access token is invalid, expired or not for this server")
        verified = claims_to_token(decoded.claims)
        if self.revocations is not None:
            self.revocations.check(verified)
        return verified


def claims_to_token(claims: dict[str, Any]) -> AccessToken:
    aud = claims.get("aud")
    roles = claims.get("roles") or ()
    return AccessToken(
        subject=str(claims["sub"]),
        client_id=str(claims.get("client_id", "")),
        scope=scopes.parse(str(claims.get("scope", ""))),
        audience=aud if isinstance(aud, str) else " ".join(aud or []),
        jti=str(claims["jti"]),
        expires_at=int(claims["exp"]),
        patient=claims.get("patient"),
        encounter=claims.get("encounter"),
        fhir_user=claims.get("fhirUser"),
        roles=tuple(str(r) for r in roles) if isinstance(roles, list) else (),
        purpose_of_use=claims.get("purpose_of_use"),
        session_id=claims.get("sid"),
        supervisor=claims["supervisor"] if isinstance(claims.get("supervisor"), str) else None,
        payer_endpoints=tuple(str(u) for u in endpoints) if isinstance(
            endpoints := claims.get("payer_endpoints"), list) else (),
        payer_token_url=claims.get("payer_token_url"),
        payer_client_id=claims.get("payer_client_id"),
    )


def bearer_value(authorization: str | None) -> str:
    """The token of an `Authorization: Bearer` header value (RFC 6750 §2.1); without one, the
    401 whose challenge carries no error code (§3.1). Every service reads bearer tokens here."""
    scheme, _, value = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise errors.NoCredentials()
    return value.strip()


def bearer_token(request: Request) -> str:
    """The raw bearer token of a request (RFC 6750 §2.1), or 401."""
    return bearer_value(request.headers.get("authorization"))
