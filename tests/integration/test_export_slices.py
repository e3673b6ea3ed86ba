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

from pymongo import ASCENDING

from records.export import store
from tests.integration.conftest import fresh_database

FIELD = "sp.lastUpdated_lo"
BATCH = 5  # slices of about 4 * BATCH = 20 documents, read only when they hold at most 40
UNTIL = datetime(2026, 6, 1, tzinfo=UTC)


def doc(ident: str, moment: datetime, patients: list[str], *, deleted: bool = False) -> dict[str, Any]:
    return {"_id": ident, "id": ident, "sp": {"lastUpdated_lo": moment}, "c": patients,
            "deleted": deleted, "raw": b"{}"}


def bursty_store() -> list[dict[str, Any]]:
    """Sparse years, then a burst of 300 in three seconds, then one millisecond holding 60 (one
    transaction Bundle), then writes after the export's transactionTime."""
    docs = [doc(f"sparse-{i}", datetime(2019, 1, 1, tzinfo=UTC) + timedelta(days=45 * i), ["p1"])
            for i in range(40)]
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


def test_time_slices_cover_the_window_once_and_each_stays_small(mongo_url: str) -> None:
    async def main() -> tuple[list[int], Counter[str], set[str]]:
        async with fresh_database(mongo_url, "export_slices") as db:
            collection = await load(db, bursty_store())
            sizes, seen = [], Counter[str]()
            window = store.Window(FIELD, None, UNTIL)
            async for bounds in store.time_slices(collection, window, 4 * BATCH):
                found = await collection.find(bounds, {"_id": 1}).to_list()
                sizes.append(len(found))
                seen.update(d["_id"] for d in found)
            streamed = {d["_id"] async for d in store.stream(db, "Observation", {FIELD: {"$lte": UNTIL}},
                                                              window, BATCH)}
            return sizes, seen, streamed

    sizes, seen, streamed = asyncio.run(main())
    expected = {d["_id"] for d in bursty_store() if d["sp"]["lastUpdated_lo"] <= UNTIL}
    assert set(seen) == expected
    assert max(seen.values()) == 1, "a resource fell in two slices"
    # Every slice holds at most 2 * 20 documents, save the one millisecond of the Bundle's 60.
    assert sorted(sizes)[-2] <= 40 and max(sizes) == 60, sizes
    assert len(sizes) >= (300 + 40 + 20) // 40
    assert streamed == {i for i in expected if not i.startswith("gone-")}


def test_since_bounds_the_slices_from_below(mongo_url: str) -> None:
    async def main() -> set[str]:
        async with fresh_database(mongo_url, "export_slices") as db:
            await load(db, bursty_store())
            since = datetime(2026, 3, 1, 9, 0, 1, tzinfo=UTC)  # a second into the burst
            window = store.Window(FIELD, since, UNTIL)
            filt = {FIELD: {"$gt": since, "$lte": UNTIL}}
            return {d["_id"] async for d in store.stream(db, "Observation", filt, window, BATCH)}

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
            return Counter([d["_id"] async for d in store.stream(db, "Observation", filt, window, BATCH)])

    counted = asyncio.run(main())
    assert set(counted) == {f"own-{i}" for i in range(120)} | {"shared-1-2", "shared-2-3", "with-outsider"}
    assert max(counted.values()) == 1
