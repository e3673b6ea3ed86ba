"""CORS for browser apps (SMART App Launch 2.2 §discovery and §token: CORS on the well-known
document, `/metadata`, the token endpoint and the FHIR APIs). Tokens travel as bearer headers,
never cookies, so any origin may call; the HTML sign-in pages are not shared cross-origin.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

_PREFIXES = ("/fhir", "/psychnotes/fhir", "/oauth/token", "/oauth/jwks", "/oauth/introspect",
             "/oauth/revoke", "/oauth/launch", "/oauth/smart-style.json", "/.well-known", "/audit")
_EXPOSE = b"Location, ETag, Last-Modified, Content-Location, X-Request-ID, Retry-After, WWW-Authenticate"
_OURS = (b"access-control-allow-origin", b"access-control-expose-headers")
_METHODS = b"GET, POST, PUT, PATCH, DELETE, OPTIONS"


def with_cors_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """An answer's headers with ours (any origin; what a browser app may read) in place of any
    the handler set."""
    kept = [(k, v) for k, v in headers if k.lower() not in _OURS]
    kept += [(b"access-control-allow-origin", b"*"), (b"access-control-expose-headers", _EXPOSE)]
    return kept


def shared(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in _PREFIXES)


class CorsMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not shared(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        if scope["method"] == "OPTIONS" and b"access-control-request-method" in headers:
            allow_headers = headers.get(b"access-control-request-headers", b"authorization, content-type")
            await send({"type": "http.response.start", "status": 204, "headers": [
                (b"access-control-allow-origin", b"*"), (b"access-control-allow-methods", _METHODS),
                (b"access-control-allow-headers", allow_headers), (b"access-control-max-age", b"600"),
                (b"vary", b"Origin")]})
            await send({"type": "http.response.body", "body": b""})
            return

        async def with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = with_cors_headers(message.get("headers", []))
            await send(message)

        await self.app(scope, receive, with_cors)
