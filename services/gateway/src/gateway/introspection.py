"""Token introspection (RFC 7662 + SMART App Launch 2.2 §token-introspection) and revocation
(RFC 7009), over the gateway's own access tokens (JWTs) and refresh tokens (opaque).

Introspection is access-controlled (RFC 7662 §2.1: "the endpoint MUST also require some form of
authorization ... to prevent token scanning attacks"): the caller authenticates as a confidential
client or presents a valid SMART bearer token. What it may learn (§4, "the authorization server
SHOULD ... limit the information returned to the protected resource"): a client registered with
the `resource-server` role introspects any token; any other caller only the tokens of its own
client (and with a bearer token, of its own user too). Anything else, and anything invalid,
expired, revoked or unknown, is `{"active": false}` and nothing more (§2.2).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from joserfc import jwt
from joserfc.errors import JoseError

from gateway import grants, oauth, store
from gateway.keys import Keyring
from gateway.revocations import RevocationList
from gateway.settings import GatewaySettings
from mindchart_core import tokens

INACTIVE: dict[str, Any] = {"active": False}


async def access_claims(
    db: store.Db, keys: Keyring, settings: GatewaySettings, token: str
) -> dict[str, Any] | None:
    """Claims of an access token this gateway issued, still valid and not revoked; else None."""
    if token.count(".") != 2:
        return None
    try:
        decoded = jwt.decode(token, await keys.keyset(), algorithms=["RS256"])
        jwt.JWTClaimsRegistry(
            leeway=tokens.CLOCK_SKEW_SECONDS, iss={"essential": True, "value": settings.issuer},
            exp={"essential": True}, sub={"essential": True}, jti={"essential": True},
            aud={"essential": True, "values": [settings.records_base, settings.psychnotes_base]},
        ).validate(decoded.claims)
    except (JoseError, ValueError, TypeError, KeyError):
        return None
    claims = dict(decoded.claims)
    if "client_id" not in claims or "scope" not in claims:
        return None  # an id_token is not an access token
    if await store.is_revoked(db, str(claims["jti"]), claims.get("sid")):
        return None
    return claims


async def introspect(db: store.Db, keys: Keyring, settings: GatewaySettings, token: str) -> dict[str, Any]:
    claims = await access_claims(db, keys, settings, token) if token else None
    if claims is not None:
        body: dict[str, Any] = {
            "active": True, "token_type": "Bearer", "scope": claims["scope"],
            "client_id": claims["client_id"], "exp": claims["exp"], "iat": claims.get("iat"),
            "sub": claims["sub"], "aud": claims["aud"], "iss": claims["iss"], "jti": claims["jti"],
        }
        for name in ("patient", "encounter", "fhirUser", "need_patient_banner"):
            if name in claims:
                body[name] = claims[name]
        if claims.get("roles"):
            body["username"] = claims["sub"]
        return body
    stored = await store.get_refresh(db, grants.secret_hash(token)) if token else None
    if (stored is None or stored.get("used") or stored.get("revoked")
            or stored["expires"] <= datetime.now(UTC)):
        return INACTIVE
    grant = stored["grant"]
    body = {"active": True, "token_type": "refresh_token", "scope": grant["scope"],
            "client_id": stored["client_id"], "exp": int(stored["expires"].timestamp()),
            "sub": grant["username"], "iss": settings.issuer,
            "aud": settings.audience_for(grant["audience"])}
    for name in ("patient", "encounter"):
        if grant.get(name):
            body[name] = grant[name]
    if grant.get("fhir_user"):
        body["fhirUser"] = grants.absolute_fhir_user(settings, grant["fhir_user"])
    return body


RESOURCE_SERVER_ROLE = "resource-server"


async def introspection_caller(
    db: store.Db, keys: Keyring, settings: GatewaySettings, form: dict[str, str], authorization: str | None,
) -> dict[str, Any]:
    """Who asks: `client_id`, `subject` (bearer callers), `resource_server`; or raises
    OAuthError(invalid_client, 401)."""
    if authorization and authorization.lower().startswith("bearer "):
        claims = await access_claims(db, keys, settings, authorization[7:].strip())
        if claims is None:
            raise oauth.OAuthError("invalid_token", "The bearer token is not valid", 401)
        client = await store.get_client(db, str(claims["client_id"]))
        return {"client_id": str(claims["client_id"]), "subject": str(claims["sub"]),
                "resource_server": client is not None and str(claims["sub"]) == client["_id"]
                and RESOURCE_SERVER_ROLE in (client.get("roles") or [])}
    if not oauth.presents_credentials(form, authorization):
        raise oauth.OAuthError("invalid_client", "Authenticate as a client or with a bearer token", 401)
    client = await oauth.authenticate_client(db, settings, form, authorization)
    return {"client_id": str(client["_id"]), "subject": None,
            "resource_server": RESOURCE_SERVER_ROLE in (client.get("roles") or [])}


def may_see(caller: dict[str, Any], body: dict[str, Any]) -> bool:
    """RFC 7662 §4: whether this caller may learn about the token described by `body`."""
    if not body.get("active"):
        return True
    if caller["resource_server"]:
        return True
    if body.get("client_id") != caller["client_id"]:
        return False
    return caller["subject"] is None or body.get("sub") == caller["subject"]


async def revoke(db: store.Db, keys: Keyring, settings: GatewaySettings, form: dict[str, str],
                 authorization: str | None, *, revocations: RevocationList) -> None:
    """RFC 7009 §2.1: revoke a token issued to the calling client; unknown tokens are ignored."""
    client = await oauth.identify_client(db, settings, form, authorization)
    token = form.get("token", "")
    if not token:
        raise oauth.OAuthError("invalid_request", "token is required")
    stored = await store.get_refresh(db, grants.secret_hash(token))
    if stored is not None:
        if stored["client_id"] != client["_id"]:
            raise oauth.OAuthError("unauthorized_client", "The token was issued to another client")
        # Revoking a refresh token ends the grant: its other refresh and access tokens too.
        await store.revoke_refresh_family(db, stored["family"])
        await revocations.revoke_family(stored["family"])
        return
    claims = await access_claims(db, keys, settings, token)
    if claims is not None:
        if claims["client_id"] != client["_id"]:
            raise oauth.OAuthError("unauthorized_client", "The token was issued to another client")
        await revocations.revoke_jti(str(claims["jti"]), datetime.fromtimestamp(int(claims["exp"]) + 60, UTC))
