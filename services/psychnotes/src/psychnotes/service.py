"""Psychnotes interactions: load, apply the gate (policy.py), audit, answer.

Every decision of the consent gate is recorded in `decisions` (AuthZconsent) before the answer
leaves, permit or deny; every release of note content is recorded in `disclosures`
(PrivacyDisclosure) and announced to the gateway in `DISCLOSURE_HEADER` (one Disclosure per
patient) for the 45 CFR 164.528 accounting. If a record cannot be written, nothing is released.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any
from urllib.parse import urlencode

import orjson
import structlog
from joserfc.jwk import ECKey
from starlette.responses import Response

from mindchart_core import audit, errors, fhirjson, metrics, validation
from mindchart_core.tokens import AccessToken
from psychnotes import consent_token, labels, notes, policy, store, vault
from psychnotes.consent import Authorization, check_authorization, parse_instant, with_defaults
from psychnotes.keys import Keyring
from psychnotes.settings import PsychnotesSettings

log = structlog.get_logger(__name__)
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
SEARCH_PARAMS = frozenset({"patient", "subject", "_id", "date", "author", "_count", "_cursor",
                           "_format"})
MAX_COUNT = 100


@dataclass
class Context:
    """One request's view of the vault: its caller and psychnotes' keys and datastore."""

    db: store.Db
    keyring: Keyring
    signing_key: ECKey
    settings: PsychnotesSettings
    token: AccessToken
    request_id: str

    @property
    def base(self) -> str:
        return self.settings.base_url

    @property
    def user(self) -> str | None:
        return self.token.fhir_user_ref


def instant(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _utc(moment: datetime) -> datetime:
    """BSON dates come back with bson's own UTC tzinfo; email.utils wants datetime.UTC."""
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC)


_REASON_CODES = (  # a bounded label set for /metrics; the full reason is in the audit record
    ("no consent token", "no-token"), ("several consent tokens", "several-tokens"),
    ("another caller", "other-caller"), ("revoked", "revoked"), ("expired", "expired"),
    ("signature", "invalid-token"), ("consent token", "invalid-token"), ("scope", "scope"),
    ("recipient", "not-recipient"), ("purpose", "purpose"), ("compliance", "role"),
    ("justification", "justification"), ("author", "not-author"),
)


def reason_code(reason: str) -> str:
    lowered = reason.lower()
    return next((code for words, code in _REASON_CODES if words in lowered), "other")


# -- audit --------------------------------------------------------------------------------------

async def record_decision(ctx: Context, *, permit: bool, reason: str, action: str,
                          patient: str | None = None, basis: str | None = None,
                          purposes: list[str] | None = None, jti: str | None = None,
                          entities: list[str] | None = None) -> None:
    decision = audit.ConsentDecision(
        permit=permit, reason=reason, action=action, client_id=ctx.token.client_id,
        fhir_user=ctx.user, patient=patient, basis=basis, purpose_of_use=purposes or [],
        token_jti=jti, entities=entities or [], request_id=ctx.request_id,
        recorded=store.now())
    event = audit.consent_decision_audit_event(decision, observer=ctx.base)
    metrics.CONSENT_DECISIONS.labels("permit" if permit else "deny",
                                     action if permit else reason_code(reason)).inc()
    await store.insert_decision(ctx.db, {
        "_id": event["id"], "recorded": decision.recorded, "permit": permit, "action": action,
        "reason": reason, "patient": patient, "client_id": ctx.token.client_id,
        "fhir_user": ctx.user, "basis": basis, "jti": jti, "request_id": ctx.request_id,
        "entities": entities or [], "event": event})


async def record_unauthenticated(db: store.Db, settings: PsychnotesSettings, request_id: str,
                                 reason: str) -> None:
    """A request refused before any caller is known (no or invalid access token)."""
    decision = audit.ConsentDecision(permit=False, reason=reason, action="authenticate",
                                     client_id=None, request_id=request_id, recorded=store.now())
    event = audit.consent_decision_audit_event(decision, observer=settings.base_url)
    metrics.CONSENT_DECISIONS.labels("deny", "no-access-token").inc()
    await store.insert_decision(db, {
        "_id": event["id"], "recorded": decision.recorded, "permit": False,
        "action": "authenticate", "reason": reason, "patient": None, "client_id": None,
        "fhir_user": None, "basis": None, "jti": None, "request_id": request_id,
        "entities": [], "event": event})


async def release(ctx: Context, token: consent_token.ConsentToken, action: str,
                  refs: list[str]) -> dict[str, str]:
    """Record the permit and the disclosure; the headers announcing it to the gateway."""
    await record_decision(ctx, permit=True, reason=f"{action} permitted by {token.basis}",
                          action=action, patient=token.patient, basis=token.basis,
                          purposes=list(token.purpose_of_use), jti=token.jti, entities=refs)
    if not refs:
        return dict(NO_STORE)
    disclosure = audit.Disclosure(
        patient=token.patient, entities=refs, purpose_of_use=list(token.purpose_of_use),
        basis=token.basis, recipient_client_id=token.client_id, recipient_user=token.fhir_user,
        description=f"psychotherapy notes ({action}) released under {token.basis}")
    moment = store.now()
    event = audit.disclosure_audit_event(disclosure, custodian=ctx.base,
                                         request_id=ctx.request_id, recorded=moment)
    await store.insert_disclosures(ctx.db, [{
        "_id": event["id"], "recorded": moment, "patient": token.patient,
        "request_id": ctx.request_id, "basis": token.basis, "recipient": token.client_id,
        "recipient_user": token.fhir_user, "entities": refs, "event": event}])
    return {**NO_STORE, audit.DISCLOSURE_HEADER: audit.encode_disclosures([disclosure])}


# -- notes: writes by the originator ------------------------------------------------------------

def _require_practitioner(ctx: Context, interaction: str) -> str:
    if not ctx.token.scope.allows("DocumentReference", interaction):
        raise errors.Forbidden(f"The granted scopes do not permit {interaction} of psychotherapy notes")
    author = ctx.user
    if not author or not author.startswith("Practitioner/"):
        raise errors.Forbidden("Only a practitioner (fhirUser) may write psychotherapy notes")
    return author


def _note_document(ctx: Context, note_id: str, version: int, resource: dict[str, Any],
                   *, patient: str, author: str, moment: datetime) -> dict[str, Any]:
    labelled = labels.label({**resource, "id": note_id})
    labelled["meta"].update(versionId=str(version), lastUpdated=instant(moment))
    labelled["author"] = [{"reference": author}]
    labelled.setdefault("date", instant(moment))
    try:
        date = parse_instant(str(labelled["date"]))
    except ValueError:
        raise errors.Unprocessable("date must be an instant", expression=["DocumentReference.date"]) from None
    body = {"resourceType": "DocumentReference", "id": note_id,
            **{k: v for k, v in labelled.items() if k not in ("resourceType", "id")}}
    sealed = vault.seal(ctx.keyring, body,
                        vault.Binding("DocumentReference", note_id, version, patient))
    stub = {"resourceType": "DocumentReference", "id": note_id, "meta": labelled["meta"],
            "status": body["status"], "subject": {"reference": patient},
            "author": [{"reference": author}], "date": body["date"]}
    return {"_id": note_id, "vid": version, "ts": moment, "patient": patient, "author": author,
            "date": date, "status": body["status"], "deleted": False, "resource": stub,
            "sealed": sealed}


def _write_headers(ctx: Context, note_id: str, version: int, moment: datetime) -> dict[str, str]:
    return {"Location": f"{ctx.base}/DocumentReference/{note_id}/_history/{version}",
            "ETag": f'W/"{version}"', "Last-Modified": format_datetime(moment, usegmt=True)}


async def create_note(ctx: Context, body: Any) -> Response:
    author = _require_practitioner(ctx, "create")
    resource = validation.validate_resource(body, "DocumentReference")
    patient = notes.check_psychotherapy_note(resource)
    note_id, moment = str(uuid.uuid4()), store.now()
    doc = _note_document(ctx, note_id, 1, resource, patient=patient, author=author, moment=moment)
    await store.insert_note(ctx.db, doc)
    await record_decision(ctx, permit=True, reason="note written by its author", action="create",
                          patient=patient, entities=[f"DocumentReference/{note_id}"])
    return Response(status_code=201, headers=_write_headers(ctx, note_id, 1, moment))


async def _own_note(ctx: Context, note_id: str, author: str, action: str) -> dict[str, Any]:
    doc = await store.get_note(ctx.db, note_id) if _ID.match(note_id) else None
    if doc is None or doc["author"] != author:
        # Someone else's note is as invisible to a writer as a missing one.
        await record_decision(ctx, permit=False, action=action,
                              reason="only the author may change a psychotherapy note")
        raise errors.NotFound(f"DocumentReference/{note_id[:64]} is not one of your notes")
    if doc.get("deleted"):
        raise errors.Gone(f"DocumentReference/{note_id} has been deleted")
    return doc


async def update_note(ctx: Context, note_id: str, body: Any, if_match: int | None) -> Response:
    author = _require_practitioner(ctx, "update")
    resource = validation.validate_resource(body, "DocumentReference")
    if resource.get("id") != note_id:
        raise errors.Invalid("The body's id must match the id in the URL")
    current = await _own_note(ctx, note_id, author, "update")
    patient = notes.check_psychotherapy_note(resource)
    if patient != current["patient"]:
        raise errors.Unprocessable("A note cannot be moved to another patient",
                                   expression=["DocumentReference.subject"])
    if if_match is not None and if_match != current["vid"]:
        raise errors.PreconditionFailed("If-Match does not match the current version")
    version, moment = int(current["vid"]) + 1, store.now()
    doc = _note_document(ctx, note_id, version, resource, patient=patient, author=author,
                         moment=moment)
    await store.replace_note(ctx.db, doc, expected=int(current["vid"]), method="PUT")
    await record_decision(ctx, permit=True, reason="note updated by its author", action="update",
                          patient=patient, entities=[f"DocumentReference/{note_id}"])
    headers = _write_headers(ctx, note_id, version, moment)
    headers.pop("Location")
    return Response(status_code=200, headers=headers)


async def delete_note(ctx: Context, note_id: str) -> Response:
    """Soft delete: the note leaves search and read (410); every version stays in history."""
    author = _require_practitioner(ctx, "delete")
    current = await _own_note(ctx, note_id, author, "delete")
    version, moment = int(current["vid"]) + 1, store.now()
    stub = {**current["resource"], "meta": {**current["resource"]["meta"],
                                            "versionId": str(version),
                                            "lastUpdated": instant(moment)}}
    doc = {**current, "vid": version, "ts": moment, "deleted": True, "sealed": None,
           "resource": stub}
    await store.replace_note(ctx.db, doc, expected=int(current["vid"]), method="DELETE")
    await record_decision(ctx, permit=True, reason="note deleted (soft) by its author",
                          action="delete", patient=current["patient"],
                          entities=[f"DocumentReference/{note_id}"])
    return Response(status_code=204)


# -- notes: reads through the gate --------------------------------------------------------------

async def gate(ctx: Context, presented: list[str], action: str) -> consent_token.ConsentToken:
    """The verified, in-force consent token of this request, or an audited refusal."""
    if not policy.may_read_notes(ctx.token):
        await record_decision(ctx, permit=False, action=action,
                              reason="the access token's scopes do not permit reading notes")
        raise errors.Forbidden("The granted scopes do not permit reading psychotherapy notes")
    if not presented:
        reason = ("Psychotherapy notes are released only with a consent token (Consent-Token "
                  "header; 45 CFR 164.508(a)(2)); mint one with $consent-token")
        await record_decision(ctx, permit=False, action=action, reason="no consent token")
        raise policy.Refusal(reason)
    if len(presented) > 1:
        await record_decision(ctx, permit=False, action=action, reason="several consent tokens")
        raise policy.TokenRefusal("Send exactly one Consent-Token header")
    try:
        token = consent_token.verify(presented[0].strip(), ctx.signing_key, base_url=ctx.base)
    except consent_token.InvalidConsentToken as exc:
        await record_decision(ctx, permit=False, action=action, reason=str(exc))
        raise policy.TokenRefusal(f"The consent token is refused: {exc}") from None
    try:
        await policy.check_token_in_force(ctx.db, token, ctx.token, datetime.now(UTC))
    except policy.Refusal as exc:
        await _deny(ctx, token, action, exc.diagnostics)
        raise
    return token


async def _deny(ctx: Context, token: consent_token.ConsentToken, action: str, reason: str,
                entities: list[str] | None = None) -> None:
    await record_decision(ctx, permit=False, action=action, reason=reason, patient=token.patient,
                          basis=token.basis, purposes=list(token.purpose_of_use), jti=token.jti,
                          entities=entities)


OUTSIDE = "The requested note is not inside this consent token's scope"


async def _open(ctx: Context, doc: dict[str, Any], note_id: str) -> bytes:
    try:
        return vault.open_sealed(ctx.keyring, doc["sealed"], vault.Binding(
            "DocumentReference", note_id, int(doc["vid"]), doc["patient"]))
    except vault.VaultError as exc:
        # Tampering, a swapped ciphertext or a missing KEK: never answer with anything but this.
        log.error("note_unsealable", resource_id=note_id, version=doc["vid"], problem=str(exc))
        raise errors.FhirError("The note cannot be decrypted; the incident is logged",
                               status=500, code="exception") from None


def _resource_headers(doc: dict[str, Any]) -> dict[str, str]:
    return {"ETag": f'W/"{doc["vid"]}"',
            "Last-Modified": format_datetime(_utc(doc["ts"]), usegmt=True)}


async def read_note(ctx: Context, token: consent_token.ConsentToken, note_id: str) -> Response:
    doc = await store.get_note(ctx.db, note_id) if _ID.match(note_id) else None
    ref = f"DocumentReference/{note_id[:64]}"
    if not policy.covers(token, doc, note_id) or doc is None:
        await _deny(ctx, token, "read", OUTSIDE, [ref])
        raise policy.Refusal(OUTSIDE)
    if doc.get("deleted"):
        await _deny(ctx, token, "read", "the note has been deleted", [ref])
        raise errors.Gone(f"{ref} has been deleted")
    raw = await _open(ctx, doc, note_id)
    headers = await release(ctx, token, "read", [ref])
    return fhirjson.FhirResponse(raw, headers={**headers, **_resource_headers(doc)})


async def vread_note(ctx: Context, token: consent_token.ConsentToken, note_id: str,
                     version: str) -> Response:
    ref = f"DocumentReference/{note_id[:64]}"
    doc = None
    if _ID.match(note_id) and version.isdigit() and len(version) < 10:
        doc = await store.get_note_version(ctx.db, note_id, int(version))
    if not policy.covers(token, doc, note_id) or doc is None:
        await _deny(ctx, token, "vread", OUTSIDE, [ref])
        raise policy.Refusal(OUTSIDE)
    if not doc.get("sealed"):
        await _deny(ctx, token, "vread", "that version is a deletion", [ref])
        raise errors.Gone(f"Version {version} of {ref} is a deletion")
    raw = await _open(ctx, doc, note_id)
    headers = await release(ctx, token, "vread", [f"{ref}/_history/{version}"])
    return fhirjson.FhirResponse(raw, headers={**headers, **_resource_headers(doc)})


async def note_history(ctx: Context, token: consent_token.ConsentToken, note_id: str) -> Response:
    """R4 http.html §history: newest first; versions outside the token's scope are left out."""
    ref = f"DocumentReference/{note_id[:64]}"
    current = await store.get_note(ctx.db, note_id) if _ID.match(note_id) else None
    if not policy.covers(token, current, note_id) or current is None:
        await _deny(ctx, token, "history", OUTSIDE, [ref])
        raise policy.Refusal(OUTSIDE)
    entries: list[bytes] = []
    released: list[str] = []
    for doc in await store.note_history(ctx.db, note_id):
        if not doc.get("sealed"):
            entries.append(orjson.dumps({
                "fullUrl": f"{ctx.base}/{ref}",
                "request": {"method": "DELETE", "url": f"{ref}/_history/{doc['vid']}"},
                "response": {"status": "204", "lastModified": instant(_utc(doc["ts"]))}}))
            continue
        if not policy.covers(token, doc, note_id):
            continue
        raw = await _open(ctx, doc, note_id)
        method = str(doc.get("method", "PUT"))
        entries.append(b'{"fullUrl":' + orjson.dumps(f"{ctx.base}/{ref}") + b',"resource":' + raw
                       + b',"request":' + orjson.dumps({
                           "method": method, "url": "DocumentReference" if method == "POST" else ref})
                       + b',"response":' + orjson.dumps({
                           "status": "201" if method == "POST" else "200",
                           "etag": f'W/"{doc["vid"]}"',
                           "lastModified": instant(_utc(doc["ts"]))}) + b"}")
        released.append(f"{ref}/_history/{doc['vid']}")
    head = {"resourceType": "Bundle", "type": "history", "total": len(entries),
            "link": [{"relation": "self", "url": f"{ctx.base}/{ref}/_history"}]}
    headers = await release(ctx, token, "history", released)
    return fhirjson.FhirResponse(_bundle(head, entries), headers=headers)


def _bundle(head: dict[str, Any], entries: list[bytes]) -> bytes:
    opening = orjson.dumps(head)[:-1]
    if not entries:
        return opening + b"}"
    return opening + b',"entry":[' + b",".join(entries) + b"]}"


def _date_clause(value: str) -> dict[str, Any]:
    prefix, rest = (value[:2], value[2:]) if value[:2] in ("ge", "gt", "le", "lt", "eq") else ("eq", value)
    try:
        lo, hi = parse_instant(rest), parse_instant(rest, end=True)
    except ValueError:
        raise errors.Invalid(f"date: '{value[:40]}' is not a date or instant") from None
    if hi == lo:
        hi = lo + timedelta(milliseconds=1)
    return {"ge": {"date": {"$gte": lo}}, "gt": {"date": {"$gte": hi}},
            "le": {"date": {"$lt": hi}}, "lt": {"date": {"$lt": lo}},
            "eq": {"date": {"$gte": lo, "$lt": hi}}}[prefix]


async def search_notes(ctx: Context, token: consent_token.ConsentToken,
                       items: list[tuple[str, str]]) -> Response:
    """Only notes inside the token's scope are ever looked at, so nothing outside is counted."""
    clauses: list[dict[str, Any]] = [policy.note_filter(token)]
    applied: list[tuple[str, str]] = []
    count, cursor = 50, None
    for name, value in items:
        if name not in SEARCH_PARAMS:
            raise errors.Invalid(f"Search parameter '{name[:40]}' is not supported here "
                                 "(supported: patient, _id, date, author, _count)")
        if name in ("patient", "subject"):
            wanted = value if value.startswith("Patient/") else f"Patient/{value}"
            if wanted != token.patient:
                await _deny(ctx, token, "search", "search for a patient other than the token's")
                raise policy.Refusal("This consent token is for another patient")
        elif name == "_id":
            clauses.append({"_id": {"$in": [v for v in value.split(",") if v][:MAX_COUNT]}})
        elif name == "date":
            clauses.append(_date_clause(value))
        elif name == "author":
            clauses.append({"author": value if "/" in value else f"Practitioner/{value}"})
        elif name == "_count":
            if not value.isdigit():
                raise errors.Invalid("_count must be a non-negative integer")
            count = min(int(value), MAX_COUNT)
        elif name == "_cursor":
            cursor = value
        if name not in ("_cursor", "_format"):
            applied.append((name, value))
    docs = [d async for d in store.find_notes(ctx.db, {"$and": clauses}, after=cursor,
                                              limit=count + 1)] if count else []
    page, has_more = docs[:count], len(docs) > count
    page = [d for d in page if policy.covers(token, d, d["_id"])]  # defence in depth
    entries, refs = [], []
    for doc in page:
        raw = await _open(ctx, doc, doc["_id"])
        ref = f"DocumentReference/{doc['_id']}"
        entries.append(b'{"fullUrl":' + orjson.dumps(f"{ctx.base}/{ref}") + b',"resource":' + raw
                       + b',"search":{"mode":"match"}}')
        refs.append(ref)
    type_url = f"{ctx.base}/DocumentReference"
    links = [{"relation": "self", "url": f"{type_url}?{urlencode(applied)}" if applied else type_url}]
    if has_more and page:
        links.append({"relation": "next",
                      "url": f"{type_url}?{urlencode([*applied, ('_cursor', page[-1]['_id'])])}"})
    head: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
    if cursor is None and not has_more and count:
        head["total"] = len(page)
    head["link"] = links
    headers = await release(ctx, token, "search", refs)
    return fhirjson.FhirResponse(_bundle(head, entries), headers=headers)


# -- Consents -----------------------------------------------------------------------------------

def _consent_document(ctx: Context, consent_id: str, version: int, resource: dict[str, Any],
                      auth: Authorization, moment: datetime, created_by: str) -> dict[str, Any]:
    body = {"resourceType": "Consent", "id": consent_id,
            **{k: v for k, v in resource.items() if k not in ("resourceType", "id", "meta")},
            "meta": {**resource.get("meta", {}), "versionId": str(version),
                     "lastUpdated": instant(moment)}}
    sealed = vault.seal(ctx.keyring, body, vault.Binding("Consent", consent_id, version, auth.patient))
    return {"_id": consent_id, "vid": version, "ts": moment, "created_by": created_by,
            **auth.index(), "sealed": sealed}


async def _may_manage(ctx: Context, patient: str) -> str | None:
    """Who the caller is to this patient's authorizations: 'patient', 'practitioner' or None."""
    if ctx.token.patient and f"Patient/{ctx.token.patient}" == patient:
        return "patient"
    if ctx.user == patient:
        return "patient"
    if ctx.user and ctx.user.startswith("Practitioner/") and await store.authored_for(
            ctx.db, ctx.user, patient):
        return "practitioner"
    return None


async def create_consent(ctx: Context, body: Any) -> Response:
    if not ctx.token.scope.allows("Consent", "create"):
        raise errors.Forbidden("The granted scopes do not permit recording an authorization")
    resource = validation.validate_resource(body, "Consent")
    now = datetime.now(UTC)
    auth = check_authorization(resource, now)
    role = await _may_manage(ctx, auth.patient)
    if role is None:
        await record_decision(ctx, permit=False, action="consent-create", patient=auth.patient,
                              reason="only the patient or a treating practitioner may record it")
        raise errors.Forbidden("Only the patient (patient context) or the treating practitioner "
                               "may record this patient's authorization")
    consent_id, moment = str(uuid.uuid4()), store.now()
    doc = _consent_document(ctx, consent_id, 1, with_defaults(resource), auth, moment,
                            created_by=ctx.user or ctx.token.client_id)
    await store.insert_consent(ctx.db, doc)
    await record_decision(ctx, permit=True, action="consent-create", patient=auth.patient,
                          basis=f"Consent/{consent_id}", purposes=sorted(auth.purposes),
                          reason=f"authorization recorded by the {role}")
    raw = _open_consent(ctx, doc)
    return fhirjson.FhirResponse(raw, status_code=201, headers={
        **NO_STORE, "Location": f"{ctx.base}/Consent/{consent_id}/_history/1",
        "ETag": 'W/"1"', "Last-Modified": format_datetime(moment, usegmt=True)})


def _open_consent(ctx: Context, doc: dict[str, Any]) -> bytes:
    try:
        return vault.open_sealed(ctx.keyring, doc["sealed"], vault.Binding(
            "Consent", doc["_id"], int(doc["vid"]), doc["patient"]))
    except vault.VaultError:
        raise errors.FhirError("The authorization cannot be decrypted", status=500,
                               code="exception") from None


async def _visible_consent(ctx: Context, consent_id: str) -> tuple[dict[str, Any], str]:
    doc = await store.get_consent(ctx.db, consent_id) if _ID.match(consent_id) else None
    role = None
    if doc is not None:
        role = await _may_manage(ctx, doc["patient"])
        if role is None and policy.is_recipient(Authorization.from_index(doc), ctx.token):
            role = "recipient"
    if doc is None or role is None:
        raise errors.NotFound(f"Consent/{consent_id[:64]} is not known")
    return doc, role


async def read_consent(ctx: Context, consent_id: str) -> Response:
    if not ctx.token.scope.allows("Consent", "read"):
        raise errors.Forbidden("The granted scopes do not permit reading authorizations")
    doc, _ = await _visible_consent(ctx, consent_id)
    return fhirjson.FhirResponse(_open_consent(ctx, doc), headers={**NO_STORE, **_resource_headers(doc)})


async def search_consents(ctx: Context, items: list[tuple[str, str]]) -> Response:
    """`GET Consent?patient=X`: a patient's authorizations, for the patient or a treating clinician."""
    if not ctx.token.scope.allows("Consent", "search-type"):
        raise errors.Forbidden("The granted scopes do not permit searching authorizations")
    wanted = [v for k, v in items if k in ("patient", "subject")]
    unknown = [k for k, _ in items if k not in ("patient", "subject", "_format")]
    if unknown or len(wanted) != 1:
        raise errors.Invalid("Search authorizations by exactly one patient (patient=<id>)")
    patient = wanted[0] if wanted[0].startswith("Patient/") else f"Patient/{wanted[0]}"
    if not _ID.match(patient.removeprefix("Patient/")) or await _may_manage(ctx, patient) is None:
        raise errors.Forbidden("Only the patient or a treating practitioner may list authorizations")
    entries = [b'{"fullUrl":' + orjson.dumps(f"{ctx.base}/Consent/{doc['_id']}") + b',"resource":'
               + _open_consent(ctx, doc) + b',"search":{"mode":"match"}}'
               for doc in await store.consents_of(ctx.db, patient)]
    head = {"resourceType": "Bundle", "type": "searchset", "total": len(entries),
            "link": [{"relation": "self", "url": f"{ctx.base}/Consent?{urlencode({'patient': patient})}"}]}
    return fhirjson.FhirResponse(_bundle(head, entries), headers=NO_STORE)


async def revoke_consent(ctx: Context, consent_id: str) -> Response:
    """45 CFR 164.508(b)(5): status becomes inactive; every token minted from it fails at once."""
    if not ctx.token.scope.allows("Consent", "update"):
        raise errors.Forbidden("The granted scopes do not permit revoking authorizations")
    doc, role = await _visible_consent(ctx, consent_id)
    if role == "recipient":
        raise errors.Forbidden("Only the patient or a treating practitioner may revoke it")
    if doc["status"] != "inactive":
        resource = orjson.loads(_open_consent(ctx, doc))
        resource["status"] = "inactive"
        auth = Authorization.from_index({**doc, "status": "inactive"})
        moment = store.now()
        new = _consent_document(ctx, consent_id, int(doc["vid"]) + 1, resource, auth, moment,
                                created_by=doc.get("created_by", ""))
        new["revoked_by"], new["revoked_at"] = ctx.user or ctx.token.client_id, moment
        await store.replace_consent(ctx.db, new, expected=int(doc["vid"]))
        doc = new
    await record_decision(ctx, permit=True, action="consent-revoke", patient=doc["patient"],
                          basis=f"Consent/{consent_id}", reason=f"authorization revoked by the {role}")
    return fhirjson.FhirResponse(_open_consent(ctx, doc), headers={**NO_STORE, **_resource_headers(doc)})


# -- consent tokens -----------------------------------------------------------------------------

def _parameters(body: Any) -> dict[str, list[Any]]:
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise errors.Invalid("Send a Parameters resource")
    validation.validate_resource(body, "Parameters")
    out: dict[str, list[Any]] = {}
    for parameter in body.get("parameter", []):
        value = next((v for k, v in parameter.items() if k.startswith("value")), None)
        if value is not None:
            out.setdefault(parameter["name"], []).append(value)
    return out


def _one_code(params: dict[str, list[Any]], name: str) -> str | None:
    values = params.get(name, [])
    if len(values) > 1:
        raise errors.Invalid(f"Give {name} once")
    if not values:
        return None
    value = values[0]
    if isinstance(value, dict):
        value = value.get("code") or value.get("reference")
    return str(value) if value else None


def _note_request(params: dict[str, list[Any]]) -> policy.NoteRequest:
    ids: set[str] = set()
    for value in params.get("note", []):
        ref = value.get("reference", "") if isinstance(value, dict) else str(value)
        note_id = ref.removeprefix("DocumentReference/")
        if not _ID.match(note_id):
            raise errors.Invalid("note: give DocumentReference/<id> references")
        ids.add(note_id)
    try:
        start = parse_instant(str(params["start"][0])) if "start" in params else None
        end = parse_instant(str(params["end"][0]), end=True) if "end" in params else None
    except ValueError:
        raise errors.Invalid("start/end must be dates or instants") from None
    return policy.NoteRequest(ids=frozenset(ids) if ids else None, start=start, end=end)


def _token_response(raw: str, token: consent_token.ConsentToken) -> Response:
    parameters = {"resourceType": "Parameters", "parameter": [
        {"name": "token", "valueString": raw},
        {"name": "expires", "valueInstant": instant(datetime.fromtimestamp(token.expires_at, UTC))},
        {"name": "patient", "valueReference": {"reference": token.patient}},
        {"name": "basis", "valueString": token.basis},
    ] + [{"name": "purpose", "valueCode": p} for p in token.purpose_of_use]}
    return fhirjson.FhirResponse(parameters, headers=NO_STORE)


def _require_reader(ctx: Context) -> None:
    if not policy.may_read_notes(ctx.token):
        raise errors.Forbidden("The granted scopes do not permit reading psychotherapy notes")


async def mint_from_consent(ctx: Context, consent_id: str, body: Any) -> Response:
    _require_reader(ctx)
    params = _parameters(body)
    purpose = _one_code(params, "purpose")
    if not purpose:
        raise errors.Invalid("purpose (a v3-ActReason code) is required")
    wanted = _note_request(params)
    basis = f"Consent/{consent_id[:64]}"
    doc = await store.get_consent(ctx.db, consent_id) if _ID.match(consent_id) else None
    now = datetime.now(UTC)
    try:
        if doc is None:
            raise policy.Refusal("This authorization does not name the caller as a recipient")
        auth = Authorization.from_index(doc)
        policy.check_consent_mint(auth, ctx.token, purpose, now)
        scope = policy.scope_from_consent(auth, wanted)
    except policy.Refusal as exc:
        await record_decision(ctx, permit=False, action="mint", reason=exc.diagnostics,
                              basis=basis, purposes=[purpose],
                              patient=doc["patient"] if doc else None)
        raise
    expires = min(int(time.time()) + ctx.settings.consent_token_minutes * 60,
                  int(auth.end.timestamp()))
    raw, token = consent_token.mint(
        ctx.signing_key, base_url=ctx.base, patient=auth.patient, basis=basis,
        client_id=ctx.token.client_id, fhir_user=ctx.user, purpose_of_use=[purpose],
        notes=scope, expires_at=expires)
    await record_decision(ctx, permit=True, action="mint", reason="consent token minted",
                          patient=auth.patient, basis=basis, purposes=[purpose], jti=token.jti)
    return _token_response(raw, token)


async def mint_for_exception(ctx: Context, body: Any) -> Response:
    """45 CFR 164.508(a)(2): a token without an authorization, on one of the listed grounds."""
    _require_reader(ctx)
    params = _parameters(body)
    basis = _one_code(params, "basis") or ""
    patient = _one_code(params, "patient") or ""
    patient = patient if patient.startswith("Patient/") else f"Patient/{patient}"
    if not _ID.match(patient.removeprefix("Patient/")):
        raise errors.Invalid("patient (Patient/<id>) is required")
    justification = str((params.get("justification") or [""])[0])
    purpose = _one_code(params, "purpose")
    wanted = _note_request(params)
    try:
        purpose = policy.check_exception_mint(basis, ctx.token, purpose, justification,
                                              ctx.settings.min_justification_chars)
        if basis == policy.ORIGINATOR and not await store.authored_for(
                ctx.db, str(ctx.user), patient):
            raise policy.Refusal("The originator-treatment exception is only for the author of "
                                 "this patient's notes")
    except policy.Refusal as exc:
        await record_decision(ctx, permit=False, action="mint", reason=exc.diagnostics,
                              patient=patient, basis=f"exception:{basis}",
                              purposes=[purpose] if purpose else [])
        raise
    author = ctx.user if basis == policy.ORIGINATOR else None
    scope = consent_token.NoteScope(ids=wanted.ids, start=wanted.start, end=wanted.end,
                                    author=author)
    expires = int(time.time()) + ctx.settings.exception_token_minutes * 60
    raw, token = consent_token.mint(
        ctx.signing_key, base_url=ctx.base, patient=patient, basis=f"exception:{basis}",
        client_id=ctx.token.client_id, fhir_user=ctx.user, purpose_of_use=[purpose],
        notes=scope, expires_at=expires)
    await store.insert_exception_grant(ctx.db, {
        "_id": token.jti, "basis": basis, "patient": patient, "purpose": purpose,
        "client_id": ctx.token.client_id, "fhir_user": ctx.user, "roles": list(ctx.token.roles),
        "justification": justification.strip() or None, "notes": scope.claims(),
        "issued": store.now(), "expires": datetime.fromtimestamp(expires, UTC),
        "request_id": ctx.request_id, "revoked": False})
    await record_decision(ctx, permit=True, action="mint", patient=patient,
                          basis=f"exception:{basis}", purposes=[purpose], jti=token.jti,
                          reason=f"consent token minted under the {basis} exception")
    return _token_response(raw, token)


async def revoke_exception(ctx: Context, body: Any) -> Response:
    """End a 45 CFR 164.508(a)(2) exception grant now: every later use of its consent token is
    refused (policy.check_token_in_force reads the grant on every request).

    Parameters: `jti` (the grant: the consent token's `jti`) or `token` (the consent token
    itself, still unexpired). Who may revoke (policy.may_revoke_exception): the grantee (same
    client and user as at minting) or a caller with the compliance role (oversight of
    exception use). Revoking twice answers the same. Each decision is audited (AuthZconsent,
    action `exception-revoke`), permit or deny.
    """
    params = _parameters(body)
    jti, raw = _one_code(params, "jti"), _one_code(params, "token")
    if bool(jti) == bool(raw):
        raise errors.Invalid("Give the grant to revoke: jti, or token (the consent token), once")
    if raw:
        try:
            jti = consent_token.verify(raw, ctx.signing_key, base_url=ctx.base).jti
        except consent_token.InvalidConsentToken as exc:
            raise errors.Invalid(f"token: {exc}; an expired consent token needs no revoking") from None
    assert jti is not None
    grant = await store.get_exception_grant(ctx.db, jti) if _ID.match(jti) else None
    if grant is None:
        raise errors.NotFound("No exception grant with this jti")
    basis = f"exception:{grant['basis']}"
    try:
        role = policy.may_revoke_exception(grant, ctx.token)
    except policy.Refusal as exc:
        await record_decision(ctx, permit=False, action="exception-revoke", reason=exc.diagnostics,
                              patient=grant["patient"], basis=basis, jti=jti)
        raise
    if not grant.get("revoked"):
        by = ctx.user or ctx.token.client_id
        if await store.revoke_exception_grant(ctx.db, jti, by=by, at=store.now()):
            grant = await store.get_exception_grant(ctx.db, jti) or grant
    await record_decision(ctx, permit=True, action="exception-revoke", patient=grant["patient"],
                          basis=basis, purposes=[grant["purpose"]], jti=jti,
                          reason=f"exception grant revoked by the {role}")
    parameters = {"resourceType": "Parameters", "parameter": [
        {"name": "jti", "valueString": jti},
        {"name": "basis", "valueString": basis},
        {"name": "patient", "valueReference": {"reference": grant["patient"]}},
        {"name": "revoked", "valueBoolean": True},
        {"name": "revokedBy", "valueString": str(grant.get("revoked_by") or "")},
        {"name": "revokedAt", "valueInstant": instant(grant["revoked_at"])},
    ]}
    return fhirjson.FhirResponse(parameters, headers=NO_STORE)

