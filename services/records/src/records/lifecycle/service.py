"""The lifecycle operations on a progress note, each one transaction through records' normal
store write path (so whatever follows a write, such as an outbox, sees them too).

- `sign`: `POST DocumentReference/{id}/$sign`. The author's draft becomes `docStatus: final` with
  `authenticator` the signer, and a Provenance with records' JWS over that exact version is
  written in the same transaction (mindchart_core.note_lifecycle: the rules and the Provenance
  psychnotes shares). The JWS covers the RFC 8785 canonical form of that version's stored JSON,
  exactly as records serves it (id and meta included), signed by records' own key
  (lifecycle/keys.py) whose kid names it in the JWK Set at `[base]/.well-known/jwks.json`. From
  then on the note is locked (lifecycle/rules.py).
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

from mindchart_core import errors, note_lifecycle, scopes
from mindchart_core.tokens import AccessToken
from records.amendments import service as amendments
from records.lifecycle import rules, sessions
from records.lifecycle.keys import SigningKeys
from records.policy import AccessPolicy
from records.resources import RESOURCES
from records.store import ResourceStore, StoredResource, instant, now

NOTE = RESOURCES["DocumentReference"]
ENCOUNTER = RESOURCES["Encounter"]
PROVENANCE = RESOURCES["Provenance"]
RECORDS_SCOPE = "system/Provenance.crs system/DocumentReference.rus system/Encounter.rs"


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


async def _check_session(own: ResourceStore, note: dict[str, Any], session: Any) -> None:
    """The CPT/time rule on the note's `context.encounter` (lifecycle/sessions.py)."""
    for encounter_ref in (note.get("context") or {}).get("encounter") or []:
        ref = str((encounter_ref or {}).get("reference", ""))
        parts = ref.rstrip("/").split("/")
        if "_history" in parts:
            parts = parts[: parts.index("_history")]
        if len(parts) < 2 or parts[-2] != "Encounter":
            continue
        try:
            encounter = await own.read(ENCOUNTER, parts[-1], session=session)
        except (errors.NotFound, errors.Gone):
            raise errors.Unprocessable(f"The note's context.encounter {ref[:80]} is not known",
                                       expression=["DocumentReference.context.encounter"]) from None
        sessions.check(orjson.loads(encounter.raw or b"{}"), f"Encounter/{parts[-1]}")


async def sign(store: ResourceStore, keys: SigningKeys, note_id: str,
               jwks_url: str) -> tuple[StoredResource, StoredResource]:
    """The signed note and the Provenance recording its signature.

    - The author signs: the note becomes final (`amended` for a correction, whose original
      becomes superseded). An author whose token names a supervisor (a supervisee) cannot make
      it final alone: their signature leaves it `preliminary`, tagged as awaiting that
      supervisor's co-signature, and locked.
    - The named supervisor then signs (Provenance agent role `verifier`): final (or amended),
      `authenticator` the supervisor, the tag removed.
    """
    token = store.policy.token
    signer = _signer(token)
    current = await store.read(NOTE, note_id, interaction="update")
    note = orjson.loads(current.raw or b"{}")
    step = note_lifecycle.sign_step(note, f"DocumentReference/{note_id}", signer=signer,
                                    signer_is_author=rules.is_author(note, token),
                                    signer_supervisor=token.supervisor)
    own = records_store(store)
    replaced = rules.replaced_ids(note) if step.awaits is None else []

    async def once(session: Any) -> tuple[StoredResource, StoredResource]:
        await _check_session(own, note, session)
        body = note_lifecycle.signed(note, step, signer)
        if step.awaits is not None:  # a supervisee's signature: awaiting co-signature
            signed, _ = await store.update(NOTE, note_id, body, current.version, session=session,
                                           transition="sign-awaiting-cosignature")
        else:
            # A correction (relatesTo replaces) is signed as `amended`; the note it corrects
            # becomes `status: superseded` in the same transaction, its content untouched (R4
            # document-reference-status: superseded by another reference).
            for original_id in replaced:
                original = await own.read(NOTE, original_id, session=session)
                previous = orjson.loads(original.raw or b"{}")
                if previous.get("status", "current") != "current" or not rules.is_locked(previous):
                    raise rules.Locked(f"DocumentReference/{original_id} is no longer current: it "
                                       "was superseded or entered in error meanwhile")
                await own.update(NOTE, original_id, {**previous, "status": "superseded"},
                                 original.version, session=session, transition="supersede")
            # The supervisor co-signs with records' own identity: the note is not theirs to update.
            writer = own if step.role == "verifier" else store
            signed, _ = await writer.update(NOTE, note_id, body, current.version, session=session,
                                            transition="sign")
            # A correction answering a patient's amendment request completes it (164.526(c)).
            await amendments.complete_on_correction(store, note, note_id, rules.authors(note),
                                                    replaced, session)
        if signed.raw is None:
            raise ValueError("a deleted version cannot be signed")
        record = note_lifecycle.signature_provenance(
            f"DocumentReference/{note_id}/_history/{signed.version}", signed.raw, signer, step.role,
            keys.current, instant(now()), jwks_url)
        return signed, await own.create(PROVENANCE, record, session=session, transition="sign")

    return await store.atomically(once)


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
        await own.create(PROVENANCE, note_lifecycle.nullify_provenance(
            f"DocumentReference/{note_id}/_history/{marked.version}", reason, who, instant(now())),
            session=session, transition="entered-in-error")
        return marked

    return await store.atomically(once)


async def verify_signature(store: ResourceStore, keys: SigningKeys, note_id: str) -> dict[str, Any]:
    """A Parameters: `result` (boolean), `message`, and one `signature` part per signature."""
    current = await store.read(NOTE, note_id)  # 404 for a note the caller cannot see
    own = records_store(store)
    found = [s for p in await own.referring(PROVENANCE, "target", [f"DocumentReference/{note_id}"])
             for s in note_lifecycle.signatures_in(orjson.loads(p.raw or b"{}"), p.id, note_id)]
    checked: list[tuple[note_lifecycle.SignedVersion, str | None]] = []
    for signed in sorted(found, key=lambda s: (s.version, s.provenance_id)):
        try:
            version = await own.vread(NOTE, note_id, signed.version)
            problem = note_lifecycle.verify(signed, version.raw, keys.all)
        except (errors.NotFound, errors.Gone):
            problem = f"version {signed.version} is not stored"
        if problem is None and signed.version == current.version:
            problem = note_lifecycle.verify(signed, current.raw, keys.all)  # the copy reads serve
        checked.append((signed, problem))
    return note_lifecycle.verification(f"DocumentReference/{note_id}", checked)


__all__ = ["entered_in_error", "records_store", "sign", "verify_signature"]
