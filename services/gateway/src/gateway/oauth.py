"""OAuth 2.0 token endpoint: SMART Backend Services and confidential clients (client_credentials).

SMART App Launch 2.2 §backend-services and RFC 6749 §4.4/§5.2; client authentication by
`private_key_jwt` (RFC 7523, assertion `aud` = our token URL, `exp` ≤ 5 min, single-use `jti`) or
by client secret (HTTP Basic or form post).
"""

from __future__ import annotations

import base64
import json
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

import httpx
import structlog
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from gateway import store
from gateway.keys import Keyring
from gateway.settings import GatewaySettings
from mindchart_core import scopes

log = structlog.get_logger(__name__)

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_ALGORITHMS = ["RS384", "ES384", "RS256", "ES256"]
MAX_ASSERTION_LIFETIME = 300
_hasher = PasswordHasher()


# RFC 6749 §5.2: "Values for the "error_description" parameter MUST NOT include characters
# outside the set %x20-21 / %x23-5B / %x5D-7E" (printable ASCII without '"' and '\\').
_OUTSIDE_DESCRIPTION_CHARS = re.compile(r"[^\x20\x21\x23-\x5b\x5d-\x7e]")


class OAuthError(Exception):
    """RFC 6749 §5.2 error response. A description that quotes the client (a parameter's name)
    keeps only the characters §5.2 allows; anything else becomes '?'."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        description = _OUTSIDE_DESCRIPTION_CHARS.sub("?", description)[:200]
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status


def hash_secret(secret: str) -> str:
    return _hasher.hash(secret)


def verify_secret(stored_hash: str, secret: str) -> bool:
    try:
        return _hasher.verify(stored_hash, secret)
    except (VerificationError, InvalidHashError):
        return False


async def authenticate_client(
    db: store.Db, settings: GatewaySettings, form: dict[str, str], authorization: str | None
) -> dict[str, Any]:
    """The registered client this request authenticates as, or invalid_client."""
    assertion_type = form.get("client_assertion_type")
    if assertion_type is not None or "client_assertion" in form:
        if assertion_type != JWT_BEARER:
            raise OAuthError("invalid_client", "client_assertion_type must be jwt-bearer")
        return await _authenticate_assertion(db, settings, form.get("client_assertion", ""))
    client_id, secret = form.get("client_id"), form.get("client_secret")
    used_basic = False
    if authorization and authorization.lower().startswith("basic "):
        used_basic = True
        try:
            decoded = base64.b64decode(authorization[6:].strip()).decode()
            raw_id, _, raw_secret = decoded.partition(":")
            client_id, secret = unquote(raw_id), unquote(raw_secret)
        except (ValueError, UnicodeDecodeError):
            raise OAuthError("invalid_client", "Malformed Basic credentials", 401) from None
    status = 401 if used_basic else 400
    if not client_id or not secret:
        raise OAuthError("invalid_client", "Client authentication is required", status)
    client = await store.get_client(db, client_id)
    if client is None or client.get("auth") != "client_secret" or not verify_secret(
        client.get("secret_hash", ""), secret
    ):
        raise OAuthError("invalid_client", "Client authentication failed", status)
    return client


def presents_credentials(form: dict[str, str], authorization: str | None) -> bool:
    return ("client_assertion" in form or "client_assertion_type" in form or "client_secret" in form
            or bool(authorization and authorization.lower().startswith("basic ")))


async def identify_client(
    db: store.Db, settings: GatewaySettings, form: dict[str, str], authorization: str | None
) -> dict[str, Any]:
    """A confidential client authenticates; a public one (auth "none") names itself with client_id
    (RFC 6749 §3.2.1, SMART 2.2 §token-request: `client_id` for public clients only)."""
    if presents_credentials(form, authorization):
        authenticated = await authenticate_client(db, settings, form, authorization)
        if form.get("client_id") and form["client_id"] != authenticated["_id"]:
            raise OAuthError("invalid_client", "client_id does not match the authenticated client")
        return authenticated
    client_id = form.get("client_id")
    client = await store.get_client(db, client_id) if client_id else None
    if client is None:
        raise OAuthError("invalid_client", "Unknown client", 401)
    if client.get("auth") != "none":
        raise OAuthError("invalid_client", "This client must authenticate", 401)
    return client


async def _authenticate_assertion(db: store.Db, settings: GatewaySettings, assertion: str) -> dict[str, Any]:
    failed = OAuthError("invalid_client", "Client assertion is invalid")
    try:  # read (unverified) who claims to be asking, to know whose keys verify it
        compact = jws.extract_compact(assertion.encode())
        header = compact.headers()
        client_id = json.loads(compact.payload).get("iss")
    except (JoseError, ValueError, AttributeError):
        raise failed from None
    if not isinstance(client_id, str):
        raise failed
    client = await store.get_client(db, client_id)
    if client is None or client.get("auth") != "private_key_jwt":
        raise failed
    jku = header.get("jku")
    if jku is not None and jku != client.get("jwks_url"):
        raise failed  # SMART: a jku must match the registered JWKS URL
    try:
        if jku is not None or not client.get("jwks"):
            keyset = await fetch_client_jwks(str(client.get("jwks_url") or ""))
        else:
            keyset = KeySet.import_key_set(client["jwks"])
        token = jwt.decode(assertion, keyset, algorithms=ASSERTION_ALGORITHMS)
        jwt.JWTClaimsRegistry(
            leeway=5,
            iss={"essential": True, "value": client_id},
            sub={"essential": True, "value": client_id},
            aud={"essential": True, "value": settings.token_url},
            exp={"essential": True},
            jti={"essential": True},
        ).validate(token.claims)
    except (JoseError, ValueError, KeyError, TypeError):
        raise failed from None
    exp = int(token.claims["exp"])
    if exp > time.time() + MAX_ASSERTION_LIFETIME + 5:
        raise OAuthError("invalid_client", "Client assertion lives longer than 5 minutes")
    if not await store.remember_assertion(
        db, client_id, str(token.claims["jti"]), datetime.fromtimestamp(exp, UTC)
    ):
        raise OAuthError("invalid_client", "Client assertion was already used (jti replay)")
    await ASSERTION_SWEEP(db)
    return client


class Sweep:
    """A housekeeping delete of expired documents, run by the request that finds it due, at most
    once every `seconds` in this process: never one more datastore write on every request."""

    def __init__(self, sweep: Callable[[store.Db], Awaitable[None]], seconds: float = 60.0) -> None:
        self._sweep = sweep
        self.seconds = seconds
        self._next = 0.0

    async def __call__(self, db: store.Db) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.seconds
        await self._sweep(db)


# Expired jtis go once a minute, not on every token request (that delete was one datastore write
# per token, bench figure 5): the collection holds at most a minute's assertions more than it
# must, and none of them can be replayed (store.forget_expired_assertions).
ASSERTION_SWEEP = Sweep(store.forget_expired_assertions)


async def fetch_client_jwks(url: str) -> KeySet:
    """A client's JWKS by URL (SMART Backend Services §registration). Fetched for each assertion:
    never cached beyond what the client's Cache-Control would allow, since nothing is cached."""
    if not url.startswith(("https://", "http://")):
        raise ValueError("no JWKS URL is registered")
    try:
        async with httpx.AsyncClient(timeout=5.0, follow_redirects=False) as http:
            response = await http.get(url, headers={"Accept": "application/json"})
            response.raise_for_status()
        keyset = KeySet.import_key_set(response.json())
    except (httpx.HTTPError, JoseError, KeyError, TypeError) as exc:
        log.warning("client_jwks_unavailable", error_type=type(exc).__name__)
        raise ValueError("the client's JWKS could not be fetched") from None
    if any(k.is_private for k in keyset.keys):
        raise ValueError("the client's JWKS holds private keys")
    return keyset


async def client_credentials(
    db: store.Db, keys: Keyring, settings: GatewaySettings, form: dict[str, str],
    authorization: str | None,
) -> dict[str, Any]:
    client = await authenticate_client(db, settings, form, authorization)
    requested = scopes.parse(form.get("scope"))
    allowed = scopes.parse(client.get("scope", ""))
    if not requested.clinical and not requested.other:
        raise OAuthError("invalid_scope", "A scope is required")
    if any(s.context != "system" for s in requested.clinical):
        raise OAuthError("invalid_scope", "client_credentials grants system/ scopes only")
    granted = scopes.cap(requested, allowed)
    if not granted.clinical:
        raise OAuthError("invalid_scope", "None of the requested scopes is registered for this client")
    audience_name = _audience_name(settings, form.get("aud") or form.get("resource"),
                                   client.get("audiences", []))
    if audience_name not in client.get("audiences", []):
        raise OAuthError("invalid_request", "This client is not registered for that audience (aud)")
    now = int(time.time())
    lifetime = settings.backend_token_seconds
    claims: dict[str, Any] = {
        "iss": settings.issuer,
        "aud": settings.audience_for(audience_name),
        "sub": client["_id"],
        "client_id": client["_id"],
        "scope": str(granted),
        "iat": now,
        "exp": now + lifetime,
        "jti": uuid.uuid4().hex,
    }
    if client.get("roles"):
        claims["roles"] = list(client["roles"])
    if client.get("payer_endpoints"):  # where records may deliver this payer's CDex attachments
        claims["payer_endpoints"] = list(client["payer_endpoints"])
        claims["payer_token_url"] = client.get("payer_token_url")
        claims["payer_client_id"] = client.get("payer_client_id")
    token = await keys.sign(claims)
    log.info("token_issued", client_id=client["_id"], grant="client_credentials",
             audience=audience_name)
    return {"access_token": token, "token_type": "bearer", "expires_in": lifetime,
            "scope": str(granted)}


def _audience_name(settings: GatewaySettings, aud: str | None, registered: list[str]) -> str:
    """The FHIR server a token is for. RFC 8707 §2 makes `resource` optional; without it (or
    SMART's `aud`) a client registered for exactly one server gets that one, any other records."""
    if aud is None:
        return registered[0] if len(registered) == 1 else "records"
    aud = aud.rstrip("/")
    for name in ("records", "psychnotes"):
        if aud == settings.audience_for(name):
            return name
    raise OAuthError("invalid_request", "aud is not a FHIR server of this authorization server")
