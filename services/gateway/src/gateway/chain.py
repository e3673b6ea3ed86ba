"""The tamper-evident audit trail: every audit record is a link in one SHA-256 hash chain.

Each record carries `seq` (its position, unique-indexed), `prev_hash` (the previous record's hash)
and `hash` (SHA-256 of its own canonical form, `prev_hash` included). A writer claims position
`head.seq + 1` by inserting it; the unique index lets only one writer win a position, the losers
re-read the head and retry, so concurrent requests and several gateway replicas cannot fork the
chain. Within one process appends are group-committed: while one batch is being written, the
records of every other request queue up and become the next batch (one insert_many and one head
update, sent as one MongoDB 8 bulkWrite where the server has it), and the last link is
remembered so no read is needed. Every caller waits until the
batch holding its record is stored, so nothing acknowledged is ever lost.
Records are never updated; `verify` walks the chain and names the first broken link.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import random
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pymongo import InsertOne, UpdateOne
from pymongo.errors import BulkWriteError, ClientBulkWriteException, DuplicateKeyError, InvalidOperation

from gateway import store

GENESIS = "0" * 64
HEAD_ID = "head"
_MAX_ATTEMPTS = 200


def _canonical_value(value: Any) -> Any:
    if isinstance(value, datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=UTC)
        # BSON keeps milliseconds: hash what the datastore can give back.
        return moment.astimezone(UTC).isoformat(timespec="milliseconds")
    if isinstance(value, dict):
        return {str(k): _canonical_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical_value(v) for v in value]
    return value


def record_hash(record: dict[str, Any], key: bytes | None = None) -> str:
    """SHA-256 (or, with a chain key, HMAC-SHA256) over the record's canonical JSON, everything but
    `hash` itself. A key kept outside the datastore means that someone who can write to the
    datastore still cannot recompute the chain after altering a record."""
    body = {k: v for k, v in record.items() if k != "hash"}
    text = json.dumps(_canonical_value(body), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    if key:
        return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()
    return hashlib.sha256(text.encode()).hexdigest()


def truncate_to_millis(moment: datetime) -> datetime:
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


async def ensure_head(db: store.Db) -> None:
    try:
        await db.audit_chain.insert_one({"_id": HEAD_ID, "seq": 0, "hash": GENESIS})
    except DuplicateKeyError:
        pass


async def _current_head(db: store.Db) -> tuple[int, str]:
    """The last link: the head document, advanced past links a crashed writer left behind."""
    head = await db.audit_chain.find_one({"_id": HEAD_ID}) or {"seq": 0, "hash": GENESIS}
    seq, digest = int(head["seq"]), str(head["hash"])
    while True:
        following = await db.audit_events.find_one({"seq": seq + 1}, {"seq": 1, "hash": 1})
        if following is None:
            return seq, digest
        seq, digest = int(following["seq"]), str(following["hash"])


async def _advance_head(db: store.Db, seq: int, digest: str) -> None:
    await db.audit_chain.update_one(
        {"_id": HEAD_ID, "seq": {"$lt": seq}}, {"$set": {"seq": seq, "hash": digest}})


async def _insert_links(db: store.Db, records: list[dict[str, Any]], key: bytes | None) -> int:
    """Insert `records` (already linked) and advance the head past the last one, in one round trip
    where the server has MongoDB 8's client bulkWrite (ordered: the head moves only if every
    insert succeeded), else as insert_many + update_one. Returns how many records were inserted
    before the first failure; raises only for failures other than losing a race for a position."""
    last = records[-1]
    head_update = {"$set": {"seq": last["seq"], "hash": last["hash"]}}
    if _client_bulk_write.get(id(db.client), True):
        models: list[InsertOne[dict[str, Any]] | UpdateOne] = [
            InsertOne(r, namespace=f"{db.name}.audit_events") for r in records]
        models.append(UpdateOne({"_id": HEAD_ID, "seq": {"$lt": last["seq"]}}, head_update,
                                namespace=f"{db.name}.audit_chain"))
        try:
            await db.client.bulk_write(models, ordered=True)
            return len(records)
        except InvalidOperation:  # a server before MongoDB 8.0: no client bulkWrite
            _client_bulk_write[id(db.client)] = False
        except ClientBulkWriteException as exc:
            failures: list[dict[str, Any]] = list(exc.details.get("writeErrors") or [])
            if exc.error is not None or not failures:
                raise
            return min(int(failure.get("idx", 0)) for failure in failures)
    try:
        await db.audit_events.insert_many(records, ordered=True)
    except BulkWriteError as exc:
        return int(exc.details.get("nInserted", 0))
    await db.audit_chain.update_one({"_id": HEAD_ID, "seq": {"$lt": last["seq"]}}, head_update)
    return len(records)


_client_bulk_write: dict[int, bool] = {}  # per client: does its server take bulkWrite?


async def _write(db: store.Db, records: list[dict[str, Any]], key: bytes | None,
                 tail: tuple[int, str] | None = None) -> tuple[int, str]:
    """Append `records` after `tail` (this process's last known link; read from the datastore
    when unknown or when another writer has moved on). Returns the new tail."""
    pending = list(records)
    for _ in range(_MAX_ATTEMPTS):
        seq, digest = tail if tail is not None else await _current_head(db)
        for record in pending:
            seq += 1
            record["seq"], record["prev_hash"] = seq, digest
            record["chain"] = "hmac-sha256" if key else "sha256"
            record["hash"] = digest = record_hash(record, key)
        inserted = await _insert_links(db, pending, key)
        if inserted == len(pending):
            last = pending[-1]
            return int(last["seq"]), str(last["hash"])
        if inserted:
            last = pending[inserted - 1]
            await _advance_head(db, last["seq"], last["hash"])
        pending = pending[inserted:]
        for record in pending:
            for field in ("seq", "prev_hash", "hash", "chain"):
                record.pop(field, None)
        tail = None  # someone else holds the next position: re-read the chain's end
        await asyncio.sleep(random.uniform(0, 0.005))  # noqa: S311 - jitter, not security
    raise RuntimeError("could not append to the audit chain")


class AuditChain:
    """Appends records for one process; callers wait until their record is stored."""

    def __init__(self, db: store.Db, key: bytes | None = None) -> None:
        self.db = db
        self.key = key
        self._pending: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        self._lock = asyncio.Lock()
        self._tail: tuple[int, str] | None = None

    async def append(self, *records: dict[str, Any]) -> None:
        loop = asyncio.get_running_loop()
        futures = []
        for record in records:
            future: asyncio.Future[None] = loop.create_future()
            self._pending.append((record, future))
            futures.append(future)
        async with self._lock:
            if not all(f.done() for f in futures):
                # Let requests that are ready in this turn of the event loop join the batch.
                await asyncio.sleep(0)
                batch, self._pending = self._pending, []
                try:
                    self._tail = await _write(self.db, [r for r, _ in batch], self.key, self._tail)
                except Exception as exc:  # every waiter of this batch learns it failed
                    self._tail = None
                    for _, f in batch:
                        if not f.done():
                            f.set_exception(exc)
                else:
                    for _, f in batch:
                        if not f.done():
                            f.set_result(None)
        for future in futures:
            await future


# -- verification ------------------------------------------------------------------------------

@dataclass
class Problem:
    seq: int | None
    record_id: str | None
    kind: str  # altered | removed | inserted | relinked
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "id": self.record_id, "kind": self.kind, "detail": self.detail}


async def verify(db: store.Db, *, key: bytes | None = None, page: int = 1000) -> dict[str, Any]:
    """Walk the chain from its first link; report the first altered, removed or inserted record."""
    head = await db.audit_chain.find_one({"_id": HEAD_ID}) or {"seq": 0, "hash": GENESIS}
    last_seq, _ = await _current_head(db)
    expected_prev, checked, problem = GENESIS, 0, None
    seen_keyed = last_keyed = False
    position = 0
    while position < last_seq and problem is None:
        upper = min(position + page, last_seq)
        batch = {int(r["seq"]): r async for r in db.audit_events.find(
            {"seq": {"$gt": position, "$lte": upper}})}
        for seq in range(position + 1, upper + 1):
            record = batch.get(seq)
            if record is None:
                problem = Problem(seq, None, "removed",
                                  f"record #{seq} is missing: the chain has a gap after #{seq - 1}")
                break
            if record.get("chain") == "hmac-sha256" and not key:
                problem = Problem(seq, str(record["_id"]), "unverifiable",
                                  f"record #{seq} is keyed: give verify the chain key "
                                  "(MINDCHART_GATEWAY_AUDIT_CHAIN_KEY_FILE)")
                break
            keyed = record.get("chain") == "hmac-sha256"
            if key and not keyed and seen_keyed:
                # Once keyed, always keyed: an unkeyed link after a keyed one was recomputed by hand.
                problem = Problem(seq, str(record["_id"]), "altered",
                                  f"record #{seq} ({record['_id']}) lost its key (downgraded link)")
                break
            seen_keyed = seen_keyed or keyed
            last_keyed = keyed
            if record.get("hash") != record_hash(record, key if keyed else None):
                problem = Problem(seq, str(record["_id"]), "altered",
                                  f"record #{seq} ({record['_id']}) does not match its hash")
                break
            if record.get("prev_hash") != expected_prev:
                problem = Problem(seq, str(record["_id"]), "relinked",
                                  f"record #{seq} ({record['_id']}) does not follow record #{seq - 1}")
                break
            expected_prev = str(record["hash"])
            checked += 1
        position = upper
    if problem is None:
        # Two single-field queries on the `seq` index (an `$or` would scan the whole trail on
        # the embedded datastore): a record past the end, or one without a position (null).
        stray = (await db.audit_events.find_one({"seq": {"$gt": last_seq}})
                 or await db.audit_events.find_one({"seq": None}))
        if stray is not None:
            problem = Problem(stray.get("seq"), str(stray["_id"]), "inserted",
                              f"record {stray['_id']} is not a link of the chain")
    if problem is None and key and checked and not last_keyed:
        problem = Problem(last_seq, None, "altered",
                          "the newest records are not keyed although the gateway writes keyed links")
    if problem is None and int(head["seq"]) > last_seq:
        problem = Problem(int(head["seq"]), None, "removed",
                          f"the chain ends at #{last_seq} but its head says #{head['seq']}")
    result: dict[str, Any] = {"ok": problem is None, "checked": checked, "length": last_seq}
    if problem is not None:
        result["first_problem"] = problem.as_dict()
    return result
