"""Gateway HTTP surface: OAuth endpoints, discovery, and the two FHIR bases it fronts."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from gateway import oauth, proxy
from gateway.settings import GatewaySettings
from mindchart_core import errors, tokens

router = APIRouter()
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


@router.post("/oauth/token")
async def token(request: Request) -> Response:
    """RFC 6749 §3.2 token endpoint; JSON errors per §5.2, never an OperationOutcome."""
    settings = _settings(request)
    try:
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
            raise oauth.OAuthError("invalid_request", "Use application/x-www-form-urlencoded")
        form = {k: str(v) for k, v in (await request.form()).items()}
        grant = form.get("grant_type")
        if grant == "client_credentials":
            body = await oauth.client_credentials(
                request.app.state.db, request.app.state.keys, settings, form,
                request.headers.get("authorization"),
            )
        elif not grant:
            raise oauth.OAuthError("invalid_request", "grant_type is required")
        else:
            raise oauth.OAuthError("unsupported_grant_type", "This grant type is not supported")
    except oauth.OAuthError as exc:
        request.state.refusal = exc.error
        return oauth_error(exc)
    return JSONResponse(body, headers={**NO_STORE, **CORS})


@router.get("/oauth/jwks")
async def jwks(request: Request) -> Response:
    return JSONResponse(await request.app.state.keys.public_jwks(), headers=CORS)


def smart_configuration(settings: GatewaySettings) -> dict[str, Any]:
    """SMART App Launch 2.2 §well-known (grown to the full list by the gateway issue)."""
    issuer = settings.issuer
    return {
        "issuer": issuer,
        "jwks_uri": f"{issuer}/oauth/jwks",
        "token_endpoint": f"{issuer}/oauth/token",
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt", "client_secret_basic",
                                                  "client_secret_post"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
        "scopes_supported": ["system/*.rs", "system/*.cruds"],
        "code_challenge_methods_supported": ["S256"],
        "capabilities": ["client-confidential-asymmetric", "client-confidential-symmetric",
                         "permission-v1", "permission-v2"],
    }


@router.get("/fhir/.well-known/smart-configuration")
@router.get("/psychnotes/fhir/.well-known/smart-configuration")
async def well_known(request: Request) -> Response:
    return JSONResponse(smart_configuration(_settings(request)), headers=CORS)


async def _proxy(request: Request, base: str, rest: str, upstream: str, audience: str) -> Response:
    proxy.reject_unsafe_path(request.scope.get("raw_path", b"").decode("latin-1"))
    if proxy.needs_token(rest):
        token = await request.app.state.verifiers[audience].verify(tokens.bearer_token(request))
        request.state.caller = {
            "client_id": token.client_id, "subject": token.subject, "fhir_user": token.fhir_user,
            "jti": token.jti, "patient": f"Patient/{token.patient}" if token.patient else None,
        }
        proxy.check_scopes(token, proxy.classify(request.method, rest))
    elif request.method != "GET":
        raise errors.MethodNotAllowed("Only GET is supported here")
    return await proxy.forward(request, request.app.state.http, upstream, request.state.request_id)


@router.api_route("/fhir/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
async def records(request: Request, rest: str) -> Response:
    settings = _settings(request)
    return await _proxy(request, "/fhir", rest, settings.records_url, "records")


@router.api_route("/psychnotes/fhir/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
async def psychnotes(request: Request, rest: str) -> Response:
    settings = _settings(request)
    return await _proxy(request, "/psychnotes/fhir", rest, settings.psychnotes_url, "psychnotes")
