"""Progress notes for measurement 3, bulk-loaded straight into the records datastore in records'
storage shape: the search values and compartment come from records' own code
(`records.search.extract`, `records.resources`), so what is searched is what records would store.

Note `i` is a US Core progress note (DocumentReference, LOINC 11506-3, category clinical-note)
with one score Observation (PHQ-9 for even `i`, GAD-7 for odd), for patient `bench-p<i // per>`,
dated monthly from 2025-01-01. Every patient has the same number of notes whatever the total, so a
search for one patient matches the same resources at 1k and at 100k: only the store grows.
Documents are built by records' own `store.stored_document`, exactly as records writes version 1.
History entries are not written (search never reads them).
"""

from __future__ import annotations

import asyncio
import base64
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, PyMongoError

from mindchart_cli import seed
from records import store as records_store
from records.resources import RESOURCES
from records.store import stored_document as stored

FIRST_DAY = datetime(2025, 1, 1, 16, 0, tzinfo=UTC)
PHQ9, GAD7 = "44261-6", "70274-6"
NOTE_TEXT = base64.b64encode(
    b"S: Reports low mood most days, poor sleep.\nO: Affect flat, PHQ-9 = 12.\n"
    b"A: Moderate depressive episode (F32.1).\nP: Weekly CBT; sleep hygiene.").decode()
BATCH = 500
DUPLICATE_KEY = 11000


def patient_of(i: int, per_patient: int) -> str:
    return f"bench-p{i // per_patient}"


def note_day(i: int, per_patient: int) -> datetime:
    return FIRST_DAY + timedelta(days=30 * (i % per_patient))


def progress_note(i: int, per_patient: int) -> dict[str, Any]:
    day = note_day(i, per_patient)
    return {
        "resourceType": "DocumentReference", "id": f"bench-note-{i}", "status": "current",
        "meta": {"security": seed.RESTRICTED_BH},
        "type": {"coding": [{"system": seed.LOINC, "code": "11506-3", "display": "Progress note"}]},
        "category": [{"coding": [seed.CLINICAL_NOTE]}],
        "subject": {"reference": f"Patient/{patient_of(i, per_patient)}"},
        "date": day.isoformat().replace("+00:00", "Z"),
        "author": [{"reference": f"Practitioner/{seed.DEMO_THERAPIST}"}],
        "content": [{"attachment": {"contentType": "text/plain", "data": NOTE_TEXT}}],
        "context": {"period": {"start": (day - timedelta(hours=1)).isoformat().replace("+00:00", "Z"),
                               "end": (day - timedelta(minutes=5)).isoformat().replace("+00:00", "Z")}},
    }


def score(i: int, per_patient: int) -> dict[str, Any]:
    code, display = (PHQ9, "PHQ-9 total score") if i % 2 == 0 else (GAD7, "GAD-7 total score")
    return {
        "resourceType": "Observation", "id": f"bench-obs-{i}", "status": "final",
        "meta": {"security": seed.RESTRICTED_BH},
        "category": [{"coding": [seed.SURVEY]}],
        "code": {"coding": [{"system": seed.LOINC, "code": code, "display": display}]},
        "subject": {"reference": f"Patient/{patient_of(i, per_patient)}"},
        "effectiveDateTime": note_day(i, per_patient).isoformat().replace("+00:00", "Z"),
        "performer": [{"reference": f"Practitioner/{seed.DEMO_THERAPIST}"}],
        "valueQuantity": {"value": 5 + i % 20, "system": "http://unitsofmeasure.org",
                          "code": "{score}", "unit": "{score}"},
        "derivedFrom": [{"reference": f"DocumentReference/bench-note-{i}"}],
    }


@dataclass
class Loaded:
    notes: int  # notes [0, notes) are stored, each with its score
    load_seconds: float
    index_seconds: float  # rebuilding records' indexes after the load
    stopped: str | None = None  # why loading stopped short of what was asked, if it did


async def _insert(collection: Any, docs: list[dict[str, Any]]) -> None:
    """Insert, keeping what an earlier attempt stored (a duplicate `_id` means "already there")."""
    try:
        await collection.insert_many(docs, ordered=False)
    except BulkWriteError as exc:
        errors = exc.details.get("writeErrors", [])
        if not errors or any(e.get("code") != DUPLICATE_KEY for e in errors):
            raise


async def _insert_batch(db: AsyncDatabase[dict[str, Any]], numbers: range, per_patient: int,
                        base_url: str) -> None:
    """Notes `numbers` and their scores; a failed batch is tried once more."""
    notes, scores = RESOURCES["DocumentReference"], RESOURCES["Observation"]
    for attempt in (1, 2):
        moment = records_store.now()
        try:
            # Two collections, two connections: the datastore serves each on its own thread.
            await asyncio.gather(
                _insert(db[notes.type], [stored(notes, progress_note(i, per_patient), base_url, moment)
                                         for i in numbers]),
                _insert(db[scores.type], [stored(scores, score(i, per_patient), base_url, moment)
                                          for i in numbers]))
            return
        except PyMongoError:
            if attempt == 2:
                raise
            await asyncio.sleep(1)


async def _drop_search_indexes(db: AsyncDatabase[dict[str, Any]]) -> None:
    for kind in ("DocumentReference", "Observation"):
        for name in await db[kind].index_information():
            if name != "_id_":
                await db[kind].drop_index(name)


async def load_notes(db: AsyncDatabase[dict[str, Any]], first: int, last: int, per_patient: int,
                     base_url: str, budget_s: float = float("inf")) -> Loaded:
    """Insert notes [first, last) with their scores, as a bulk import would: records' secondary
    indexes on the two collections are dropped first and rebuilt by records' own
    `ensure_indexes` after (inserting with ~20 indexes in place ran at ~80 notes/s on SecantusDB,
    without them ~1000/s). Loading stops after the batch that exhausts `budget_s`, or at the last
    good batch if the datastore fails one twice; the result says which."""
    started = time.perf_counter()
    done, stopped = first, None
    try:
        await _drop_search_indexes(db)
    except PyMongoError as exc:  # loading with the indexes in place is slower, not wrong
        stopped = f"dropping the search indexes failed ({type(exc).__name__}: {exc}"[:200]
        stopped += "); loaded with them in place"
    try:
        for start in range(first, last, BATCH):
            numbers = range(start, min(start + BATCH, last))
            try:
                await _insert_batch(db, numbers, per_patient, base_url)
            except PyMongoError as exc:
                stopped = f"the datastore failed the batch at note {start} twice: {type(exc).__name__}: {exc}"
                stopped = stopped[:300]
                break
            done = numbers[-1] + 1
            elapsed = time.perf_counter() - started
            if done < last and elapsed + elapsed * BATCH / (done - first) > budget_s:
                stopped = f"the {budget_s:.0f} s load budget ran out"
                break
    finally:
        loaded = time.perf_counter()
        await _rebuild_indexes(db)
    return Loaded(done, loaded - started, time.perf_counter() - loaded, stopped)


async def _rebuild_indexes(db: AsyncDatabase[dict[str, Any]]) -> None:
    for attempt in (1, 2):
        try:
            await records_store.ensure_indexes(db)
            return
        except PyMongoError as exc:
            if attempt == 2:
                raise RuntimeError(f"rebuilding records' indexes failed twice: {type(exc).__name__}: "
                                   f"{exc}"[:300]) from exc
            await asyncio.sleep(2)
