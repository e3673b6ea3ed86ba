"""The subscription outbox (records/subscriptions/outbox.py): a write that triggers a topic stores
its event in the same transaction, a write that fails stores none, a psychotherapy note never
stores one. Driven through records' real ResourceStore on an embedded datastore."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pymongo import AsyncMongoClient

from mindchart_core import errors
from records import bundles, store
from records.policy import AccessPolicy
from records.resources import RESOURCES
from records.subscriptions import outbox, topics
from tests.records_resources import access_token, phq9_total, progress_note

BASE = "http://127.0.0.1:8000/fhir"
NOTES = RESOURCES["DocumentReference"]
TOPIC = {name: f"{topics.TOPIC_BASE}/{name}" for name in topics.TOPICS}


@pytest.fixture
async def db(mongo_url: str) -> AsyncIterator[Any]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_url, tz_aware=True)
    database = client[f"records_outbox_{time.time_ns()}"]
    await store.ensure_indexes(database)
    await outbox.ensure_indexes(database)
    yield database
    await client.drop_database(database.name)
    await client.close()


def writer(db: Any, scope: str = "system/*.cruds", patient: str | None = None) -> store.ResourceStore:
    return store.ResourceStore(db.client, db, AccessPolicy(access_token(scope, patient, audience=BASE), BASE))


async def events(db: Any) -> list[dict[str, Any]]:
    return await db[outbox.EVENTS].find().sort("_id").to_list()


async def test_lifecycle_transitions_are_recorded_with_the_write(db: Any) -> None:
    records = writer(db)
    note = await records.create(NOTES, progress_note("p1", docStatus="preliminary"))
    body = {**progress_note("p1", docStatus="final"), "id": note.id}
    # Written as records/lifecycle's own steps are (`transition=`): plain writes of a draft by
    # anyone but its author, or of a signed note, are refused by the lock (lifecycle/rules.py).
    step = "lifecycle"
    await records.update(NOTES, note.id, body, transition=step)
    await records.update(NOTES, note.id, {**body, "description": "typo fixed"}, transition=step)  # no topic
    await records.update(NOTES, note.id, {**body, "docStatus": "amended"}, transition=step)
    await records.update(NOTES, note.id, {**body, "docStatus": "amended", "status": "entered-in-error"},
                         transition=step)
    await records.create(RESOURCES["Observation"], phq9_total("p1"))
    await records.create(RESOURCES["Observation"], phq9_total("p1", status="preliminary"))
    # records/lifecycle's correction: signing it supersedes the original
    original = await records.create(NOTES, progress_note("p1", docStatus="final"))  # arrives signed
    relates = [{"code": "replaces", "target": {"reference": f"DocumentReference/{original.id}"}}]
    fix = await records.create(NOTES, progress_note("p1", docStatus="preliminary", relatesTo=relates))
    await records.update(NOTES, fix.id, {**progress_note("p1", docStatus="final", relatesTo=relates), "id": fix.id},
                         transition=step)
    await records.update(NOTES, original.id, {**progress_note("p1", docStatus="final", status="superseded"),
                                              "id": original.id}, transition=step)
    got = [(e["type"], e["vid"], e["topics"]) for e in await events(db)]
    assert got == [
        ("DocumentReference", 1, [TOPIC["note-created"]]),
        ("DocumentReference", 2, [TOPIC["note-signed"]]),
        ("DocumentReference", 4, [TOPIC["note-amended"]]),
        ("DocumentReference", 5, [TOPIC["note-entered-in-error"]]),
        ("Observation", 1, [TOPIC["screening-recorded"]]),
        ("DocumentReference", 1, [TOPIC["note-created"], TOPIC["note-signed"]]),
        ("DocumentReference", 1, [TOPIC["note-created"]]),
        ("DocumentReference", 2, [TOPIC["note-signed"], TOPIC["note-amended"]]),
        ("DocumentReference", 2, [TOPIC["note-amended"]]),
    ]
    first = (await events(db))[0]
    assert first["c"] == ["p1"] and first["sp"]["patient"] == ["Patient/p1"]


async def test_a_refused_write_records_no_event(db: Any) -> None:
    patient_writer = writer(db, "patient/*.cruds", patient="p1")
    with pytest.raises(errors.Forbidden):  # another patient's compartment: the transaction aborts
        await patient_writer.create(NOTES, progress_note("p2"))
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:a", "resource": progress_note("p1"), "request": {"method": "POST", "url": "DocumentReference"}},
        {"fullUrl": "urn:uuid:b", "resource": progress_note("p2"), "request": {"method": "POST", "url": "DocumentReference"}},
    ]}
    with pytest.raises(errors.FhirError):  # the second entry is refused: the whole Bundle aborts
        await bundles.process(patient_writer, bundle, BASE, prefer=None)
    assert await events(db) == []
    assert await db.DocumentReference.count_documents({}) == 0


async def test_a_transaction_records_one_event_per_triggering_entry(db: Any) -> None:
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:n1", "resource": progress_note("p3", docStatus="final"),
         "request": {"method": "POST", "url": "DocumentReference"}},
        {"fullUrl": "urn:uuid:o1", "resource": phq9_total("p3"), "request": {"method": "POST", "url": "Observation"}},
    ]}
    await bundles.process(writer(db), bundle, BASE, prefer=None)
    assert sorted(t for e in await events(db) for t in e["topics"]) == sorted(
        [TOPIC["note-created"], TOPIC["note-signed"], TOPIC["screening-recorded"]])


async def test_psychotherapy_notes_never_produce_events(db: Any) -> None:
    labelled = progress_note("p4", meta={"security": [
        {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "PSYTHPN"}]})
    await writer(db).create(NOTES, labelled)
    assert await events(db) == []
