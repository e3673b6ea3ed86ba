"""mindchart_core.inserts on the embedded datastore: audit records are plain `insert` commands
(no retryable-write bookkeeping), stored exactly once when a reply is lost; idempotent updates
and deletes likewise, applied once in effect when sent twice."""

from __future__ import annotations

from typing import Any

import pytest
from pymongo.errors import OperationFailure

from mindchart_core import inserts
from tests.integration.conftest import DropsReplies, fresh_database


async def test_a_lost_reply_is_sent_again_and_each_document_is_stored_once(mongo_url: str) -> None:
    async with fresh_database(mongo_url, "inserts") as db:
        flaky = DropsReplies(db)
        documents = [{"_id": f"d{i}", "n": i} for i in range(5)]
        assert await inserts.insert_once(flaky, "decisions", documents) == 5
        assert flaky.dropped == 1
        stored = await db.decisions.find({}).sort("n", 1).to_list()
        assert [d["_id"] for d in stored] == [f"d{i}" for i in range(5)]


async def test_documents_already_stored_count_and_the_rest_follow(mongo_url: str) -> None:
    """What an earlier send stored before the connection dropped (a prefix of an ordered insert)
    is recognised by `_id`; the others are inserted after it."""
    async with fresh_database(mongo_url, "inserts") as db:
        await db.disclosures.insert_many([{"_id": "d0", "n": 0}, {"_id": "d1", "n": 1}])
        documents: list[dict[str, Any]] = [{"_id": f"d{i}", "n": i} for i in range(4)]
        assert await inserts.insert_once(db, "disclosures", documents) == 4
        assert await db.disclosures.count_documents({}) == 4


async def test_a_document_without_its_own_id_is_refused_before_anything_is_sent(mongo_url: str) -> None:
    async with fresh_database(mongo_url, "inserts") as db:
        with pytest.raises(ValueError, match="_id"):
            await inserts.insert_once(db, "decisions", [{"_id": "a"}, {"n": 1}])
        assert await db.decisions.count_documents({}) == 0


async def test_idempotent_updates_and_deletes_sent_again_after_a_lost_reply_apply_once(
        mongo_url: str) -> None:
    async with fresh_database(mongo_url, "inserts") as db:
        await db.disclosures.insert_many([{"_id": f"d{i}", "state": "pending", "n": 0} for i in range(4)])
        flaky = DropsReplies(db)
        await inserts.write_idempotent(flaky, "update", "disclosures", [
            {"q": {"_id": f"d{i}", "state": "pending"}, "u": {"$set": {"state": "recorded"}, "$inc": {"n": 1}}}
            for i in range(2)])
        assert flaky.dropped == 1  # the first send was applied; its reply was lost; it went again
        await inserts.write_idempotent(db, "delete", "disclosures",
                                       [{"q": {"_id": "d3", "state": "pending"}, "limit": 1}])
        stored = {d["_id"]: (d["state"], d["n"]) for d in await db.disclosures.find({}).to_list()}
        assert stored == {"d0": ("recorded", 1), "d1": ("recorded", 1), "d2": ("pending", 0)}


async def test_a_write_error_is_raised_not_swallowed(mongo_url: str) -> None:
    async with fresh_database(mongo_url, "inserts") as db:
        await db.disclosures.insert_one({"_id": "d0", "state": "pending"})
        with pytest.raises(OperationFailure):
            await inserts.write_idempotent(db, "update", "disclosures",
                                           [{"q": {"_id": "d0"}, "u": {"$set": {"_id": "other"}}}])
