"""The note lifecycle both kinds of therapy note follow (records' progress notes, psychnotes'
psychotherapy notes): which states lock a note, how addenda and corrections point at what they
amend, who may sign at each step (co-signature), and the Provenance that records a signature.

Everything here decides from a note's JSON alone; each service keeps its own storage, policy and
transactions (records/lifecycle, psychnotes/lifecycle) and calls these so the rules cannot drift.

R4 DocumentReference: `docStatus` (composition-status: preliminary | final | amended |
entered-in-error) is the state of the document; `status` (document-reference-status: current |
superseded | entered-in-error) the state of the reference; `relatesTo.code`
(document-relationship-type: "appends: this document adds additional information to the target
document", "replaces: this document logically replaces or supersedes the target document").

R4 Provenance: `target` the note's exact version (`DocumentReference/{id}/_history/{vid}`),
`recorded`, `activity` v3-DocumentCompletion#LA "legally authenticated" (provenance-activity-type,
extensible), `agent` the signer with a provenance-participant-type role (`author` for the author's
signature, `verifier` for a supervisor's co-signature), and `signature` (R4 datatypes.html
#Signature: `type` 1..* from signature-type, i.e. ASTM E1762-95 OIDs, `when` 1..1, `who` 1..1,
`targetFormat`, `sigFormat`, `data` base64). `signature.data` is the service's system signature:
a compact JWS with a detached payload over the RFC 8785 canonical form of that version's stored
JSON (mindchart_core.signatures; Da Vinci CDex signatures.html CONF-029..031).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from joserfc.jwk import ECKey

from mindchart_core import errors, signatures

DRAFT = "preliminary"
SIGNED_STATES = frozenset({"final", "amended", "entered-in-error"})
# A supervisee's signed draft waits for its supervisor: this meta.tag names them (code =
# Practitioner/ID), so the note shows it and `_tag=<system>|Practitioner/ID` lists what awaits one.
AWAITING_COSIGNATURE = "https://mindchart.dev/fhir/CodeSystem/awaiting-cosignature"
AMENDING_CODES = frozenset({"appends", "replaces"})  # R4 document-relationship-type
AMEND_HINT = ("add an addendum (a new DocumentReference with relatesTo code 'appends') or a "
              "correction (relatesTo code 'replaces') instead")


class Locked(errors.FhirError):
    """409: the note is signed; R4 http.html lets a server refuse an update as a conflict."""

    status = 409
    code = "business-rule"


def is_locked(note: dict[str, Any]) -> bool:
    """Signed (or arrived signed). `status` alone locks nothing: without `docStatus` a note is
    outside the lifecycle, whatever its status says."""
    return note.get("docStatus") in SIGNED_STATES


def is_draft(note: dict[str, Any]) -> bool:
    return note.get("docStatus") == DRAFT and not is_locked(note)


def awaiting_cosigner(note: dict[str, Any]) -> str | None:
    """The supervisor a note waits for, when its author (a supervisee) has signed it."""
    for tag in (note.get("meta") or {}).get("tag") or []:
        if isinstance(tag, dict) and tag.get("system") == AWAITING_COSIGNATURE:
            return str(tag.get("code"))
    return None


def check_not_awaiting(new: dict[str, Any]) -> None:
    """Only `$sign` puts a note in wait for a co-signer: a plain write carrying the tag would let
    a supervisee name an accomplice as their supervisor."""
    if awaiting_cosigner(new) is not None:
        raise errors.Unprocessable(
            f"meta.tag {AWAITING_COSIGNATURE} is set by $sign when a supervisee signs, never by a "
            "write", expression=["DocumentReference.meta.tag"])


def without_awaiting(meta: dict[str, Any]) -> dict[str, Any]:
    """`meta` for the next version: no awaiting-co-signature tag, no versionId/lastUpdated."""
    tags = [t for t in meta.get("tag") or [] if not (
        isinstance(t, dict) and t.get("system") == AWAITING_COSIGNATURE)]
    kept = {k: v for k, v in meta.items() if k not in ("tag", "versionId", "lastUpdated")}
    return {**kept, "tag": tags} if tags else kept


def awaiting(note: dict[str, Any], supervisor: str) -> dict[str, Any]:
    """The note as signed by a supervisee: still a draft, tagged as awaiting `supervisor`."""
    meta = without_awaiting(dict(note.get("meta") or {}))
    tag = {"system": AWAITING_COSIGNATURE, "code": supervisor,
           "display": f"awaiting co-signature by {supervisor}"}
    return {**note, "meta": {**meta, "tag": [*meta.get("tag", []), tag]}}


def relations(note: dict[str, Any]) -> list[tuple[str, str]]:
    """(code, note id) of each note this one appends to or replaces; a versioned target
    reference names its note."""
    found = []
    for relation in note.get("relatesTo") or []:
        if not isinstance(relation, dict) or relation.get("code") not in AMENDING_CODES:
            continue
        parts = str((relation.get("target") or {}).get("reference", "")).rstrip("/").split("/")
        if "_history" in parts:
            parts = parts[: parts.index("_history")]
        found.append((str(relation["code"]), parts[-1]))
    return found


def amended_ids(note: dict[str, Any]) -> list[str]:
    return [target for _, target in relations(note)]


def replaced_ids(note: dict[str, Any]) -> list[str]:
    return [target for code, target in relations(note) if code == "replaces"]


def _subject(note: dict[str, Any]) -> Any:
    return (note.get("subject") or {}).get("reference")


def amendable(target: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    """Whether `new` may append to or replace `target`: a signed, current note of its patient."""
    return (target is not None and is_locked(target)
            and target.get("docStatus") != "entered-in-error"
            and target.get("status", "current") == "current"
            and _subject(target) == _subject(new))


def check_relations(new: dict[str, Any], targets: dict[str, dict[str, Any] | None]) -> None:
    """An addendum (`appends`) or a correction (`replaces`) points at a signed, current note of
    the same patient; `targets` holds each pointed-at note as the writer may see it (or None)."""
    for target_id in amended_ids(new):
        if not amendable(targets.get(target_id), new):
            raise errors.Unprocessable(
                f"relatesTo DocumentReference/{target_id[:64]} must be a signed, current note of the "
                "same patient (an addendum or a correction amends a signed note)",
                expression=["DocumentReference.relatesTo"])


def check_retractable(note: dict[str, Any], note_ref: str) -> None:
    """Entered-in-error marks a signed note, never a draft (change or delete that instead), and
    only once; the content stays (R4 composition-status entered-in-error)."""
    if note.get("docStatus") == "entered-in-error":
        raise Locked(f"{note_ref} is already marked entered-in-error")
    if not is_locked(note):
        raise errors.Unprocessable(f"{note_ref} is not signed: change or delete the draft instead")


@dataclass(frozen=True)
class SignStep:
    """What one `$sign` does: the signer's Provenance role, and either the supervisor the note
    now awaits (a supervisee signed) or the final docStatus (`amended` for a correction)."""

    role: str
    awaits: str | None
    doc_status: str | None


def sign_step(note: dict[str, Any], note_ref: str, *, signer: str, signer_is_author: bool,
              signer_supervisor: str | None) -> SignStep:
    """Who may sign now, and what their signature does.

    - The author signs: the note becomes final (`amended` for a correction). An author whose
      token names a supervisor (a supervisee) cannot make it final alone: their signature leaves
      it `preliminary`, tagged as awaiting that supervisor, and locked.
    - The named supervisor then signs (agent role `verifier`): final (or amended).
    """
    if is_locked(note):
        raise Locked(f"{note_ref} is already signed: {AMEND_HINT}")
    cosigner = awaiting_cosigner(note)
    if cosigner is not None and signer != cosigner:
        raise errors.Forbidden(f"{note_ref} awaits co-signature by its author's supervisor; only "
                               "they may sign it now")
    if cosigner is None and not signer_is_author:
        raise errors.Forbidden(f"Only an author of {note_ref} may sign it")
    if cosigner is None and signer_supervisor is not None:
        return SignStep("author", signer_supervisor, None)
    final = "amended" if replaced_ids(note) else "final"
    return SignStep("verifier" if cosigner is not None else "author", None, final)


def signed(note: dict[str, Any], step: SignStep, signer: str) -> dict[str, Any]:
    """The note's next version after `step` by `signer`."""
    if step.awaits is not None:
        return awaiting(note, step.awaits)
    return {**note, "meta": without_awaiting(dict(note.get("meta") or {})),
            "docStatus": step.doc_status, "authenticator": {"reference": signer}}


# -- the Provenance of a signature ---------------------------------------------------------------

ACTIVITY = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-DocumentCompletion",
                        "code": "LA", "display": "legally authenticated"}]}
NULLIFY = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
                       "code": "NULLIFY", "display": "nullify"}]}
PARTICIPANT_TYPE = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
SIGNATURE_TYPE = "urn:iso-astm:E1762-95:2013"
# ASTM E1762-95 signature purposes (R4 valueset-signature-type).
AUTHOR_SIGNATURE = {"system": SIGNATURE_TYPE, "code": "1.2.840.10065.1.12.1.1",
                    "display": "Author's Signature"}
VERIFICATION_SIGNATURE = {"system": SIGNATURE_TYPE, "code": "1.2.840.10065.1.12.1.5",
                          "display": "Verification Signature"}
ROLES = {"author": AUTHOR_SIGNATURE, "verifier": VERIFICATION_SIGNATURE}


def signature_provenance(target: str, stored: bytes, signer: str, role: str, key: ECKey,
                         when: str, jwks_url: str) -> dict[str, Any]:
    """The Provenance for `signer`'s signature (role `author` or `verifier`) of the version
    `target` (`DocumentReference/{id}/_history/{vid}`) whose stored JSON is `stored`."""
    jws = signatures.sign_detached(signatures.canonical(stored), key, header={"jku": jwks_url})
    return {
        "resourceType": "Provenance",
        "target": [{"reference": target}],
        "recorded": when,
        "activity": ACTIVITY,
        "agent": [{"type": {"coding": [{"system": PARTICIPANT_TYPE, "code": role}]},
                   "who": {"reference": signer}}],
        "signature": [{
            "type": [ROLES[role]],
            "when": when,
            "who": {"reference": signer},
            "targetFormat": signatures.TARGET_FORMAT,
            "sigFormat": signatures.SIG_FORMAT,
            "data": base64.b64encode(jws.encode()).decode(),
        }],
    }


def nullify_provenance(target: str, reason: str, who: dict[str, Any], when: str) -> dict[str, Any]:
    """The Provenance of marking a version entered-in-error (v3-DataOperation#NULLIFY) with the
    written reason."""
    return {
        "resourceType": "Provenance", "target": [{"reference": target}], "recorded": when,
        "activity": NULLIFY, "reason": [{"text": reason.strip()[:2000]}],
        "agent": [{"type": {"coding": [{"system": PARTICIPANT_TYPE, "code": "author"}]},
                   "who": who}],
    }


@dataclass(frozen=True)
class SignedVersion:
    """One signature found in a Provenance: which version it covers, by whom, as what."""

    provenance_id: str
    version: int
    signer: str
    role: str
    jws: str


def signatures_in(provenance: dict[str, Any], provenance_id: str, note_id: str) -> list[SignedVersion]:
    """The JWS signatures a Provenance carries for versions of DocumentReference/note_id."""
    versions = []
    for target in provenance.get("target") or []:
        parts = str(target.get("reference", "")).split("/")
        if len(parts) >= 4 and parts[-4:-2] == ["DocumentReference", note_id] and parts[-2] == "_history" \
                and parts[-1].isdigit():
            versions.append(int(parts[-1]))
    role = next((c.get("code") for a in provenance.get("agent") or []
                 for c in (a.get("type") or {}).get("coding") or []
                 if c.get("system") == PARTICIPANT_TYPE), "author")
    found = []
    for sig in provenance.get("signature") or []:
        if sig.get("sigFormat") != signatures.SIG_FORMAT:
            continue
        try:
            jws = base64.b64decode(str(sig.get("data", "")), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            jws = ""
        signer = str((sig.get("who") or {}).get("reference", ""))
        found += [SignedVersion(provenance_id, v, signer, str(role), jws) for v in versions]
    return found


def verify(signed_version: SignedVersion, stored: bytes | None, keys: Iterable[ECKey]) -> str | None:
    """None when the signature verifies over `stored` (that version's JSON), else why not."""
    if stored is None:
        return f"version {signed_version.version} is not stored"
    try:
        signatures.verify_detached(signed_version.jws, signatures.canonical(stored), keys)
    except signatures.SignatureInvalid as problem:
        return f"version {signed_version.version}: {problem}"
    except (orjson.JSONDecodeError, ValueError):
        return f"version {signed_version.version}: the stored bytes are not JSON"
    return None


def _part(name: str, **value: Any) -> dict[str, Any]:
    return {"name": name, **value}


def verification(note_ref: str, checked: list[tuple[SignedVersion, str | None]],
                 provenance_parts: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The `$verify-signature` answer: a Parameters with `result` (true only when there is a
    signature and each verifies), `message`, and one `signature` part per signature (with the
    Provenance itself under `provenance` when `provenance_parts` has it, else a reference)."""
    parts: list[dict[str, Any]] = []
    problems = [problem for _, problem in checked if problem is not None]
    for found, problem in checked:
        ref = {"reference": f"Provenance/{found.provenance_id}"}
        given = (provenance_parts or {}).get(found.provenance_id)
        parts.append(_part("signature", part=[
            _part("provenance", resource=given) if given else _part("provenance", valueReference=ref),
            _part("version", valueString=str(found.version)),
            *([_part("signer", valueReference={"reference": found.signer})] if found.signer else []),
            *([_part("role", valueCode=found.role)] if found.role else []),
            _part("valid", valueBoolean=problem is None),
            *([_part("message", valueString=problem)] if problem else []),
        ]))
    if not checked:
        problems.append(f"{note_ref} has no signature")
    message = "; ".join(problems) if problems else (
        f"Every signature of {note_ref} matches the stored version it covers")
    return {"resourceType": "Parameters", "parameter": [
        _part("result", valueBoolean=not problems), _part("message", valueString=message), *parts]}


__all__ = [
    "ACTIVITY", "AMENDING_CODES", "AMEND_HINT", "AUTHOR_SIGNATURE", "AWAITING_COSIGNATURE", "DRAFT",
    "NULLIFY", "PARTICIPANT_TYPE", "ROLES", "SIGNED_STATES", "VERIFICATION_SIGNATURE", "Locked",
    "SignStep", "SignedVersion", "amendable", "amended_ids", "awaiting", "awaiting_cosigner",
    "check_not_awaiting",
    "check_relations", "check_retractable", "is_draft", "is_locked", "nullify_provenance",
    "relations", "replaced_ids", "sign_step", "signature_provenance", "signatures_in", "signed",
    "verification", "verify", "without_awaiting",
]
