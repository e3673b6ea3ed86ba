"""What an addendum (`relatesTo` appends) or a correction (`relatesTo` replaces) of a
psychotherapy note must point at, checked when it is written.

The same rule as records (mindchart_core.note_lifecycle.amendable): a signed, current note of the
same patient. In the vault also: one of the writer's own notes (a psychotherapy note is its
originator's, 45 CFR 164.501), and written as a draft (`docStatus: preliminary`): a correction
takes effect when its author signs it (`$sign` supersedes the original, service.py), so it never
arrives already in force. A note the writer may not amend is answered exactly like a missing one.
"""

from __future__ import annotations

from typing import Any

from mindchart_core import errors, note_lifecycle
from psychnotes import store


def as_note(doc: dict[str, Any]) -> dict[str, Any]:
    """The lifecycle facts of a stored note, from its clear fields (no decryption)."""
    return {"docStatus": doc.get("doc_status"), "status": doc.get("status"),
            "subject": {"reference": doc.get("patient")}}


async def check(db: store.Db, new: dict[str, Any], author: str) -> None:
    targets = note_lifecycle.amended_ids(new)
    if not targets:
        return
    if new.get("docStatus") != note_lifecycle.DRAFT:
        raise errors.Unprocessable(
            "An addendum or a correction is written as a draft (docStatus 'preliminary') and "
            "takes effect when its author signs it with $sign", expression=["DocumentReference.docStatus"])
    for target_id in targets:
        doc = await store.get_note(db, target_id) if len(target_id) <= 64 else None
        mine = doc is not None and doc["author"] == author and not doc.get("deleted")
        if not (mine and doc is not None and note_lifecycle.amendable(as_note(doc), new)):
            raise errors.Unprocessable(
                f"relatesTo DocumentReference/{target_id[:64]} must be one of your signed, current "
                "notes of the same patient (an addendum or a correction amends a signed note)",
                expression=["DocumentReference.relatesTo"])
