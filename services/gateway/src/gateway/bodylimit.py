"""Request bodies above MINDCHART_GATEWAY_MAX_BODY_BYTES are refused at the edge with 413, before
any handler parses a form or the proxy opens an upstream request. Declared sizes are checked up
front; chunked bodies are counted as they stream. The answer speaks each surface's language:
RFC 6749 JSON on /oauth, an OperationOutcome everywhere else. Backends keep their own limits.
"""

from __future__ import annotations

from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mindchart_core import errors


class BodyTooLarge(Exception):
    pass


def refusal(path: str, limit: int) -> Response:
    text = f"Request body exceeds the {limit}-byte limit"
    if path.startswith("/oauth"):
        return JSONResponse({"error": "invalid_request", "error_description": text}, status_code=413,
                            headers={"Cache-Control": "no-store"})
    return errors.PayloadTooLarge(text).response()


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await refusal(scope.get("path", ""), self.max_bytes)(scope, receive, send)
            return
        seen = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge:
            if started:
                raise
            await refusal(scope.get("path", ""), self.max_bytes)(scope, receive, send)
