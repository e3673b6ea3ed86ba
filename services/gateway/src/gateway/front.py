"""The FHIR path's one ASGI callable: a request for `/fhir/...` or `/psychnotes/fhir/...` goes from
uvicorn straight here (app.GatewayApp), past FastAPI, Starlette and the middleware stack, and this
does for it, in one pass, what each of those layers does for every other request:

- request context (mindchart_core.asgi.RequestContextMiddleware): request id, echoed back;
  structlog context; HTTP metrics and the access log line;
- body deadline (mindchart_core.http_limits.BodyDeadlineMiddleware): 408 for a slow body;
- forwarded-for (forwarded.py): the client address a trusted proxy vouches for;
- audit (audit.py): one record per request, stored before the response starts, 503 if it cannot
  be, the backends' disclosure header stripped and recorded;
- body limit (bodylimit.py): 413 above `max_body_bytes`, declared or counted;
- CORS (cors.py): the headers every FHIR answer carries;
- dispatch (proxy.FhirDispatch): the backend's ProxyEndpoint, its errors as OperationOutcomes.

Each refusal keeps the shape and the place it had in the stack: a 413 and a 500 are audited but
carry no CORS headers (they were answered outside the CORS layer), a 503 for a failed audit
carries the request id only, an endpoint's refusal carries both. CORS preflights, and every
request while tracing is on (its span must wrap the request), take the full stack instead.

Why: per proxied read each layer cost a closure per message, a header scan and an `await`, and
FastAPI's outer layers (error middleware, telemetry check, body-limit wrapper) their own: together
with the access log's metric lookups about a tenth of the gateway's CPU per read (bench/README).
"""

from __future__ import annotations

import time

import structlog
from starlette.types import Message, Receive, Scope, Send

from gateway import audit, bodylimit, cors, forwarded, proxy
from mindchart_core import asgi, http_limits

log = structlog.get_logger(__name__)


class FhirFront:
    def __init__(self, *, service: str, observer: str, max_body_bytes: int,
                 trusted: tuple[forwarded.Network, ...], routed: frozenset[str],
                 datastore_failure: proxy.DatastoreFailure) -> None:
        self.service = service
        self.observer = observer
        self.max_body_bytes = max_body_bytes
        self.trusted = trusted
        self.routed = routed
        self.datastore_failure = datastore_failure
        self.endpoints = [(base, proxy.ProxyEndpoint(backend)) for base, backend in proxy.BASES]

    def endpoint_for(self, scope: Scope) -> proxy.ProxyEndpoint | None:
        """This request's endpoint when the front answers it, else None (the full stack does)."""
        if scope["type"] != "http":
            return None
        path: str = scope["path"]
        if path in self.routed:
            return None
        for base, endpoint in self.endpoints:
            if path == base or (path.startswith(base) and path[len(base)] == "/"):
                if scope["method"] == "OPTIONS" and any(
                        k == b"access-control-request-method" for k, _ in scope["headers"]):
                    return None  # a CORS preflight: cors.py answers it
                scope["path_params"] = {"rest": path[len(base) + 1:]}
                return endpoint
        return None

    async def __call__(self, endpoint: proxy.ProxyEndpoint, scope: Scope, receive: Receive,
                       send: Send) -> None:
        # -- request context --
        request_id = asgi.request_id_from(scope["headers"])
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        structlog.contextvars.bind_contextvars(request_id=request_id)
        started = time.perf_counter()
        status = 500
        request_id_header = (asgi.REQUEST_ID_HEADER, request_id.encode())
        # -- forwarded-for --
        if self.trusted:
            scope = forwarded.resolve_client(scope, self.trusted)
        cors_headers = True  # endpoint answers carry CORS; the audit layer's own 413/500 do not

        async def with_request_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [h for h in message.get("headers", [])
                                      if h[0].lower() != asgi.REQUEST_ID_HEADER] + [request_id_header]
            await send(message)

        # -- audit -- (its 503 for a failed audit carries the request id only)
        audited = audit.AuditedSend(scope, receive, with_request_id, self.observer,
                                    scope["app"].state.audit_chain, started)

        async def respond(message: Message) -> None:  # -- CORS --
            if cors_headers and message["type"] == "http.response.start":
                message["headers"] = cors.with_cors_headers(message.get("headers", []))
            await audited(message)

        def responded() -> bool:
            return audited.responded

        try:
            try:
                body_receive = self._bounded_receive(scope, receive)
                if body_receive is None:  # a declared size over the limit
                    cors_headers = False
                    await bodylimit.refusal(scope["path"], self.max_body_bytes)(scope, receive, respond)
                    return
                await proxy.serve(endpoint, scope, body_receive, respond, self.datastore_failure,
                                  responded)
            except bodylimit.BodyTooLarge:
                if audited.responded:
                    raise
                cors_headers = False
                await bodylimit.refusal(scope["path"], self.max_body_bytes)(scope, receive, respond)
        except Exception as exc:
            if audited.responded:
                raise
            await audited.internal_error(exc)  # as audit.AuditMiddleware: no CORS on the 500
        finally:
            asgi.request_finished(self.service, scope, status, started)
            structlog.contextvars.unbind_contextvars("request_id")

    def _bounded_receive(self, scope: Scope, receive: Receive) -> Receive | None:
        """`receive` as the body deadline and the body limit see it; None when the declared
        Content-Length is over the limit. A request without a body reads it unchanged."""
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        if not http_limits.has_body(headers):
            return receive
        declared = next((v for k, v in headers if k == b"content-length"), b"")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return None
        seen = 0

        def count(size: int) -> None:
            nonlocal seen
            seen += size
            if seen > self.max_body_bytes:
                raise bodylimit.BodyTooLarge

        return http_limits.deadline_receive(receive, http_limits.limits().body_timeout_seconds, count)


__all__ = ["FhirFront"]
