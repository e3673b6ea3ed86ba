"""Every database query of CDex beyond the Task resources themselves (which live in records'
`Task` collections like any type): the review-decision log, the release disclosures (in the
disclosure log bulk export already feeds to the gateway's 45 CFR 164.528 accounting), and the
outbox of `$submit-attachment` calls.

- `cdex_decisions`: one document per review decision (approve, refuse) and per overdue marking:
  who decided, what was released or why it was refused. Written in the transaction that changes
  the Task.
- `disclosures` (shared with records/export): a release writes one `recorded` entry per patient,
  `event` "cdex", in the same transaction as the Task's new version, so the accounting shows
  exactly the releases that happened.
- `cdex_outbox`: one document per approved attachment request, written in the approval's
  transaction; workers claim it with a lease (as export jobs are claimed), deliver it, and record
  the outcome on the Task.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import ASCENDING, ReturnDocument
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.database import AsyncDatabase

Db = AsyncDatabase[dict[str, Any]]


def now() -> datetime:
    moment = datetime.now(UTC)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


async def ensure_indexes(db: Db) -> None:
    await db.cdex_decisions.create_index([("task", ASCENDING)])
    await db.cdex_outbox.create_index([("state", ASCENDING)])
    await db.cdex_outbox.create_index([("task", ASCENDING)])


async def record_decision(db: Db, decision: dict[str, Any], session: AsyncClientSession) -> None:
    await db.cdex_decisions.insert_one({"_id": uuid.uuid4().hex, "at": now(), **decision},
                                       session=session)


async def decisions_of(db: Db, task_id: str) -> list[dict[str, Any]]:
    return await db.cdex_decisions.find({"task": task_id}).to_list()


async def record_release(db: Db, *, task_id: str, per_patient: dict[str, dict[str, int]],
                         recipient: str, purpose: str, session: AsyncClientSession) -> None:
    """The release's 164.528 entries (read by records' internal `Patient/{id}/$disclosures`)."""
    moment = now()
    docs = [{"_id": f"cdex:{task_id}:{patient}", "patient": patient, "job": task_id,
             "event": "cdex", "state": "recorded", "recorded": moment, "recipient": recipient,
             "recipient_user": None, "purpose": purpose, "counts": counts}
            for patient, counts in per_patient.items()]
    if docs:
        await db.disclosures.insert_many(docs, session=session)


async def save_target(db: Db, task_id: str, target: dict[str, Any],
                      session: AsyncClientSession) -> None:
    """Where an attachment request's answer may go: the payer's registered endpoint and how
    records authenticates there, from the payer's token when it filed the request (the gateway's
    registration), never from the Task body alone."""
    await db.cdex_targets.insert_one({"_id": task_id, **target}, session=session)


async def target_of(db: Db, task_id: str) -> dict[str, Any] | None:
    doc: dict[str, Any] | None = await db.cdex_targets.find_one({"_id": task_id})
    return doc


async def enqueue_delivery(db: Db, delivery: dict[str, Any], session: AsyncClientSession) -> None:
    await db.cdex_outbox.insert_one({"_id": uuid.uuid4().hex, "state": "queued", "attempts": 0,
                                     "not_before": now(), "lease_until": None, **delivery},
                                    session=session)


async def claim_delivery(db: Db, worker: str, lease_seconds: float) -> dict[str, Any] | None:
    """Take the lease of one due delivery (queued, or running with an expired lease)."""
    moment = now()
    doc: dict[str, Any] | None = await db.cdex_outbox.find_one_and_update(
        {"$or": [{"state": "queued", "not_before": {"$lte": moment}},
                 {"state": "running", "lease_until": {"$lt": moment}}]},
        {"$set": {"state": "running", "worker": worker,
                  "lease_until": moment + timedelta(seconds=lease_seconds)},
         "$inc": {"attempts": 1}},
        return_document=ReturnDocument.AFTER,
    )
    return doc


async def retry_later(db: Db, delivery_id: str, worker: str, delay_s: float, error: str) -> None:
    await db.cdex_outbox.update_one(
        {"_id": delivery_id, "worker": worker, "state": "running"},
        {"$set": {"state": "queued", "not_before": now() + timedelta(seconds=delay_s),
                  "last_error": error, "lease_until": None}})


async def finish_delivery(db: Db, delivery_id: str, worker: str, state: str, detail: str,
                          session: AsyncClientSession) -> bool:
    """Mark a delivery done or failed; False if this worker no longer holds its lease."""
    result = await db.cdex_outbox.update_one(
        {"_id": delivery_id, "worker": worker, "state": "running"},
        {"$set": {"state": state, "detail": detail, "finished": now(), "lease_until": None}},
        session=session)
    return result.modified_count == 1


def new_id() -> str:
    return uuid.uuid4().hex
