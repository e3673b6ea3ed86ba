"""A throwaway embedded datastore (SecantusDB, in memory) per test module, for tests that speak
to records' store directly rather than through the whole stack."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest
from pymongo import AsyncMongoClient, monitoring
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import AutoReconnect

from mindchart_cli import stack
from tests.conftest import free_port


@pytest.fixture(scope="module")
def mongo_url() -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen([stack.secantusd(), "--host", "127.0.0.1", "--port", str(port),
                                "--storage-path", ":memory:", "--log-level", "WARNING"])
    url = f"mongodb://127.0.0.1:{port}/?directConnection=true"
    try:
        stack.wait_for_mongo(url, 60, process)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@asynccontextmanager
async def fresh_database(mongo_url: str, prefix: str, listeners: Sequence[monitoring.CommandListener] = (),
                         ) -> AsyncIterator[AsyncDatabase[dict[str, Any]]]:
    """A database of its own on the module's datastore (`<prefix>_<random>`), dropped afterwards;
    `.client` is the client it was opened with (with `listeners` as its event listeners)."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_url, tz_aware=True,
                                                                event_listeners=list(listeners))
    database = client[f"{prefix}_{uuid.uuid4().hex[:8]}"]
    try:
        yield database
    finally:
        await client.drop_database(database.name)
        await client.close()


class DropsReplies:
    """The gateway's database, but the first write command's (`insert`, `update`, `delete`)
    reply is lost after the server applied it (the connection drops on the way back), as a
    network failure can do."""

    def __init__(self, db: Any) -> None:
        self._db = db
        self.dropped = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)

    def __getitem__(self, name: str) -> Any:
        return self._db[name]

    async def command(self, body: dict[str, Any], **kwargs: Any) -> Any:
        reply = await self._db.command(body, **kwargs)
        if {"insert", "update", "delete"} & body.keys() and not self.dropped:
            self.dropped += 1
            raise AutoReconnect("connection closed after the write was applied")
        return reply
