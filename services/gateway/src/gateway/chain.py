"""The tamper-evident audit trail: hash chains, one per partition, each written by one replica.

Each record carries `partition` (which chain), `seq` (its position there; (partition, seq) is
unique-indexed), `prev_hash` (the previous link's hash) and `hash` (SHA-256, or HMAC-SHA256 with a
chain key, of its own canonical form, `partition` and `prev_hash` included, so a record moved to
another position or partition no longer matches). Records written before partitioning have no
`partition` field: they are the `legacy` partition, read and verified as one more chain.

Why partitions held by lease rather than a fixed number chosen by hash: with one chain every
replica contends for one position; with hash partitions two replicas still meet in the same
partition whenever their requests hash alike, and each replica's group commit is split into
P small batches. A partition leased to one replica (`partitions.py`) has exactly one writer, so
its group commit stays whole and contention is zero by construction; the (partition, seq) unique
index still decides if two writers ever meet (a lease that lapsed while its holder stalled): the
loser re-reads the end and retries, so a chain can never fork. Partitions are as many as replicas
have ever run at once (a restarted replica takes over a free one).

Within one process appends are group-committed: while one batch is being written, the records of
every other request queue up and become the next batch (one `insert` command, not a retryable
write: mindchart_core.inserts), and the last link is remembered so no read is needed. The head
document moves with a batch at most every HEAD_SECONDS (then both go as one MongoDB 8 bulkWrite
where the server has it) and in the background while it lags: a second write in every batch's
transaction was a large part of the datastore's work per audited request. Readers of a partition's
end (`current_head`) walk on from the head. Every caller waits until the batch holding its record
is stored, so nothing acknowledged is ever lost. Records are never updated. Signed checkpoints of
every partition's head (`checkpoints.py`) and verification (`chain_verify.py`) build on this.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
from prometheus_client import Counter
from pymongo import InsertOne, UpdateOne
from pymongo.errors import ClientBulkWriteException, InvalidOperation

from gateway import partitions, store
from mindchart_core import inserts

GENESIS = "0" * 64
_MAX_ATTEMPTS = 200
CONFLICTS = Counter(
    "mindchart_gateway_audit_chain_conflicts_total",
    "Audit batches that lost a race for their chain position and were written again")
_log = logging.getLogger(__name__)


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


def _millis(value: Any) -> str:
    if isinstance(value, datetime):
        return str(_canonical_value(value))
    raise TypeError(type(value).__name__)


_ORJSON_OPTIONS = orjson.OPT_SORT_KEYS | orjson.OPT_PASSTHROUGH_DATETIME


def canonical_json(body: dict[str, Any]) -> bytes:
    """The canonical form a record's hash covers: `json.dumps(sort_keys=True, separators=(",",
    ":"), ensure_ascii=True)` of the record with dates as ISO 8601 UTC milliseconds.

    orjson writes those same bytes for what audit records hold (str keys, str/int/bool/None, the
    finite floats of `latency_ms`, lists, dicts, dates through `_millis`) at a fraction of the
    CPU (it was 6% of the gateway's CPU per proxied read); whatever it might write differently
    goes the slow way: any non-ASCII output (json escapes it, orjson does not), anything orjson
    refuses, and floats that are not finite or need an exponent (`_awkward_floats`).
    tests/unit/test_audit_chain_hash.py compares the two on every shape of record."""
    try:
        fast = orjson.dumps(body, default=_millis, option=_ORJSON_OPTIONS)
    except TypeError:
        fast = None
    if fast is not None and fast.isascii() and not _awkward_floats(body):
        return fast
    return json.dumps(_canonical_value(body), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True).encode()


def _awkward_floats(body: dict[str, Any]) -> bool:
    """A float whose spelling json and orjson may not share (NaN, infinities, exponents: the two
    agree on every other finite float). Records only ever had one float, top-level `latency_ms`,
    so that is where the check looks: a record written before orjson hashes the same either way,
    and one written since is hashed and verified by this same function."""
    return any(isinstance(v, float) and not (v == 0 or 1e-4 <= abs(v) < 1e15) for v in body.values())


def record_hash(record: dict[str, Any], key: bytes | None = None) -> str:
    """SHA-256 (or, with a chain key, HMAC-SHA256) over the record's canonical JSON, everything but
    `hash` itself. A key kept outside the datastore means that someone who can write to the
    datastore still cannot recompute the chain after altering a record."""
    text = canonical_json({k: v for k, v in record.items() if k != "hash"})
    if key:
        return hmac.new(key, text, hashlib.sha256).hexdigest()
    return hashlib.sha256(text).hexdigest()


def truncate_to_millis(moment: datetime) -> datetime:
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


async def current_head(db: store.Db, partition: partitions.Partition) -> tuple[int, str]:
    """A partition's last link: its head document, advanced past the links written since (the
    writer moves the head at most every HEAD_SECONDS, and a crashed one may have left more),
    reading the positions after it in windows of `_WALK` (one range on the (partition, seq)
    index each) up to the first one missing."""
    head = await db.audit_chain.find_one({"_id": partition.head_id}) or {"seq": 0, "hash": GENESIS}
    seq, digest = int(head["seq"]), str(head["hash"])
    while True:
        window_end = seq + _WALK
        following = {int(r["seq"]): str(r["hash"]) for r in await db.audit_events.find(
            partition.records({"$gt": seq, "$lte": window_end}), {"seq": 1, "hash": 1}).to_list()}
        while seq + 1 in following:
            seq += 1
            digest = following[seq]
        if seq < window_end:
            return seq, digest


_WALK = 500
# How often the writer moves its partition's head document: a batch written within this long
# of the last move is one insert and nothing else (measured: the head update was a second write
# in every batch's transaction, on a store that maintains indexes in Python).
HEAD_SECONDS = 1.0


async def _advance_head(db: store.Db, partition: partitions.Partition, seq: int, digest: str) -> None:
    await db.audit_chain.update_one(
        {"_id": partition.head_id, "seq": {"$lt": seq}}, {"$set": {"seq": seq, "hash": digest}})


async def _insert_links(db: store.Db, partition: partitions.Partition,
                        records: list[dict[str, Any]], advance_head: bool = True) -> int:
    """Insert `records` (already linked) and, with `advance_head`, advance the head past the last
    one, in one round trip where the server has MongoDB 8's client bulkWrite (ordered: the head
    moves only if every insert succeeded), else as insert_many + update_one. Returns how many
    records were inserted before the first failure; raises only for failures other than losing
    a race for a position."""
    if not advance_head:
        return await inserts.insert_once(db, db.audit_events.name, records, _stored_as_sent(db))
    last = records[-1]
    head_filter = {"_id": partition.head_id, "seq": {"$lt": last["seq"]}}
    head_update = {"$set": {"seq": last["seq"], "hash": last["hash"]}}
    if _client_bulk_write.get(id(db.client), True):
        models: list[InsertOne[dict[str, Any]] | UpdateOne] = [
            InsertOne(r, namespace=f"{db.name}.audit_events") for r in records]
        models.append(UpdateOne(head_filter, head_update, namespace=f"{db.name}.audit_chain"))
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
    inserted = await inserts.insert_once(db, db.audit_events.name, records, _stored_as_sent(db))
    if inserted == len(records):
        await db.audit_chain.update_one(head_filter, head_update)
    return inserted


def _stored_as_sent(db: store.Db) -> inserts.StoredAsSent:
    """A link refused as a duplicate is this batch's own if it is stored with its `hash`, which
    covers its partition and position (mindchart_core.inserts: after a lost reply)."""
    async def check(record: dict[str, Any]) -> bool:
        stored = await db.audit_events.find_one({"_id": record["_id"]}, {"hash": 1})
        return stored is not None and stored.get("hash") == record["hash"]
    return check


_client_bulk_write: dict[int, bool] = {}  # per client: does its server take bulkWrite?


async def _write(db: store.Db, partition: partitions.Partition, records: list[dict[str, Any]],
                 key: bytes | None, tail: tuple[int, str] | None = None,
                 advance_head: bool = True) -> tuple[int, str]:
    """Append `records` to `partition` after `tail` (this process's last known link; read from the
    datastore when unknown or when another writer has moved on), moving the head document along
    with `advance_head`. Returns the new tail."""
    pending = list(records)
    for _ in range(_MAX_ATTEMPTS):
        seq, digest = tail if tail is not None else await current_head(db, partition)
        for record in pending:
            seq += 1
            record["partition"], record["seq"], record["prev_hash"] = partition.field, seq, digest
            record["chain"] = "hmac-sha256" if key else "sha256"
            record["hash"] = digest = record_hash(record, key)
        inserted = await _insert_links(db, partition, pending, advance_head)
        if inserted == len(pending):
            last = pending[-1]
            return int(last["seq"]), str(last["hash"])
        CONFLICTS.inc()
        if inserted:
            last = pending[inserted - 1]
            await _advance_head(db, partition, last["seq"], last["hash"])
        pending = pending[inserted:]
        for record in pending:
            for field in ("partition", "seq", "prev_hash", "hash", "chain"):
                record.pop(field, None)
        tail = None  # someone else holds the next position: re-read the chain's end
        await asyncio.sleep(random.uniform(0, 0.005))  # noqa: S311 - jitter, not security
    raise RuntimeError("could not append to the audit chain")


class AuditChain:
    """Appends records for one process to the partition it holds; callers wait until their record
    is stored. `run()` keeps the lease (and takes another partition if it was lost)."""

    def __init__(self, db: store.Db, key: bytes | None = None, *, holder: str | None = None,
                 lease_seconds: float = 30.0) -> None:
        self.db = db
        self.key = key
        self.holder = holder or uuid.uuid4().hex
        self.lease_seconds = lease_seconds
        self.partition: partitions.Partition | None = None
        self._pending: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        self._lock = asyncio.Lock()
        self._tail: tuple[int, str] | None = None
        self._head_moved = 0.0  # time.monotonic() of the last batch that moved the head
        self._head_seq = 0  # where this process last moved its partition's head to

    async def start(self) -> partitions.Partition:
        if self.partition is None:
            self.partition = await partitions.claim(self.db, self.holder, self.lease_seconds)
            self._tail, self._head_moved, self._head_seq = None, 0.0, 0
        return self.partition

    async def move_head(self) -> None:
        """Bring the partition's head document up to this process's last link, if it lags."""
        partition, tail = self.partition, self._tail
        if partition is not None and tail is not None and tail[0] > self._head_seq:
            await _advance_head(self.db, partition, *tail)
            self._head_seq = tail[0]

    async def keep_lease(self) -> None:
        """Renew the lease once; on losing it, take another partition (the next batch goes there)."""
        partition = await self.start()
        if not await partitions.renew(self.db, partition, self.holder, self.lease_seconds):
            async with self._lock:
                self.partition = None
                await self.start()

    async def run(self) -> None:
        """Every HEAD_SECONDS the head catches up with the last batch; every third of a lease the
        lease is renewed."""
        renewed = time.monotonic()
        while True:
            await asyncio.sleep(HEAD_SECONDS)
            try:
                await self.move_head()
                if time.monotonic() - renewed >= self.lease_seconds / 3:
                    renewed = time.monotonic()
                    await self.keep_lease()
            except Exception as exc:  # the datastore is away: appends fail (503) until it is back
                _log.warning("audit partition lease or head not written (%s)", type(exc).__name__)

    async def stop(self) -> None:
        async with self._lock:
            if self.partition is not None:
                await self.move_head()
                await partitions.release(self.db, self.partition, self.holder)
                self.partition = None

    async def append(self, *records: dict[str, Any]) -> None:
        """Store `records` (in one batch with whatever else is waiting); raises the first failure.
        Every future made here has its outcome retrieved, whichever way this call ends: a request
        that appends several records (a response and its disclosures) or that is cancelled while a
        batch holding its records fails must not leave "Future exception was never retrieved"."""
        loop = asyncio.get_running_loop()
        futures = []
        for record in records:
            future: asyncio.Future[None] = loop.create_future()
            self._pending.append((record, future))
            futures.append(future)
        try:
            async with self._lock:
                if not all(f.done() for f in futures):
                    # Let requests that are ready in this turn of the event loop join the batch.
                    await asyncio.sleep(0)
                    batch, self._pending = self._pending, []
                    try:
                        partition = await self.start()
                        now = time.monotonic()
                        advance = now - self._head_moved >= HEAD_SECONDS
                        self._tail = await _write(self.db, partition, [r for r, _ in batch],
                                                  self.key, self._tail, advance)
                        if advance:
                            self._head_moved, self._head_seq = now, self._tail[0]
                    except BaseException as exc:  # every waiter of this batch learns it failed
                        self._tail = None
                        failure = exc if isinstance(exc, Exception) else RuntimeError(
                            "the audit batch was interrupted")  # this call was cancelled mid-write
                        for _, f in batch:
                            if not f.done():
                                f.set_exception(failure)
                        raise
                    else:
                        for _, f in batch:
                            if not f.done():
                                f.set_result(None)
        except BaseException:
            # Cancelled (or the batch failed): a future still waiting is cancelled, so a later
            # batch skips it; one already failed is retrieved here, as nobody else will await it.
            for f in futures:
                if not f.cancel() and not f.cancelled():
                    f.exception()
            raise
        # Every future is done by now (a batch resolves all it took before releasing the lock).
        outcomes = [f.exception() for f in futures]
        failure = next((e for e in outcomes if e is not None), None)
        if failure is not None:
            raise failure
