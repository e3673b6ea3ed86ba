"""Gateway HTTP surface: OAuth endpoints, discovery, and the two FHIR bases it fronts."""

from __future__ import annotations

import base64
import json
from datetime import datetime
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from gateway import (
    audit_routes,
    authorize,
    grants,
    introspection,
    launches,
    oauth,
    pages,
    ratelimit,
    revocations,
    subscribers,
)
from gateway.settings import GatewaySettings
from mindchart_core import errors, metrics, tokens

router = APIRouter()
router.include_router(audit_routes.router)
router.include_router(subscribers.router)
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
CORS = {"Access-Control-Allow-Origin": "*"}


def _settings(request: Request) -> GatewaySettings:
    settings: GatewaySettings = request.app.state.settings
    return settings


def oauth_error(exc: oauth.OAuthError) -> JSONResponse:
    headers = dict(NO_STORE)
    if exc.status == 401:
        headers["WWW-Authenticate"] = 'Basic realm="mindchart"'
    return JSONResponse({"error": exc.error, "error_description": exc.description},
                        status_code=exc.status, headers=headers)


async def _form(request: Request) -> dict[str, str]:
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
        raise oauth.OAuthError("invalid_request", "Use application/x-www-form-urlencoded")
    form = await request.form()
    for key in form:
        if len(form.getlist(key)) > 1:
            raise oauth.OAuthError("invalid_request", f"{key} is repeated")  # RFC 6749 §3.1
    return {k: str(v) for k, v in form.items()}


def _claimed_client(form: dict[str, str], authorization: str | None) -> str | None:
    """The client a token request names (unverified), to count it against that client's budget."""
    if form.get("client_id"):
        return form["client_id"]
    if authorization and authorization.lower().startswith("basic "):
        try:
            return base64.b64decode(authorization[6:].strip()).decode().partition(":")[0] or None
        except (ValueError, UnicodeDecodeError):
            return None
    if form.get("client_assertion"):
        try:
            payload = form["client_assertion"].split(".")[1]
            return str(json.loads(base64.urlsafe_b64decode(payload + "==")).get("iss")) or None
        except (ValueError, IndexError, UnicodeDecodeError, AttributeError):
            return None
    return None


def _limit(request: Request, key: str) -> None:
    ratelimit.enforce(request.app.state.rate_limiter, key, _settings(request).rate_limit_requests,
                      request.scope.setdefault("state", {}))


@router.post("/oauth/token")
async def token(request: Request) -> Response:
    """RFC 6749 §3.2 token endpoint; JSON errors per §5.2, never an OperationOutcome."""
    settings = _settings(request)
    db, keys = request.app.state.db, request.app.state.keys
    authorization = request.headers.get("authorization")
    try:
        form = await _form(request)
        claimed = _claimed_client(form, authorization)
        request.state.oauth_client_id = claimed
        try:
            # The client is not authenticated yet: count per (claimed client, address), so nobody
            # can spend another client's budget by naming it.
            address = request.client.host if request.client else "?"
            _limit(request, f"token:{claimed or '-'}:{address}")
        except errors.Throttled as exc:
            return JSONResponse({"error": "slow_down", "error_description": exc.diagnostics},
                                status_code=429, headers={**NO_STORE, **exc.headers})
        grant = form.get("grant_type")
        if grant == "client_credentials":
            body = await oauth.client_credentials(db, keys, settings, form, authorization)
        elif grant == "authorization_code":
            body = await grants.authorization_code(db, keys, settings, form, authorization,
                                                   revocations=request.app.state.revocations)
        elif grant == "refresh_token":
            body = await grants.refresh_token(db, keys, settings, form, authorization,
                                              revocations=request.app.state.revocations)
        elif not grant:
            raise oauth.OAuthError("invalid_request", "grant_type is required")
        else:
            raise oauth.OAuthError("unsupported_grant_type", "This grant type is not supported")
    except oauth.OAuthError as exc:
        request.state.refusal = exc.error
        metrics.TOKEN_REFUSALS.labels(_grant_label(form if "form" in locals() else {}), exc.error).inc()
        return oauth_error(exc)
    metrics.TOKENS_ISSUED.labels(_grant_label(form)).inc()
    return JSONResponse(body, headers={**NO_STORE, **CORS})


def _grant_label(form: dict[str, str]) -> str:
    grant = form.get("grant_type", "")
    return grant if grant in ("client_credentials", "authorization_code", "refresh_token") else "other"


@router.post("/oauth/introspect")
async def introspect(request: Request) -> Response:
    """RFC 7662 §2 with SMART 2.2 §token-introspection fields."""
    settings = _settings(request)
    db, keys = request.app.state.db, request.app.state.keys
    try:
        form = await _form(request)
        caller = await introspection.introspection_caller(
            db, keys, settings, form, request.headers.get("authorization"))
        request.state.oauth_client_id = caller["client_id"]
    except oauth.OAuthError as exc:
        request.state.refusal = exc.error
        response = oauth_error(exc)
        if exc.error == "invalid_token":
            response.headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
        return response
    body = await introspection.introspect(db, keys, settings, form.get("token", ""))
    if not introspection.may_see(caller, body):
        body = dict(introspection.INACTIVE)  # RFC 7662 §2.2: not allowed = not active
    return JSONResponse(body, headers=NO_STORE)


@router.post("/oauth/revoke")
async def revoke(request: Request) -> Response:
    """RFC 7009 §2: 200 whether or not the token was known."""
    settings = _settings(request)
    try:
        form = await _form(request)
        request.state.oauth_client_id = form.get("client_id")
        await introspection.revoke(request.app.state.db, request.app.state.keys, settings, form,
                                   request.headers.get("authorization"),
                                   revocations=request.app.state.revocations)
    except oauth.OAuthError as exc:
        request.state.refusal = exc.error
        return oauth_error(exc)
    return Response(status_code=200, headers=NO_STORE)


# -- authorization endpoint and its pages (SMART 2.2 §authorization-code) -----------------------

@router.get("/oauth/authorize")
async def authorize_get(request: Request) -> Response:
    params = request.query_params
    if any(len(params.getlist(k)) > 1 for k in params):
        return pages.error_page("Invalid request", "A parameter is repeated.")
    return await authorize.start(request, dict(params))


async def _page_form(request: Request) -> tuple[dict[str, str], list[str]]:
    form = await request.form()
    return {k: str(v) for k, v in form.items() if k != "scope"}, [str(v) for v in form.getlist("scope")]


@router.post("/oauth/authorize")
async def authorize_post(request: Request) -> Response:
    """SMART 2.2: the authorize endpoint SHALL accept form POST too (authorize-post)."""
    form = await request.form()
    if any(len(form.getlist(k)) > 1 for k in form):
        return pages.error_page("Invalid request", "A parameter is repeated.")
    return await authorize.start(request, {k: str(v) for k, v in form.items()})


@router.post(authorize.LOGIN)
async def authorize_login(request: Request) -> Response:
    form, _ = await _page_form(request)
    return await authorize.login(request, form)


@router.post(authorize.PICK)
async def authorize_patient(request: Request) -> Response:
    form, _ = await _page_form(request)
    return await authorize.pick_patient(request, form)


@router.post(authorize.APPROVE)
async def authorize_approve(request: Request) -> Response:
    form, approved = await _page_form(request)
    return await authorize.decide(request, form, approved)


# -- EHR launch API ----------------------------------------------------------------------------

@router.post("/oauth/launch")
async def create_launch(request: Request) -> Response:
    """An EHR user (practitioner or admin, with a token from this gateway) mints a launch id."""
    settings = _settings(request)
    db, keys = request.app.state.db, request.app.state.keys
    raw = tokens.bearer_value(request.headers.get("authorization"))
    claims = await introspection.access_claims(db, keys, settings, raw)
    if claims is None:
        raise errors.Unauthorized("A valid bearer token is required")
    request.state.caller = {"client_id": claims["client_id"], "subject": claims["sub"],
                            "fhir_user": claims.get("fhirUser"), "jti": claims["jti"]}
    if not {"practitioner", "admin"} & set(claims.get("roles") or []):
        raise errors.Forbidden("Only practitioners and administrators may create launches")
    try:
        body = await request.json()
        if not isinstance(body, dict) or not isinstance(body.get("patient"), str):
            raise errors.Invalid("Send JSON with patient (and optionally encounter, client_id, launch_url)")
        result = await launches.create_launch(
            db, settings, patient=body["patient"], encounter=body.get("encounter"),
            client_id=body.get("client_id"), username=str(claims["sub"]),
            launch_url=body.get("launch_url"))
    except launches.LaunchError as exc:
        raise errors.Invalid(str(exc)) from None
    except ValueError:
        raise errors.Invalid("The body is not JSON") from None
    return JSONResponse(result, status_code=201, headers=NO_STORE)


@router.get(grants.SMART_STYLE_PATH)
async def smart_style(_: Request) -> Response:
    """What `smart_style_url` points at: JSON, readable from any origin (apps fetch it)."""
    return JSONResponse(grants.SMART_STYLE, headers=CORS)


@router.get("/oauth/revocations")
async def revocations_feed(request: Request) -> Response:
    """What records and psychnotes follow (mindchart_core.tokens.RevocationFeed) to refuse revoked
    access tokens themselves, answered from this replica's in-memory list (revocations.py; no
    datastore query per request). `cursor` (what this endpoint last gave) names what the backend
    has; with `since` (the `newest` instant it was given) a cursor of another replica or process
    still resumes, with a few seconds of overlap; with neither, every unexpired revocation.
    `wait` (seconds, at most revocations.MAX_WAIT_SECONDS) makes it a long poll: a backend that
    is up to date is answered when something is revoked. Ids only (`jti:<jti>`,
    `family:<sid>`) with their expiry: nothing here is usable as a credential. Only callers
    presenting the feed secret are answered (revocations.py, "Who may read the feed")."""
    listed: revocations.RevocationList = request.app.state.revocations
    listed.check_reader(request.headers.get("authorization"))
    params = request.query_params
    since_text, cursor, wait_text = params.get("since"), params.get("cursor"), params.get("wait")
    since = None
    if since_text:
        try:
            since = datetime.fromisoformat(since_text)
        except ValueError:
            raise errors.Invalid("since must be an instant this endpoint returned") from None
        if since.tzinfo is None:
            raise errors.Invalid("since must carry a time zone")
    if cursor is not None and len(cursor) > 64:
        raise errors.Invalid("cursor must be one this endpoint returned")
    wait = 0.0
    if wait_text:
        try:
            wait = float(wait_text)
        except ValueError:
            raise errors.Invalid("wait must be a number of seconds") from None
        if not 0 <= wait <= revocations.MAX_WAIT_SECONDS:
            raise errors.Invalid(f"wait must be between 0 and {revocations.MAX_WAIT_SECONDS:g} seconds")
    answer = await listed.changes(cursor=cursor, since=since, wait=wait)
    return Response(orjson.dumps(answer.to_json()), media_type="application/json", headers=NO_STORE)


@router.get("/oauth/jwks")
async def jwks(request: Request) -> Response:
    return JSONResponse(await request.app.state.keys.public_jwks(fresh=True), headers=CORS)


CAPABILITIES = [
    "launch-standalone", "launch-ehr", "authorize-post", "client-public",
    "client-confidential-symmetric", "client-confidential-asymmetric", "sso-openid-connect",
    "context-banner", "context-style", "context-standalone-patient", "context-ehr-patient",
    "context-ehr-encounter",
    "permission-patient", "permission-user", "permission-offline", "permission-online",
    "permission-v1", "permission-v2",
]
SCOPES_SUPPORTED = [
    "openid", "fhirUser", "launch", "launch/patient", "launch/encounter", "offline_access",
    "online_access", "patient/*.rs", "patient/*.cruds", "user/*.rs", "user/*.cruds", "system/*.rs",
    "system/*.cruds", "patient/*.read", "user/*.read", "user/AuditEvent.rs", "system/AuditEvent.rs",
]


def smart_configuration(settings: GatewaySettings) -> dict[str, Any]:
    """SMART App Launch 2.2 §well-known: required, conditional and recommended fields."""
    issuer = settings.issuer
    return {
        "issuer": issuer,
        "jwks_uri": f"{issuer}/oauth/jwks",
        "authorization_endpoint": f"{issuer}/oauth/authorize",
        "token_endpoint": f"{issuer}/oauth/token",
        "introspection_endpoint": f"{issuer}/oauth/introspect",
        "revocation_endpoint": f"{issuer}/oauth/revoke",
        "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
        "response_types_supported": ["code"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt", "client_secret_basic",
                                                  "client_secret_post"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
        "scopes_supported": SCOPES_SUPPORTED,
        "code_challenge_methods_supported": ["S256"],
        "capabilities": CAPABILITIES,
    }


# The routes under the FHIR bases that are the gateway's own, not proxied (proxy.FhirDispatch).
FHIR_BASE_ROUTES = frozenset({"/fhir/.well-known/smart-configuration",
                              "/psychnotes/fhir/.well-known/smart-configuration"})


@router.get("/fhir/.well-known/smart-configuration")
@router.get("/psychnotes/fhir/.well-known/smart-configuration")
async def well_known(request: Request) -> Response:
    return JSONResponse(smart_configuration(_settings(request)), headers=CORS)


@router.get("/.well-known/openid-configuration")
async def openid_configuration(request: Request) -> Response:
    """OpenID Connect Discovery 1.0 §3 for `sso-openid-connect`."""
    settings = _settings(request)
    smart = smart_configuration(settings)
    return JSONResponse({
        "issuer": settings.issuer,
        "authorization_endpoint": smart["authorization_endpoint"],
        "token_endpoint": smart["token_endpoint"],
        "jwks_uri": smart["jwks_uri"],
        "introspection_endpoint": smart["introspection_endpoint"],
        "revocation_endpoint": smart["revocation_endpoint"],
        "response_types_supported": ["code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "scopes_supported": ["openid", "fhirUser", "offline_access", "online_access"],
        "grant_types_supported": smart["grant_types_supported"],
        "token_endpoint_auth_methods_supported": smart["token_endpoint_auth_methods_supported"],
        "code_challenge_methods_supported": ["S256"],
        "claims_supported": ["iss", "sub", "aud", "exp", "iat", "auth_time", "nonce", "fhirUser"],
    }, headers=CORS)
