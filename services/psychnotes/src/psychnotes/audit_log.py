"""Psychnotes' own audit records (consent decisions and disclosures), group-committed.

A consent-gated read writes two records, the permit and the disclosure of what it released. While
one batch is being written, the records of every other request queue up for the next, so the
datastore work per read falls as load rises. Every caller waits until the batch holding its
records is stored before it answers: nothing released goes unrecorded.

How a batch is written (issue 16, measured on the embedded datastore, SecantusDB 0.7 with
--sync-on-commit): a client `bulkWrite` is one round trip, but SecantusDB runs each of its
operations as an insert of its own, each its own commit; `insert_many` commits a collection's
documents together. So a batch of one request's records (one document per collection) is one
ordered `bulkWrite` (MongoDB 8; one insert per collection on older servers), and a batch of
several requests' records is one insert per collection, decisions first (each a plain `insert`
command, not a retryable write: mindchart_core.inserts): for eight reads'
records, 1.2-1.4 ms instead of 2.6 ms of datastore CPU per read, and the batch is stored in
125-150 ms instead of 280-305 ms (2 commits instead of 16).
"""

from __future__ import annotations

import asyncio
from typing import Any

from pymongo import InsertOne
from pymongo.errors import InvalidOperation

from mindchart_core import inserts
from psychnotes import store


class AuditLog:
    def __init__(self, db: store.Db) -> None:
        self.db = db
        self._pending: list[tuple[list[tuple[str, dict[str, Any]]], asyncio.Future[None]]] = []
        self._lock = asyncio.Lock()
        self._bulk_write = True  # does the server take client bulkWrite (MongoDB 8)?

    async def insert(self, *records: tuple[str, dict[str, Any]]) -> None:
        """Store `(collection, document)` pairs; returns once they are stored."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((list(records), future))
        async with self._lock:
            if not future.done():
                await asyncio.sleep(0)  # let requests ready in this turn of the loop join
                batch, self._pending = self._pending, []
                try:
                    await self._write([r for records_of, _ in batch for r in records_of])
                except Exception as exc:  # every waiter of the batch learns it failed
                    for _, waiter in batch:
                        if not waiter.done():
                            waiter.set_exception(exc)
                else:
                    for _, waiter in batch:
                        if not waiter.done():
                            waiter.set_result(None)
        await future

    async def _write(self, records: list[tuple[str, dict[str, Any]]]) -> None:
        collections = [c for c, _ in records]
        if self._bulk_write and len(set(collections)) == len(collections):
            try:
                await self.db.client.bulk_write(
                    [InsertOne(doc, namespace=f"{self.db.name}.{collection}") for collection, doc in records],
                    ordered=True)
                return
            except InvalidOperation:  # a server before MongoDB 8.0
                self._bulk_write = False
        for collection in dict.fromkeys(collections):
            # Not insert_many: a plain command has no retryable-write bookkeeping on the server
            # (mindchart_core.inserts). Each record has its own `_id`, so it is stored once.
            documents = [doc for c, doc in records if c == collection]
            if await inserts.insert_once(self.db, collection, documents) < len(documents):
                raise RuntimeError(f"an audit record's _id in {collection} was already taken")
