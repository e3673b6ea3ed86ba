"""Audit group commit (gateway.chain.AuditChain): concurrent appends share batches (one insert_many
each; the partition's head document moves at most every chain.HEAD_SECONDS), every append returns
only once its record is stored, and the chain still verifies. (The writer's one-time partition claim is not an audit write.)"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

from pymongo import AsyncMongoClient, monitoring

from gateway import chain, chain_verify, store
from tests.conftest import RunningStack


class Writes(monitoring.CommandListener):
    """Each write command sent: (command, records inserted into audit_events, head updates)."""

    def __init__(self) -> None:
        self.commands: list[tuple[str, int, int]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        command = event.command
        if event.command_name == "insert" and command["insert"] == "audit_events":
            self.commands.append(("insert", len(command["documents"]), 0))
        elif event.command_name == "update" and command["update"] == "audit_chain":
            self.commands.append(("update", 0, len(command["updates"])))
        elif event.command_name == "bulkWrite":  # MongoDB 8: a batch and its head update at once
            spaces = [ns["ns"].split(".", 1)[1] for ns in command["nsInfo"]]
            inserts = sum(1 for op in command["ops"] if "insert" in op and spaces[op["insert"]] == "audit_events")
            updates = sum(1 for op in command["ops"] if "update" in op and spaces[op["update"]] == "audit_chain")
            self.commands.append(("bulkWrite", inserts, updates))

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
            result = await chain_verify.verify(db)
            await client.drop_database(db_name)
            return result, list(stored)
        finally:
            await client.close()

    result, stored = asyncio.run(scenario())
    assert result["ok"] is True and result["partitions"] == [{"partition": "1", "checked": 40}]
    assert all(stored)
    batches = sum(1 for _, inserted, _ in writes.commands if inserted)
    assert sum(inserted for _, inserted, _ in writes.commands) == 40
    assert 1 <= batches < 40  # group commit: far fewer batches than records
    # The head document moves with the first batch and then at most every HEAD_SECONDS (all 40
    # took less here), so the other batches are one insert each, with no second write.
    head_moves = sum(updates for _, _, updates in writes.commands)
    assert head_moves == 1
    assert len(writes.commands) <= batches + 1
