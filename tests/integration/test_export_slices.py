"""Bulk export reads a large store in small datastore calls (records/export/store.py `sliced`).

The embedded datastore gathers a query's whole result before its first batch, so one scan of a
large store held it for every other caller (the 100k-note export failed, "Too many attempts").
These check, on a real SecantusDB, that the slices cover the export's window exactly (every
resource once, nothing outside it), that no slice reads more than its bound whatever the data's
spread (sparse years, a burst, one millisecond holding a whole transaction Bundle), and that a
Group's members are read in chunks with a resource in two members' compartments exported once.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import ASCENDING, monitoring

from records import store as records_store
from records.export import slots, store
from tests.integration.conftest import fresh_database

FIELD = "sp.lastUpdated_lo"
BATCH = 5  # slices of about 4 * BATCH = 20 documents, read only when they hold at most 40
UNTIL = datetime(2026, 6, 1, tzinfo=UTC)
GATHER = 30.0


def doc(ident: str, moment: datetime, patients: list[str], *, deleted: bool = False) -> dict[str, Any]:
    return {"_id": ident, "id": ident, "sp": {"lastUpdated_lo": moment}, "c": patients,
            "deleted": deleted, "raw": b"{}"}


def bursty_store(*, sparse: bool = True) -> list[dict[str, Any]]:
    """Sparse years (unless not `sparse`), then a burst of 300 in three seconds, then one
    millisecond holding 60 (one transaction Bundle), then writes after the export's
    transactionTime, and 20 deleted."""
    docs = [doc(f"sparse-{i}", datetime(2019, 1, 1, tzinfo=UTC) + timedelta(days=45 * i), ["p1"])
            for i in range(40 if sparse else 0)]
    burst = datetime(2026, 3, 1, 9, tzinfo=UTC)
    docs += [doc(f"burst-{i}", burst + timedelta(milliseconds=10 * i), [f"p{i % 7}"]) for i in range(300)]
    bundle = datetime(2026, 4, 2, 12, tzinfo=UTC)
    docs += [doc(f"bundle-{i}", bundle, ["p2"]) for i in range(60)]
    docs += [doc(f"later-{i}", UNTIL + timedelta(seconds=1 + i), ["p1"]) for i in range(10)]
    docs += [doc(f"gone-{i}", burst + timedelta(milliseconds=5 + 10 * i), ["p3"], deleted=True)
             for i in range(20)]
    return docs


async def load(db: Any, docs: list[dict[str, Any]]) -> Any:
    collection = db["Observation"]
    await collection.create_index([(FIELD, ASCENDING)])
    await collection.create_index([("c", ASCENDING)])
    await collection.insert_many(docs)
    return collection


class FindSizes(monitoring.CommandListener):
    """Documents each `find` answered (but those of the migration marker), its getMores
    included, and the counts sent."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.counts: list[dict[str, Any]] = []
        self._finds: dict[int, int] = {}  # cursor id -> index in sizes
        self._more: dict[int, int] = {}  # getMore request id -> cursor id

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "getMore":
            self._more[event.request_id] = event.command["getMore"]
        if event.command_name in ("count", "aggregate"):
            self.counts.append(event.command)

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        cursor = event.reply.get("cursor")
        if event.command_name == "find" and cursor is not None \
                and not cursor["ns"].endswith(f".{records_store.MIGRATIONS}"):
            self.sizes.append(len(cursor["firstBatch"]))
            if cursor["id"]:
                self._finds[cursor["id"]] = len(self.sizes) - 1
        elif event.command_name == "getMore" and cursor is not None:
            self.sizes[self._finds[self._more.pop(event.request_id)]] += len(cursor["nextBatch"])

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def steady_store() -> list[dict[str, Any]]:
    """A clinic's steady writes: one every six hours for 100 days, and one millisecond holding 60
    (one transaction Bundle) in the middle."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    docs = [doc(f"steady-{i}", start + timedelta(hours=6 * i), [f"p{i % 7}"]) for i in range(400)]
    return docs + [doc(f"bundle-{i}", start + timedelta(days=50, minutes=1), ["p2"]) for i in range(60)]


def test_time_slices_cover_the_window_once_and_each_stays_small(mongo_url: str) -> None:
    """Every resource once; the search for where the data starts costs only empty reads; the
    first read holding data takes what lies before its end, and every later read stays near the
    target (20 here), save the Bundle's millisecond. No count of documents is sent."""
    listener = FindSizes()

    async def main() -> Counter[str]:
        async with fresh_database(mongo_url, "export_slices", [listener]) as db:
            collection = await load(db, steady_store())
            listener.sizes.clear()
            listener.counts.clear()
            window = store.Window(FIELD, None, UNTIL)
            return Counter([d["_id"] async for d in store.time_sliced(collection, window, 4 * BATCH, BATCH, GATHER)])

    seen = asyncio.run(main())
    assert set(seen) == {d["_id"] for d in steady_store()}
    assert max(seen.values()) == 1, "a resource fell in two slices"
    sizes = listener.sizes
    first = next(i for i, n in enumerate(sizes) if n)
    assert first <= 45, sizes  # halving 56 years down to the data: about 41 empty reads
    later = sorted(sizes[first + 1:])
    assert later[-1] <= 60, sizes  # the Bundle's millisecond read as it is
    assert later[-2] <= 3 * 4 * BATCH, sizes
    assert len(later) >= (460 - sizes[first]) // (3 * 4 * BATCH), sizes
    # Only the metadata count (estimated_document_count: `count` with no query) is sent.
    assert [c.get("query") for c in listener.counts] == [None], listener.counts


def test_stream_covers_a_sparse_then_bursty_store_once(mongo_url: str) -> None:
    async def main() -> set[str]:
        async with fresh_database(mongo_url, "export_slices") as db:
            await load(db, bursty_store())
            window = store.Window(FIELD, None, UNTIL)
            return {d["_id"] async for d in store.stream(db, "Observation", {FIELD: {"$lte": UNTIL}}, window, BATCH, GATHER)}

    expected = {d["_id"] for d in bursty_store() if d["sp"]["lastUpdated_lo"] <= UNTIL and not d["deleted"]}
    assert asyncio.run(main()) == expected


def test_since_bounds_the_slices_from_below(mongo_url: str) -> None:
    async def main() -> set[str]:
        async with fresh_database(mongo_url, "export_slices") as db:
            await load(db, bursty_store())
            since = datetime(2026, 3, 1, 9, 0, 1, tzinfo=UTC)  # a second into the burst
            window = store.Window(FIELD, since, UNTIL)
            filt = {FIELD: {"$gt": since, "$lte": UNTIL}}
            return {d["_id"] async for d in store.stream(db, "Observation", filt, window, BATCH, GATHER)}

    found = asyncio.run(main())
    since = datetime(2026, 3, 1, 9, 0, 1, tzinfo=UTC)
    assert found == {d["_id"] for d in bursty_store()
                     if since < d["sp"]["lastUpdated_lo"] <= UNTIL and not d["deleted"]}
    assert "burst-100" not in found and "burst-101" in found  # 09:00:01.000 is not after since


def test_a_groups_members_are_read_in_chunks_and_shared_resources_exported_once(mongo_url: str) -> None:
    members = [f"Patient/m{i:03d}" for i in range(120)]  # three chunks of 50
    moment = datetime(2026, 2, 1, tzinfo=UTC)
    docs = [doc(f"own-{i}", moment, [m]) for i, m in enumerate(members)]
    docs += [doc("shared-1-2", moment, ["Patient/m010", "Patient/m070"]),   # chunks 1 and 2
             doc("shared-2-3", moment, ["Patient/m119", "Patient/m060"]),   # chunks 3 and 2
             doc("with-outsider", moment, ["Patient/zzz", "Patient/m110"]),  # one member, chunk 3
             doc("outsider", moment, ["Patient/zzz"])]

    async def main() -> Counter[str]:
        async with fresh_database(mongo_url, "export_slices") as db:
            await load(db, docs)
            window = store.Window(FIELD, None, UNTIL)
            filt = store.and_({"c": {"$in": members}}, {FIELD: {"$lte": UNTIL}})
            return Counter([d["_id"] async for d in store.stream(db, "Observation", filt, window, BATCH, GATHER)])

    counted = asyncio.run(main())
    assert set(counted) == {f"own-{i}" for i in range(120)} | {"shared-1-2", "shared-2-3", "with-outsider"}
    assert max(counted.values()) == 1


# -- export slots (records/export/slots.py, store.slot_sliced) -------------------------------------

def slotted(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**d, records_store.SLOT: records_store.slot_of(d["_id"])} for d in docs]


def bulk_import() -> list[dict[str, Any]]:
    """What a bulk import leaves: 400 resources with one id prefix, all stamped in the same
    millisecond (time ranges cannot split them, nor id ranges by their spread), 20 deleted, 10
    written after the export's transactionTime."""
    moment = datetime(2026, 5, 1, 9, tzinfo=UTC)
    docs = [doc(f"import-{i}", moment, [f"p{i % 9}"]) for i in range(400)]
    docs += [doc(f"import-gone-{i}", moment, ["p1"], deleted=True) for i in range(20)]
    return docs + [doc(f"import-later-{i}", UNTIL + timedelta(seconds=1 + i), ["p1"]) for i in range(10)]


async def load_slotted(db: Any, docs: list[dict[str, Any]]) -> Any:
    collection = await load(db, docs)
    await collection.create_index([(records_store.SLOT, ASCENDING)])
    return collection


def test_slot_ranges_cover_the_window_once_and_each_stays_near_its_target(mongo_url: str) -> None:
    """A burst in one millisecond with one id prefix: every resource of the window once, in
    reads of about the target (20) each, where a time walk reads the burst in one; a resource
    stored without a slot (a replica of an earlier version) is read by the last, `slot: null`."""
    docs = slotted(bulk_import())
    straggler = doc("written-without-slot", datetime(2026, 5, 2, tzinfo=UTC), ["p2"])
    listener = FindSizes()

    async def main() -> tuple[Counter[str], list[int], list[int]]:
        async with fresh_database(mongo_url, "export_slots", [listener]) as db:
            collection = await load_slotted(db, [*docs, straggler])
            window = store.Window(FIELD, None, UNTIL)
            listener.sizes.clear()
            seen = Counter([d["_id"] async for d in store.slot_sliced(collection, window, 4 * BATCH, BATCH, GATHER)])
            by_slot = list(listener.sizes)
            listener.sizes.clear()
            _ = [d async for d in store.time_sliced(collection, window, 4 * BATCH, BATCH, GATHER)]
            return seen, by_slot, list(listener.sizes)

    seen, by_slot, by_time = asyncio.run(main())
    assert set(seen) == {d["_id"] for d in docs if d["sp"]["lastUpdated_lo"] <= UNTIL} | {straggler["_id"]}
    assert max(seen.values()) == 1, "a resource fell in two slot ranges"
    assert by_slot[-1] == 1  # the straggler, alone in `slot: null`
    # 431 stored, target 20: 22 ranges of about 19 (the window excludes 10 in the datastore).
    assert len(by_slot) == 23 and max(by_slot[:-1]) <= 40, by_slot
    assert max(by_time) >= 400, by_time  # the burst's millisecond, read whole by time


def test_since_is_checked_by_the_datastore_in_each_slot_range(mongo_url: str) -> None:
    moment = datetime(2026, 5, 1, 9, tzinfo=UTC)
    docs = slotted([doc(f"old-{i}", moment, ["p1"]) for i in range(200)]
                   + [doc(f"new-{i}", moment + timedelta(hours=1), ["p1"]) for i in range(30)])
    listener = FindSizes()

    async def main() -> set[str]:
        async with fresh_database(mongo_url, "export_slots", [listener]) as db:
            await load_slotted(db, docs)
            await db[records_store.MIGRATIONS].insert_one({"_id": slots.SLOTS_DONE})
            since = moment + timedelta(minutes=30)
            filt = {FIELD: {"$gt": since, "$lte": UNTIL}}
            listener.sizes.clear()
            return {d["_id"] async for d in store.stream(db, "Observation", filt,
                                                         store.Window(FIELD, since, UNTIL), BATCH, GATHER)}

    assert asyncio.run(main()) == {f"new-{i}" for i in range(30)}
    assert sum(listener.sizes) == 30, listener.sizes  # the 200 older ones never left the datastore


def test_the_backfill_gives_every_document_its_slot_once_and_exports_then_read_by_slot(
        mongo_url: str) -> None:
    """A datastore written before slots: exports read by time until the backfill has filed its
    migration, which gives each document the slot a new write would, and is not run twice."""
    docs = bulk_import()

    async def main() -> None:
        async with fresh_database(mongo_url, "export_slots") as db:
            collection = await load_slotted(db, docs)
            assert not await slots.ready(db)
            assert await slots.backfill(db) == len(docs)
            assert await slots.ready(db)
            async for stored in collection.find({}, {records_store.SLOT: 1}):
                assert stored[records_store.SLOT] == records_store.slot_of(stored["_id"])
            assert await slots.backfill(db) == 0
            listener = FindSizes()
            async with fresh_database(mongo_url, "unused", [listener]) as other:
                twin = other.client[db.name]
                window = store.Window(FIELD, None, UNTIL)
                found = [d["_id"] async for d in store.stream(twin, "Observation", {FIELD: {"$lte": UNTIL}},
                                                               window, BATCH, GATHER)]
            assert sorted(found) == sorted(d["_id"] for d in docs
                                           if not d["deleted"] and d["sp"]["lastUpdated_lo"] <= UNTIL)
            assert max(listener.sizes) <= 40, listener.sizes  # by slot: the burst split

    asyncio.run(main())
