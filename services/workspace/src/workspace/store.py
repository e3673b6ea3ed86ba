"""Every query of the workspace's own datastore, and nothing else.

Two collections: `sessions` (the server side of a browser's sign-in: CSRF token, pending
authorization requests, the tokens the gateway issued) and `preferences` (per therapist, keyed by
their fhirUser: pinned interventions in their order, saved phrases, the default template). No
clinical content is ever stored here: notes, scores and patients stay in records and psychnotes.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

from pymongo import AsyncMongoClient

Db = Any


def session_key(cookie_value: str) -> str:
    """Sessions are stored under a hash of the cookie, so a datastore reader cannot ride one."""
    return hashlib.sha256(cookie_value.encode()).hexdigest()


async def ensure_indexes(db: Db) -> None:
    await db.sessions.create_index("expires")


async def put_session(db: Db, cookie_value: str, doc: dict[str, Any]) -> None:
    await db.sessions.replace_one({"_id": session_key(cookie_value)},
                                  {**doc, "_id": session_key(cookie_value)}, upsert=True)


async def get_session(db: Db, cookie_value: str) -> dict[str, Any] | None:
    doc: dict[str, Any] | None = await db.sessions.find_one({"_id": session_key(cookie_value)})
    if doc is None or doc["expires"] <= datetime.now(UTC):
        return None
    return doc


async def update_session(db: Db, cookie_value: str, changes: dict[str, Any]) -> None:
    await db.sessions.update_one({"_id": session_key(cookie_value)}, {"$set": changes})


async def unset_in_session(db: Db, cookie_value: str, field: str) -> None:
    await db.sessions.update_one({"_id": session_key(cookie_value)}, {"$unset": {field: ""}})


async def delete_session(db: Db, cookie_value: str) -> None:
    await db.sessions.delete_one({"_id": session_key(cookie_value)})


async def get_preferences(db: Db, fhir_user: str) -> dict[str, Any]:
    doc: dict[str, Any] | None = await db.preferences.find_one({"_id": fhir_user})
    return doc or {"_id": fhir_user, "pins": [], "phrases": [], "template": "DAP"}


async def set_preference(db: Db, fhir_user: str, field: str, value: Any) -> None:
    await db.preferences.update_one({"_id": fhir_user}, {"$set": {field: value}}, upsert=True)


def client(url: str) -> AsyncMongoClient[dict[str, Any]]:
    return AsyncMongoClient(url, tz_aware=True, serverSelectionTimeoutMS=5000)
