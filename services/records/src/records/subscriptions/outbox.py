"""The outbox: a write that triggers a topic records its event in the write's own transaction.

records/store.py calls `previous_version` before it replaces a watched resource and `record` after
it has written the new version and its history entry, both with the write's session, so the event
commits or aborts with the write (DESIGN.md, "Events, outbound calls": nothing acknowledged is
lost, nothing happens twice). Every records write path (REST create/update/patch, conditional
interactions, batch and transaction Bundles, lifecycle operations) goes through store._write.

An event holds what fan-out and policy need without reading the resource again: type, id,
version, time, the topics it triggered, and the version's search values `sp` and compartment `c`
(what AccessPolicy filters match on). Events carry no number: numbers are given per subscription
at fan-out, only to events that subscription matches and may see (delivery.py), so nothing about
other patients' activity, or about writes that never trigger, can be read from them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
from bson.objectid import ObjectId
from pymongo import ASCENDING
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from records.subscriptions import topics

EVENTS = "subscription_events"


def watches(resource_type: str) -> bool:
    return resource_type in topics.WATCHED_TYPES


async def ensure_indexes(db: AsyncDatabase[dict[str, Any]]) -> None:
    await db[EVENTS].create_index([("state", ASCENDING)])


async def previous_version(collection: AsyncCollection[dict[str, Any]], resource_id: str,
                           session: AsyncClientSession) -> dict[str, Any] | None:
    """The current version about to be replaced (inside the write's transaction), parsed."""
    doc = await collection.find_one({"_id": resource_id}, {"raw": 1}, session=session)
    if doc is None or doc.get("raw") is None:
        return None
    previous: dict[str, Any] = orjson.loads(bytes(doc["raw"]))
    return previous


async def record(db: AsyncDatabase[dict[str, Any]], session: AsyncClientSession, resource_type: str,
                 current: dict[str, Any], previous: dict[str, Any] | None, *, version: int,
                 moment: datetime, sp: dict[str, Any], compartment: list[str]) -> None:
    """Store the event this write triggers, if any, in the write's transaction."""
    triggered = topics.triggered(resource_type, previous, current)
    if not triggered:
        return
    await db[EVENTS].insert_one({
        "_id": ObjectId(), "state": "pending", "topics": triggered, "type": resource_type,
        "id": current["id"], "vid": version, "ts": moment, "sp": sp, "c": compartment,
        "created": previous is None,
    }, session=session)
