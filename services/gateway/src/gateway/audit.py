"""One audit record per request the gateway receives, written before the response starts.

A pure-ASGI middleware (not BaseHTTPMiddleware) wraps the whole gateway, so 401s, 404s, 429s and
errors raised before any handler are audited too (Microsoft's FHIR server needed its own
AuditMiddleware for the same reason). If the record cannot be stored, the client gets a 503 rather
than an unaudited answer (45 CFR 164.312(b)). Records go into the hash chain (chain.py).

Backends report releases of patient data (45 CFR 164.528) in an internal response header; it is
stripped here from every response, readable or not, and each release becomes a PrivacyDisclosure
record in the same chain.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import chain, proxy
from mindchart_core import audit as audit_shape
from mindchart_core import errors

log = structlog.get_logger(__name__)
DISCLOSURE_HEADER = audit_shape.DISCLOSURE_HEADER.encode()


def _base_and_rest(path: str) -> tuple[str | None, str]:
    for base in ("/psychnotes/fhir", "/fhir", "/audit"):
        if path == base or path.startswith(base + "/"):
            return base, path[len(base):]
    return None, path


def build_record(scope: Scope, status: int, latency_ms: float, observer: str,
                 location: str | None = None) -> dict[str, Any]:
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
        if interaction_name == "create" and location and status < 300:
            # BALP Create: the data entity is the created resource, named by Location.
            created = location.split("/_history/")[0].rstrip("/").split("/")
            if len(created) >= 2 and created[-2] == interaction.resource_type:
                entity = f"{created[-2]}/{created[-1]}"
    else:
        interaction_name = "token" if path.startswith("/oauth") else "operation"
        entity = None
    patient = caller.get("patient") or (proxy.patient_of(rest, query) if base else None)
    if patient is None and entity and entity.startswith("Patient/"):
        patient = entity
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
        client_id=caller.get("client_id") or state.get("oauth_client_id"),
        subject=caller.get("subject"),
        fhir_user=caller.get("fhir_user"),
        jti=caller.get("jti"),
        patient=patient,
        entity_ref=entity,
        purpose_of_use=list(caller.get("purpose_of_use") or []),
        latency_ms=latency_ms,
        outcome_desc=state.get("refusal"),
        recorded=chain.truncate_to_millis(datetime.now(UTC)),
    )
    event = audit_shape.rest_audit_event(audit)
    agents = [a for a in (audit.client_id, audit.subject, audit.fhir_user,
                          _relative(audit.fhir_user)) if a]
    return {
        "_id": event["id"],
        "kind": "rest",
        "recorded": audit.recorded,
        "request_id": audit.request_id,
        "method": audit.method,
        "path": path,
        "status": status,
        "latency_ms": round(latency_ms, 2),
        "client_id": audit.client_id,
        "subject": audit.subject,
        "patient": patient,
        "agents": sorted(set(agents)),
        "entities": [e for e in (entity, patient) if e],
        "outcome": event["outcome"],
        "event": event,
    }


def _relative(reference: str | None) -> str | None:
    if not reference or "/" not in reference:
        return None
    return "/".join(reference.rstrip("/").split("/")[-2:])


def disclosure_records(header_values: list[bytes], request_id: str, observer: str) -> tuple[
        list[dict[str, Any]], str | None]:
    """PrivacyDisclosure records for what a backend reported releasing; a malformed report is
    itself recorded (as the request's outcome description), never passed to the client."""
    records: list[dict[str, Any]] = []
    problem = None
    for raw in header_values:
        try:
            disclosures = audit_shape.decode_disclosures(raw.decode("latin-1"))
        except (ValueError, TypeError, KeyError, UnicodeDecodeError):
            problem = "a backend reported a disclosure the gateway could not read"
            log.error("disclosure_header_malformed")
            continue
        for disclosure in disclosures:
            recorded = chain.truncate_to_millis(datetime.now(UTC))
            event = audit_shape.disclosure_audit_event(
                disclosure, custodian=observer, request_id=request_id, recorded=recorded)
            patient = disclosure.patient if "/" in disclosure.patient else f"Patient/{disclosure.patient}"
            records.append({
                "_id": event["id"],
                "kind": "disclosure",
                "recorded": recorded,
                "request_id": request_id,
                "client_id": disclosure.recipient_client_id,
                "subject": disclosure.recipient_user,
                "patient": patient,
                "agents": sorted({a for a in (disclosure.recipient_client_id, disclosure.recipient_user,
                                              _relative(disclosure.recipient_user)) if a}),
                "entities": [patient, *disclosure.entities],
                "outcome": "0",
                "event": event,
            })
    return records, problem


async def audit_response(scope: Scope, status: int, headers: list[tuple[bytes, bytes]],
                         latency_ms: float, observer: str, audit_chain: chain.AuditChain,
                         ) -> list[tuple[bytes, bytes]]:
    """Store the audit record of a response about to start (and a PrivacyDisclosure record for
    each release a backend reported); returns its headers without the disclosure header. Raises
    when the records could not be stored: the caller answers 503 instead."""
    reported = [v for k, v in headers if k.lower() == DISCLOSURE_HEADER]
    if reported:
        headers = [(k, v) for k, v in headers if k.lower() != DISCLOSURE_HEADER]
    state = scope.setdefault("state", {})
    disclosures, problem = disclosure_records(reported, str(state.get("request_id", "")), observer)
    if problem:
        state["refusal"] = problem
    location = next((v.decode("latin-1") for k, v in headers if k.lower() == b"location"), None)
    await audit_chain.append(build_record(scope, status, latency_ms, observer, location), *disclosures)
    return headers


class AuditedSend:
    """The `send` of one audited request, the one implementation AuditMiddleware and the FHIR
    front (front.py) share: a response start goes on only once its audit record (and a
    PrivacyDisclosure record for each release reported) is stored; if they cannot be stored,
    the client gets a 503 through `send` instead and nothing more of that response goes out
    (45 CFR 164.312(b): no answer unaudited). `started` is the request's time.perf_counter()."""

    __slots__ = ("audit_chain", "failed", "observer", "receive", "responded", "scope", "send",
                 "started")

    def __init__(self, scope: Scope, receive: Receive, send: Send, observer: str,
                 audit_chain: chain.AuditChain, started: float) -> None:
        self.scope, self.receive, self.send = scope, receive, send
        self.observer, self.audit_chain, self.started = observer, audit_chain, started
        self.responded = False  # a response start got past the audit (or was refused by it)
        self.failed = False  # its records could not be stored: the 503 went out instead

    async def __call__(self, message: Message) -> None:
        if self.failed:
            return
        if message["type"] == "http.response.start":
            self.responded = True
            elapsed = (time.perf_counter() - self.started) * 1000
            try:
                message["headers"] = await audit_response(
                    self.scope, message["status"], list(message.get("headers", [])), elapsed,
                    self.observer, self.audit_chain)
            except Exception as exc:
                self.failed = True
                log.error("audit_write_failed", error_type=type(exc).__name__)
                refusal = errors.Unavailable(
                    "The request could not be audited; try again",
                    headers={"Retry-After": str(errors.RETRY_AFTER_SECONDS)})
                await refusal.response()(self.scope, self.receive, self.send)
                return
        await self.send(message)

    async def internal_error(self, exc: Exception) -> None:
        """Answer an exception raised before any response started (the caller re-raises once
        one has): a 500 audited like any answer, a 503 if it cannot be. Answered here rather than
        by ServerErrorMiddleware (outside this layer, outside the request id), which would send
        a 500 nobody audited."""
        log.error("unhandled_error", error_type=type(exc).__name__)
        failure = errors.FhirError("Internal server error", status=500, code="exception")
        await failure.response()(self.scope, self.receive, self)


UNAUDITED = frozenset({"/healthz", "/readyz", "/metrics", "/oauth/revocations"})


class AuditMiddleware:
    def __init__(self, app: ASGIApp, *, observer: str) -> None:
        self.app = app
        self.observer = observer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Not audited: health and metrics, and the revocation feed every backend replica polls
        # each second (token ids only, no patient data; auditing it would flood the trail).
        if scope["type"] != "http" or scope.get("path") in UNAUDITED:
            await self.app(scope, receive, send)
            return
        audited = AuditedSend(scope, receive, send, self.observer, scope["app"].state.audit_chain,
                              time.perf_counter())
        try:
            await self.app(scope, receive, audited)
        except Exception as exc:
            if audited.responded:
                raise
            await audited.internal_error(exc)
