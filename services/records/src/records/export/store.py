"""Every database query of bulk export, and nothing else: jobs, their files, the disclosure log,
and the streams of resources a job writes out.

Collections (records datastore):
- `export_jobs`: one document per kick-off. Workers claim a job by taking its lease with
  `find_one_and_update` (state `queued`, or `running` with an expired lease), renew the lease while
  they work, and commit each finished resource type with a write that only the lease holder's
  attempt can make. Any records replica can therefore run any job, and a crashed worker's job is
  resumed by whoever claims it next.
- GridFS bucket `export` (`export.files` / `export.chunks`): file contents, tagged with job id,
  type and attempt in `metadata`, so a dead attempt's partial files can be found and discarded.
- `export_files`: one document per finished file (kind output | deleted | error, its resource
  type, count, and the patients it holds, for download disclosures).
- `disclosures`: the 45 CFR 164.528 disclosure log (one entry per patient per export or download),
  read only by the gateway's accounting (routes.patient_disclosures).

Resource streams and reads go through records.store's two-phase executor (its module docstring):
the datastore is sent only an index-matched driving conjunct and the rest of the filter is checked
on each streamed document, so memory stays bounded whatever the size. Filters are always ANDed with
`AccessPolicy.filter_for(...)`, exactly as records.store does.
"""

from __future__ import annotations

import contextlib
import itertools
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from gridfs import AsyncGridFSBucket
from gridfs.errors import NoFile
from pymongo import ASCENDING, DESCENDING, ReturnDocument, UpdateOne
from pymongo import timeout as datastore_timeout
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from mindchart_core import errors, inserts, matcher
from records import store as records_store
from records.export import slots
from records.search import query

Db = AsyncDatabase[dict[str, Any]]
Collection = AsyncCollection[dict[str, Any]]
ACTIVE = ("queued", "running")
CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
RESTRICTED_LABELS = [f"{CONFIDENTIALITY}|R", f"{CONFIDENTIALITY}|V"]
DISCLOSURE_WRITES = 500  # upserts per command, so each ends well inside the socket timeout
DOWNLOAD_INSERTS = 5000  # download entries per insert command (~250 bytes each)
MAX_DISCLOSURES = 1000  # at most this many per page of a patient's disclosures


def now() -> datetime:
    moment = datetime.now(UTC)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def and_(*clauses: dict[str, Any]) -> dict[str, Any]:
    kept = [c for c in clauses if c]
    if not kept:
        return {}
    return kept[0] if len(kept) == 1 else {"$and": kept}


def bucket(db: Db) -> AsyncGridFSBucket:
    return AsyncGridFSBucket(db, bucket_name="export")


async def ensure_indexes(db: Db) -> None:
    await db.export_jobs.create_index([("state", ASCENDING)])
    await db.export_jobs.create_index([("client_id", ASCENDING), ("state", ASCENDING)])
    await db.export_jobs.create_index([("expires_at", ASCENDING)])
    await db.export_files.create_index([("job", ASCENDING)])
    await db["export.files"].create_index([("metadata.job", ASCENDING)])
    await db.disclosures.create_index([("patient", ASCENDING), ("state", ASCENDING)])
    await db.disclosures.create_index([("patient", ASCENDING), ("state", ASCENDING),
                                       ("recorded", DESCENDING)])
    await db.disclosures.create_index([("job", ASCENDING)])


# -- jobs -----------------------------------------------------------------------------------------

async def create_job(db: Db, job: dict[str, Any], cap: int) -> bool:
    """Queue a job unless its client already has `cap` active ones (then False, nothing stored).

    Insert (as `admitting`, which no worker claims), then count, then queue: two simultaneous
    kick-offs may both be refused, never both accepted.
    """
    await db.export_jobs.insert_one({**job, "state": "admitting"})
    active = await db.export_jobs.count_documents(
        {"client_id": job["client_id"], "state": {"$in": ["admitting", *ACTIVE]}}
    )
    if active > cap:
        await db.export_jobs.delete_one({"_id": job["_id"]})
        return False
    await db.export_jobs.update_one({"_id": job["_id"]}, {"$set": {"state": "queued"}})
    return True


async def job(db: Db, job_id: str) -> dict[str, Any] | None:
    return await db.export_jobs.find_one({"_id": job_id}, {"patients": 0})


async def claim(db: Db, owner: str, lease_seconds: float) -> dict[str, Any] | None:
    """Take the lease of a queued job, or of a running one whose worker stopped renewing it."""
    moment = now()
    return await db.export_jobs.find_one_and_update(
        {"$or": [{"state": "queued"}, {"state": "running", "lease_expires": {"$lt": moment}}]},
        {"$set": {"state": "running", "owner": owner,
                  "lease_expires": moment + timedelta(seconds=lease_seconds),
                  "started": moment},
         "$inc": {"attempt": 1}},
        return_document=ReturnDocument.AFTER,
    )


def _mine(job_id: str, attempt: int) -> dict[str, Any]:
    return {"_id": job_id, "attempt": attempt, "state": "running"}


async def resume(db: Db, job_id: str, attempt: int, lease_seconds: float) -> dict[str, Any] | None:
    """The lease holder starts a new attempt of its own job after the datastore failed it
    (timed out or unreachable): the attempt number moves on, so whatever the failed attempt's
    late writes do lands under the old number and is discarded like a dead attempt's, and
    `stalls` counts it apart from attempts lost to dead workers. None: no longer ours."""
    return await db.export_jobs.find_one_and_update(
        _mine(job_id, attempt),
        {"$set": {"lease_expires": now() + timedelta(seconds=lease_seconds)},
         "$inc": {"attempt": 1, "stalls": 1}},
        return_document=ReturnDocument.AFTER,
    )


async def renew(db: Db, job_id: str, attempt: int, lease_seconds: float, progress: str) -> bool:
    """Extend the lease; False when it is no longer ours (cancelled, or reclaimed by another)."""
    result = await db.export_jobs.update_one(_mine(job_id, attempt), {"$set": {
        "lease_expires": now() + timedelta(seconds=lease_seconds), "progress": progress}})
    return result.matched_count == 1


async def commit_type(db: Db, job_id: str, attempt: int, resource_type: str,
                      summary: dict[str, Any]) -> dict[str, Any] | None:
    """Record a finished type under the attempt that exported it: the entry as stored in the
    job's `done`, or None when the lease is no longer this attempt's (nothing written)."""
    entry = {**summary, "attempt": attempt}
    result = await db.export_jobs.update_one(_mine(job_id, attempt),
                                             {"$set": {f"done.{resource_type}": entry}})
    return entry if result.matched_count == 1 else None


async def complete(db: Db, job_id: str, attempt: int, ttl_seconds: int) -> bool:
    moment = now()
    result = await db.export_jobs.update_one(_mine(job_id, attempt), {"$set": {
        "state": "complete", "completed": moment, "error_attempt": attempt,
        "expires_at": moment + timedelta(seconds=ttl_seconds), "progress": "complete"},
        "$unset": {"lease_expires": "", "owner": ""}})
    return result.matched_count == 1


async def fail(db: Db, job_id: str, attempt: int | None, reason: str, ttl_seconds: int) -> None:
    moment = now()
    filt = _mine(job_id, attempt) if attempt is not None else {"_id": job_id}
    await db.export_jobs.update_one(filt, {"$set": {
        "state": "failed", "reason": reason, "completed": moment,
        "expires_at": moment + timedelta(seconds=ttl_seconds)}, "$unset": {"lease_expires": ""}})


async def cancel(db: Db, job_id: str) -> bool:
    """Mark cancelled (the worker notices at its next lease renewal) and discard the files now."""
    result = await db.export_jobs.update_one(
        {"_id": job_id, "state": {"$in": [*ACTIVE, "complete", "failed"]}},
        {"$set": {"state": "cancelled", "expires_at": now()}},
    )
    if result.matched_count != 1:
        return False
    await discard_files(db, job_id)
    await discard_pending_disclosures(db, job_id)
    return True


async def expired_jobs(db: Db, limit: int = 100) -> list[str]:
    docs = await db.export_jobs.find(
        {"expires_at": {"$lt": now()}}, {"_id": 1}
    ).limit(limit).to_list()
    return [d["_id"] for d in docs]


async def delete_job(db: Db, job_id: str) -> None:
    await discard_files(db, job_id)
    await discard_pending_disclosures(db, job_id)
    await db.export_jobs.delete_one({"_id": job_id})


async def job_patients(db: Db, job_id: str) -> list[str] | None:
    doc = await db.export_jobs.find_one({"_id": job_id}, {"patients": 1})
    return None if doc is None else doc.get("patients")


# -- files ----------------------------------------------------------------------------------------

async def add_file(db: Db, doc: dict[str, Any]) -> None:
    await db.export_files.insert_one(doc)


async def files_of(db: Db, job_id: str) -> list[dict[str, Any]]:
    return await db.export_files.find({"job": job_id}, {"patients": 0}).to_list()


async def file_of(db: Db, job_id: str, file_id: str) -> dict[str, Any] | None:
    return await db.export_files.find_one({"_id": file_id, "job": job_id})


async def discard_files(db: Db, job_id: str, keep: set[tuple[str, int]] | None = None) -> None:
    """Delete a job's files (GridFS contents included), except those of committed (type, attempt)s.

    On a reclaim this removes what a dead attempt had written of its unfinished type, so the
    type is exported again from its start and no resource appears twice.

    Several may run at once for one job: the DELETE request's cancel, the worker that notices it
    lost its lease, the sweeper (a cancelled job expires at once). A file another one deleted in
    between is already gone, not an error (the race behind an occasional 500 on DELETE).
    """
    keep = keep or set()
    grid = bucket(db)
    async for meta in db["export.files"].find({"metadata.job": job_id}, {"metadata": 1}):
        tag = meta.get("metadata") or {}
        if (tag.get("type"), tag.get("attempt")) not in keep:
            with contextlib.suppress(NoFile):
                await grid.delete(meta["_id"])
    async for doc in db.export_files.find({"job": job_id}, {"source_type": 1, "attempt": 1}):
        if (doc.get("source_type"), doc.get("attempt")) not in keep:
            await db.export_files.delete_one({"_id": doc["_id"]})


def grid_id(job_id: str, source_type: str, kind: str, attempt: int, seq: int) -> str:
    """GridFS file ids are predictable, so chunks of a file whose upload never closed (its
    writer was killed) can still be found and deleted."""
    return f"{job_id}.{source_type}.{kind}.{attempt}.{seq}"


async def discard_unclosed_uploads(db: Db, job_id: str, kinds: list[tuple[str, str]],
                                   attempts: range) -> None:
    """Delete chunks left by uploads that dead attempts never closed (no `export.files` entry)."""
    for source_type, kind in kinds:
        for attempt in attempts:
            seq = 1
            while True:
                ident = grid_id(job_id, source_type, kind, attempt, seq)
                removed = await db["export.chunks"].delete_many({"files_id": ident})
                known = await db["export.files"].count_documents({"_id": ident})
                if not removed.deleted_count and not known:
                    break
                seq += 1


async def stream_file(db: Db, gridfs_id: Any) -> AsyncIterator[bytes]:
    """A stored file chunk by chunk (255 KiB at a time): never the whole file in memory."""
    download = await bucket(db).open_download_stream(gridfs_id)
    try:
        while chunk := await download.readchunk():
            yield chunk
    finally:
        await download.close()


# -- resources ------------------------------------------------------------------------------------

EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)  # before any write records can have stamped
PATIENTS_PER_QUERY = 50


@dataclass(frozen=True)
class Window:
    """The export's time window on `field` (an indexed datetime, ms precision): after `since`
    (exclusive; None: from the start) up to `until` (inclusive: the job's transactionTime)."""

    field: str
    since: datetime | None
    until: datetime


async def stream(db: Db, resource_type: str, filt: dict[str, Any], window: Window,
                 batch_size: int, gather_seconds: float) -> AsyncIterator[dict[str, Any]]:
    """Current versions matching `filt` (which already holds the policy filter and `window`):
    walked by export slot once every document has one (slots.py), by time until then."""
    by_slot = await slots.ready(db)
    async for doc in sliced(db[resource_type], and_(filt, {"deleted": {"$ne": True}}), window,
                            records_store.indexed_fields(resource_type), batch_size, gather_seconds,
                            by_slot=by_slot):
        yield doc


def deletions(db: Db, resource_type: str, filt: dict[str, Any], window: Window,
              batch_size: int, gather_seconds: float) -> AsyncIterator[dict[str, Any]]:
    """DELETE entries of the history collection matching `filt` (policy and time window in it).
    History entries carry no slot: walked by time."""
    return sliced(db[f"{resource_type}_history"], and_(filt, {"method": "DELETE"}), window,
                  records_store.HISTORY_DRIVERS, batch_size, gather_seconds, by_slot=False)


async def sliced(collection: Collection, filt: dict[str, Any], window: Window,
                 drivers: frozenset[str], batch_size: int,
                 gather_seconds: float, *, by_slot: bool) -> AsyncIterator[dict[str, Any]]:
    """Every document matching `filt`, in datastore calls that each stay small whatever the size
    of the store, with the whole filter checked here (records.store's phase 2).

    Why: the embedded SecantusDB gathers a query's whole result before it answers the first batch,
    and a limit or sort does not shorten that (measured 2026-12-02 on 100k documents of 2 KB with
    an index on the range field: the whole range 3.9-5.4 s to the first document, limited to 501
    3.4-3.9 s, sorted and limited 3.4 s, a range holding 500 documents 19 ms, an empty one 2-4 ms).
    One export scan of a large store therefore held the datastore for every other caller past the
    export's own lease. So:

    - a filter driven by one patient's compartment (`c` equality) is sent as it is: bounded by
      that patient's record;
    - one driven by a list of patients (a Group's members, `c $in`) is sent in chunks of
      `PATIENTS_PER_QUERY` patients, and a resource in several members' compartments is emitted
      only with the chunk of the first of them, so it is exported once;
    - anything else is read in ranges of about `4 * batch_size` documents: of export slots
      (`slot_sliced`) when `by_slot`, else of `window`'s time (`time_sliced`).
    """
    driver = query.driving_clause(filt, drivers)
    try:
        predicate = matcher.compile_filter(filt)
    except matcher.UnsupportedFilter:  # never for records' own filters (test_records_matcher.py)
        async for doc in records_store.stream(collection, filt, drivers, batch_size):
            yield doc
        return
    compartment = driver.get("c") if driver is not None else None
    if compartment is not None and not isinstance(compartment, dict):
        async for doc in _read(collection, driver, batch_size, gather_seconds):
            if predicate(doc):
                yield doc
        return
    if isinstance(compartment, dict) and "$in" in compartment:
        members = sorted(set(compartment["$in"]))
        allowed = set(members)
        for start in range(0, len(members), PATIENTS_PER_QUERY):
            chunk = members[start:start + PATIENTS_PER_QUERY]
            mine = set(chunk)
            async for doc in _read(collection, {"c": {"$in": chunk}}, batch_size, gather_seconds):
                if min(p for p in doc["c"] if p in allowed) in mine and predicate(doc):
                    yield doc
        return
    walk = slot_sliced if by_slot else time_sliced
    async for doc in walk(collection, window, 4 * batch_size, batch_size, gather_seconds):
        if predicate(doc):
            yield doc


async def slot_sliced(collection: Collection, window: Window, target: int, batch_size: int,
                      gather_seconds: float) -> AsyncIterator[dict[str, Any]]:
    """Every document in `window`, read in consecutive ranges of export slot (records.store
    `slot_of`: a hash of the id, so each range holds its share of the collection however the
    documents are spread in time) sized from the collection's metadata count to hold about
    `target` each, then those stored without a slot (`slot: null`: written by a replica of an
    earlier version after the backfill, slots.py). Each call is an index range scan of the slot
    (the slot clause first: SecantusDB drives a filter of several range clauses by the first one
    that has an index, storage.py `_try_index_id_keys`) with the window checked in the datastore,
    so it ships only what is in the window; an export with `_since` still reads the collection
    once, in these bounded calls.

    Why not time ranges alone: the data's density in time is unknown until read, and a bulk
    import writes 100k documents in a minute; the first range holding data was read whole
    (measured at 0494699: the 100k export's first read outlasted its 30 s gather, every
    attempt). Why not `_id` ranges: SecantusDB's `_id` index is virtual and serves only equality,
    so a range of ids scans the collection (storage.py `_try_index_id_keys`)."""
    if window.since is not None and window.since >= window.until:
        return
    bound: dict[str, Any] = {"$lte": window.until}
    if window.since is not None:
        bound["$gt"] = window.since
    stored = await collection.estimated_document_count()
    ranges = max(1, -(-stored // target))
    edges = [i * records_store.SLOTS // ranges for i in range(ranges + 1)]
    clauses = [{"$gte": low, "$lt": high} for low, high in itertools.pairwise(edges)]
    for clause in [*clauses, None]:
        async for doc in _read(collection, {records_store.SLOT: clause, window.field: bound},
                               batch_size, gather_seconds):
            yield doc


def _range(field: str, after: datetime, until: datetime) -> dict[str, Any]:
    return {field: {"$gt": after, "$lte": until}}


async def time_sliced(collection: Collection, window: Window, target: int, batch_size: int,
                      gather_seconds: float) -> AsyncIterator[dict[str, Any]]:
    """Every document in `window`, read in consecutive ranges of `window.field` (each a filter on
    that field alone: an index range scan) of about `target` documents once the data is found.

    SecantusDB spends the same per matched document to count as to read (measured 2026-12-02:
    80-90 µs, 100k documents of 2 KB), and it cannot stop either early (a limit, or maxTimeMS,
    applies only after the whole range is gathered), so ranges are read, never counted. A store
    holding at most `2 * target` documents (its metadata count, no scan) is read in one range.
    Otherwise the data is found by halving: the left half of what remains is read, and while it
    is empty the search moves past it (empty ranges cost a few milliseconds each); the first range
    that holds data is read whole, so the one call that grows with the store is that first read,
    bounded by the documents between the data's start and the range's end. From there each range
    is as wide as the last, doubled when that held under half the target and narrowed in
    proportion when it held more: a range overshoots only where the density jumps between
    neighbours (a burst after a quiet stretch). A millisecond (BSON's resolution) holding more
    (one large transaction Bundle stamps every entry alike) is read as it is."""
    low = window.since if window.since is not None else EARLIEST - timedelta(milliseconds=1)
    if low >= window.until:
        return
    step = timedelta(milliseconds=1)
    searching = await collection.estimated_document_count() > 2 * target
    high = window.until
    while True:
        if searching and high - low > step:
            high = low + max(step, (high - low) // 2 // step * step)
        read, earliest = 0, high
        async for doc in _read(collection, _range(window.field, low, high), batch_size, gather_seconds):
            read += 1
            if searching:
                earliest = min(earliest, _value(doc, window.field))
            yield doc
        if high >= window.until:
            return
        if searching and not read:  # nothing here: halve what remains
            low, high = high, window.until
            continue
        # The first range holding data is sized by the data in it, not the empty time before.
        width = max(step, high - earliest) if searching else high - low
        searching = False
        if read < target // 2:
            width *= 2
        elif read > target:
            width = max(step, width * target // read // step * step)
        low, high = high, min(window.until, high + width)


def _value(doc: dict[str, Any], path: str) -> datetime:
    node: Any = doc
    for part in path.split("."):
        node = node[part]
    return node  # type: ignore[no-any-return]


async def _read(collection: Collection, bounds: dict[str, Any], batch_size: int,
                gather_seconds: float) -> AsyncIterator[dict[str, Any]]:
    """One range's documents, batch by batch. The first batch may wait `gather_seconds` (the
    embedded datastore answers it only after gathering the whole range, which at the first range
    holding data can exceed the datastore timeout that bounds every other wait); later batches
    are already gathered."""
    cursor = collection.find(bounds, batch_size=batch_size)
    try:
        with datastore_timeout(gather_seconds):
            first = await anext(cursor, None)
        if first is None:
            return
        yield first
        async for doc in cursor:
            yield doc
    finally:
        await cursor.close()


async def still_deleted(db: Db, resource_type: str, ids: list[str]) -> set[str]:
    docs = await records_store.select(db[resource_type], {"$and": [{"_id": {"$in": ids}}, {"deleted": True}]},
                                      records_store.indexed_fields(resource_type), raw=False)
    return {d["_id"] for d in docs}


async def find_one(db: Db, resource_type: str, filt: dict[str, Any]) -> dict[str, Any] | None:
    docs = await records_store.select(db[resource_type], and_(filt, {"deleted": {"$ne": True}}),
                                      records_store.indexed_fields(resource_type), limit=1)
    return docs[0] if docs else None


async def compartment_page(db: Db, resource_type: str, filt: dict[str, Any],
                           limit: int) -> list[dict[str, Any]]:
    """Current versions matching `filt` in `_id` order, at most `limit` (for $everything)."""
    return await records_store.select(db[resource_type], and_(filt, {"deleted": {"$ne": True}}),
                                      records_store.indexed_fields(resource_type),
                                      order=[("_id", ASCENDING)], limit=limit)


# -- disclosure log -------------------------------------------------------------------------------

async def add_pending_disclosures(db: Db, job: dict[str, Any], resource_type: str, attempt: int,
                                  per_patient: dict[str, int]) -> None:
    """Count what this export releases per patient, under the attempt that counted it: only the
    attempt that committed the type counts when the export completes, so a failed attempt's
    counts (even a write of it the datastore applies late) are never added twice.

    Sent `DISCLOSURE_WRITES` upserts to a command: one command must finish inside the
    datastore's socket timeout (5 s by default), and SecantusDB applies an upsert in 0.4-1 ms
    (measured 2026-12-03 on 2 cores, the disclosures indexed three ways), so the 5,000 of a full
    flush took 2.7-5 s in one command once the collection held 10k patients, timed out, and
    failed the 100k-note export of `make bench`."""
    writes = [
        UpdateOne(
            {"_id": f"{job['_id']}:{patient}"},
            {"$inc": {f"pending.{resource_type}.{attempt}": n},
             "$setOnInsert": {"patient": patient, "job": job["_id"], "event": "export",
                              "state": "pending", "recipient": job["client_id"],
                              "recipient_user": job.get("recipient_user"),
                              "purpose": job["purpose"]}},
            upsert=True,
        )
        for patient, n in per_patient.items()
    ]
    for start in range(0, len(writes), DISCLOSURE_WRITES):
        await db.disclosures.bulk_write(writes[start:start + DISCLOSURE_WRITES], ordered=False)


async def discard_pending_disclosures(db: Db, job_id: str) -> None:
    """Delete what a cancelled or expired job had pending, `DISCLOSURE_WRITES` at a command (a
    job of 10k patients pends 10k entries, more than one command deletes inside the timeout)."""
    while ids := [doc["_id"] for doc in await db.disclosures.find(
            {"job": job_id, "state": "pending"}, {"_id": 1}).limit(DISCLOSURE_WRITES).to_list()]:
        await db.disclosures.delete_many({"_id": {"$in": ids}, "state": "pending"})


def committed_counts(doc: dict[str, Any], committed: dict[str, int]) -> dict[str, int]:
    """A pending disclosure's counts per type, from the committing attempt of each type only.
    `counts` already there is an entry pending from before counts were kept per attempt."""
    counts = dict(doc.get("counts") or {})
    for resource_type, by_attempt in (doc.get("pending") or {}).items():
        n = (by_attempt or {}).get(str(committed.get(resource_type)))
        if n:
            counts[resource_type] = int(n)
    return counts


async def record_export_disclosures(db: Db, job_id: str, committed: dict[str, int],
                                    batch: int = 500) -> None:
    """Turn the job's pending disclosures into recorded ones, all at one moment; a patient left
    with nothing counted (only failed attempts saw them) gets no entry. Idempotent: a worker that
    resumes the job after a failure here records only what is still pending.

    Each statement matches on `state: pending`, so sending it twice changes nothing the first
    did not: the batches go as plain commands (mindchart_core.inserts.write_idempotent), without
    the retryable-write bookkeeping that SecantusDB pays for with a scan of its kept replies on
    every write."""
    moment = now()
    pending: dict[str, list[dict[str, Any]]] = {"update": [], "delete": []}
    async for doc in db.disclosures.find({"job": job_id, "state": "pending"}, batch_size=batch):
        counts = committed_counts(doc, committed)
        where = {"_id": doc["_id"], "state": "pending"}
        if counts:
            verb, statement = "update", {"q": where, "u": {
                "$set": {"counts": counts, "state": "recorded", "recorded": moment},
                "$unset": {"pending": ""}}}
        else:
            verb, statement = "delete", {"q": where, "limit": 1}
        pending[verb].append(statement)
        if len(pending[verb]) >= batch:
            await inserts.write_idempotent(db, verb, db.disclosures.name, pending[verb])
            pending[verb] = []
    for verb, statements in pending.items():
        if statements:
            await inserts.write_idempotent(db, verb, db.disclosures.name, statements)


async def record_download(db: Db, job: dict[str, Any], file_doc: dict[str, Any],
                          recipient_user: str | None) -> None:
    """One disclosure entry per patient in the file. Each entry has its own `_id`, so the insert
    goes once without retryable-write bookkeeping (mindchart_core.inserts.insert_once), in
    commands of DOWNLOAD_INSERTS entries so each stays far below the 16 MiB command limit."""
    moment = now()
    docs = [{"_id": uuid.uuid4().hex, "patient": patient, "job": job["_id"], "event": "download",
             "file": file_doc["_id"], "state": "recorded", "recorded": moment,
             "recipient": job["client_id"], "recipient_user": recipient_user,
             "purpose": job["purpose"], "counts": {file_doc["source_type"]: n}}
            for patient, n in file_doc.get("patients", [])]
    for start in range(0, len(docs), DOWNLOAD_INSERTS):
        await inserts.insert_once(db, db.disclosures.name, docs[start:start + DOWNLOAD_INSERTS])


async def disclosures_of(db: Db, patient: str, *, windows: list[dict[str, datetime]],
                         before: tuple[datetime, str] | None, limit: int,
                         event_id: Callable[[dict[str, Any]], str]) -> list[dict[str, Any]]:
    """Up to `limit` recorded disclosures of a patient, newest first by (`recorded`, event id),
    strictly after `before` in that order, inside every `recorded` window.

    Ordered exactly (ties at one millisecond are common: an export records all its patients at
    once), so the gateway can merge this with its own entries and page the whole accounting.
    """
    base = and_({"patient": patient, "state": "recorded"}, *({"recorded": w} for w in windows))
    found: dict[Any, dict[str, Any]] = {}
    older = base
    if before is not None:
        moment, ident = before
        for doc in await db.disclosures.find(and_(base, {"recorded": moment})).to_list():
            if event_id(doc) < ident:
                found[doc["_id"]] = doc
        older = and_(base, {"recorded": {"$lt": moment}})
    docs = await db.disclosures.find(older).sort("recorded", -1).limit(limit).to_list()
    if len(docs) == limit:  # the last millisecond may hold more than the limit let through
        docs += await db.disclosures.find(and_(older, {"recorded": docs[-1]["recorded"]})).to_list()
    for doc in docs:
        found[doc["_id"]] = doc
    ordered = sorted(found.values(), key=lambda d: (d["recorded"], event_id(d)), reverse=True)
    return ordered[:limit]


def new_id() -> str:
    return uuid.uuid4().hex


__all__ = ["ACTIVE", "RESTRICTED_LABELS", "Db", "Window", "and_", "bucket", "cancel", "claim",
           "commit_type", "complete", "create_job", "deletions", "ensure_indexes", "errors", "fail",
           "job", "new_id", "now", "renew", "sliced", "slot_sliced", "stream", "time_sliced"]
