"""Every database query of subscriptions, and nothing else.

Collections (records datastore):
- `subscriptions`: one document per Subscription: the resource as the client sent it (minus
  `channel.header`, kept encrypted in `headers`), its owner (grants.owner_of), the parsed channel,
  and the delivery state: `status`, `events` (events numbered so far = the backport's
  events-since-subscription-start), `delivered` (highest number delivered or skipped, in order),
  `failures` (consecutive), `due` (when a worker should next look at it; None = nothing to do),
  and a lease (`lease_owner`, `lease_until`) so one worker at a time serves it.
- `subscription_notifications`: one per (subscription, event number), what the event was about
  (type, id, version, topic, time): the source of deliveries, retries and `$events`.
- `subscription_events` (outbox.py): events waiting for fan-out, deleted in the transaction that
  numbers them for every matching subscription.
- `subscription_leases`: the fan-out lease, so one replica at a time numbers events (in order).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from pymongo import ASCENDING, AsyncMongoClient, ReturnDocument
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError, PyMongoError

from records.subscriptions.outbox import EVENTS

Db = AsyncDatabase[dict[str, Any]]
T = TypeVar("T")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
LIVE = ("requested", "active", "error")  # statuses that still number events ("off" does not)


def now() -> datetime:
    moment = datetime.now(UTC)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


async def ensure_indexes(db: Db) -> None:
    await db.subscriptions.create_index([("due", ASCENDING)])
    await db.subscriptions.create_index([("owner.client_id", ASCENDING)])
    await db.subscription_notifications.create_index([("sub", ASCENDING), ("n", ASCENDING)], unique=True)
    await db.subscription_notifications.create_index([("sub", ASCENDING), ("event", ASCENDING)], unique=True)


async def transactionally(
    client: AsyncMongoClient[dict[str, Any]],
    work: Callable[[AsyncClientSession], Awaitable[T]],
    attempts: int = 20,
) -> T:
    """`work` in one transaction, run again while it conflicts with a concurrent one."""
    for attempt in range(attempts):
        try:
            async with client.start_session() as session, await session.start_transaction():
                return await work(session)
        except PyMongoError as exc:
            if not exc.has_error_label("TransientTransactionError") or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


# -- subscriptions --------------------------------------------------------------------------


async def insert(db: Db, doc: dict[str, Any]) -> None:
    await db.subscriptions.insert_one(doc)


async def get(db: Db, sub_id: str) -> dict[str, Any] | None:
    return await db.subscriptions.find_one({"_id": sub_id})


async def owned_by(db: Db, client_id: str) -> list[dict[str, Any]]:
    return await db.subscriptions.find({"owner.client_id": client_id}).to_list()


async def replace_spec(db: Db, sub_id: str, vid: int, changes: dict[str, Any]) -> bool:
    result = await db.subscriptions.update_one({"_id": sub_id, "vid": vid}, {"$set": changes})
    return result.matched_count == 1


async def delete(db: Db, sub_id: str) -> None:
    await db.subscriptions.delete_one({"_id": sub_id})
    await db.subscription_notifications.delete_many({"sub": sub_id})


async def live(db: Db) -> list[dict[str, Any]]:
    return await db.subscriptions.find({"status": {"$in": list(LIVE)}}, {"body": 0, "headers": 0}).to_list()


# -- fan-out --------------------------------------------------------------------------------


async def hold_fan_out(db: Db, owner: str, lease_seconds: float) -> bool:
    """Take or renew the fan-out lease; False while another replica holds it."""
    moment = now()
    try:
        doc = await db.subscription_leases.find_one_and_update(
            {"_id": "fan-out", "$or": [{"owner": owner}, {"until": {"$lt": moment}}]},
            {"$set": {"owner": owner, "until": moment + timedelta(seconds=lease_seconds)}},
            upsert=True,
            return_document=ReturnDocument.AFTER,
        )
    except DuplicateKeyError:
        return False
    return doc is not None


async def pending_events(db: Db, limit: int) -> list[dict[str, Any]]:
    docs = await db[EVENTS].find({"state": "pending"}).limit(limit).to_list()
    return sorted(docs, key=lambda d: d["_id"])


async def fan_out(
    client: AsyncMongoClient[dict[str, Any]], db: Db, event: dict[str, Any], targets: list[tuple[str, str]]
) -> None:
    """Number `event` for each (subscription, topic), then drop it from the outbox.

    One small transaction per subscription (its counter and its notification, nothing else), so
    fan-out conflicts with a delivery worker on one subscription at most. Run again after a crash,
    a subscription already numbered for this event hits the unique (sub, event) index, which
    aborts that transaction, counter included: no event is numbered twice."""
    for sub_id, topic in targets:

        async def work(session: AsyncClientSession, sub_id: str = sub_id, topic: str = topic) -> None:
            sub = await db.subscriptions.find_one_and_update(
                {"_id": sub_id, "status": {"$in": list(LIVE)}},
                {"$inc": {"events": 1}, "$set": {"due": now()}},
                projection={"events": 1},
                return_document=ReturnDocument.AFTER,
                session=session,
            )
            if sub is None:
                return  # switched off or deleted meanwhile
            await db.subscription_notifications.insert_one(
                {
                    "sub": sub_id,
                    "n": int(sub["events"]),
                    "event": event["_id"],
                    "topic": topic,
                    "type": event["type"],
                    "id": event["id"],
                    "vid": event["vid"],
                    "ts": event["ts"],
                    "created": event.get("created", False),
                },
                session=session,
            )

        try:
            await transactionally(client, work)
        except DuplicateKeyError:
            pass  # numbered for this subscription before a crash: keep that number
    await db[EVENTS].delete_one({"_id": event["_id"]})


# -- delivery -------------------------------------------------------------------------------


async def claim(db: Db, owner: str, lease_seconds: float) -> dict[str, Any] | None:
    """Take the lease of a subscription that is due and that no live worker holds."""
    moment = now()
    return await db.subscriptions.find_one_and_update(
        {"due": {"$lte": moment}, "lease_until": {"$lt": moment}},
        {"$set": {"lease_owner": owner, "lease_until": moment + timedelta(seconds=lease_seconds)}},
        return_document=ReturnDocument.AFTER,
    )


def _mine(sub_id: str, owner: str) -> dict[str, Any]:
    return {"_id": sub_id, "lease_owner": owner}


async def renew(db: Db, sub_id: str, owner: str, lease_seconds: float) -> bool:
    result = await db.subscriptions.update_one(
        _mine(sub_id, owner), {"$set": {"lease_until": now() + timedelta(seconds=lease_seconds)}}
    )
    return result.matched_count == 1


async def pending(db: Db, sub_id: str, after: int, limit: int) -> list[dict[str, Any]]:
    docs = (
        await db.subscription_notifications.find({"sub": sub_id, "n": {"$gt": after}})
        .limit(limit * 4)
        .to_list()
    )
    return sorted(docs, key=lambda d: d["n"])[:limit]


async def notifications(
    db: Db, sub_id: str, first: int, last: int | None, limit: int
) -> list[dict[str, Any]]:
    bound: dict[str, Any] = {"$gte": first}
    if last is not None:
        bound["$lte"] = last
    docs = await db.subscription_notifications.find({"sub": sub_id, "n": bound}).to_list()
    return sorted(docs, key=lambda d: d["n"])[:limit]


async def delivered(db: Db, sub_id: str, owner: str, number: int, *, sent: bool) -> bool:
    """Record that event `number` was delivered (or skipped by policy); resets failures."""
    changes: dict[str, Any] = {"delivered": number, "failures": 0, "error": None}
    if sent:
        changes["last_sent"] = now()
    result = await db.subscriptions.update_one(
        {**_mine(sub_id, owner), "delivered": {"$lt": number}}, {"$set": changes}
    )
    return result.matched_count == 1


async def heartbeat_sent(db: Db, sub_id: str, owner: str) -> None:
    await db.subscriptions.update_one(
        _mine(sub_id, owner), {"$set": {"last_sent": now(), "failures": 0, "error": None}}
    )


async def set_status(
    db: Db, sub_id: str, owner: str, status: str, error: str | None, *, due: datetime | None = None
) -> None:
    """Change the status from a worker holding the lease, and give the lease back."""
    await db.subscriptions.update_one(
        _mine(sub_id, owner),
        {
            "$set": {
                "status": status,
                "error": error,
                "due": due,
                "lease_until": EPOCH,
                **({"failures": 0} if status == "active" else {}),
            }
        },
    )


async def failed(
    db: Db, sub_id: str, owner: str, failures: int, error: str, due: datetime | None, status: str
) -> None:
    await db.subscriptions.update_one(
        _mine(sub_id, owner),
        {"$set": {"failures": failures, "error": error, "due": due, "status": status, "lease_until": EPOCH}},
    )


async def release(db: Db, sub_id: str, owner: str, seen_events: int, due: datetime | None) -> None:
    """Give the lease back, due again at `due`, or at once if events were numbered meanwhile."""
    result = await db.subscriptions.update_one(
        {**_mine(sub_id, owner), "events": seen_events}, {"$set": {"due": due, "lease_until": EPOCH}}
    )
    if result.matched_count == 0:
        await db.subscriptions.update_one(
            _mine(sub_id, owner), {"$set": {"due": now(), "lease_until": EPOCH}}
        )
