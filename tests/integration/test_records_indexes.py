"""Every US Core search of records selects through an index on the embedded datastore (issue 3
§Search: "searches must stay fast as data grows"), checked with explain() rather than timing.

SecantusDB plans an index only when the whole filter matches one, never uses an index for sort()
and scans for ranges on _id (DESIGN.md). So records queries in two phases (records.store): the
datastore is sent only the driving conjunct (`_id`, patient, compartment, ...), and the policy,
the other parameters and `deleted` are checked on those candidates in Python. What keeps a search
flat from 1k to 100k notes is that phase 1 is an index scan (IXSCAN) that examines only the
patient's documents, not the collection, for a system caller and a patient-scoped one alike.
Data goes in through the real ResourceStore.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pymongo import AsyncMongoClient

from mindchart_core import errors
from mindchart_core.tokens import AccessToken
from records import store
from records.policy import AccessPolicy
from records.resources import RESOURCES
from records.search import query
from tests.records_resources import access_token, phq9_total, progress_note

BASE = "http://127.0.0.1:8000/fhir"
NOTES = 120


def token(scope: str, patient: str | None = None) -> AccessToken:
    return access_token(scope, patient, audience=BASE)


@pytest.fixture(scope="module")
async def db(mongo_url: str) -> AsyncIterator[Any]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_url, tz_aware=True)
    database = client[f"records_idx_{int(time.time())}"]
    await store.ensure_indexes(database)
    writer = store.ResourceStore(client, database, AccessPolicy(token("system/*.cruds"), BASE))
    notes = RESOURCES["DocumentReference"]
    observations = RESOURCES["Observation"]
    for i in range(NOTES):
        pid = f"p{i % 10}"
        await writer.create(notes, progress_note(pid, code=("11506-3", "11510-5")[i % 2],
                                                 date=f"2026-{1 + i % 12:02d}-10T10:00:00Z"))
        await writer.create(observations, phq9_total(pid, i % 27, when=f"2026-{1 + i % 12:02d}-10"))
    yield database
    await client.drop_database(database.name)
    await client.close()


def stages(plan: Any) -> list[str]:
    """Every stage name in a (possibly nested) explain plan."""
    found: list[str] = []
    if isinstance(plan, dict):
        if isinstance(plan.get("stage"), str):
            found.append(plan["stage"])
        for value in plan.values():
            found += stages(value)
    elif isinstance(plan, list):
        for value in plan:
            found += stages(value)
    return found


US_CORE = {
    "DocumentReference": [
        [("_id", "x")],
        [("patient", "p1")],
        [("patient", "p1"), ("category", "clinical-note")],
        [("patient", "p1"), ("category", "clinical-note"), ("date", "ge2026-03-01")],
        [("patient", "p1"), ("type", "http://loinc.org|11506-3")],
        [("patient", "p1"), ("status", "current")],
        [("patient", "p1"), ("type", "11506-3"), ("period", "ge2026-01-01")],
    ],
    "Observation": [
        [("patient", "p1"), ("category", "survey")],
        [("patient", "p1"), ("code", "http://loinc.org|44261-6")],
        [("patient", "p1"), ("category", "survey"), ("date", "ge2026-03-01")],
        [("patient", "p1"), ("code", "44261-6"), ("date", "le2026-06")],
        [("patient", "p1"), ("category", "survey"), ("status", "final")],
        [("patient", "p1"), ("category", "survey"), ("_lastUpdated", "gt2020-01-01")],
    ],
    "Patient": [[("_id", "p1")], [("identifier", "urn:x|1")], [("family", "riv")], [("name", "alex")],
                [("name", "alex"), ("birthdate", "1990")], [("name", "alex"), ("gender", "female")],
                [("family", "riv"), ("gender", "female")], [("given", "al")]],
    "Encounter": [[("patient", "p1")], [("patient", "p1"), ("date", "ge2026-01-01")]],
    "Condition": [[("patient", "p1")], [("patient", "p1"), ("code", "35489007")],
                  [("patient", "p1"), ("category", "problem-list-item")]],
}


@pytest.mark.parametrize("caller", ["system", "patient"])
async def test_every_us_core_search_uses_an_index(db: Any, caller: str) -> None:
    policy = AccessPolicy(token("system/*.rs") if caller == "system" else token("patient/*.rs", "p1"), BASE)
    reader = store.ResourceStore(db.client, db, policy)
    problems = []
    for kind, searches in US_CORE.items():
        definition = RESOURCES[kind]
        for items in searches:
            request = query.parse(definition, items, base_url=BASE, resources=RESOURCES)
            plan = await reader.explain_search(definition, request)
            found = stages(plan.get("queryPlanner", {}).get("winningPlan", plan))
            if "IXSCAN" not in found or "COLLSCAN" in found:
                problems.append(f"{kind}?{items}: {found}")
    assert not problems, "\n".join(problems)


async def test_searches_return_what_the_index_selects(db: Any) -> None:
    """The indexed plan is also the right answer (a guard against an index on the wrong field)."""
    reader = store.ResourceStore(db.client, db, AccessPolicy(token("patient/*.rs", "p1"), BASE))
    definition = RESOURCES["DocumentReference"]
    request = query.parse(definition, [("category", "clinical-note"), ("date", "ge2026-06-01")],
                          base_url=BASE, resources=RESOURCES)
    request.count = 100
    page = await reader.search(definition, request)
    expected = sum(1 for i in range(NOTES) if i % 10 == 1 and 1 + i % 12 >= 6)
    assert len(page.resources) == expected > 0
    assert await reader.count(definition, request) == expected


# The three US Core searches the benchmark measures, and a patient-scoped read by id: phase 1
# examines the patient's candidates (or the one resource), never the collection.
SCALING = [
    ("DocumentReference", [("patient", "p1"), ("category", "clinical-note")], NOTES // 10),
    ("DocumentReference", [("patient", "p1"), ("category", "clinical-note"), ("date", "ge2026-03-01")],
     NOTES // 10),
    ("Observation", [("patient", "p1"), ("code", "http://loinc.org|44261-6")], NOTES // 10),
    ("DocumentReference", [("category", "clinical-note")], NOTES // 10),  # patient token: `c` drives
]


@pytest.mark.parametrize("caller", ["system", "patient"])
async def test_phase_one_examines_the_patients_documents_not_the_collection(db: Any, caller: str) -> None:
    policy = AccessPolicy(token("system/*.rs") if caller == "system" else token("patient/*.rs", "p1"), BASE)
    reader = store.ResourceStore(db.client, db, policy)
    for kind, items, candidates in SCALING:
        definition = RESOURCES[kind]
        if caller == "system" and not any(name == "patient" for name, _ in items):
            continue  # a system caller's category-only search has no selective driver
        request = query.parse(definition, items, base_url=BASE, resources=RESOURCES)
        plan = await reader.explain_search(definition, request)
        assert "IXSCAN" in stages(plan["queryPlanner"]["winningPlan"]), (kind, items)
        stats = plan["executionStats"]
        collection_size = await db[kind].count_documents({})
        assert collection_size == NOTES
        assert stats["totalDocsExamined"] == candidates < collection_size, (kind, items, stats)
        request.count = 100
        matches = (await reader.search(definition, request)).resources
        assert 0 < len(matches) <= candidates


async def test_a_patient_scoped_read_by_id_examines_one_document(db: Any) -> None:
    reader = store.ResourceStore(db.client, db, AccessPolicy(token("patient/*.rs", "p1"), BASE))
    definition = RESOURCES["DocumentReference"]
    mine = await db[definition.type].find_one({"c": "p1"}, {"_id": 1})
    theirs = await db[definition.type].find_one({"c": "p2"}, {"_id": 1})
    request = query.parse(definition, [("_id", mine["_id"])], base_url=BASE, resources=RESOURCES)
    plan = await reader.explain_search(definition, request)
    assert plan["queryPlanner"]["winningPlan"]["inputStage"]["inputStage"]["indexName"] == "_id_"
    assert plan["executionStats"]["totalDocsExamined"] == 1
    assert (await reader.read(definition, mine["_id"])).id == mine["_id"]
    with pytest.raises(errors.NotFound):  # another patient's note does not exist for this caller
        await reader.read(definition, theirs["_id"])


async def test_startup_drops_indexes_no_longer_in_the_spec(db: Any) -> None:
    notes = db["DocumentReference"]
    await notes.create_index([("sp.status", 1), ("sp.category", 1)], name="retired_compound")
    await notes.create_index([("sp._tag", 1)])
    await store.ensure_indexes(db)
    found = {tuple(index["key"]) async for index in await notes.list_indexes()}
    wanted = {tuple(field for field, _ in spec) for spec in store.index_specs(RESOURCES["DocumentReference"])}
    assert found == {("_id",)} | wanted
    assert ("sp.status", "sp.category") not in found and ("sp._tag",) not in found
