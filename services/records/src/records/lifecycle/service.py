"""The lifecycle operations on a progress note, each one transaction through records' normal
store write path (so whatever follows a write, such as an outbox, sees them too).

- `sign`: `POST DocumentReference/{id}/$sign`. The author's draft becomes `docStatus: final` with
  `authenticator` the signer, and a Provenance with records' JWS over that exact version is
  written in the same transaction (lifecycle/signing.py). From then on the note is locked
  (lifecycle/rules.py).
- `verify_signature`: `DocumentReference/{id}/$verify-signature`. Every signature recorded for the
  note is checked against the stored bytes of the version it covers (the history entry, and the
  current copy while that version is current): a `Parameters` with `result` true only when each
  verifies.

Records writes the Provenance itself, with its own system identity (`records_store`), whatever
scopes the signer's token has: the signer needs only to be allowed to update the note.
"""

from __future__ import annotations

from typing import Any

import orjson

from mindchart_core import errors, scopes
from mindchart_core.tokens import AccessToken
from records.lifecycle import rules, signing
from records.lifecycle.keys import SigningKeys
from records.policy import AccessPolicy
from records.resources import RESOURCES
from records.store import ResourceStore, StoredResource, instant, now

NOTE = RESOURCES["DocumentReference"]
PROVENANCE = RESOURCES["Provenance"]
RECORDS_SCOPE = "system/Provenance.crs system/DocumentReference.rus"


def records_store(store: ResourceStore) -> ResourceStore:
    """The same datastore under records' own system identity, for the writes records makes on
    its own behalf (signature Provenances, lifecycle transitions) after the caller's checks."""
    token = AccessToken(subject="records", client_id="records", scope=scopes.parse(RECORDS_SCOPE),
                        audience=store.policy.base_url, jti="records-lifecycle", expires_at=0)
    return ResourceStore(store.client, store.db, AccessPolicy(token=token, base_url=store.policy.base_url))


def _signer(token: AccessToken) -> str:
    signer = token.fhir_user_ref
    if not signer or not signer.startswith("Practitioner/"):
        raise errors.Forbidden("Only a practitioner signed in as themselves (fhirUser) signs notes")
    return signer


async def sign(store: ResourceStore, keys: SigningKeys, note_id: str,
               jwks_url: str) -> tuple[StoredResource, StoredResource]:
    """The signed note and the Provenance recording its signature."""
    signer = _signer(store.policy.token)
    current = await store.read(NOTE, note_id, interaction="update")
    note = orjson.loads(current.raw or b"{}")
    if rules.is_locked(note):
        raise rules.Locked(f"DocumentReference/{note_id} is already signed: {rules.AMEND_HINT}")
    if not rules.is_author(note, store.policy.token):
        raise errors.Forbidden(f"Only an author of DocumentReference/{note_id} may sign it")
    own = records_store(store)

    replaced = rules.replaced_ids(note)

    async def once(session: Any) -> tuple[StoredResource, StoredResource]:
        # A correction (relatesTo replaces) is signed as `amended`; the note it corrects becomes
        # `status: superseded` in the same transaction, its content untouched (R4
        # document-reference-status: "This reference has been superseded by another reference").
        doc_status = "amended" if replaced else "final"
        signed_body = {**note, "docStatus": doc_status, "authenticator": {"reference": signer}}
        for original_id in replaced:
            original = await own.read(NOTE, original_id, session=session)
            body = orjson.loads(original.raw or b"{}")
            if body.get("status", "current") != "current" or not rules.is_locked(body):
                raise rules.Locked(f"DocumentReference/{original_id} is no longer current: it was "
                                   "superseded or entered in error meanwhile")
            await own.update(NOTE, original_id, {**body, "status": "superseded"}, original.version,
                             session=session, transition="supersede")
        signed, _ = await store.update(NOTE, note_id, signed_body, current.version, session=session,
                                       transition="sign")
        record = signing.provenance(signed, signer, "author", keys, now(), jwks_url)
        return signed, await own.create(PROVENANCE, record, session=session, transition="sign")

    return await store.atomically(once)


NULLIFY = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
                       "code": "NULLIFY", "display": "nullify"}]}


async def entered_in_error(store: ResourceStore, note_id: str, reason: str) -> StoredResource:
    """Mark a signed note entered-in-error (docStatus and status), keeping its content, with a
    Provenance (activity v3-DataOperation#NULLIFY, `reason` the written reason) in the same
    transaction. It stays readable by id and in history; plain searches leave it out."""
    token = store.policy.token
    if len(reason.strip()) < 5:
        raise errors.Invalid("$entered-in-error needs a written 'reason'")
    current = await store.read(NOTE, note_id, interaction="update")
    note = orjson.loads(current.raw or b"{}")
    rules.check_entered_in_error(note, token)
    own = records_store(store)
    who = ({"reference": token.fhir_user_ref} if token.fhir_user_ref
           else {"display": f"{token.client_id} {token.subject}"[:200]})

    async def once(session: Any) -> StoredResource:
        marked, _ = await store.update(
            NOTE, note_id, {**note, "docStatus": "entered-in-error", "status": "entered-in-error"},
            current.version, session=session, transition="entered-in-error")
        moment = instant(now())
        await own.create(PROVENANCE, {
            "resourceType": "Provenance",
            "target": [{"reference": f"DocumentReference/{note_id}/_history/{marked.version}"}],
            "recorded": moment, "activity": NULLIFY, "reason": [{"text": reason.strip()[:2000]}],
            "agent": [{"type": {"coding": [{"system": signing.PARTICIPANT_TYPE, "code": "author"}]},
                       "who": who}],
        }, session=session, transition="entered-in-error")
        return marked

    return await store.atomically(once)


def _part(name: str, **value: Any) -> dict[str, Any]:
    return {"name": name, **value}


async def verify_signature(store: ResourceStore, keys: SigningKeys, note_id: str) -> dict[str, Any]:
    """A Parameters: `result` (boolean), `message`, and one `signature` part per signature."""
    current = await store.read(NOTE, note_id)  # 404 for a note the caller cannot see
    own = records_store(store)
    found = [s for p in await own.referring(PROVENANCE, "target", [f"DocumentReference/{note_id}"])
             for s in signing.signatures_in(p.raw or b"{}", p.id, note_id)]
    parts: list[dict[str, Any]] = []
    problems: list[str] = []
    for signed in sorted(found, key=lambda s: (s.version, s.provenance_id)):
        try:
            version = await own.vread(NOTE, note_id, signed.version)
            problem = signing.verify(signed, version.raw, keys)
        except (errors.NotFound, errors.Gone):
            problem = f"version {signed.version} is not stored"
        if problem is None and signed.version == current.version:
            problem = signing.verify(signed, current.raw, keys)  # the copy every read serves
        if problem is not None:
            problems.append(problem)
        parts.append(_part("signature", part=[
            _part("provenance", valueReference={"reference": f"Provenance/{signed.provenance_id}"}),
            _part("version", valueString=str(signed.version)),
            _part("signer", valueReference={"reference": signed.signer}),
            _part("role", valueCode=signed.role),
            _part("valid", valueBoolean=problem is None),
            *([_part("message", valueString=problem)] if problem else []),
        ]))
    if not found:
        problems.append(f"DocumentReference/{note_id} has no signature")
    message = "; ".join(problems) if problems else (
        f"Every signature of DocumentReference/{note_id} matches the stored version it covers")
    return {"resourceType": "Parameters", "parameter": [
        _part("result", valueBoolean=not problems), _part("message", valueString=message), *parts]}


__all__ = ["entered_in_error", "records_store", "sign", "verify_signature"]
