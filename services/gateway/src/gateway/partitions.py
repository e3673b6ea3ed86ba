"""The audit trail's partitions: which chains exist, where each one's head is, and which replica
may write each (a lease).

A partition is a head document in `audit_chain`: `{_id: "partition:<name>", partition: <name>,
seq, hash, holder, lease_until}`. A replica starting up takes over a partition whose lease has
lapsed (a replica that stopped, or crashed and whose lease ran out) or, if none is free, creates
the next one; it renews its lease every `lease_seconds / 3` and gives it up when it stops, so a
rolling restart reuses partitions instead of adding one per restart. The lease only keeps writers
apart for speed: correctness comes from the (partition, seq) unique index (chain.py), so a replica
whose lease lapsed while it stalled costs at most a retried batch, never a fork. Lease times are
each replica's own clock, so clocks must agree to well within a lease (30 s by default).

The chain written before partitioning is the `legacy` partition: head `{_id: "head"}`, records
without a `partition` field. It is read and verified like the others and is no longer written.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError

from gateway import store

LEGACY = "legacy"
LEGACY_HEAD_ID = "head"
GENESIS = "0" * 64
_PREFIX = "partition:"
_NEVER = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Partition:
    name: str

    @property
    def head_id(self) -> str:
        return LEGACY_HEAD_ID if self.name == LEGACY else f"{_PREFIX}{self.name}"

    @property
    def field(self) -> str | None:
        """The records' `partition` value (legacy records have none; MongoDB's null matches)."""
        return None if self.name == LEGACY else self.name

    def records(self, seq: Any) -> dict[str, Any]:
        """A filter on this partition's records at `seq` (a value or a range): one compound index."""
        return {"partition": self.field, "seq": seq}


def of_head(doc: dict[str, Any]) -> Partition:
    return Partition(LEGACY if doc["_id"] == LEGACY_HEAD_ID else str(doc["partition"]))


async def heads(db: store.Db) -> list[dict[str, Any]]:
    """Every partition's head document (legacy first if there is one), in name order."""
    docs = await db.audit_chain.find({"_id": {"$in": [LEGACY_HEAD_ID]}}).to_list()
    docs += sorted(await db.audit_chain.find({"kind": "partition"}).to_list(),
                   key=lambda d: (len(str(d["partition"])), str(d["partition"])))
    return docs


async def claim(db: store.Db, holder: str, lease_seconds: float) -> Partition:
    """A partition for `holder` alone until its lease lapses: a free one, else a new one."""
    while True:
        now = datetime.now(UTC)
        until = now + timedelta(seconds=lease_seconds)
        free = await db.audit_chain.find_one_and_update(
            {"kind": "partition", "lease_until": {"$lt": now}},
            {"$set": {"holder": holder, "lease_until": until}}, return_document=ReturnDocument.AFTER)
        if free is not None:
            return Partition(str(free["partition"]))
        taken = [int(d["partition"]) for d in await db.audit_chain.find(
            {"kind": "partition"}, {"partition": 1}).to_list() if str(d["partition"]).isdigit()]
        name = str(max(taken, default=0) + 1)
        try:
            await db.audit_chain.insert_one({
                "_id": f"{_PREFIX}{name}", "kind": "partition", "partition": name, "seq": 0,
                "hash": GENESIS, "holder": holder, "lease_until": until})
        except DuplicateKeyError:  # another replica created it at the same moment: look again
            continue
        return Partition(name)


async def renew(db: store.Db, partition: Partition, holder: str, lease_seconds: float) -> bool:
    """Extend `holder`'s lease; False if another replica has taken the partition over."""
    result = await db.audit_chain.update_one(
        {"_id": partition.head_id, "holder": holder},
        {"$set": {"lease_until": datetime.now(UTC) + timedelta(seconds=lease_seconds)}})
    return result.matched_count == 1


async def release(db: store.Db, partition: Partition, holder: str) -> None:
    await db.audit_chain.update_one({"_id": partition.head_id, "holder": holder},
                                    {"$set": {"lease_until": _NEVER}})
