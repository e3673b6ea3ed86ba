"""Bulk Data Access 2.0.0 HTTP surface (shared/STANDARDS.md §3) and the disclosure log.

- Kick-off: `GET|POST /fhir/$export`, `/fhir/Patient/$export`, `/fhir/Group/{id}/$export` → 202 +
  absolute `Content-Location`.
- Status: `GET /fhir/$export-status/{job}` → 202 (`X-Progress`, `Retry-After`) | 200 manifest |
  404 after cancel or expiry; `DELETE` cancels (202).
- Files: `GET /fhir/$export-file/{job}/{file}` → `application/fhir+ndjson`, streamed from GridFS.
- `GET /fhir/Patient/{id}/$disclosures`: internal, for the gateway's accounting only (see
  `patient_disclosures`): the 45 CFR 164.528 entries records holds for a patient.

Status and file URLs carry a `$` segment, so the gateway treats them as operations (any clinical
scope passes its coarse check); records itself restricts them to the kick-off's client and
subject, and checks on every download that the token still grants what the kick-off's granted.
"""

from __future__ import annotations

import uuid
from datetime import UTC
from email.utils import format_datetime
from typing import Any
from urllib.parse import urlencode

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response, StreamingResponse

from mindchart_core import audit, errors, fhirjson, tokens
from records.export import exporter, kickoff, store
from records.export.settings import ExportSettings
from records.policy import AccessPolicy
from records.resources import RESOURCES
from records.search import extract

router = APIRouter(prefix="/fhir")
NDJSON = "application/fhir+ndjson"


def _base_url(request: Request) -> str:
    return str(request.app.state.settings.public_base_url).rstrip("/")


def _settings(request: Request) -> ExportSettings:
    settings: ExportSettings = request.app.state.export_settings
    return settings


async def _caller(request: Request) -> tokens.AccessToken:
    token: tokens.AccessToken = await request.app.state.verifier.verify(tokens.bearer_token(request))
    return token


def _db(request: Request) -> store.Db:
    db: store.Db = request.app.state.db
    return db


def _claims(token: tokens.AccessToken) -> dict[str, Any]:
    """What the worker needs to rebuild the caller's AccessPolicy (never the token itself)."""
    return {"sub": token.subject, "client_id": token.client_id, "scope": str(token.scope),
            "aud": token.audience, "jti": token.jti, "exp": token.expires_at,
            "patient": token.patient, "encounter": token.encounter, "fhirUser": token.fhir_user,
            "roles": list(token.roles), "purpose_of_use": token.purpose_of_use}


def _purpose(token: tokens.AccessToken) -> str:
    if token.purpose_of_use:
        return str(token.purpose_of_use).rpartition("#")[2]
    return "HPAYMT" if "system" in token.scope.contexts() else "TREAT"


def _public_url(request: Request) -> str:
    path = request.url.path.removeprefix("/fhir")
    return _base_url(request) + path + (f"?{request.url.query}" if request.url.query else "")


async def _group_members(db: store.Db, policy: AccessPolicy, group_id: str, base_url: str) -> list[str]:
    definition = RESOURCES["Group"]
    doc = await store.find_one(db, "Group", store.and_({"_id": group_id},
                                                        policy.filter_for(definition, "read")))
    if doc is None:
        raise errors.NotFound(f"Group/{group_id[:64]} is not known")
    group = orjson.loads(bytes(doc["raw"]))
    members: set[str] = set()
    for member in group.get("member") or []:
        if member.get("inactive") is True:
            continue
        for ref in extract.reference_of(member.get("entity"), base_url):
            kind, _, ident = ref.partition("/")
            if kind == "Patient" and ident:
                members.add(ident)
    return sorted(members)


async def _kick_off(request: Request, level: str, group_id: str | None = None) -> Response:
    """Bulk Data 2.0 §bulk-data-kick-off-request."""
    token = await _caller(request)
    base_url = _base_url(request)
    settings = _settings(request)
    policy = AccessPolicy(token=token, base_url=base_url)
    prefer = request.headers.get("prefer", "")
    is_lenient = kickoff.lenient(prefer)
    if "respond-async" not in prefer.replace(" ", "").lower() and not is_lenient:
        raise errors.Invalid("$export is asynchronous: send Prefer: respond-async")
    fhirjson.negotiate(request)  # a missing Accept is taken as application/fhir+json
    post = request.method == "POST"
    pairs: list[tuple[str, Any]] = list(request.query_params.multi_items())
    if post and request.headers.get("content-length", "0") != "0":
        pairs += kickoff.parameters_body(await fhirjson.read_json_body(request))
    spec = kickoff.parse(level, pairs, post=post, lenient_handling=is_lenient, base_url=base_url)

    types: list[str] = []
    for kind in spec.types:
        if token.scope.allows(kind, "search-type"):
            types.append(kind)
        elif spec.explicit_types and not is_lenient:
            raise errors.InsufficientScope(f"The granted scopes do not permit exporting {kind}")
    if not types:
        raise errors.InsufficientScope(
            "The granted scopes do not permit exporting any requested resource type")

    patients = spec.patients
    if level == "group":
        assert group_id is not None
        members = await _group_members(_db(request), policy, group_id, base_url)
        patients = members if patients is None else sorted(set(members) & set(patients))

    job_id = store.new_id()
    job = {
        "_id": job_id, "state": "queued", "attempt": 0, "level": level, "group": group_id,
        "client_id": token.client_id, "subject": token.subject, "claims": _claims(token),
        "recipient_user": token.fhir_user, "purpose": _purpose(token),
        "include_restricted": token.scope.has(settings.restricted_scope),
        "request_url": _public_url(request), "types": types, "type_filters": spec.type_filters,
        "since": spec.since, "elements": spec.elements, "patients": patients,
        "transaction_time": store.now(), "created": store.now(), "done": {},
        "progress": "queued",
    }
    if not await store.create_job(_db(request), job, settings.max_concurrent_per_client):
        raise errors.Throttled(
            f"At most {settings.max_concurrent_per_client} export(s) per client at a time; "
            "retry when the running one has finished (or cancel it)",
            headers={"Retry-After": str(settings.retry_after_seconds * 5)},
        )
    request.app.state.export_workers.nudge()
    notes = [{"severity": "information", "code": "informational",
              "diagnostics": f"Export {job_id} accepted"}]
    notes += [{"severity": "warning", "code": "not-supported", "diagnostics": text[:200]}
              for text in spec.ignored]
    return fhirjson.FhirResponse(
        {"resourceType": "OperationOutcome", "issue": notes}, status_code=202,
        headers={"Content-Location": f"{base_url}/$export-status/{job_id}"},
    )


@router.api_route("/$export", methods=["GET", "POST"])
async def export_system(request: Request) -> Response:
    return await _kick_off(request, "system")


@router.api_route("/Patient/$export", methods=["GET", "POST"])
async def export_patients(request: Request) -> Response:
    return await _kick_off(request, "patient")


@router.api_route("/Group/{group_id}/$export", methods=["GET", "POST"])
async def export_group(group_id: str, request: Request) -> Response:
    return await _kick_off(request, "group", group_id)


async def _own_job(request: Request, job_id: str) -> tuple[dict[str, Any], tokens.AccessToken]:
    token = await _caller(request)
    job = await store.job(_db(request), job_id)
    if job is None or job["state"] == "cancelled" or (
        job.get("expires_at") is not None and job["expires_at"] < store.now()
    ):
        raise errors.NotFound("No such export: it was cancelled, has expired or never existed")
    if job["client_id"] != token.client_id or job["subject"] != token.subject:
        raise errors.Forbidden("This export belongs to another client")
    return job, token


def _committed(job: dict[str, Any], files: list[dict[str, Any]]) -> list[dict[str, Any]]:
    done = job.get("done") or {}
    kept = [f for f in files
            if (f["kind"] == "error" and f["attempt"] == job.get("error_attempt"))
            or (f["kind"] != "error" and (done.get(f["source_type"]) or {}).get("attempt") == f["attempt"])]
    order = {t: i for i, t in enumerate(job["types"])}
    kept.sort(key=lambda f: (order.get(f["source_type"], len(order)), f["seq"]))
    return kept


@router.get("/$export-status/{job_id}")
async def export_status(job_id: str, request: Request) -> Response:
    """Bulk Data 2.0 §bulk-data-status-request."""
    job, _ = await _own_job(request, job_id)
    settings = _settings(request)
    if job["state"] in (*store.ACTIVE, "admitting"):
        progress = str(job.get("progress") or job["state"])[:95]
        return Response(status_code=202, headers={
            "X-Progress": progress, "Retry-After": str(settings.retry_after_seconds)})
    if job["state"] == "failed":
        raise errors.FhirError(str(job.get("reason") or "The export failed"), status=500,
                               code="exception")
    base_url = _base_url(request)
    manifest: dict[str, Any] = {
        "transactionTime": store_instant(job["transaction_time"]),
        "request": job["request_url"],
        "requiresAccessToken": True,
        "output": [], "error": [],
    }
    if job.get("since") is not None:
        manifest["deleted"] = []
    for f in _committed(job, await store.files_of(_db(request), job_id)):
        entry = {"type": f["type"], "url": f"{base_url}/$export-file/{job_id}/{f['_id']}",
                 "count": f["count"]}
        manifest["error" if f["kind"] == "error" else "deleted" if f["kind"] == "deleted"
                 else "output"].append(entry)
    return Response(orjson.dumps(manifest), status_code=200, media_type="application/json",
                    headers={"Expires": format_datetime(job["expires_at"].astimezone(UTC), usegmt=True)})


@router.delete("/$export-status/{job_id}")
async def export_cancel(job_id: str, request: Request) -> Response:
    """Bulk Data 2.0 §bulk-data-delete-request: 202, after which polls answer 404."""
    await _own_job(request, job_id)
    if not await store.cancel(_db(request), job_id):
        raise errors.NotFound("No such export")
    return fhirjson.FhirResponse(errors.operation_outcome(
        "informational", f"Export {job_id} cancelled", severity="information"), status_code=202)


@router.get("/$export-file/{job_id}/{file_id}")
async def export_file(job_id: str, file_id: str, request: Request) -> Response:
    """Bulk Data 2.0 §file-request: the same token rules as the kick-off, on every download."""
    job, token = await _own_job(request, job_id)
    db = _db(request)
    file_doc = await store.file_of(db, job_id, file_id)
    if job["state"] != "complete" or file_doc is None or not _committed(job, [file_doc]):
        raise errors.NotFound("No such file in this export")
    kind = file_doc["source_type"]
    if kind in RESOURCES:
        base_url = _base_url(request)
        now_filter = AccessPolicy(token=token, base_url=base_url).filter_for(RESOURCES[kind], "search-type")
        then_filter = exporter.policy_of(job, base_url).filter_for(RESOURCES[kind], "search-type")
        if now_filter and now_filter != then_filter:
            raise errors.Forbidden(f"This token's access to {kind} differs from the kick-off's")
    await store.record_download(db, job, file_doc, token.fhir_user)
    return StreamingResponse(store.stream_file(db, file_doc["gridfs_id"]), media_type=NDJSON,
                             headers={"Content-Disposition": f'attachment; filename="{file_id}.ndjson"'})


_DISCLOSURE_PARAMS = {"date", "_count", "_cursor", "_format"}


@router.get("/Patient/{patient_id}/$disclosures")
async def patient_disclosures(patient_id: str, request: Request) -> Response:
    """Internal: the bulk-export disclosures of one patient (45 CFR 164.528(b)(2)), as BALP
    PrivacyDisclosure AuditEvents, for the gateway's accounting only.

    The public accounting is the gateway's `GET /audit/Patient/{id}/$disclosures`, which merges
    these with its own entries. Here only the token the gateway mints for itself is accepted
    (client `audit.ACCOUNTING_CLIENT` with scope `audit.ACCOUNTING_SCOPE`); any other caller,
    administrators and `system/AuditEvent.rs` clients included, gets 403, so this log has one
    reader and one set of access rules (the gateway's).

    Parameters: `date` (repeatable; eq|ge|gt|le|lt, a day or an instant) on `recorded`;
    `_count` (page size, at most 1000); `_cursor` (from the `next` link). Newest first, ordered
    by (`recorded`, AuditEvent id).
    """
    token = await _caller(request)
    fhirjson.negotiate(request)
    if token.client_id != audit.ACCOUNTING_CLIENT or token.subject != audit.ACCOUNTING_CLIENT or \
            not token.scope.has(audit.ACCOUNTING_SCOPE):
        raise errors.Forbidden("This operation is internal: read the accounting of disclosures "
                               "at the gateway's /audit/Patient/{id}/$disclosures")
    params = request.query_params
    unknown = set(params.keys()) - _DISCLOSURE_PARAMS
    if unknown:
        raise errors.Invalid(f"Unsupported parameter(s): {', '.join(sorted(unknown))}")
    windows = []
    for value in params.getlist("date"):
        window = audit.recorded_range(value)
        if window is None:
            raise errors.Invalid("date must be YYYY-MM-DD or an instant, with an optional prefix: "
                                 f"{value[:40]!r}")
        windows.append(window)
    try:
        count = min(max(int(params.get("_count", str(store.MAX_DISCLOSURES))), 1), store.MAX_DISCLOSURES)
    except ValueError:
        raise errors.Invalid("_count must be an integer") from None
    before = None
    if "_cursor" in params:
        before = audit.parse_accounting_cursor(params["_cursor"])
        if before is None:
            raise errors.Invalid("_cursor is not a cursor this server issued")
    base_url = _base_url(request)

    def event_id(doc: dict[str, Any]) -> str:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{base_url}/disclosure/{doc['_id']}"))

    docs = await store.disclosures_of(_db(request), patient_id, windows=windows, before=before,
                                      limit=count + 1, event_id=event_id)
    entries = []
    for doc in docs[:count]:
        counts = doc.get("counts") or {}
        what = ", ".join(f"{n} {t}" for t, n in sorted(counts.items()))
        if doc["event"] == "export":
            verb = f"bulk export {doc['job']}"
        elif doc["event"] == "cdex":  # records/cdex: a reviewed release to a payer
            verb = f"Da Vinci CDex release, Task/{doc['job']}"
        else:
            verb = f"bulk export file download {doc['job']} (file {doc.get('file')})"
        event = audit.disclosure_audit_event(
            audit.Disclosure(
                patient=f"Patient/{patient_id}", entities=[], purpose_of_use=[doc["purpose"]],
                basis=f"scope:{doc['recipient']}", recipient_client_id=doc["recipient"],
                recipient_user=doc.get("recipient_user"),
                description=f"{verb}: {what}"),
            custodian=base_url, request_id=str(doc["job"]), recorded=doc["recorded"],
        )
        event["id"] = event_id(doc)
        entries.append({"fullUrl": f"urn:uuid:{event['id']}", "resource": event,
                        "search": {"mode": "match"}})
    self_url = f"{base_url}/Patient/{patient_id}/$disclosures"
    links = [{"relation": "self", "url": self_url + (f"?{request.url.query}" if request.url.query else "")}]
    if len(docs) > count:
        pairs = [(k, v) for k, v in params.multi_items() if k != "_cursor"]
        pairs.append(("_cursor", audit.accounting_cursor(entries[-1]["resource"])))
        links.append({"relation": "next", "url": f"{self_url}?{urlencode(pairs)}"})
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "link": links,
                              "entry": entries}
    if not entries:
        del bundle["entry"]
    return fhirjson.FhirResponse(bundle)


def store_instant(moment: Any) -> str:
    return str(moment.astimezone(UTC).isoformat(timespec="milliseconds")).replace("+00:00", "Z")


__all__ = ["router"]
