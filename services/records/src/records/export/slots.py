"""Export slots: every current-version document carries `slot` (records.store.slot_of, 16 bits
of SHA-256 of its id, indexed), so that bulk export reads a large collection in slot ranges that
each hold about the same share of it (store.slot_sliced), whatever the ids look like or when the
resources were written.

A datastore written before slots has documents without one. `backfill`, once per datastore in
the background after start-up, gives each its slot and then files `SLOTS_DONE` in
`records_migrations`; until then exports read by time (store.time_sliced), as they did before,
so nothing is left out while it runs. Two replicas may run it at once: both write the same value,
and only where the document still has none. A document written without a slot after it finished
(a replica of an earlier version, mid-upgrade) is read by the export's last range, `slot: null`.
"""

from __future__ import annotations

import logging
from typing import Any

from pymongo import UpdateOne
from pymongo.asynchronous.database import AsyncDatabase

from records import store as records_store
from records.resources import RESOURCES

SLOTS_DONE = "export-slots"  # its document in records_migrations once every document has a slot
BATCH = 500
_log = logging.getLogger(__name__)


async def ready(db: AsyncDatabase[dict[str, Any]]) -> bool:
    """Whether every document stored before slots has been given one."""
    return await db[records_store.MIGRATIONS].find_one({"_id": SLOTS_DONE}) is not None


async def backfill(db: AsyncDatabase[dict[str, Any]]) -> int:
    """Give every current-version document without a slot its slot; the number given, 0 when a
    previous run finished. The documents without one are found by the slot index (`slot: null`
    matches a missing field), so a datastore that has them all is asked one empty read a type."""
    if await ready(db):
        return 0
    given = 0
    for kind in RESOURCES:
        collection = db[kind]
        pending: list[Any] = []
        async for doc in collection.find({records_store.SLOT: None}, {"_id": 1}, batch_size=BATCH):
            pending.append(doc["_id"])
            if len(pending) == BATCH:
                given += await _give(collection, pending)
        given += await _give(collection, pending)
    await db[records_store.MIGRATIONS].update_one(
        {"_id": SLOTS_DONE}, {"$set": {"at": records_store.now(), "given": given}}, upsert=True)
    if given:
        _log.info("export slots given to %d documents stored before them", given)
    return given


async def _give(collection: Any, ids: list[Any]) -> int:
    """Each of `ids` its slot, where it still has none; empties `ids`."""
    if not ids:
        return 0
    await collection.bulk_write([
        UpdateOne({"_id": ident, records_store.SLOT: None},
                  {"$set": {records_store.SLOT: records_store.slot_of(str(ident))}}) for ident in ids],
        ordered=False)
    given = len(ids)
    ids.clear()
    return given


async def backfill_in_background(db: AsyncDatabase[dict[str, Any]]) -> None:
    """`backfill`, for a start-up task: a failure is logged and leaves exports reading by time
    (still complete, in larger datastore calls); the next start tries again."""
    try:
        await backfill(db)
    except Exception:  # logged; exports stay complete without slots
        _log.exception("export slot backfill failed; exports read by time until it succeeds")


__all__ = ["SLOTS_DONE", "backfill", "backfill_in_background", "ready"]
