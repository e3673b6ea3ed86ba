"""Every psychnotes database query. This datastore is separate from records' by design.

Collections:
- `notes` / `notes_history`: one document per note (current version) and per version. Beside the
  sealed resource (`sealed`, vault.py) they keep only what the gate and search filter on: patient,
  author, date, status, the security labels (`resource` is a clear stub: resourceType, id, meta,
  status, subject, author, date). Never the note's words.
- `consents` / `consents_history`: the authorizations, sealed likewise, with the gate's summary
  (consent.Authorization.index) in clear.
- `provenances`: the Provenance of each signature and entered-in-error mark (lifecycle/), sealed
  like a note (its JWS covers the note's words, so a guess at them could be checked against it),
  with the note id (`note`), its version (`note_vid`) and patient in clear; a Provenance is never
  revised (`vid` 1).
- `exception_grants`: each 164.508(a)(2) exception token minted, with the written justification.
- `decisions`: every consent-gate decision (AuthZconsent AuditEvent), permit or deny, with reason.
- `disclosures`: every release of note content (PrivacyDisclosure AuditEvent).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from pymongo import ASCENDING
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import ConnectionFailure, PyMongoError

from mindchart_core import errors

Db = AsyncDatabase[dict[str, Any]]
SEALED_COLLECTIONS = ("notes", "notes_history", "consents", "consents_history", "provenances")


def now() -> datetime:
    moment = datetime.now(UTC)  # BSON dates hold milliseconds
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


async def ensure_indexes(db: Db) -> None:
    await db.notes.create_index([("patient", ASCENDING), ("date", ASCENDING)])
    await db.notes.create_index([("author", ASCENDING)])
    await db.notes.create_index([("relates_to", ASCENDING)])
    await db.provenances.create_index([("note", ASCENDING)])
    await db.notes_history.create_index([("id", ASCENDING), ("vid", ASCENDING)], unique=True)
    await db.consents.create_index([("patient", ASCENDING)])
    await db.consents_history.create_index([("id", ASCENDING), ("vid", ASCENDING)], unique=True)
    await db.decisions.create_index([("request_id", ASCENDING)])
    await db.decisions.create_index([("patient", ASCENDING)])
    await db.disclosures.create_index([("patient", ASCENDING)])
    await db.disclosures.create_index([("request_id", ASCENDING)])


# -- notes --------------------------------------------------------------------------------------

async def insert_note(db: Db, doc: dict[str, Any], decision: dict[str, Any]) -> None:
    """A new note (version 1), its history entry and the author's permit decision, atomically:
    no version is stored without its audit record, and a write that fails leaves neither, so a
    503 means nothing was written (the kill -9 test in tests/resilience found a stored note with
    no decision when the two were separate writes)."""
    async with db.client.start_session() as session, await session.start_transaction():
        await db.notes.insert_one(doc, session=session)
        await db.notes_history.insert_one(
            {**doc, "_id": f"{doc['_id']}/{doc['vid']}", "id": doc["_id"], "method": "POST"},
            session=session)
        await db.decisions.insert_one(decision, session=session)


def _lost_race(exc: PyMongoError, what: str) -> errors.FhirError | None:
    """A write conflict with a concurrent transaction on the same document (MongoDB's
    TransientTransactionError label): the other writer won, so this one answers 409 like any
    lost version race. An unreachable datastore carries the label too; that stays a 503."""
    if exc.has_error_label("TransientTransactionError") and not isinstance(exc, ConnectionFailure):
        return errors.Conflict(f"The {what} changed meanwhile; retry with its new version")
    return None


async def replace_note(db: Db, doc: dict[str, Any], *, expected: int, method: str,
                       decision: dict[str, Any]) -> None:
    """The next version (update or soft delete), only if `expected` is still the current one,
    with the author's permit decision in the same transaction (as insert_note)."""
    await write_versions(db, [(doc, expected)], method=method, decisions=(decision,))


async def write_versions(db: Db, versions: list[tuple[dict[str, Any], int]], *, method: str,
                         provenances: tuple[dict[str, Any], ...] = (),
                         decisions: tuple[dict[str, Any], ...] = ()) -> None:
    """Next versions of several notes (each only if its `expected` version is still current),
    the Provenances recording why and the decisions auditing it, in one transaction: a signature
    is never stored without the version it signs, nor a correction signed without its original
    superseded, nor a version without its decision."""
    try:
        async with db.client.start_session() as session, await session.start_transaction():
            for doc, expected in versions:
                note_id = doc["_id"]
                result = await db.notes.replace_one({"_id": note_id, "vid": expected}, doc,
                                                    session=session)
                if result.matched_count != 1:
                    raise errors.Conflict("The note changed meanwhile; retry with its new version")
                await db.notes_history.insert_one(
                    {**doc, "_id": f"{note_id}/{doc['vid']}", "id": note_id, "method": method},
                    session=session)
            for provenance in provenances:
                await db.provenances.insert_one(provenance, session=session)
            for decision in decisions:
                await db.decisions.insert_one(decision, session=session)
    except PyMongoError as exc:
        raise _lost_race(exc, "note") or exc from None


async def provenances_of(db: Db, note_id: str) -> list[dict[str, Any]]:
    docs = await db.provenances.find({"note": note_id}).to_list()
    return sorted(docs, key=lambda d: (int(d["note_vid"]), d["_id"]))


async def get_note(db: Db, note_id: str) -> dict[str, Any] | None:
    doc: dict[str, Any] | None = await db.notes.find_one({"_id": note_id})
    return doc


async def get_note_version(db: Db, note_id: str, version: int) -> dict[str, Any] | None:
    doc: dict[str, Any] | None = await db.notes_history.find_one({"id": note_id, "vid": version})
    return doc


async def note_history(db: Db, note_id: str) -> list[dict[str, Any]]:
    docs = await db.notes_history.find({"id": note_id}).to_list()
    return sorted(docs, key=lambda d: -int(d["vid"]))


async def find_notes(db: Db, filt: dict[str, Any], *, after: str | None,
                     limit: int) -> AsyncIterator[dict[str, Any]]:
    """Current, undeleted notes matching `filt` (already narrowed to the token), in id order."""
    clauses = [filt, {"deleted": False}]
    if after:
        clauses.append({"_id": {"$gt": after}})
    cursor = db.notes.find({"$and": clauses}).sort("_id", ASCENDING).limit(limit)
    async for doc in cursor:
        yield doc


async def authored_for(db: Db, author: str, patient: str) -> bool:
    """Whether `author` has written a psychotherapy note about `patient` (a treating clinician)."""
    return await db.notes.find_one({"author": author, "patient": patient}, {"_id": 1}) is not None


async def existing_note_ids(db: Db, patient: str, ids: list[str]) -> set[str]:
    docs = await db.notes.find({"_id": {"$in": ids}, "patient": patient, "deleted": False},
                               {"_id": 1}).to_list()
    return {d["_id"] for d in docs}


# -- consents -----------------------------------------------------------------------------------

async def insert_consent(db: Db, doc: dict[str, Any], decision: dict[str, Any]) -> None:
    """An authorization's first version and the decision auditing it, in one transaction."""
    async with db.client.start_session() as session, await session.start_transaction():
        await db.consents.insert_one(doc, session=session)
        await db.consents_history.insert_one(
            {**doc, "_id": f"{doc['_id']}/{doc['vid']}", "id": doc["_id"], "method": "POST"},
            session=session)
        await db.decisions.insert_one(decision, session=session)


async def replace_consent(db: Db, doc: dict[str, Any], *, expected: int, decision: dict[str, Any]) -> None:
    """An authorization's next version (revoked, attested) and its decision, in one transaction."""
    consent_id = doc["_id"]
    try:
        async with db.client.start_session() as session, await session.start_transaction():
            result = await db.consents.replace_one({"_id": consent_id, "vid": expected}, doc,
                                                   session=session)
            if result.matched_count != 1:
                raise errors.Conflict("The authorization changed meanwhile; retry")
            await db.consents_history.insert_one(
                {**doc, "_id": f"{consent_id}/{doc['vid']}", "id": consent_id, "method": "PUT"},
                session=session)
            await db.decisions.insert_one(decision, session=session)
    except PyMongoError as exc:
        raise _lost_race(exc, "authorization") or exc from None


async def get_consent(db: Db, consent_id: str) -> dict[str, Any] | None:
    doc: dict[str, Any] | None = await db.consents.find_one({"_id": consent_id})
    return doc


async def consents_of(db: Db, patient: str) -> list[dict[str, Any]]:
    docs = await db.consents.find({"patient": patient}).to_list()
    return sorted(docs, key=lambda d: d["_id"])


# -- exception grants, decisions, disclosures ---------------------------------------------------

async def insert_exception_grant(db: Db, grant: dict[str, Any]) -> None:
    await db.exception_grants.insert_one(grant)


async def get_exception_grant(db: Db, jti: str) -> dict[str, Any] | None:
    doc: dict[str, Any] | None = await db.exception_grants.find_one({"_id": jti})
    return doc


async def revoke_exception_grant(db: Db, jti: str, *, by: str, at: datetime) -> bool:
    """Mark a grant revoked (once: the first revocation's who and when are kept)."""
    result = await db.exception_grants.update_one(
        {"_id": jti, "revoked": {"$ne": True}},
        {"$set": {"revoked": True, "revoked_by": by, "revoked_at": at}})
    return result.modified_count == 1


async def insert_decision(db: Db, record: dict[str, Any]) -> None:
    await db.decisions.insert_one(record)


# -- key rotation -------------------------------------------------------------------------------

async def sealed_documents(db: Db, collection: str, current_kek: str) -> AsyncIterator[dict[str, Any]]:
    """Documents whose data key is not yet wrapped by the current KEK."""
    cursor = db[collection].find({"sealed.dek.kek": {"$exists": True, "$ne": current_kek}})
    async for doc in cursor:
        yield doc


async def kek_not_among(db: Db, known: list[str]) -> str | None:
    """A KEK id some stored data key is wrapped by that is not in `known` (None: there is none)."""
    for collection in SEALED_COLLECTIONS:
        doc = await db[collection].find_one(
            {"sealed.dek.kek": {"$exists": True, "$nin": known}}, {"sealed.dek.kek": 1})
        if doc is not None:
            return str(doc["sealed"]["dek"]["kek"])
    return None


async def set_sealed(db: Db, collection: str, doc_id: str, old_kek: str, sealed: dict[str, Any]) -> bool:
    result = await db[collection].update_one({"_id": doc_id, "sealed.dek.kek": old_kek},
                                             {"$set": {"sealed": sealed}})
    return result.modified_count == 1
