"""Every gateway database query: clients, users, signing keys, assertion jtis, audit records."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import ASCENDING, DESCENDING
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

Db = AsyncDatabase[dict[str, Any]]


async def ensure_indexes(db: Db) -> None:
    await db.assertion_jtis.create_index([("expires", ASCENDING)])
    await db.audit_events.create_index([("recorded", ASCENDING)])
    await db.audit_events.create_index([("patient", ASCENDING)])
    await db.audit_events.create_index([("client_id", ASCENDING)])
    await db.audit_events.create_index([("request_id", ASCENDING)])
    await db.signing_keys.create_index([("created", DESCENDING)])


# -- clients and users ------------------------------------------------------------------------

async def get_client(db: Db, client_id: str) -> dict[str, Any] | None:
    return await db.clients.find_one({"_id": client_id, "disabled": {"$ne": True}})


async def put_client(db: Db, client: dict[str, Any]) -> None:
    await db.clients.replace_one({"_id": client["_id"]}, client, upsert=True)


async def get_user(db: Db, username: str) -> dict[str, Any] | None:
    return await db.users.find_one({"_id": username})


async def put_user(db: Db, user: dict[str, Any]) -> None:
    await db.users.replace_one({"_id": user["_id"]}, user, upsert=True)


# -- signing keys -----------------------------------------------------------------------------

async def signing_keys(db: Db) -> list[dict[str, Any]]:
    """Keys still publishable (newest first); the newest signs."""
    return await db.signing_keys.find({"retired": {"$ne": True}}).sort("created", DESCENDING).to_list()


async def add_signing_key(db: Db, kid: str, private_jwk: dict[str, Any]) -> None:
    await db.signing_keys.insert_one(
        {"_id": kid, "jwk": private_jwk, "created": datetime.now(UTC), "retired": False}
    )


# -- client-assertion replay protection (SMART Backend Services: SHALL reject a replayed jti) --

async def remember_assertion(db: Db, client_id: str, jti: str, expires: datetime) -> bool:
    """Record a client assertion's jti; False if it was seen before."""
    await db.assertion_jtis.delete_many({"expires": {"$lt": datetime.now(UTC) - timedelta(minutes=10)}})
    try:
        await db.assertion_jtis.insert_one({"_id": f"{client_id}\n{jti}", "expires": expires})
    except DuplicateKeyError:
        return False
    return True


# -- audit ------------------------------------------------------------------------------------

async def insert_audit(db: Db, record: dict[str, Any]) -> None:
    await db.audit_events.insert_one(record)
