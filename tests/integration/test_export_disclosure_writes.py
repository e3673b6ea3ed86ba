"""An export's disclosure entries are written in commands of bounded size (records/export/store.py
`add_pending_disclosures`, `discard_pending_disclosures`).

The 100k-note export of `make bench` failed because one flush of 5,000 patients' counts went to
the datastore as one command, which outlasted the 5 s socket timeout on SecantusDB. These check,
on a real SecantusDB, that a flush larger than a command's bound is still counted exactly once
per patient, that no write or delete command carries more than the bound, and that a cancelled
job's pending entries are all removed.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pymongo import monitoring

from records.export import store
from tests.integration.conftest import fresh_database

PATIENTS = 2 * store.DISCLOSURE_WRITES + 234


class WriteSizes(monitoring.CommandListener):
    """Statements in each `update` command, and the ids each `delete` command names."""

    def __init__(self) -> None:
        self.updates: list[int] = []
        self.deletes: list[int] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "update":
            self.updates.append(len(event.command["updates"]))
        elif event.command_name == "delete":
            for statement in event.command["deletes"]:
                ids = (statement["q"].get("_id") or {}).get("$in")
                self.deletes.append(len(ids) if ids is not None else -1)

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def job(ident: str) -> dict[str, Any]:
    return {"_id": ident, "client_id": "insurer", "recipient_user": None, "purpose": "PAYMENT"}


def test_a_flush_larger_than_a_command_counts_every_patient_once(mongo_url: str) -> None:
    listener = WriteSizes()
    per_patient = {f"p{i}": 1 + i % 3 for i in range(PATIENTS)}

    async def main() -> dict[str, dict[str, int]]:
        async with fresh_database(mongo_url, "export_disclosures", [listener]) as db:
            await store.ensure_indexes(db)
            await store.add_pending_disclosures(db, job("j1"), "Observation", 1, per_patient)
            await store.add_pending_disclosures(db, job("j1"), "Observation", 1, {"p0": 5})
            await store.add_pending_disclosures(db, job("j1"), "DocumentReference", 2, {"p1": 2})
            await store.record_export_disclosures(db, "j1", {"Observation": 1, "DocumentReference": 2})
            return {d["patient"]: d["counts"] async for d in db.disclosures.find({"state": "recorded"})}

    recorded = asyncio.run(main())
    assert len(recorded) == PATIENTS
    assert recorded["p0"] == {"Observation": 1 + 5}
    assert recorded["p1"] == {"Observation": 2, "DocumentReference": 2}
    assert recorded["p5"] == {"Observation": 3}
    assert max(listener.updates) <= store.DISCLOSURE_WRITES, listener.updates
    assert sum(listener.updates[:3]) == PATIENTS  # the large flush, in three commands


def test_cancelling_a_job_removes_its_pending_entries_in_bounded_deletes(mongo_url: str) -> None:
    listener = WriteSizes()

    async def main() -> tuple[int, int, bool]:
        async with fresh_database(mongo_url, "export_disclosures", [listener]) as db:
            await store.ensure_indexes(db)
            await db.export_jobs.insert_many([{"_id": "j1", "state": "running"},
                                              {"_id": "j2", "state": "running"}])
            await store.add_pending_disclosures(db, job("j1"), "Observation", 1,
                                                {f"p{i}": 1 for i in range(PATIENTS)})
            await store.add_pending_disclosures(db, job("j2"), "Observation", 1, {"p0": 1})
            cancelled = await store.cancel(db, "j1")
            return (await db.disclosures.count_documents({"job": "j1"}),
                    await db.disclosures.count_documents({"job": "j2"}), cancelled)

    left, other, cancelled = asyncio.run(main())
    assert cancelled and left == 0
    assert other == 1, "another job's pending entry was removed"
    assert listener.deletes and max(listener.deletes) <= store.DISCLOSURE_WRITES, listener.deletes
    assert min(listener.deletes) > 0, "a delete named no ids: it is unbounded"
