"""One audit record per request the gateway receives, written before the response starts.

A pure-ASGI middleware (not BaseHTTPMiddleware) wraps the whole gateway, so 401s, 404s, 429s and
errors raised before any handler are audited too (Microsoft's FHIR server needed its own
AuditMiddleware for the same reason). If the record cannot be stored, the client gets a 503 rather
than an unaudited answer (45 CFR 164.312(b)).
"""

from __future__ import annotations

import time
from typing import Any

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import proxy, store
from mindchart_core import audit as audit_shape
from mindchart_core import errors

log = structlog.get_logger(__name__)


def _base_and_rest(path: str) -> tuple[str | None, str]:
    for base in ("/psychnotes/fhir", "/fhir", "/audit"):
        if path == base or path.startswith(base + "/"):
            return base, path[len(base):]
    return None, path


def build_record(scope: Scope, status: int, latency_ms: float, observer: str) -> dict[str, Any]:
    state = scope.get("state", {})
    caller: dict[str, Any] = state.get("caller", {})
    path: str = scope.get("path", "")
    query = scope.get("query_string", b"").decode("latin-1")
    base, rest = _base_and_rest(path)
    if base in ("/fhir", "/psychnotes/fhir"):
        interaction = proxy.classify(scope["method"], rest)
        interaction_name, entity = interaction.name, None
        parts = [p for p in rest.split("/") if p]
        if len(parts) >= 2 and not parts[1].startswith(("$", "_")):
            entity = f"{parts[0]}/{parts[1]}"
    else:
        interaction_name = "token" if path.startswith("/oauth") else "operation"
        entity = None
    patient = caller.get("patient") or (proxy.patient_of(rest, query) if base else None)
    client = scope.get("client") or ("", 0)
    audit = audit_shape.RestAudit(
        interaction=interaction_name,
        method=scope["method"],
        path=path,
        query=query,
        status=status,
        request_id=str(state.get("request_id", "")),
        client_ip=str(client[0]),
        observer=observer,
        client_id=caller.get("client_id"),
        subject=caller.get("subject"),
        fhir_user=caller.get("fhir_user"),
        jti=caller.get("jti"),
        patient=patient,
        entity_ref=entity,
        latency_ms=latency_ms,
        outcome_desc=state.get("refusal"),
    )
    event = audit_shape.rest_audit_event(audit)
    return {
        "_id": event["id"],
        "recorded": audit.recorded,
        "request_id": audit.request_id,
        "method": audit.method,
        "path": path,
        "status": status,
        "latency_ms": round(latency_ms, 2),
        "client_id": audit.client_id,
        "subject": audit.subject,
        "patient": patient,
        "outcome": event["outcome"],
        "event": event,
    }


class AuditMiddleware:
    def __init__(self, app: ASGIApp, *, observer: str) -> None:
        self.app = app
        self.observer = observer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in ("/healthz", "/readyz", "/metrics"):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        failed = False
        responded = False

        async def audited_send(message: Message) -> None:
            nonlocal failed
            if failed:
                return
            if message["type"] == "http.response.start":
                responded = True
                elapsed = (time.perf_counter() - started) * 1000
                try:
                    record = build_record(scope, message["status"], elapsed, self.observer)
                    await store.insert_audit(scope["app"].state.db, record)
                except Exception as exc:
                    failed = True
                    log.error("audit_write_failed", error_type=type(exc).__name__)
                    refusal = errors.Unavailable("The request could not be audited; try again")
                    await refusal.response()(scope, receive, send)
                    return
            await send(message)

        try:
            await self.app(scope, receive, audited_send)
        except Exception:
            if not responded:  # the 500 that ServerErrorMiddleware is about to send
                elapsed = (time.perf_counter() - started) * 1000
                record = build_record(scope, 500, elapsed, self.observer)
                await store.insert_audit(scope["app"].state.db, record)
            raise
