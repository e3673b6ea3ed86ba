"""The audit group commit (gateway.chain.AuditChain.append) when its datastore fails mid-batch:
every waiter learns of the failure and no future is left with an exception nobody retrieved
(asyncio reports those as "Future exception was never retrieved"; seen when a response and its
disclosure records were appended together while the datastore froze).

asyncio calls the loop's exception handler from a future's finalizer when its exception was never
retrieved (https://docs.python.org/3/library/asyncio-dev.html, "Detect never-retrieved
exceptions"), so the test collects what the handler receives."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import subprocess
from datetime import UTC, datetime
from typing import Any

from pymongo import AsyncMongoClient

from gateway import chain, store
from mindchart_cli import stack
from tests.conftest import free_port


def record(tag: str) -> dict[str, Any]:
    return {"_id": tag, "kind": "rest", "request_id": tag, "status": 200,
            "recorded": chain.truncate_to_millis(datetime.now(UTC)),
            "event": {"resourceType": "AuditEvent", "id": tag}}


def test_a_failed_batch_leaves_no_exception_unretrieved() -> None:
    port = free_port()
    process = subprocess.Popen([stack.secantusd(), "--host", "127.0.0.1", "--port", str(port),
                                "--storage-path", ":memory:", "--log-level", "WARNING"])
    url = f"mongodb://127.0.0.1:{port}/?directConnection=true"
    reported: list[str] = []

    async def scenario() -> list[str]:
        asyncio.get_running_loop().set_exception_handler(
            lambda _loop, context: reported.append(str(context["message"])))
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(url, tz_aware=True, timeoutMS=500)
        db = client.chain_failures
        await store.ensure_indexes(db)
        writer = chain.AuditChain(db)
        await writer.append(record("before"))
        os.kill(process.pid, signal.SIGSTOP)  # the datastore freezes: the next batch times out
        try:
            # A response with two disclosures, a request appending behind it, and one whose client
            # went away while it waited for the batch.
            response = asyncio.create_task(writer.append(record("r"), record("d1"), record("d2")))
            behind = asyncio.create_task(writer.append(record("b")))
            gone = asyncio.create_task(writer.append(record("g")))
            await asyncio.sleep(0.05)
            gone.cancel()
            outcomes = await asyncio.gather(response, behind, gone, return_exceptions=True)
        finally:
            os.kill(process.pid, signal.SIGCONT)
        await client.close()
        return [type(o).__name__ for o in outcomes]

    try:
        stack.wait_for_mongo(url, 60, process)
        outcomes = asyncio.run(scenario())
        gc.collect()  # the loop is gone: a future whose exception nobody retrieved is reported now
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert not [m for m in reported if "never retrieved" in m], reported
    # Each waiter was told the records were not stored (the gateway answers those requests 503).
    assert outcomes[0] == outcomes[1] == "NetworkTimeout" and outcomes[2] == "CancelledError"
