"""Routing to the FHIR backends with coarse policy: valid token, our audience, scopes that can
cover the interaction. Backends verify the token again and narrow results themselves.

Only allow-listed request headers travel upstream, so identity headers a client invents
(X-Forwarded-User, X-Client-Id, ...) never reach a backend.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import httpx
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from mindchart_core import errors, fhirjson, tokens

FORWARDED_REQUEST_HEADERS = frozenset({
    "authorization", "consent-token", "accept", "content-type", "content-length", "prefer",
    "if-match", "if-none-match", "if-none-exist", "if-modified-since", "x-request-id",
    "traceparent", "tracestate",  # W3C trace context: one trace across gateway and backend
})
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
    "transfer-encoding", "upgrade", "content-length", "content-encoding", "x-request-id", "date",
    "server",
})
_UNSAFE_PATH = re.compile(r"(^|/)\.{1,2}(/|$)|%2e|%2f|%5c|\\|//|%00", re.IGNORECASE)
_TOKEN_FREE = ("metadata", ".well-known/smart-configuration")


@dataclass(frozen=True)
class Interaction:
    resource_type: str | None
    name: str  # R4 restful-interaction code, or "operation"


def classify(method: str, rest: str) -> Interaction:
    """What a request to `[base]/rest` asks for (R4 http.html)."""
    parts = [p for p in rest.split("/") if p]
    if any(p.startswith("$") for p in parts):
        kind = parts[0] if parts and parts[0][:1].isupper() else None
        return Interaction(kind, "operation")
    if not parts:
        return Interaction(None, "search-system" if method == "GET" else "transaction")
    kind = parts[0]
    if parts[0] == "_history":
        return Interaction(None, "history-system")
    if len(parts) == 1:  # PUT/DELETE/PATCH on a type are the conditional forms (R4 http.html)
        names = {"GET": "search-type", "POST": "create", "PUT": "update", "PATCH": "patch",
                 "DELETE": "delete"}
        return Interaction(kind, names.get(method, "unknown"))
    if parts[1] == "_search":
        return Interaction(kind, "search-type")
    if parts[1] == "_history":
        return Interaction(kind, "history-type")
    if len(parts) == 2:
        names = {"GET": "read", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
        return Interaction(kind, names.get(method, "unknown"))
    if parts[2] == "_history":
        return Interaction(kind, "vread" if len(parts) > 3 else "history-instance")
    return Interaction(kind, "unknown")


def patient_of(rest: str, query: str) -> str | None:
    """The patient a request is about, when the URL says (for the audit's patient entity)."""
    parts = [p for p in rest.split("/") if p]
    if len(parts) >= 2 and parts[0] == "Patient" and not parts[1].startswith(("$", "_")):
        return f"Patient/{parts[1]}"
    for pair in query.split("&"):
        name, _, value = pair.partition("=")
        if name in ("patient", "subject") and value and "," not in value and "%2C" not in value:
            return value if "/" in value or "%2F" in value else f"Patient/{value}"
    return None


def reject_unsafe_path(raw_path: str) -> None:
    if _UNSAFE_PATH.search(raw_path):
        raise errors.Invalid("Path segments '.', '..', encoded slashes and backslashes are refused")


def needs_token(rest: str) -> bool:
    return rest.strip("/") not in _TOKEN_FREE


def check_scopes(token: tokens.AccessToken, interaction: Interaction) -> None:
    """Refuse what the token's scopes can never cover; backends narrow what remains."""
    if interaction.name == "unknown":
        raise errors.MethodNotAllowed("This method is not supported on this URL")
    if interaction.resource_type and interaction.name != "operation":
        if not token.scope.allows(interaction.resource_type, interaction.name):
            raise errors.Forbidden(
                f"The granted scopes do not permit {interaction.name} on {interaction.resource_type}"
            )
    elif not token.scope.clinical:
        raise errors.Forbidden("The granted scopes do not permit this request")


async def forward(request: Request, http: httpx.AsyncClient, upstream: str, request_id: str) -> Response:
    headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED_REQUEST_HEADERS}
    headers["x-request-id"] = request_id
    url = upstream + request.url.path
    if request.url.query:
        url += "?" + request.url.query
    upstream_request = http.build_request(
        request.method, url, headers=headers, content=request.stream(),
    )
    try:
        response = await http.send(upstream_request, stream=True)
    except httpx.TimeoutException:
        raise errors.FhirError("The upstream FHIR server timed out", status=504, code="timeout") from None
    except httpx.HTTPError:
        raise errors.Unavailable("The upstream FHIR server is unavailable") from None
    out_headers = {k: v for k, v in response.headers.items() if k.lower() not in HOP_BY_HOP}
    return StreamingResponse(
        response.aiter_raw(), status_code=response.status_code, headers=out_headers,
        background=BackgroundTask(response.aclose),
    )


__all__ = ["Interaction", "classify", "fhirjson", "forward", "needs_token", "patient_of"]
