"""User grants: the authorization_code and refresh_token grants and the tokens they issue.

SMART App Launch 2.2 §token-response (access token, context, `id_token` with `fhirUser`,
refresh token), §refresh (rotation, scope subset, bound to the client), RFC 7636 §4.6 (PKCE S256
verification), RFC 6749 §4.1.2 and §10.5 (codes single-use and short-lived; a replayed code
revokes what it issued). A *grant* is what the user approved: client, user, scopes, launch context;
codes and refresh tokens both carry one, under a `family` id that revocation acts on.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from gateway import store
from gateway.keys import Keyring
from gateway.oauth import OAuthError, identify_client, presents_credentials
from gateway.revocations import RevocationList
from gateway.settings import GatewaySettings
from mindchart_core import scopes

log = structlog.get_logger(__name__)

# SMART identity, context and refresh scopes: any client using the authorization code may ask.
LAUNCH_SCOPES = frozenset({"openid", "fhirUser", "profile", "launch", "launch/patient",
                           "launch/encounter", "offline_access", "online_access"})
SMART_STYLE_PATH = "/oauth/smart-style.json"
# SMART App Launch "Experimental features: smart-app-styling-properties": the keys an app may read
# from `smart_style_url` to look like its host. These are the gateway pages' own colours and fonts.
SMART_STYLE = {
    "color_background": "#f7f7f5", "color_error": "#9e2d2d", "color_highlight": "#1d5e8c",
    "color_modal_backdrop": "rgba(0, 0, 0, 0.4)", "color_success": "#2f6f3e", "color_text": "#1b1b1b",
    "dim_border_radius": "4px", "dim_font_size": "16px", "dim_spacing_size": "16px",
    "font_family_body": "system-ui, sans-serif", "font_family_heading": "system-ui, sans-serif",
}
_VERIFIER = re.compile(r"^[A-Za-z0-9\-._~]{43,128}$")  # RFC 7636 §4.1


def secret_hash(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def user_scope_cap(requested: scopes.ScopeSet, client: dict[str, Any]) -> scopes.ScopeSet:
    """What a user-facing app may be granted: its registered patient/ and user/ scopes, plus the
    SMART launch and identity scopes. system/ scopes are for Backend Services only."""
    allowed = scopes.parse(client.get("scope", ""))
    capped = scopes.cap(requested, allowed)
    return scopes.ScopeSet(
        clinical=tuple(s for s in capped.clinical if s.context in ("patient", "user")),
        other=frozenset(w for w in requested.other if w in LAUNCH_SCOPES or w in allowed.other),
    )


def absolute_fhir_user(settings: GatewaySettings, fhir_user: str | None) -> str | None:
    return f"{settings.records_base}/{fhir_user}" if fhir_user else None


async def issue_tokens(
    db: store.Db, keys: Keyring, settings: GatewaySettings, grant: dict[str, Any],
    *, refresh_expires: datetime | None = None,
) -> dict[str, Any]:
    """SMART 2.2 §token-response for an approved grant."""
    granted = scopes.parse(grant["scope"])
    now = int(time.time())
    fhir_user = absolute_fhir_user(settings, grant.get("fhir_user"))
    claims: dict[str, Any] = {
        "iss": settings.issuer, "aud": settings.audience_for(grant["audience"]),
        "sub": grant["username"], "client_id": grant["client_id"], "scope": str(granted),
        "iat": now, "exp": now + settings.user_token_seconds, "jti": uuid.uuid4().hex,
        "sid": grant["family"], "roles": [grant["role"]],
    }
    if fhir_user:
        claims["fhirUser"] = fhir_user
    if grant.get("supervisor"):  # records/lifecycle: this practitioner's notes need co-signature
        claims["supervisor"] = grant["supervisor"]
    body: dict[str, Any] = {"token_type": "Bearer", "expires_in": settings.user_token_seconds,
                            "scope": str(granted)}
    for name in ("patient", "encounter"):
        if grant.get(name):
            claims[name] = body[name] = grant[name]
    if grant.get("patient"):
        claims["need_patient_banner"] = body["need_patient_banner"] = bool(
            grant.get("need_patient_banner", True))
    if grant.get("ehr_launch"):
        # SMART 2.2 §launch-context `smart_style_url` (capability `context-style`); the ONC (g)(10)
        # test kit's `g10_smart_style_url` requires it on the EHR launch and fetches it as JSON.
        body["smart_style_url"] = f"{settings.issuer}{SMART_STYLE_PATH}"
    body["access_token"] = await keys.sign(claims)
    if granted.has("openid"):
        id_claims: dict[str, Any] = {
            "iss": settings.issuer, "sub": grant["username"], "aud": grant["client_id"],
            "iat": now, "exp": now + settings.user_token_seconds, "auth_time": grant.get("auth_time", now),
        }
        if granted.has("fhirUser") and fhir_user:
            id_claims["fhirUser"] = fhir_user
        if grant.get("nonce"):
            id_claims["nonce"] = grant["nonce"]
        body["id_token"] = await keys.sign(id_claims)
    if granted.has("offline_access") or granted.has("online_access"):
        lifetime = (settings.offline_refresh_seconds if granted.has("offline_access")
                    else settings.online_refresh_seconds)
        expires = refresh_expires or datetime.now(UTC) + timedelta(seconds=lifetime)
        refresh = secrets.token_urlsafe(32)
        await store.put_refresh(db, {
            "_id": secret_hash(refresh), "family": grant["family"], "client_id": grant["client_id"],
            "grant": grant, "expires": expires, "created": datetime.now(UTC), "used": False,
            "revoked": False})
        body["refresh_token"] = refresh
    log.info("token_issued", client_id=grant["client_id"], grant="user", audience=grant["audience"])
    return body


async def authorization_code(
    db: store.Db, keys: Keyring, settings: GatewaySettings, form: dict[str, str],
    authorization: str | None, *, revocations: RevocationList,
) -> dict[str, Any]:
    client = await identify_client(db, settings, form, authorization)
    code = form.get("code")
    if not code:
        raise OAuthError("invalid_request", "code is required")
    stored = await store.redeem_code(db, secret_hash(code))
    if stored is None:
        raise OAuthError("invalid_grant", "The authorization code is unknown")
    if stored.get("used"):
        # RFC 6749 §4.1.2: a code used twice revokes the tokens it already produced.
        await store.revoke_refresh_family(db, stored["grant"]["family"])
        await revocations.revoke_family(stored["grant"]["family"])
        raise OAuthError("invalid_grant", "The authorization code was already used")
    if stored["expires"] <= datetime.now(UTC):
        raise OAuthError("invalid_grant", "The authorization code has expired")
    if stored["grant"]["client_id"] != client["_id"]:
        raise OAuthError("invalid_grant", "The authorization code was issued to another client")
    if form.get("redirect_uri") != stored["redirect_uri"]:
        raise OAuthError("invalid_grant", "redirect_uri differs from the authorization request")
    verifier = form.get("code_verifier", "")
    if not _VERIFIER.match(verifier):
        raise OAuthError("invalid_request", "code_verifier is required (RFC 7636, 43-128 characters)")
    if not secrets.compare_digest(s256(verifier).encode(), str(stored["code_challenge"]).encode()):
        raise OAuthError("invalid_grant", "code_verifier does not match the code_challenge")
    return await issue_tokens(db, keys, settings, stored["grant"])


async def refresh_token(
    db: store.Db, keys: Keyring, settings: GatewaySettings, form: dict[str, str],
    authorization: str | None, *, revocations: RevocationList,
) -> dict[str, Any]:
    """SMART App Launch 2.2 §refresh-access-token: a public app sends only `grant_type`,
    `refresh_token` (and optionally `scope`): "authentication is not possible (and thus not
    required)" for it, and RFC 6749 §6 asks client authentication only of confidential clients.
    The refresh token already names its client, so a request without credentials and without
    `client_id` is taken as that client's, which must then be public."""
    presented = form.get("refresh_token")
    if not presented:
        raise OAuthError("invalid_request", "refresh_token is required")
    digest = secret_hash(presented)
    stored = await store.get_refresh(db, digest)
    if stored is None or stored.get("revoked") or stored["expires"] <= datetime.now(UTC):
        raise OAuthError("invalid_grant", "The refresh token is invalid, expired or revoked")
    if not form.get("client_id") and not presents_credentials(form, authorization):
        form = {**form, "client_id": stored["client_id"]}  # identify_client: must be public
    client = await identify_client(db, settings, form, authorization)
    if stored["client_id"] != client["_id"]:
        raise OAuthError("invalid_grant", "The refresh token was issued to another client")
    grant = dict(stored["grant"])
    if form.get("scope"):
        asked, had = set(form["scope"].split()), set(grant["scope"].split())
        if not asked <= had:
            raise OAuthError("invalid_scope", "A refresh may only narrow the granted scopes")
        grant["scope"] = str(scopes.parse(" ".join(w for w in grant["scope"].split() if w in asked)))
    if await store.claim_refresh(db, digest) is None:
        # A rotated token used again: someone holds a copy. Revoke the whole grant.
        await store.revoke_refresh_family(db, stored["family"])
        await revocations.revoke_family(stored["family"])
        raise OAuthError("invalid_grant", "The refresh token was already used")
    user = await store.get_user(db, grant["username"])
    if user is None or user.get("disabled"):
        raise OAuthError("invalid_grant", "The user of this grant no longer exists")
    return await issue_tokens(db, keys, settings, grant, refresh_expires=stored["expires"])
