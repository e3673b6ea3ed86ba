"""The amendment marker's queries: on a note's current-version document, `appended`
(records.store.APPENDED) lists the ids of the statements of disagreement and rebuttals appended to
it (appended.py), so that a read or a search page of notes with nothing appended asks the
datastore nothing more, and one with something asks once, by those ids.

- `mark`: in the transaction that writes a statement or a rebuttal (service.py `_append`), the
  note's marker is set to every amendment document then relating to it, the new one included. It
  is recomputed rather than added to, so a note stored before the marker existed gets its older
  ones too.
- `backfill`: once per datastore, in the background after start-up, every note without a marker
  gets one (those with amendment documents by `mark`, the others empty). Until then such notes
  read as "not known" and appended.py queries for them as it did before the marker, so nothing is
  ever left out. Two replicas may run it at once: both write the same values, and a step that
  meets a concurrent statement's transaction on the same note conflicts and runs again on what
  that transaction committed (records.store.ResourceStore.atomically).

The marker is a superset hint, never the answer: the documents it names are still read through
the caller's policy-bound store and checked to relate to the note (appended.material).
"""

from __future__ import annotations

import logging
from typing import Any

from pymongo.asynchronous.client_session import AsyncClientSession

from records.amendments import appended
from records.store import APPENDED, MIGRATIONS, ResourceStore, now

NOTES = "DocumentReference"
BACKFILL = "amendment-marker"  # its document in MIGRATIONS once done
BATCH = 500
_log = logging.getLogger(__name__)


def _is_amendment_document(doc: dict[str, Any]) -> bool:
    categories = (doc.get("sp") or {}).get("category") or []
    return any(token in categories for token in appended.CATEGORY_TOKENS)


async def mark(store: ResourceStore, note_id: str, session: AsyncClientSession) -> list[str]:
    """Set the note's marker to the ids of every amendment document relating to it (indexed on
    `sp.relatesto`), as this transaction sees them; returns them."""
    collection = store.db[NOTES]
    ids = sorted(str(d["_id"]) for d in await collection.find(
        {"sp.relatesto": f"{NOTES}/{note_id}"}, {"_id": 1, "sp.category": 1},
        session=session).to_list() if _is_amendment_document(d))
    await collection.update_one({"_id": note_id}, {"$set": {APPENDED: ids}}, session=session)
    return ids


async def backfill(store: ResourceStore) -> int:
    """Give every note without a marker its marker (see the module docstring); the number of
    notes marked, 0 when a previous run finished. One pass over the collection without `raw`."""
    db = store.db
    if await db[MIGRATIONS].find_one({"_id": BACKFILL}) is not None:
        return 0
    unmarked: list[str] = []
    with_material: set[str] = set()
    async for doc in db[NOTES].find({}, {"_id": 1, "sp.category": 1, "sp.relatesto": 1, APPENDED: 1},
                                    batch_size=BATCH):
        if not isinstance(doc.get(APPENDED), list):
            unmarked.append(str(doc["_id"]))
        if _is_amendment_document(doc):
            with_material.update(ref.removeprefix(f"{NOTES}/")
                                 for ref in (doc.get("sp") or {}).get("relatesto") or [])
    for note_id in sorted(with_material):
        await store.atomically(lambda s, note_id=note_id: mark(store, note_id, s))
    rest = [i for i in unmarked if i not in with_material]
    for start in range(0, len(rest), BATCH):
        batch = rest[start:start + BATCH]

        async def empty(s: AsyncClientSession, batch: list[str] = batch) -> None:
            # Only where still unmarked: a statement filed since the pass has marked its note.
            await db[NOTES].update_many({"_id": {"$in": batch}, APPENDED: {"$exists": False}},
                                        {"$set": {APPENDED: []}}, session=s)

        await store.atomically(empty)
    await db[MIGRATIONS].update_one({"_id": BACKFILL}, {"$set": {"at": now()}}, upsert=True)
    marked = len(with_material) + len(rest)
    _log.info("amendment markers backfilled on %d notes (%d with appended documents)", marked,
              len(with_material))
    return marked


async def backfill_in_background(store: ResourceStore) -> None:
    """`backfill`, for a start-up task: a failure is logged and leaves notes "not known" (still
    read correctly); the next start tries again."""
    try:
        await backfill(store)
    except Exception:  # logged; reads stay correct without the marker
        _log.exception("amendment marker backfill failed; notes without a marker are queried")


__all__ = ["BACKFILL", "MIGRATIONS", "backfill", "backfill_in_background", "mark"]
