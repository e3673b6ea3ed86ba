"""The lock: which plain writes a progress note still accepts, decided from its stored version.

Called by the store on every write of a DocumentReference (PUT, PATCH, conditional update,
DELETE, transaction and batch entries all reach `ResourceStore._write`/`delete`), so no route,
bulk path or admin command can edit a signed note in place. The lifecycle's own transitions
(`$sign`, superseding, entered-in-error) pass `transition=...` to the store and are checked by
records/lifecycle/service.py instead.

R4 DocumentReference: `docStatus` (composition-status: preliminary | final | amended |
entered-in-error) is the state of the document; `status` (document-reference-status: current |
superseded | entered-in-error) the state of the reference.

- no `docStatus`: today's behaviour, any writer with scope may change or delete it (README
  "Progress notes": a client that does not take part in the lifecycle keeps working);
- `preliminary` (a draft): only its author (the token's `fhirUser` among `author`) changes or
  deletes it, and a change keeps it `preliminary` (it becomes final only through `$sign`);
- `final`, `amended`, `entered-in-error`: locked (superseding or marking entered-in-error are
  lifecycle transitions, not plain writes); a note that arrives already final (an EHR sending a
  note it signed) is locked from the start.
"""

from __future__ import annotations

from typing import Any

from mindchart_core import errors
from mindchart_core.note_lifecycle import (
    AMEND_HINT,
    AWAITING_COSIGNATURE,
    DRAFT,
    SIGNED_STATES,
    Locked,
    amended_ids,
    awaiting_cosigner,
    check_not_awaiting,
    check_relations,
    check_retractable,
    is_draft,
    is_locked,
    relations,
    replaced_ids,
)
from mindchart_core.tokens import AccessToken
from records.amendments import requests as amendment_requests

GUARDED_TYPES = frozenset({"DocumentReference", "Provenance"})
JOSE = "application/jose"
ADMIN_ROLE = "admin"  # the gateway's administrator role (mindchart user create --role admin)


def authors(note: dict[str, Any]) -> list[str]:
    """The note's author references, relative (`Practitioner/x`)."""
    refs = []
    for author in note.get("author") or []:
        ref = author.get("reference") if isinstance(author, dict) else None
        if isinstance(ref, str):
            parts = ref.rstrip("/").split("/")
            if "_history" in parts:
                parts = parts[: parts.index("_history")]
            refs.append("/".join(parts[-2:]))
    return refs


def is_author(note: dict[str, Any], token: AccessToken) -> bool:
    user = token.fhir_user_ref
    return bool(user) and user in authors(note)


def check_update(current: dict[str, Any], new: dict[str, Any], token: AccessToken) -> None:
    """A plain update (PUT, PATCH, conditional update, Bundle entry) of a stored note."""
    note = f"DocumentReference/{current.get('id')}"
    if is_locked(current):
        raise Locked(f"{note} is signed and cannot be changed: {AMEND_HINT}")
    if awaiting_cosigner(current):
        raise Locked(f"{note} is signed by its author and awaits co-signature by "
                     f"{awaiting_cosigner(current)}: it cannot be changed meanwhile")
    if not is_draft(current):
        return
    if not is_author(current, token):
        raise errors.Forbidden(f"Only the author of the draft {note} may change it")
    if new.get("docStatus") != DRAFT:
        raise errors.Unprocessable(
            f"{note} is a draft: it stays docStatus 'preliminary' until its author signs it with "
            f"POST DocumentReference/{current.get('id')}/$sign", expression=["DocumentReference.docStatus"])
    if not is_author(new, token):
        raise errors.Unprocessable(f"The draft {note} cannot be handed to another author",
                                   expression=["DocumentReference.author"])


def check_delete(current: dict[str, Any], token: AccessToken) -> None:
    note = f"DocumentReference/{current.get('id')}"
    if is_locked(current):
        raise Locked(f"{note} is signed and cannot be deleted: {AMEND_HINT}, or mark it with "
                     f"POST {note}/$entered-in-error")
    if awaiting_cosigner(current):
        raise Locked(f"{note} awaits co-signature and cannot be deleted")
    if is_draft(current) and not is_author(current, token):
        raise errors.Forbidden(f"Only the author of the draft {note} may delete it")


def check_entered_in_error(current: dict[str, Any], token: AccessToken) -> None:
    """45 CFR and R4 alike keep the record: entered-in-error marks a signed note, never deletes
    it. Its author or an administrator (`admin` role) may."""
    note = f"DocumentReference/{current.get('id')}"
    if not (is_author(current, token) or ADMIN_ROLE in token.roles):
        raise errors.Forbidden(f"Only the author of {note} or an administrator may mark it entered-in-error")
    check_retractable(current, note)


def hidden_from_search(resource_type: str, applied: list[tuple[str, str]]) -> dict[str, Any]:
    """A plain search leaves out notes marked entered-in-error (still readable by id); one that
    asks for a `status` gets what it asks for."""
    if resource_type != "DocumentReference" or any(n.split(":")[0] == "status" for n, _ in applied):
        return {}
    return {"sp.status": {"$ne": "entered-in-error"}}


def carries_system_signature(provenance: dict[str, Any]) -> bool:
    return any(isinstance(s, dict) and s.get("sigFormat") == JOSE
               for s in provenance.get("signature") or [])


def is_amendment_document(note: dict[str, Any]) -> bool:
    """A statement of disagreement or rebuttal (records/amendments/appended.py): written only
    by records' amendment operations, so none can be forged or altered by a plain write."""
    return any(isinstance(c, dict) and c.get("system") == amendment_requests.SYSTEM
               for category in note.get("category") or [] if isinstance(category, dict)
               for c in category.get("coding") or [])


def check_write(resource_type: str, current: dict[str, Any] | None, new: dict[str, Any] | None,
                token: AccessToken) -> None:
    """Every plain write of a guarded type: `current` the version it replaces (None for a
    create), `new` what is written (None for a delete)."""
    if resource_type == "DocumentReference" and new is not None and is_amendment_document(new) \
            and not (current is not None and is_amendment_document(current)):  # else: locked
        raise errors.Unprocessable(
            "Statements of disagreement and rebuttals are filed with POST Task/{id}/$disagree and "
            "Task/{id}/$rebut (45 CFR 164.526(d)), never written directly",
            expression=["DocumentReference.category"])
    if resource_type == "Provenance":
        # The JWS signatures of notes are records' own (lifecycle/service.py, $sign): a client can
        # neither file one (it would make $verify-signature report a forgery) nor alter one.
        if current is not None and carries_system_signature(current):
            raise Locked(f"Provenance/{current.get('id')} records a signature and cannot be changed")
        if new is not None and carries_system_signature(new):
            raise errors.Unprocessable(
                "Provenance signatures with sigFormat application/jose are written by records "
                "itself when a note is signed (POST DocumentReference/{id}/$sign)",
                expression=["Provenance.signature"])
        return
    if current is None:
        if new is not None:
            check_not_awaiting(new)
        return
    if new is None:
        check_delete(current, token)
    else:
        check_update(current, new, token)  # a note awaiting co-signature is locked: 409 first
        check_not_awaiting(new)


__all__ = [
    "AMEND_HINT",
    "AWAITING_COSIGNATURE",
    "DRAFT",
    "GUARDED_TYPES",
    "SIGNED_STATES",
    "Locked",
    "amended_ids",
    "authors",
    "awaiting_cosigner",
    "carries_system_signature",
    "check_delete",
    "check_relations",
    "check_update",
    "check_write",
    "is_author",
    "is_draft",
    "is_locked",
    "relations",
    "replaced_ids",
]
