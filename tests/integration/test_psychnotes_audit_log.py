"""Psychnotes' audit records group-committed (psychnotes.audit_log): the decision and disclosure
of concurrent releases share batches, one insert per collection for a batch of several releases
(one bulkWrite on MongoDB 8, the embedded datastore, for a release alone), and every caller
returns only once its records are stored."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from pymongo import AsyncMongoClient, monitoring

from psychnotes.audit_log import AuditLog


class Writes(monitoring.CommandListener):
    def __init__(self) -> None:
        self.commands: list[str] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name in ("insert", "bulkWrite"):
            self.commands.append(event.command_name)

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


async def test_concurrent_releases_share_batches_and_are_stored_on_return(mongo_url: str) -> None:
    writes = Writes()
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_url, tz_aware=True,
                                                                event_listeners=[writes])
    db = client[f"psychnotes_log_{uuid.uuid4().hex[:8]}"]
    log = AuditLog(db)
    try:
        async def release(i: int) -> bool:
            await log.insert(("decisions", {"_id": f"d{i}", "permit": True}),
                             ("disclosures", {"_id": f"x{i}", "patient": "Patient/p"}))
            return (await db.decisions.find_one({"_id": f"d{i}"}) is not None
                    and await db.disclosures.find_one({"_id": f"x{i}"}) is not None)

        stored = await asyncio.gather(*(release(i) for i in range(40)))
        assert all(stored)
        assert await db.decisions.count_documents({}) == 40
        assert await db.disclosures.count_documents({}) == 40
        # Two writes per release before; now far fewer round trips than releases, and a batch of
        # several releases is one insert per collection (each commits its documents together).
        assert 1 <= len(writes.commands) < 40, writes.commands
        assert "insert" in writes.commands

        writes.commands.clear()
        assert await release(40)  # alone: one round trip for both records
        assert writes.commands == ["bulkWrite"]
    finally:
        await client.drop_database(db.name)
        await client.close()
