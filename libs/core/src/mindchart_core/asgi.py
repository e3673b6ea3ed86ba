"""Pure-ASGI request context: request id, access log line and HTTP metrics for every request;
and a start-up refused for a configuration reason said in one line, not a traceback.

Pure ASGI rather than BaseHTTPMiddleware, which breaks context variables (Starlette docs). The
request id comes from `X-Request-ID` when it is well formed, else a new one; it is echoed back.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mindchart_core.keyfiles import KeyFileError
from mindchart_core.metrics import HTTP_LATENCY, HTTP_REQUESTS
from mindchart_core.settings import UnsafeConfiguration

REQUEST_ID_HEADER = b"x-request-id"
_VALID_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")

log = structlog.get_logger("access")


def request_id_of(scope: Scope) -> str:
    return str(scope.get("state", {}).get("request_id", ""))


ROUTE_STATE_KEY = "route"


def _route_template(scope: Scope) -> str:
    """The route a request took, as a template (bounded label values for metrics): what a pure
    ASGI endpoint named in `scope["state"]["route"]` (the gateway's proxy names FHIR interactions
    there), else the matched FastAPI route's path."""
    named = scope.get("state", {}).get(ROUTE_STATE_KEY)
    if named:
        return str(named)
    route = scope.get("route")
    path = getattr(route, "path", None)
    return str(path) if path else "unmatched"


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    """The request's id: its (last) `X-Request-ID` when well formed, else a new one."""
    incoming = b""
    for name, value in headers:
        if name == REQUEST_ID_HEADER:
            incoming = value
    return incoming.decode() if incoming and _VALID_ID.match(incoming) else uuid.uuid4().hex


# Metric children by label values (service, method, route, status): `.labels()` builds and
# looks up a key under a lock on every call. Routes are templates and methods and statuses few,
# so this stays small; it is dropped wholesale should it ever grow past _MAX_CHILDREN.
_children: dict[tuple[str, str, str, str], tuple[Any, Any]] = {}
_MAX_CHILDREN = 10_000


def request_finished(service: str, scope: Scope, status: int, started: float) -> None:
    """HTTP metrics and the access log line of a request that started at `started`
    (time.perf_counter())."""
    elapsed = time.perf_counter() - started
    route = _route_template(scope)
    method = str(scope.get("method", ""))
    key = (service, method, route, str(status))
    children = _children.get(key)
    if children is None:
        if len(_children) >= _MAX_CHILDREN:
            _children.clear()
        children = _children[key] = (HTTP_REQUESTS.labels(*key), HTTP_LATENCY.labels(*key[:3]))
    children[0].inc()
    children[1].observe(elapsed)
    log.info("request", method=method, route=route, status=status,
             latency_ms=round(elapsed * 1000, 2))


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, *, service: str) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(scope["headers"])
        scope.setdefault("state", {})["request_id"] = request_id
        structlog.contextvars.bind_contextvars(request_id=request_id)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", [])
                           if k.lower() != REQUEST_ID_HEADER]
                headers.append((REQUEST_ID_HEADER, request_id.encode()))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_finished(self.service, scope, status, started)
            structlog.contextvars.unbind_contextvars("request_id")


def refusal(exc: KeyFileError | UnsafeConfiguration) -> str:
    """The one line a refused start-up says (UnsafeConfiguration already begins with it)."""
    said = str(exc)
    return said if said.startswith("refusing to start") else f"refusing to start: {said}"


class StartupRefusalMiddleware:
    """A lifespan that raises KeyFileError or UnsafeConfiguration (a wrong or missing key, an
    unsafe production setting) fails start-up with that message alone: the ASGI lifespan
    protocol's `lifespan.startup.failed` carries it, and the server logs it and exits. Starlette
    would send the whole traceback instead, which reads as a crash, not as a refusal."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        held: list[Message] = []

        async def hold_failure(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed":
                held.append(message)  # sent once we know why
            else:
                await send(message)

        try:
            await self.app(scope, receive, hold_failure)
        except (KeyFileError, UnsafeConfiguration) as exc:
            await send({"type": "lifespan.startup.failed", "message": refusal(exc)})
            return
        except BaseException:
            for message in held:
                await send(message)
            raise
        for message in held:
            await send(message)
