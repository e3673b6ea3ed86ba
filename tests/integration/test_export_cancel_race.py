"""Cancelling an export while something else discards its files: the DELETE request's
`store.cancel`, the worker that just lost its lease (`store.discard_files`) and the sweeper
(`store.delete_job`, a cancelled job expires at once) all delete the same GridFS files. Whoever
comes second must find them gone, not fail: before, DELETE on a running export answered 500 now
and then (gridfs NoFile). Repeated, because a race shows only some of the time."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from pymongo import AsyncMongoClient

from records.export import store

ROUNDS = 25
FILES_PER_JOB = 6


async def job_with_files(db: Any, job_id: str) -> None:
    await db.export_jobs.insert_one({"_id": job_id, "state": "running", "attempt": 1, "client_id": "payer",
                                     "subject": "payer", "lease_expires": store.now() + timedelta(seconds=30)})
    grid = store.bucket(db)
    for seq in range(1, FILES_PER_JOB + 1):
        ident = store.grid_id(job_id, "Observation", "output", 1, seq)
        await grid.upload_from_stream_with_id(ident, f"{ident}.ndjson", b'{"resourceType":"Observation"}\n' * 50,
                                              metadata={"job": job_id, "type": "Observation", "attempt": 1})
        await db.export_files.insert_one({"_id": f"{job_id}-{seq}", "job": job_id, "source_type": "Observation",
                                          "attempt": 1, "kind": "output"})


def test_cancel_races_the_worker_and_the_sweeper(mongo_url: str) -> None:
    async def main() -> list[Any]:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_url, tz_aware=True)
        db = client["export_cancel_race"]
        failures: list[Any] = []
        try:
            for round_ in range(ROUNDS):
                job_id = f"race-{round_}"
                await job_with_files(db, job_id)
                results = await asyncio.gather(
                    store.cancel(db, job_id), store.discard_files(db, job_id), store.delete_job(db, job_id),
                    return_exceptions=True)
                failures += [r for r in results if isinstance(r, BaseException)]
                assert await db["export.files"].count_documents({"metadata.job": job_id}) == 0
                assert await db.export_files.count_documents({"job": job_id}) == 0
        finally:
            await client.close()
        return failures

    failures = asyncio.run(main())
    assert failures == [], f"{len(failures)} failures in {ROUNDS} rounds: {failures[:2]!r}"
