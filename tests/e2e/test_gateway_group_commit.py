"""Audit group commit (gateway.chain.AuditChain): concurrent appends share batches (one insert_many
and one head update each), every append returns only once its record is stored, and the chain
still verifies."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

from pymongo import AsyncMongoClient, monitoring

from gateway import chain, store
from tests.conftest import RunningStack


class Writes(monitoring.CommandListener):
    def __init__(self) -> None:
        self.commands: list[tuple[str, str]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name in ("insert", "update"):
            self.commands.append((event.command_name, str(event.command.get(event.command_name))))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def test_concurrent_appends_are_group_committed(live: RunningStack) -> None:
    db_name = f"group_commit_{uuid.uuid4().hex[:8]}"
    writes = Writes()

    async def scenario() -> tuple[dict[str, Any], list[bool]]:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            live.config.mongo_url("gateway"), tz_aware=True, event_listeners=[writes])
        try:
            db = client[db_name]
            await store.ensure_indexes(db)
            await chain.ensure_head(db)
            writer = chain.AuditChain(db)
            writes.commands.clear()

            async def append(i: int) -> bool:
                record = {"_id": f"g{i}", "kind": "rest", "request_id": f"g{i}",
                          "recorded": chain.truncate_to_millis(datetime.now(UTC)),
                          "event": {"resourceType": "AuditEvent", "id": f"g{i}"}}
                await writer.append(record)
                # Acknowledged means stored: the record is there the moment append returns.
                return await db.audit_events.find_one({"_id": f"g{i}"}) is not None

            stored = await asyncio.gather(*(append(i) for i in range(40)))
            result = await chain.verify(db)
            await client.drop_database(db_name)
            return result, list(stored)
        finally:
            await client.close()

    result, stored = asyncio.run(scenario())
    assert result == {"ok": True, "checked": 40, "length": 40}
    assert all(stored)
    inserts = [c for c in writes.commands if c == ("insert", "audit_events")]
    head_updates = [c for c in writes.commands if c == ("update", "audit_chain")]
    assert 1 <= len(inserts) < 40  # batched: far fewer inserts than records
    assert len(head_updates) == len(inserts)  # one head update per batch
