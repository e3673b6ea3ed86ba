"""Psychotherapy notes: writes by their author, reads through the consent gate (policy.py).

Writes (45 CFR 164.501: the notes of a mental health professional about a counseling session)
come from the practitioner in the access token's `fhirUser`, never from the body. Reads (read,
vread, search, history) pass `gate` first: a verified, in-force consent token (45 CFR
164.508(a)(2)); every note released is recorded as a disclosure (service.release).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any
from urllib.parse import urlencode

import orjson
import structlog
from starlette.responses import Response

from mindchart_core import errors, fhirjson, note_lifecycle, validation
from psychnotes import consent_token, labels, notes, policy, service, store, vault
from psychnotes.consent import parse_instant
from psychnotes.lifecycle import amends

log = structlog.get_logger(__name__)
SEARCH_PARAMS = frozenset({"patient", "subject", "_id", "date", "author", "status", "relatesto",
                           "_lastUpdated", "_tag", "_security", "_count", "_cursor", "_format"})
# R4 search.html §2.1.1.2 common parameters: `_tag` and `_security` are tokens on meta.tag and
# meta.security, `_lastUpdated` a date on meta.lastUpdated. The stored stub keeps the note's meta
# in clear (never its text), so they filter on it; `_lastUpdated` on the version's time `ts`.
META_TOKENS = {"_tag": "resource.meta.tag", "_security": "resource.meta.security"}
MAX_COUNT = 100


def require_practitioner(ctx: service.Context, interaction: str) -> str:
    if not ctx.token.scope.allows("DocumentReference", interaction):
        raise errors.InsufficientScope(
            f"The granted scopes do not permit {interaction} of psychotherapy notes")
    author = ctx.user
    if not author or not author.startswith("Practitioner/"):
        raise errors.Forbidden("Only a practitioner (fhirUser) may write psychotherapy notes")
    return author


async def require_care_team(ctx: service.Context, patient: str, author: str, action: str) -> None:
    """Only a member of the patient's active CareTeam in records writes their psychotherapy notes
    (careteam.py); having written one before proves nothing."""
    if not await ctx.care_teams.is_member(patient, author):
        await service.record_decision(ctx, permit=False, action=action, patient=patient,
                                      reason="the author is not on the patient's care team")
        raise errors.Forbidden("Only a member of the patient's active care team (CareTeam in "
                               "records) writes psychotherapy notes for them")


def note_document(ctx: service.Context, note_id: str, version: int, resource: dict[str, Any],
                   *, patient: str, author: str, moment: datetime) -> dict[str, Any]:
    labelled = labels.label({**resource, "id": note_id})
    labelled["meta"].update(versionId=str(version), lastUpdated=service.instant(moment))
    labelled["author"] = [{"reference": author}]
    labelled.setdefault("date", service.instant(moment))
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
            "date": date, "status": body["status"], "doc_status": body.get("docStatus"),
            "relates_to": note_lifecycle.amended_ids(body),
            "awaiting": note_lifecycle.awaiting_cosigner(body),
            "deleted": False, "resource": stub,
            "sealed": sealed}


def write_headers(ctx: service.Context, note_id: str, version: int, moment: datetime) -> dict[str, str]:
    return {"Location": f"{ctx.base}/DocumentReference/{note_id}/_history/{version}",
            "ETag": f'W/"{version}"', "Last-Modified": format_datetime(moment, usegmt=True)}


async def create_note(ctx: service.Context, body: Any) -> Response:
    author = require_practitioner(ctx, "create")
    resource = validation.validate_resource(body, "DocumentReference")
    patient = notes.check_psychotherapy_note(resource)
    note_lifecycle.check_not_awaiting(resource)
    await require_care_team(ctx, patient, author, "create")
    await amends.check(ctx.db, resource, author)
    note_id, moment = str(uuid.uuid4()), store.now()
    doc = note_document(ctx, note_id, 1, resource, patient=patient, author=author, moment=moment)
    await store.insert_note(ctx.db, doc, service.decision_record(
        ctx, permit=True, reason="note written by its author", action="create", patient=patient,
        entities=[f"DocumentReference/{note_id}"]))
    return Response(status_code=201, headers=write_headers(ctx, note_id, 1, moment))


async def own_note(ctx: service.Context, note_id: str, author: str, action: str) -> dict[str, Any]:
    doc = await store.get_note(ctx.db, note_id) if service.ID.match(note_id) else None
    if doc is None or doc["author"] != author:
        # Someone else's note is as invisible to a writer as a missing one.
        await service.record_decision(ctx, permit=False, action=action,
                                      reason="only the author may change a psychotherapy note")
        raise errors.NotFound(f"DocumentReference/{note_id[:64]} is not one of your notes")
    if doc.get("deleted"):
        raise errors.Gone(f"DocumentReference/{note_id} has been deleted")
    return doc


# The note lifecycle (psychnotes/lifecycle/, the rules in mindchart_core.note_lifecycle): a signed
# note (or one that arrived signed, or one awaiting co-signature) never changes: what follows is a
# new note. Without `docStatus` a note keeps the behaviour it had before (its author may change or
# delete it).
def check_unlocked(current: dict[str, Any], note_id: str, action: str) -> None:
    if current.get("doc_status") in note_lifecycle.SIGNED_STATES:
        raise note_lifecycle.Locked(
            f"DocumentReference/{note_id} is signed and cannot be {action}: "
            f"{note_lifecycle.AMEND_HINT}")
    if current.get("awaiting"):
        raise note_lifecycle.Locked(
            f"DocumentReference/{note_id} is signed by its author and awaits co-signature: it "
            f"cannot be {action} meanwhile")


async def update_note(ctx: service.Context, note_id: str, body: Any, if_match: int | None) -> Response:
    author = require_practitioner(ctx, "update")
    resource = validation.validate_resource(body, "DocumentReference")
    if resource.get("id") != note_id:
        raise errors.Invalid("The body's id must match the id in the URL")
    current = await own_note(ctx, note_id, author, "update")
    check_unlocked(current, note_id, "changed")
    draft = note_lifecycle.DRAFT
    if current.get("doc_status") == draft and resource.get("docStatus") != draft:
        raise errors.Unprocessable(f"DocumentReference/{note_id} is a draft: it stays docStatus "
                                   f"'preliminary' until its author signs it with $sign",
                                   expression=["DocumentReference.docStatus"])
    patient = notes.check_psychotherapy_note(resource)
    note_lifecycle.check_not_awaiting(resource)
    if note_lifecycle.amended_ids(resource) != current.get("relates_to", []):
        raise errors.Unprocessable("What a note appends to or replaces (relatesTo) is set when it "
                                   "is written", expression=["DocumentReference.relatesTo"])
    if patient != current["patient"]:
        raise errors.Unprocessable("A note cannot be moved to another patient",
                                   expression=["DocumentReference.subject"])
    await require_care_team(ctx, patient, author, "update")
    if if_match is not None and if_match != current["vid"]:
        raise errors.PreconditionFailed("If-Match does not match the current version")
    version, moment = int(current["vid"]) + 1, store.now()
    doc = note_document(ctx, note_id, version, resource, patient=patient, author=author,
                         moment=moment)
    await store.replace_note(ctx.db, doc, expected=int(current["vid"]), method="PUT",
                             decision=service.decision_record(
                                 ctx, permit=True, reason="note updated by its author", action="update",
                                 patient=patient, entities=[f"DocumentReference/{note_id}"]))
    headers = write_headers(ctx, note_id, version, moment)
    headers.pop("Location")
    return Response(status_code=200, headers=headers)


async def delete_note(ctx: service.Context, note_id: str) -> Response:
    """Soft delete: the note leaves search and read (410); every version stays in history."""
    author = require_practitioner(ctx, "delete")
    current = await own_note(ctx, note_id, author, "delete")
    check_unlocked(current, note_id, "deleted")
    await require_care_team(ctx, current["patient"], author, "delete")
    version, moment = int(current["vid"]) + 1, store.now()
    stub = {**current["resource"], "meta": {**current["resource"]["meta"],
                                            "versionId": str(version),
                                            "lastUpdated": service.instant(moment)}}
    doc = {**current, "vid": version, "ts": moment, "deleted": True, "sealed": None,
           "resource": stub}
    await store.replace_note(ctx.db, doc, expected=int(current["vid"]), method="DELETE",
                             decision=service.decision_record(
                                 ctx, permit=True, reason="note deleted (soft) by its author",
                                 action="delete", patient=current["patient"],
                                 entities=[f"DocumentReference/{note_id}"]))
    return Response(status_code=204)


# -- notes: reads through the gate --------------------------------------------------------------

async def gate(ctx: service.Context, presented: list[str], action: str) -> consent_token.ConsentToken:
    """The verified, in-force consent token of this request, or an audited refusal."""
    if policy.is_patient_context(ctx.token):
        await service.record_decision(ctx, permit=False, action=action,
                                      reason="a patient-context token never reads psychotherapy notes")
        raise errors.Forbidden("Psychotherapy notes are outside the right of access (45 CFR "
                               "164.524(a)(1)(i)): a patient-context token never reads them")
    if not policy.may_read_notes(ctx.token):
        await service.record_decision(ctx, permit=False, action=action,
                                      reason="the access token's scopes do not permit reading notes")
        raise errors.InsufficientScope("The granted scopes do not permit reading psychotherapy notes")
    if not presented:
        reason = ("Psychotherapy notes are released only with a consent token (Consent-Token "
                  "header; 45 CFR 164.508(a)(2)); mint one with $consent-token")
        await service.record_decision(ctx, permit=False, action=action, reason="no consent token")
        raise policy.Refusal(reason)
    if len(presented) > 1:
        await service.record_decision(ctx, permit=False, action=action, reason="several consent tokens")
        raise policy.TokenRefusal("Send exactly one Consent-Token header")
    try:
        token = ctx.consent_tokens.verify(presented[0].strip(), lambda raw: consent_token.verify(
            raw, ctx.signing_key, base_url=ctx.base))
    except consent_token.InvalidConsentToken as exc:
        await service.record_decision(ctx, permit=False, action=action, reason=str(exc))
        raise policy.TokenRefusal(f"The consent token is refused: {exc}") from None
    try:
        await policy.check_token_in_force(ctx.db, token, ctx.token, datetime.now(UTC), ctx.bases)
    except policy.Refusal as exc:
        await _deny(ctx, token, action, exc.diagnostics)
        raise
    return token


async def _deny(ctx: service.Context, token: consent_token.ConsentToken, action: str, reason: str,
                entities: list[str] | None = None) -> None:
    await service.record_decision(ctx, permit=False, action=action, reason=reason, patient=token.patient,
                                  basis=token.basis, purposes=list(token.purpose_of_use), jti=token.jti,
                                  entities=entities)


OUTSIDE = "The requested note is not inside this consent token's scope"


async def open_note(ctx: service.Context, doc: dict[str, Any], note_id: str) -> bytes:
    try:
        return vault.open_sealed(ctx.keyring, doc["sealed"], vault.Binding(
            "DocumentReference", note_id, int(doc["vid"]), doc["patient"]))
    except vault.VaultError as exc:
        # Tampering, a swapped ciphertext or a missing KEK: never answer with anything but this.
        log.error("note_unsealable", resource_id=note_id, version=doc["vid"], problem=str(exc))
        raise errors.FhirError("The note cannot be decrypted; the incident is logged",
                               status=500, code="exception") from None


async def read_note(ctx: service.Context, token: consent_token.ConsentToken, note_id: str) -> Response:
    doc = await store.get_note(ctx.db, note_id) if service.ID.match(note_id) else None
    ref = f"DocumentReference/{note_id[:64]}"
    if not policy.covers(token, doc, note_id) or doc is None:
        await _deny(ctx, token, "read", OUTSIDE, [ref])
        raise policy.Refusal(OUTSIDE)
    if doc.get("deleted"):
        await _deny(ctx, token, "read", "the note has been deleted", [ref])
        raise errors.Gone(f"{ref} has been deleted")
    raw = await open_note(ctx, doc, note_id)
    headers = await service.release(ctx, token, "read", [ref])
    return fhirjson.FhirResponse(raw, headers={**headers, **service.resource_headers(doc)})


async def vread_note(ctx: service.Context, token: consent_token.ConsentToken, note_id: str,
                     version: str) -> Response:
    ref = f"DocumentReference/{note_id[:64]}"
    doc = None
    if service.ID.match(note_id) and version.isdigit() and len(version) < 10:
        doc = await store.get_note_version(ctx.db, note_id, int(version))
    if not policy.covers(token, doc, note_id) or doc is None:
        await _deny(ctx, token, "vread", OUTSIDE, [ref])
        raise policy.Refusal(OUTSIDE)
    if not doc.get("sealed"):
        await _deny(ctx, token, "vread", "that version is a deletion", [ref])
        raise errors.Gone(f"Version {version} of {ref} is a deletion")
    raw = await open_note(ctx, doc, note_id)
    headers = await service.release(ctx, token, "vread", [f"{ref}/_history/{version}"])
    return fhirjson.FhirResponse(raw, headers={**headers, **service.resource_headers(doc)})


async def note_history(ctx: service.Context, token: consent_token.ConsentToken, note_id: str) -> Response:
    """R4 http.html §history: newest first; versions outside the token's scope are left out."""
    ref = f"DocumentReference/{note_id[:64]}"
    current = await store.get_note(ctx.db, note_id) if service.ID.match(note_id) else None
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
                "response": {"status": "204", "lastModified": service.instant(service.utc(doc["ts"]))}}))
            continue
        if not policy.covers(token, doc, note_id):
            continue
        raw = await open_note(ctx, doc, note_id)
        method = str(doc.get("method", "PUT"))
        entries.append(b'{"fullUrl":' + orjson.dumps(f"{ctx.base}/{ref}") + b',"resource":' + raw
                       + b',"request":' + orjson.dumps({
                           "method": method, "url": "DocumentReference" if method == "POST" else ref})
                       + b',"response":' + orjson.dumps({
                           "status": "201" if method == "POST" else "200",
                           "etag": f'W/"{doc["vid"]}"',
                           "lastModified": service.instant(service.utc(doc["ts"]))}) + b"}")
        released.append(f"{ref}/_history/{doc['vid']}")
    head = {"resourceType": "Bundle", "type": "history", "total": len(entries),
            "link": [{"relation": "self", "url": f"{ctx.base}/{ref}/_history"}]}
    headers = await service.release(ctx, token, "history", released)
    return fhirjson.FhirResponse(service.bundle(head, entries), headers=headers)


def _date_clause(value: str, field: str = "date", name: str = "date") -> dict[str, Any]:
    prefix, rest = (value[:2], value[2:]) if value[:2] in ("ge", "gt", "le", "lt", "eq") else ("eq", value)
    try:
        lo, hi = parse_instant(rest), parse_instant(rest, end=True)
    except ValueError:
        raise errors.Invalid(f"{name}: '{value[:40]}' is not a date or instant") from None
    if hi == lo:
        hi = lo + timedelta(milliseconds=1)
    return {"ge": {field: {"$gte": lo}}, "gt": {field: {"$gte": hi}},
            "le": {field: {"$lt": hi}}, "lt": {field: {"$lt": lo}},
            "eq": {field: {"$gte": lo, "$lt": hi}}}[prefix]


def _meta_token_clause(name: str, value: str) -> dict[str, Any]:
    """R4 search.html §2.1.1.4.5 token forms on a Coding list: `system|code`, `code` (any
    system), `|code` (no system), `system|` (any code of the system); commas are OR."""
    alternatives: list[dict[str, Any]] = []
    for item in [v for v in value.split(",") if v][:MAX_COUNT]:
        if "|" in item:
            system, _, code = item.partition("|")
            match: dict[str, Any] = {"system": system} if system else {"system": {"$exists": False}}
            if code:
                match["code"] = code
            elif not system:
                raise errors.Invalid(f"{name}: '|' names neither a system nor a code")
        else:
            match = {"code": item}
        alternatives.append({META_TOKENS[name]: {"$elemMatch": match}})
    if not alternatives:
        raise errors.Invalid(f"{name} needs a value")
    return alternatives[0] if len(alternatives) == 1 else {"$or": alternatives}


async def search_notes(ctx: service.Context, token: consent_token.ConsentToken,
                       items: list[tuple[str, str]]) -> Response:
    """Only notes inside the token's scope are ever looked at, so nothing outside is counted."""
    clauses: list[dict[str, Any]] = [policy.note_filter(token)]
    applied: list[tuple[str, str]] = []
    count, cursor = 50, None
    for name, value in items:
        if name not in SEARCH_PARAMS:
            raise errors.Invalid(f"Search parameter '{name[:40]}' is not supported here "
                                 "(supported: patient, _id, date, author, status, relatesto, "
                                 "_lastUpdated, _tag, _security, _count)")
        if name in ("patient", "subject"):
            wanted = value if value.startswith("Patient/") else f"Patient/{value}"
            if wanted != token.patient:
                await _deny(ctx, token, "search", "search for a patient other than the token's")
                raise policy.Refusal("This consent token is for another patient")
        elif name == "_id":
            clauses.append({"_id": {"$in": [v for v in value.split(",") if v][:MAX_COUNT]}})
        elif name == "date":
            clauses.append(_date_clause(value))
        elif name == "_lastUpdated":
            clauses.append(_date_clause(value, "ts", name))
        elif name in META_TOKENS:
            clauses.append(_meta_token_clause(name, value))
        elif name == "author":
            clauses.append({"author": value if "/" in value else f"Practitioner/{value}"})
        elif name == "status":
            clauses.append({"status": {"$in": value.split(",")[:MAX_COUNT]}})
        elif name == "relatesto":  # the addenda and corrections of a note
            targets = [v.rsplit("/", 1)[-1] for v in value.split(",")][:MAX_COUNT]
            clauses.append({"relates_to": {"$in": targets}})
        elif name == "_count":
            if not value.isdigit():
                raise errors.Invalid("_count must be a non-negative integer")
            count = min(int(value), MAX_COUNT)
        elif name == "_cursor":
            cursor = value
        if name not in ("_cursor", "_format"):
            applied.append((name, value))
    if not any(name == "status" for name, _ in applied):
        # R4 DocumentReference entered-in-error stays readable by id; a plain search leaves it out.
        clauses.append({"status": {"$ne": "entered-in-error"}})
    docs = [d async for d in store.find_notes(ctx.db, {"$and": clauses}, after=cursor,
                                              limit=count + 1)] if count else []
    page, has_more = docs[:count], len(docs) > count
    page = [d for d in page if policy.covers(token, d, d["_id"])]  # defence in depth
    entries, refs = [], []
    for doc in page:
        raw = await open_note(ctx, doc, doc["_id"])
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
    headers = await service.release(ctx, token, "search", refs)
    return fhirjson.FhirResponse(service.bundle(head, entries), headers=headers)

