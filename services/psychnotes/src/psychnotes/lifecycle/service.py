"""The lifecycle operations on a psychotherapy note, each one datastore transaction
(store.write_versions): the note's next version, the versions it supersedes and the Provenance
recording why are stored together or not at all.

- `sign`: `POST DocumentReference/{id}/$sign`. Who may sign and what it does are records' rules
  (mindchart_core.note_lifecycle.sign_step): the author makes a draft final (`amended` for a
  correction, whose original becomes `status: superseded`, its content untouched and still
  readable with consent); an author whose token names a `supervisor` leaves it awaiting that
  supervisor (`meta.tag`, locked), whose `$sign` finalizes it (Provenance agent role verifier).
- The system signature: every `$sign` stores a Provenance whose `signature` is a JWS with a
  detached payload (RFC 7515 Appendix F) over the RFC 8785 canonical form of the version's
  plaintext JSON, exactly as reads serve it after decryption, signed with psychnotes' own key
  (lifecycle/keys.py, published at `[base]/.well-known/jwks.json`; Da Vinci CDex
  signatures.html CONF-029..031). The payload is detached, so the JWS holds no note text; the
  Provenance is sealed like the note all the same, because anyone holding a signature over the
  plaintext could test a guess at the words against it.
- `entered_in_error`: the author marks a signed note `entered-in-error` (docStatus and status)
  with a written reason, kept in a sealed Provenance (v3-DataOperation#NULLIFY). It stays
  readable by id with consent; a plain search leaves it out.
- `verify_signature`: `$verify-signature`, behind the consent gate like any read. Each signature
  is checked against the version it covers after decryption (the history entry, and the current
  copy while that version is current). The AES-GCM seal already refuses altered ciphertext; the
  signature also catches a version re-sealed by someone holding the KEK, and lets anyone with the
  JWK Set check a note they were given.

The named supervisor co-signs without being on the patient's care team: supervised training is
a use 45 CFR 164.508(a)(2)(i)(B) permits without authorization ("used by the covered entity for
its own training programs in which students, trainees, or practitioners in mental health learn
under supervision to practice or improve their skills"). Every other step is a write by the
note's author, who must be on the patient's active care team (careteam.py).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
import structlog
from starlette.responses import Response

from mindchart_core import errors, fhirjson, note_lifecycle
from mindchart_core.signatures import SigningKeys
from psychnotes import consent_token, notes_service, policy, service, store, vault
from psychnotes.lifecycle.keys import JWKS_PATH

log = structlog.get_logger(__name__)
MIN_REASON_CHARS = 5


@dataclass(frozen=True)
class _Version:
    """A note's next version, built and sealed, with the plaintext it seals (what is signed)."""

    doc: dict[str, Any]
    expected: int
    stored: bytes


async def _next_version(ctx: service.Context, current: dict[str, Any], resource: dict[str, Any],
                        moment: datetime) -> _Version:
    note_id = str(current["_id"])
    doc = notes_service.note_document(ctx, note_id, int(current["vid"]) + 1, resource,
                                      patient=current["patient"], author=current["author"],
                                      moment=moment)
    # Opened again from the seal, so what is signed is byte for byte what reads will serve.
    return _Version(doc, int(current["vid"]), await notes_service.open_note(ctx, doc, note_id))


def _sealed_provenance(ctx: service.Context, note: dict[str, Any], version: int,
                       provenance: dict[str, Any]) -> dict[str, Any]:
    provenance_id = str(uuid.uuid4())
    resource = {"resourceType": "Provenance", "id": provenance_id,
                **{k: v for k, v in provenance.items() if k != "resourceType"}}
    return {"_id": provenance_id, "vid": 1, "note": note["_id"], "note_vid": version,
            "patient": note["patient"],
            "sealed": vault.seal(ctx.keyring, resource,
                                 vault.Binding("Provenance", provenance_id, 1, note["patient"]))}


async def _signable(ctx: service.Context, note_id: str, signer: str) -> dict[str, Any]:
    """The note `signer` may sign: their own, or one awaiting their co-signature. Any other note
    is as invisible as a missing one."""
    doc = await store.get_note(ctx.db, note_id) if service.ID.match(note_id) else None
    if doc is not None and doc["author"] == signer:
        return await notes_service.own_note(ctx, note_id, signer, "sign")
    if doc is None or doc.get("deleted") or doc.get("awaiting") != signer:
        await service.record_decision(ctx, permit=False, action="sign", reason=(
            "only the author, or the supervisor a note awaits, signs a psychotherapy note"))
        raise errors.NotFound(f"DocumentReference/{note_id[:64]} is not one of your notes")
    return doc


async def _superseded(ctx: service.Context, note: dict[str, Any], moment: datetime) -> list[_Version]:
    """The next version of each note a correction replaces: `status: superseded`, all else kept."""
    versions = []
    for original_id in note_lifecycle.replaced_ids(note):
        original = await store.get_note(ctx.db, original_id) if service.ID.match(original_id) else None
        if original is None or not note_lifecycle.amendable(
                {"docStatus": original["doc_status"], "status": original["status"],
                 "subject": {"reference": original["patient"]}}, note):
            raise note_lifecycle.Locked(f"DocumentReference/{original_id[:64]} is no longer current: "
                                        "it was superseded or entered in error meanwhile")
        previous = orjson.loads(await notes_service.open_note(ctx, original, original_id))
        versions.append(await _next_version(ctx, original, {**previous, "status": "superseded"},
                                            moment))
    return versions


async def sign(ctx: service.Context, keys: SigningKeys, note_id: str) -> Response:
    signer = notes_service.require_practitioner(ctx, "update")
    current = await _signable(ctx, note_id, signer)
    ref = f"DocumentReference/{note_id}"
    is_author = current["author"] == signer
    if is_author:
        await notes_service.require_care_team(ctx, current["patient"], signer, "sign")
    note = orjson.loads(await notes_service.open_note(ctx, current, note_id))
    step = note_lifecycle.sign_step(note, ref, signer=signer, signer_is_author=is_author,
                                    signer_supervisor=ctx.token.supervisor if is_author else None)
    moment = store.now()
    signed = await _next_version(ctx, current, note_lifecycle.signed(note, step, signer), moment)
    originals = await _superseded(ctx, note, moment) if step.awaits is None else []
    version = int(signed.doc["vid"])
    provenance = note_lifecycle.signature_provenance(
        f"{ref}/_history/{version}", signed.stored, signer, step.role, keys.current,
        service.instant(moment), ctx.base + JWKS_PATH)
    reason = ("note co-signed by its author's supervisor" if step.role == "verifier" else
              "note signed by its author; awaits co-signature" if step.awaits else
              "note signed by its author")
    decision = service.decision_record(
        ctx, permit=True, reason=reason, action="sign", patient=current["patient"],
        entities=[ref, *(f"DocumentReference/{o.doc['_id']}" for o in originals)])
    # The signed version, the originals it supersedes, its Provenance and its decision: one
    # transaction, so a retry after a lost answer never finds a signature nobody audited.
    await store.write_versions(
        ctx.db, [(signed.doc, signed.expected), *((o.doc, o.expected) for o in originals)],
        method="PUT", provenances=(_sealed_provenance(ctx, current, version, provenance),),
        decisions=(decision,))
    headers = notes_service.write_headers(ctx, note_id, version, moment)
    headers.pop("Location")
    return Response(status_code=200, headers=headers)


def reason_of(body: Any) -> str:
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise errors.Invalid("$entered-in-error takes a Parameters resource with a 'reason'")
    reason = next((p.get("valueString") for p in body.get("parameter") or []
                   if isinstance(p, dict) and p.get("name") == "reason"), None)
    if not isinstance(reason, str) or len(reason.strip()) < MIN_REASON_CHARS:
        raise errors.Invalid("$entered-in-error needs a written 'reason' (valueString)")
    return reason


async def entered_in_error(ctx: service.Context, note_id: str, body: Any) -> Response:
    reason = reason_of(body)
    author = notes_service.require_practitioner(ctx, "update")
    current = await notes_service.own_note(ctx, note_id, author, "entered-in-error")
    ref = f"DocumentReference/{note_id}"
    await notes_service.require_care_team(ctx, current["patient"], author, "entered-in-error")
    note = orjson.loads(await notes_service.open_note(ctx, current, note_id))
    note_lifecycle.check_retractable(note, ref)
    moment = store.now()
    marked = await _next_version(ctx, current, {**note, "docStatus": "entered-in-error",
                                                "status": "entered-in-error"}, moment)
    version = int(marked.doc["vid"])
    provenance = note_lifecycle.nullify_provenance(f"{ref}/_history/{version}", reason,
                                                   {"reference": author}, service.instant(moment))
    decision = service.decision_record(ctx, permit=True, action="entered-in-error",
                                       patient=current["patient"],
                                       reason="note marked entered-in-error by its author", entities=[ref])
    await store.write_versions(ctx.db, [(marked.doc, marked.expected)], method="PUT",
                               provenances=(_sealed_provenance(ctx, current, version, provenance),),
                               decisions=(decision,))
    headers = notes_service.write_headers(ctx, note_id, version, moment)
    headers.pop("Location")
    return Response(status_code=200, headers=headers)


def _opened(ctx: service.Context, doc: dict[str, Any], resource_type: str,
            resource_id: str) -> bytes | None:
    """The plaintext of a sealed document, or None when it does not open (altered, or its KEK is
    missing): logged, never raised, so verification reports it."""
    try:
        return vault.open_sealed(ctx.keyring, doc["sealed"], vault.Binding(
            resource_type, resource_id, int(doc["vid"]), doc["patient"]))
    except (vault.VaultError, KeyError, TypeError) as exc:
        log.error("signed_version_unsealable", resource_type=resource_type, resource_id=resource_id,
                  version=doc.get("vid"), problem=str(exc))
        return None


async def _check(ctx: service.Context, keys: SigningKeys, current: dict[str, Any],
                 found: note_lifecycle.SignedVersion) -> str | None:
    note_id = str(current["_id"])
    doc = await store.get_note_version(ctx.db, note_id, found.version)
    if doc is None or not doc.get("sealed"):
        return f"version {found.version} is not stored"
    copies = [doc, current] if found.version == int(current["vid"]) else [doc]
    for copy in copies:  # the history entry, and the current copy every read serves
        stored = _opened(ctx, copy, "DocumentReference", note_id)
        if stored is None:
            return f"version {found.version} cannot be decrypted: the stored bytes were altered"
        problem = note_lifecycle.verify(found, stored, keys.all)
        if problem is not None:
            return problem
    return None


async def verify_signature(ctx: service.Context, token: consent_token.ConsentToken, keys: SigningKeys,
                           note_id: str) -> Response:
    doc = await store.get_note(ctx.db, note_id) if service.ID.match(note_id) else None
    ref = f"DocumentReference/{note_id[:64]}"
    if not policy.covers(token, doc, note_id) or doc is None:
        await service.record_decision(ctx, permit=False, action="verify-signature",
                                      reason=notes_service.OUTSIDE, patient=token.patient,
                                      basis=token.basis, jti=token.jti,
                                      purposes=list(token.purpose_of_use), entities=[ref])
        raise policy.Refusal(notes_service.OUTSIDE)
    checked: list[tuple[note_lifecycle.SignedVersion, str | None]] = []
    resources: dict[str, dict[str, Any]] = {}
    for sealed in await store.provenances_of(ctx.db, note_id):
        raw = _opened(ctx, sealed, "Provenance", str(sealed["_id"]))
        if raw is None:
            unreadable = note_lifecycle.SignedVersion(str(sealed["_id"]), int(sealed["note_vid"]), "",
                                                      "", "")
            checked.append((unreadable, "the Provenance cannot be decrypted: its stored bytes were altered"))
            continue
        resources[str(sealed["_id"])] = orjson.loads(raw)
        for found in note_lifecycle.signatures_in(resources[str(sealed["_id"])], str(sealed["_id"]),
                                                  note_id):
            checked.append((found, await _check(ctx, keys, doc, found)))
    answer = note_lifecycle.verification(ref, checked, resources)
    # Not a disclosure: no word of the note leaves (the JWS is detached); the permit is audited.
    await service.record_decision(ctx, permit=True, action="verify-signature", patient=token.patient,
                                  reason=f"verify-signature permitted by {token.basis}",
                                  basis=token.basis, purposes=list(token.purpose_of_use),
                                  jti=token.jti, entities=[ref])
    return fhirjson.FhirResponse(answer, headers=dict(service.NO_STORE))


__all__ = ["entered_in_error", "sign", "verify_signature"]
