"""Writes that happen once without the server's retryable-write bookkeeping: for the audit
records that every request writes (the gateway's chain links, psychnotes' decisions and
disclosures) and records' export disclosure log.

`insert_many` is a retryable write: the driver sends a transaction number and the server keeps
the reply for a replay. SecantusDB keeps the last 10,000 such replies for 30 minutes and scans
and sorts all of them on each retryable write (measured 2026-12-02: 8.9 ms of datastore CPU per
write once 10,000 are kept, 0.6 ms for the same `insert` sent as a plain command). The MongoDB
driver specification (retryable-writes.md, "Behavioral Changes for Write Commands") says a
generic command method "MUST NOT automatically add a transaction ID", so a command sent as it is
carries none. What a retryable write gave is done here instead, from the documents' own `_id`:
after a network error the same documents are sent once more, and one refused as a duplicate that
is stored as it was sent is one the first send stored. It counts as inserted, so nothing is
stored twice and nothing is reported lost that was kept; a second network error is raised, as a
retryable write's second failure is.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import ConnectionFailure, OperationFailure

DUPLICATE_KEY = 11000  # MongoDB's DuplicateKey error code

StoredAsSent = Callable[[dict[str, Any]], Awaitable[bool]]


async def insert_once(db: AsyncDatabase[dict[str, Any]], name: str, documents: list[dict[str, Any]],
                      stored_as_sent: StoredAsSent | None = None) -> int:
    """Insert `documents` (each with its `_id`) into `name` in order; returns how many are stored
    before the first one refused as a duplicate that was not stored as sent (another writer's
    document at a unique position, say). `stored_as_sent(document)` decides that; by default a
    document is its own if its `_id` is stored. Raises any other write error."""
    if any("_id" not in document for document in documents):
        raise ValueError("insert_once needs each document's own _id: one the server made is new on a resend")
    if stored_as_sent is None:
        async def stored_as_sent(document: dict[str, Any]) -> bool:
            return await db[name].find_one({"_id": document["_id"]}, {"_id": 1}) is not None
    done, resent = 0, False
    while done < len(documents):
        try:
            reply = await db.command({"insert": name, "documents": documents[done:], "ordered": True})
        except ConnectionFailure:
            if resent:
                raise
            resent = True
            continue
        if reply.get("writeConcernError"):
            problem = reply["writeConcernError"]
            raise OperationFailure(str(problem.get("errmsg", "insert failed")), problem.get("code"))
        problems = list(reply.get("writeErrors") or [])
        if not problems:
            return len(documents)
        first = min(problems, key=lambda problem: int(problem.get("index", 0)))
        done += int(first.get("index", 0))
        if first.get("code") != DUPLICATE_KEY:
            raise OperationFailure(str(first.get("errmsg", "insert failed")), first.get("code"))
        if not await stored_as_sent(documents[done]):
            return done
        done += 1
    return done


async def write_idempotent(db: AsyncDatabase[dict[str, Any]], verb: str, name: str,
                           statements: list[dict[str, Any]]) -> None:
    """Send `update` or `delete` statements on `name` as one unordered command with no
    transaction number, and once more after a network error, as a retryable write would. Only
    for statements that change nothing when applied twice (each matching on the state it
    leaves behind, say): the caller vouches for that, as `insert_once`'s `_id`s vouch for it."""
    command = {verb: name, f"{verb}s": statements, "ordered": False}
    try:
        reply = await db.command(command)
    except ConnectionFailure:
        reply = await db.command(command)
    problem = reply.get("writeConcernError") or next(iter(reply.get("writeErrors") or []), None)
    if problem:
        raise OperationFailure(str(problem.get("errmsg", f"{verb} failed")), problem.get("code"))


__all__ = ["DUPLICATE_KEY", "StoredAsSent", "insert_once", "write_idempotent"]
