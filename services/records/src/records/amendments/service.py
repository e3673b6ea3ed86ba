"""The steps of a 45 CFR 164.526 amendment request, each one transaction through records' store.

- `file`: the patient POSTs the Task (`POST [base]/Task` with the amendment code); records fills
  the owner (the note's author), the dates and the 60-day deadline (requests.as_filed).
  164.526(b)(1). A focus that is not one of the caller's progress notes (someone else's note, a
  note that does not exist, a psychotherapy note, which is outside the right to amend under
  164.526(a)(2)(iii)) gets one and the same answer, so the request is no existence oracle.
- `deny`: the owner denies in writing, with a 164.526(a)(2) basis (164.526(d)(1)).
- `extend`: the owner extends the deadline once by 30 days with a reason (164.526(b)(2)(ii)).
- acceptance: the owner signs a correction (`relatesTo: replaces` the note, `context.related`
  the Task); `complete_on_correction` completes the Task in the signing transaction
  (164.526(c)(1): make the amendment, append or link it; (c)(2): the patient sees it on the Task).
- `disagree`: after a denial, the patient files a statement of disagreement (164.526(d)(2)).
- `rebut`: the owner may answer it with a rebuttal, which the patient can read (164.526(d)(3)).

`disagree` and `rebut` set the note's amendment marker (store.py) in the transaction that writes
the appended document, so reads find it without asking the datastore about every note.

Who acts is checked here against the Task as the caller may see it (records.policy); the writes
are made by records' own amendment identity (policy.AMENDMENTS_CLIENT), because a Task changes
only through these steps.
"""

from __future__ import annotations

from typing import Any

import orjson
from pymongo import AsyncMongoClient
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.database import AsyncDatabase

from mindchart_core import errors, scopes, tokens
from records.amendments import appended, requests
from records.amendments import store as marker
from records.policy import AMENDMENTS_CLIENT, AccessPolicy
from records.resources import RESOURCES
from records.search import extract
from records.store import ResourceStore, StoredResource, now

TASK = RESOURCES["Task"]
NOTE = RESOURCES["DocumentReference"]
INTERNAL_SCOPE = "system/Task.cru system/DocumentReference.crus"
PSYCHOTHERAPY_NOTE = ("http://terminology.hl7.org/CodeSystem/v3-ActCode", "PSYTHPN")
NOT_AMENDABLE = ("Task.focus must reference one of your progress notes held in this record "
                 "(psychotherapy notes are outside the right to amend, 45 CFR 164.526(a)(2)(iii))")


def internal_store(store: ResourceStore) -> ResourceStore:
    return internal_store_of(store.client, store.db, store.policy.base_url)


def internal_store_of(client: AsyncMongoClient[dict[str, Any]], db: AsyncDatabase[dict[str, Any]],
                      base_url: str) -> ResourceStore:
    """The store as records' own amendment identity sees it (policy.AMENDMENTS_CLIENT)."""
    token = tokens.AccessToken(subject=AMENDMENTS_CLIENT, client_id=AMENDMENTS_CLIENT,
                               scope=scopes.parse(INTERNAL_SCOPE), audience=base_url,
                               jti="records-amendments", expires_at=0)
    return ResourceStore(client, db, AccessPolicy(token=token, base_url=base_url))


def _patient_of(store: ResourceStore) -> str:
    """The patient the caller acts for: every DocumentReference read scope confined to them."""
    patient = store.policy.confined_patient(NOTE, "read")
    if patient is None:
        raise errors.Forbidden("Only the patient (a patient-context or patient user token) requests "
                               "an amendment of their record or files a statement of disagreement")
    return patient


def _labels(resource: dict[str, Any]) -> set[tuple[str, str]]:
    labels = list((resource.get("meta") or {}).get("security") or [])
    labels += [c for concept in resource.get("securityLabel") or [] if isinstance(concept, dict)
               for c in concept.get("coding") or []]
    return {(str(x.get("system")), str(x.get("code"))) for x in labels if isinstance(x, dict)}


def _author(note: dict[str, Any]) -> str | None:
    for author in note.get("author") or []:
        ref = extract.reference_of(author, "")
        if ref and ref[0].startswith("Practitioner/"):
            return ref[0]
    return None


async def file(store: ResourceStore, sent: dict[str, Any], base_url: str) -> StoredResource:
    """The patient's request, stored as records fills it (requests.as_filed)."""
    patient = _patient_of(store)
    if not store.policy.token.scope.matching("Task", "create"):
        raise errors.InsufficientScope("The granted scopes do not permit create on Task")
    who = extract.reference_of(sent.get("for"), base_url) if sent.get("for") else [f"Patient/{patient}"]
    if who != [f"Patient/{patient}"]:
        raise errors.Unprocessable("Task.for must be you: a patient requests amendments of their own "
                                   "record", expression=["Task.for"])
    refused = errors.Unprocessable(NOT_AMENDABLE, expression=["Task.focus"])
    focus = sent.get("focus")
    ref = str((focus or {}).get("reference", "")) if isinstance(focus, dict) else ""
    local = extract.relative_reference(ref, base_url) if ref.startswith(base_url + "/") or \
        not ref.startswith(("http:", "https:", "urn:")) else ""
    note_id = requests.reference_id({"reference": local}, "DocumentReference")
    if note_id is None or "/_history" in ref:
        raise refused
    try:
        stored = await store.read(NOTE, note_id)
    except (errors.NotFound, errors.Gone, errors.Forbidden):
        raise refused from None
    note = orjson.loads(stored.raw or b"{}")
    author = _author(note)
    if PSYCHOTHERAPY_NOTE in _labels(note) or appended.kind_of(note) or author is None:
        raise refused
    if note.get("docStatus") == "entered-in-error" or note.get("status") == "entered-in-error":
        raise errors.Unprocessable(f"DocumentReference/{note_id} is marked entered in error: there "
                                   "is nothing left in it to amend", expression=["Task.focus"])
    filed = requests.as_filed(sent, note_id, patient, author, now())
    return await internal_store(store).create(TASK, filed)


async def _request(store: ResourceStore, task_id: str) -> tuple[StoredResource, dict[str, Any]]:
    stored = await store.read(TASK, task_id)  # 404 for a Task the caller cannot see
    task = orjson.loads(stored.raw or b"{}")
    if not requests.is_amendment_request(task):
        raise errors.Unprocessable(f"Task/{task_id} is not an amendment request")
    return stored, task


def _owner_only(store: ResourceStore, task: dict[str, Any]) -> None:
    token = store.policy.token
    owner = (task.get("owner") or {}).get("reference")
    if not token.fhir_user_ref or token.fhir_user_ref != owner:
        raise errors.Forbidden(f"Only the request's owner ({owner}, the note's author) decides on it")
    if not token.scope.matching("Task", "update"):
        raise errors.InsufficientScope("The granted scopes do not permit update on Task")


def _patient_only(store: ResourceStore, task: dict[str, Any]) -> None:
    if (task.get("for") or {}).get("reference") != f"Patient/{_patient_of(store)}":
        raise errors.Forbidden("Only the patient who filed the request may do this")


async def _replace(store: ResourceStore, stored: StoredResource, new: dict[str, Any],
                   session: AsyncClientSession | None = None) -> StoredResource:
    try:
        updated, _ = await internal_store(store).update(TASK, stored.id, new, stored.version,
                                                         session=session)
    except errors.PreconditionFailed:
        raise errors.Conflict("The request changed meanwhile; reload it") from None
    return updated


async def deny(store: ResourceStore, task_id: str, basis: str, reason: str) -> StoredResource:
    stored, task = await _request(store, task_id)
    _owner_only(store, task)
    if task.get("status") not in requests.OPEN:
        raise errors.Conflict(f"This request is already {task.get('status')}")
    if basis not in requests.DENIAL_BASES:
        raise errors.Unprocessable("basis must be one of the grounds of 45 CFR 164.526(a)(2): "
                                   + ", ".join(requests.DENIAL_BASES))
    return await _replace(store, stored, requests.denied(task, basis, requests.text(reason, "reason"), now()))


async def extend(store: ResourceStore, task_id: str, reason: str) -> StoredResource:
    stored, task = await _request(store, task_id)
    _owner_only(store, task)
    return await _replace(store, stored, requests.extended(task, requests.text(reason, "reason"), now()))


async def _append(store: ResourceStore, stored: StoredResource, task: dict[str, Any], kind: str,
                  author: str, body: str, business: str) -> StoredResource:
    """Write the appended document and record it on the Task, in one transaction."""
    internal = internal_store(store)
    note_id = requests.reference_id(task.get("focus"), "DocumentReference") or ""
    note = orjson.loads((await internal.read(NOTE, note_id)).raw or b"{}")

    async def once(session: AsyncClientSession) -> StoredResource:
        moment = now()
        created = await internal.create(NOTE, appended.document(kind, task, note, author, body, moment),
                                        session=session, transition="amendment")
        await marker.mark(internal, note_id, session)  # the note's marker, in this transaction
        await _replace(store, stored, requests.with_document(task, kind, created.id, moment, business),
                       session)
        return created

    return await internal.atomically(once)


async def disagree(store: ResourceStore, task_id: str, statement: str) -> StoredResource:
    stored, task = await _request(store, task_id)
    _patient_only(store, task)
    if task.get("status") != "rejected":
        raise errors.Conflict("A statement of disagreement answers a denied request; this one is "
                              f"{task.get('status')}")
    if requests.outputs(task, appended.STATEMENT):
        raise errors.Conflict("A statement of disagreement was already filed for this request")
    body = requests.text(statement, "statement")
    return await _append(store, stored, task, appended.STATEMENT,
                         str((task.get("for") or {}).get("reference")), body, "disagreement-filed")


async def rebut(store: ResourceStore, task_id: str, rebuttal: str) -> StoredResource:
    stored, task = await _request(store, task_id)
    _owner_only(store, task)
    if not requests.outputs(task, appended.STATEMENT):
        raise errors.Conflict("A rebuttal answers a statement of disagreement; none was filed")
    if requests.outputs(task, appended.REBUTTAL):
        raise errors.Conflict("A rebuttal was already written for this request")
    body = requests.text(rebuttal, "rebuttal")
    return await _append(store, stored, task, appended.REBUTTAL,
                         str((task.get("owner") or {}).get("reference")), body, "rebutted")


async def complete_on_correction(store: ResourceStore, correction: dict[str, Any], correction_id: str,
                                 authors: list[str], replaced: list[str],
                                 session: AsyncClientSession) -> None:
    """A correction being signed final that names an amendment request in `context.related`
    completes it, in the signing transaction: the request must be open, about the note the
    correction replaces, and owned by one of the correction's authors."""
    internal = internal_store(store)
    for related in (correction.get("context") or {}).get("related") or []:
        task_id = requests.reference_id(
            {"reference": extract.relative_reference(str((related or {}).get("reference", "")),
                                                     store.policy.base_url)}, "Task")
        if task_id is None:
            continue
        try:
            stored = await internal.read(TASK, task_id, session=session)
        except (errors.NotFound, errors.Gone):
            raise errors.Unprocessable(f"context.related Task/{task_id[:64]} is not known",
                                       expression=["DocumentReference.context.related"]) from None
        task = orjson.loads(stored.raw or b"{}")
        if not requests.is_amendment_request(task):
            continue
        focus = requests.reference_id(task.get("focus"), "DocumentReference")
        if task.get("status") not in requests.OPEN or focus not in replaced or \
                (task.get("owner") or {}).get("reference") not in authors:
            raise errors.Unprocessable(
                f"Task/{task_id} is not an open amendment request of the note this correction "
                "replaces, owned by its author", expression=["DocumentReference.context.related"])
        await _replace(store, stored, requests.completed(task, correction_id, now()), session)


__all__ = ["complete_on_correction", "deny", "disagree", "extend", "file", "internal_store",
           "internal_store_of", "rebut"]
