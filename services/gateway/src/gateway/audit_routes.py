"""Reading the audit trail: `GET /audit/AuditEvent` (search), `GET /audit/AuditEvent/{id}`, and
`GET /audit/Patient/{id}/$disclosures`, the 45 CFR 164.528 accounting of disclosures.

Only auditors (`require_auditor`): the token must name AuditEvent (`user/AuditEvent.rs` or
`system/AuditEvent.rs`; wildcards such as `system/*.rs` never grant it, mindchart_core.scopes
NOT_IN_WILDCARDS), and the caller's registration is read again on every request: a backend
client must be registered with that scope and the `admin` or `compliance` role; a user must have
one of those roles and sign in through an app registered for `user/AuditEvent.rs`. Search parameters (R4
AuditEvent): `date` (with ge/gt/le/lt/eq prefixes, repeatable), `patient`, `agent` (client id,
username or fhirUser), `entity` (a reference such as Patient/1 or DocumentReference/2), `outcome`
(0, 4, 8, 12), `_count` (default 50, at most 500). Newest first by `recorded` (then id, for ties:
the one order across the trail's partitions); `next` links carry that pair as `_cursor`.
Both read the trail in two phases, an index-bound candidate set then MongoDB's semantics in
Python (gateway/audit_store.py), so a query costs what it selects, not the size of the trail.

The accounting is a FHIR `searchset` Bundle of IHE.BasicAudit.PrivacyDisclosure AuditEvents, one
per release, newest first, filterable by `date`, paged by `_count` (default 1000, at most 500 when
given) and `_cursor`. It merges the gateway's own disclosure records (reported by backends in
DISCLOSURE_HEADER) with records' bulk-export log (each export and each file download, per
patient), which the gateway reads from records with a token it mints for itself
(gateway/accounting.py); if records does not answer, the accounting is 503, never partial.
164.528(b)(2) elements map to: date = `recorded`; recipient = the `agent` with type DCM#110152
(`who`, and `altId` = the app's client_id); description of what was disclosed = the `entity`
entries with role object-role#4 plus `outcomeDesc`; purpose = `purposeOfEvent`; basis
(authorization or exception) = the `entity` with role object-role#13.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from starlette.responses import Response

from gateway import accounting, audit_store, introspection, store
from gateway.settings import GatewaySettings
from mindchart_core import audit, errors, fhirjson, scopes, tokens

router = APIRouter()

AUDITOR_ROLES = frozenset({"admin", "compliance"})
_PARAMS = {"date", "patient", "agent", "entity", "outcome", "_count", "_cursor", "_format"}
_REF = re.compile(r"^[A-Za-z0-9._:/|-]{1,256}$")


async def require_auditor(request: Request) -> dict[str, Any]:
    """The caller's token claims if they may read the audit trail; else 401/403."""
    token = tokens.bearer_value(request.headers.get("authorization"))
    app = request.app
    claims = await introspection.access_claims(app.state.db, app.state.keys, app.state.settings, token)
    if claims is None:
        raise errors.Unauthorized("The access token is invalid, expired or revoked")
    request.state.caller = {"client_id": claims.get("client_id"), "subject": claims.get("sub"),
                            "fhir_user": claims.get("fhirUser"), "jti": claims.get("jti")}
    named = [s for s in scopes.parse(str(claims.get("scope", ""))).matching("AuditEvent", "search-type")
             if s.resource_type == "AuditEvent"]  # a wildcard never names it (scopes.NOT_IN_WILDCARDS)
    if not named:
        raise errors.InsufficientScope("Reading the audit trail needs user/AuditEvent.rs or "
                                       "system/AuditEvent.rs")
    if not await may_audit(app.state.db, claims):
        raise errors.Forbidden("Reading the audit trail needs user/AuditEvent.rs or "
                               "system/AuditEvent.rs and a caller registered as admin or "
                               "compliance")
    return claims


async def may_audit(db: store.Db, claims: dict[str, Any]) -> bool:
    """Who reads the trail and the accounting: the trail says which therapist read which
    patient's psychotherapy notes and on what basis, so the token's scope string alone is not
    enough (45 CFR 164.312(a)(1) access control, 164.308(a)(4) access authorization: access is
    granted to a role, and the role is what the gateway has on record now, not what a token
    once carried).

    - system/: the backend client is registered (and not disabled) with AuditEvent named in its
      scope and the `admin` or `compliance` role;
    - user/: the user exists with the `admin` or `compliance` role, and the app they use is
      registered for `user/AuditEvent.rs`.
    """
    granted = scopes.parse(str(claims.get("scope", ""))).matching("AuditEvent", "search-type")
    contexts = {s.context for s in granted if s.resource_type == "AuditEvent"}
    client = await store.get_client(db, str(claims.get("client_id", "")))
    if client is None:
        return False
    registered = {s.context for s in scopes.parse(str(client.get("scope", ""))).clinical
                  if s.resource_type == "AuditEvent"}
    if "system" in contexts & registered and str(claims.get("sub")) == client["_id"]:
        return bool(AUDITOR_ROLES & set(client.get("roles") or []))
    if "user" in contexts & registered:
        user = await store.get_user(db, str(claims.get("sub", "")))
        return user is not None and not user.get("disabled") and user.get("role") in AUDITOR_ROLES
    return False


def _date_clause(value: str) -> dict[str, datetime]:
    window = audit.recorded_range(value)
    if window is None:
        raise errors.Invalid(f"date must be YYYY-MM-DD or an instant, with an optional prefix: {value!r}")
    return window


def search_filter(request: Request) -> tuple[dict[str, Any], int, tuple[datetime, str] | None]:
    params = request.query_params
    unknown = set(params.keys()) - _PARAMS
    if unknown:
        raise errors.Invalid(f"Unsupported search parameter(s): {', '.join(sorted(unknown))}")
    clauses: list[dict[str, Any]] = []
    for value in params.getlist("date"):
        clauses.append({"recorded": _date_clause(value)})
    for name, field in (("patient", "patient"), ("agent", "agents"), ("entity", "entities")):
        for value in params.getlist(name):
            if not _REF.match(value):
                raise errors.Invalid(f"{name} is not a valid reference or identifier")
            if name == "patient" and "/" not in value:
                value = f"Patient/{value}"
            if name != "agent" and value.startswith(("http://", "https://")):
                value = "/".join(value.rstrip("/").split("/")[-2:])
            clauses.append({field: value})
    for value in params.getlist("outcome"):
        if value not in ("0", "4", "8", "12"):
            raise errors.Invalid("outcome must be 0, 4, 8 or 12")
        clauses.append({"outcome": value})
    try:
        count = min(max(int(params.get("_count", "50")), 1), 500)
    except ValueError:
        raise errors.Invalid("_count must be an integer") from None
    cursor = None
    if "_cursor" in params:
        cursor = audit.parse_accounting_cursor(params["_cursor"])
        if cursor is None:
            raise errors.Invalid("_cursor is not a cursor this server issued")
        clauses.append(audit_store.cursor_clause(cursor))
    query: dict[str, Any] = {"$and": clauses} if len(clauses) > 1 else (clauses[0] if clauses else {})
    return query, count, cursor


def _bundle(settings: GatewaySettings, records: list[dict[str, Any]], self_url: str,
            next_url: str | None) -> dict[str, Any]:
    links = [{"relation": "self", "url": self_url}]
    if next_url:
        links.append({"relation": "next", "url": next_url})
    return {
        "resourceType": "Bundle", "type": "searchset", "link": links,
        "entry": [{"fullUrl": f"{settings.issuer}/audit/AuditEvent/{r['event']['id']}",
                   "resource": r["event"], "search": {"mode": "match"}} for r in records],
    }


def _next(request: Request, cursor: tuple[datetime, str] | None) -> str | None:
    if cursor is None:
        return None
    pairs = [(k, v) for k, v in request.query_params.multi_items() if k != "_cursor"]
    moment, ident = cursor
    pairs.append(("_cursor", audit.accounting_cursor({"recorded": moment.isoformat(), "id": ident})))
    settings: GatewaySettings = request.app.state.settings
    return f"{settings.issuer}{request.url.path}?{urlencode(pairs)}"


@router.get("/audit/AuditEvent")
async def search_audit(request: Request) -> Response:
    await require_auditor(request)
    query, count, before = search_filter(request)
    records, cursor = await audit_store.search(request.app.state.db, query, count, before)
    settings: GatewaySettings = request.app.state.settings
    self_url = f"{settings.issuer}{request.url.path}" + (f"?{request.url.query}" if request.url.query else "")
    return fhirjson.FhirResponse(_bundle(settings, records, self_url, _next(request, cursor)))


@router.get("/audit/AuditEvent/{event_id}")
async def read_audit(request: Request, event_id: str) -> Response:
    await require_auditor(request)
    record = await request.app.state.db.audit_events.find_one({"_id": event_id})
    if record is None:
        raise errors.NotFound(f"AuditEvent/{event_id} is not known")
    return fhirjson.FhirResponse(record["event"])


_ACCOUNTING_PARAMS = {"date", "_count", "_cursor", "_format"}
_DEFAULT_ACCOUNTING_PAGE = 1000


@router.get("/audit/Patient/{patient_id}/$disclosures")
async def disclosures(request: Request, patient_id: str) -> Response:
    """45 CFR 164.528: who received this patient's data, when, why, and on what basis.

    One accounting from two logs: the gateway's own disclosure records (what backends reported
    in DISCLOSURE_HEADER, e.g. psychotherapy notes) and records' bulk-export log (each export
    and each file download per patient), fetched from records (gateway/accounting.py). Merged
    newest first by (`recorded`, AuditEvent id); `_cursor` pages through both. If records does
    not answer, 503: never a partial accounting.
    """
    await require_auditor(request)
    if not re.fullmatch(r"[A-Za-z0-9\-.]{1,64}", patient_id):
        raise errors.Invalid("patient id is not a FHIR id")
    params = request.query_params
    unknown = set(params.keys()) - _ACCOUNTING_PARAMS
    if unknown:
        raise errors.Invalid(f"Unsupported search parameter(s): {', '.join(sorted(unknown))}")
    dates = params.getlist("date")
    windows = [_date_clause(value) for value in dates]
    try:
        count = (min(max(int(params["_count"]), 1), 500) if "_count" in params
                 else _DEFAULT_ACCOUNTING_PAGE)
    except ValueError:
        raise errors.Invalid("_count must be an integer") from None
    cursor = params.get("_cursor")
    before = audit.parse_accounting_cursor(cursor) if cursor is not None else None
    if cursor is not None and before is None:
        raise errors.Invalid("_cursor is not a cursor this server issued")
    own = await audit_store.own_disclosures(request.app.state.db, f"Patient/{patient_id}", windows,
                                            before, count + 1)
    theirs, more_there = await accounting.records_disclosures(
        request.app, patient_id, dates, cursor, count, str(request.state.request_id))
    merged = sorted(own + theirs, key=audit.accounting_key, reverse=True)
    page, more = merged[:count], len(merged) > count or more_there
    settings: GatewaySettings = request.app.state.settings
    self_url = f"{settings.issuer}{request.url.path}" + (f"?{request.url.query}" if request.url.query else "")
    links = [{"relation": "self", "url": self_url}]
    if more and page:
        pairs = [(k, v) for k, v in params.multi_items() if k != "_cursor"]
        pairs.append(("_cursor", audit.accounting_cursor(page[-1])))
        links.append({"relation": "next", "url": f"{settings.issuer}{request.url.path}?{urlencode(pairs)}"})
    own_ids = {event["id"] for event in own}
    return fhirjson.FhirResponse({
        "resourceType": "Bundle", "type": "searchset", "link": links,
        "entry": [{"fullUrl": f"{settings.issuer}/audit/AuditEvent/{event['id']}" if event["id"] in own_ids
                   else f"urn:uuid:{event['id']}",
                   "resource": event, "search": {"mode": "match"}} for event in page],
    })
