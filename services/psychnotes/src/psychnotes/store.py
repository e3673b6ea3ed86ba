"""Every psychnotes database query. This datastore is separate from records' by design."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pymongo import ASCENDING
from pymongo.asynchronous.database import AsyncDatabase

Db = AsyncDatabase[dict[str, Any]]


async def ensure_indexes(db: Db) -> None:
    await db.notes.create_index([("patient", ASCENDING), ("date", ASCENDING)])
    await db.notes.create_index([("author", ASCENDING)])
    await db.notes_history.create_index([("id", ASCENDING), ("vid", ASCENDING)], unique=True)


async def insert_note(db: Db, note_id: str, resource: dict[str, Any], *, patient: str, author: str) -> None:
    client = db.client
    now = datetime.now(UTC)
    doc = {"_id": note_id, "vid": 1, "ts": now, "patient": patient, "author": author,
           "resource": resource, "deleted": False}
    async with client.start_session() as session, await session.start_transaction():
        await db.notes.insert_one(doc, session=session)
        await db.notes_history.insert_one({**doc, "_id": f"{note_id}/1", "id": note_id}, session=session)
