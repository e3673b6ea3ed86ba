"""Phase 2 of records' queries decides in Python what the datastore would decide (records.store,
mindchart_core.matcher): a differential test on the real embedded datastore.

Hundreds of filters, built by records' own parser and access policy (every parameter type, prefix,
modifier and precision, alone and in pairs, for system, patient-scoped and granular callers) and
by hand (arrays, missing fields, nulls, mixed types, multikey ranges whose bounds different
elements satisfy vs `$elemMatch`), each answered by the datastore from the whole filter and by the
matcher over the same documents: the id sets must be identical. Then the two-phase executor itself
(`store.select`, `store.count`, `store.stream`) must agree with the datastore on the same filters.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from bson.objectid import ObjectId
from pymongo import AsyncMongoClient

from mindchart_core import errors, matcher
from mindchart_core.tokens import AccessToken
from records import store
from records.everything import _care_clause
from records.policy import AccessPolicy
from records.resources import RESOURCES
from records.search import extract, query
from tests.records_resources import LOINC, access_token, patient, phq9_total, progress_note

BASE = "http://127.0.0.1:8000/fhir"
CONF = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"


def token(scope: str, patient_id: str | None = None) -> AccessToken:
    return access_token(scope, patient_id, audience=BASE)


@pytest.fixture(scope="module")
async def db(mongo_url: str) -> AsyncIterator[Any]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_url, tz_aware=True)
    database = client[f"records_matcher_{int(time.time())}"]
    await store.ensure_indexes(database)
    writer = store.ResourceStore(client, database, AccessPolicy(token("system/*.cruds"), BASE))
    families = ["Rivera", "Zoë Núñez", "rivers", "Chen", "O'Brien"]
    for i, family in enumerate(families):
        body = patient(family, gender=("female", "male", "other")[i % 3],
                       birthDate=("1990-05-17", "1984", "1971-12", "2001-01-01", "1990")[i],
                       identifier=[{"system": "urn:mrn", "value": f"m{i}"}])
        if i == 1:
            body["name"].append({"given": ["Ana", "María"], "text": "Ana María Núñez"})
        if i == 4:
            body.pop("birthDate")
        await writer.create(RESOURCES["Patient"], body, resource_id=f"p{i}")
    for i in range(30):
        pid = f"p{i % 5}"
        note = progress_note(pid, code=("11506-3", "11510-5", "34746-8")[i % 3],
                             date=("2026-01-10T10:00:00Z", "2026-03", "2026-03-15", "2025-12-31T23:30:00-05:00",
                                   "2026-06-01T00:00:00.250Z")[i % 5])
        if i % 4 == 0:
            note["meta"] = {"security": [{"system": CONF, "code": "R"}], "tag": [{"code": "t1"}]}
        if i % 6 == 0:
            note["context"] = {"period": {"start": "2026-02-01", **({"end": "2026-02-03"} if i % 12 else {})}}
        if i % 7 == 0:
            note.pop("date")
        if i % 5 == 1:
            note["identifier"] = [{"system": "urn:doc", "value": f"d{i}"}, {"value": "shared"}]
        created = await writer.create(RESOURCES["DocumentReference"], note)
        if i % 9 == 0:
            await writer.delete(RESOURCES["DocumentReference"], created.id)
        obs = phq9_total(pid, (0, 4.5, 14, 27, 9.99)[i % 5], when=("2026-01", "2026-03-10",
                                                                    "2026-03-10T08:00:00Z")[i % 3],
                         code=("44261-6", "70274-6")[i % 2])
        if i % 8 == 3:
            obs.pop("valueQuantity")
            obs["effectivePeriod"] = {"start": "2026-02-01T00:00:00Z"}
            obs.pop("effectiveDateTime")
        await writer.create(RESOURCES["Observation"], obs)
    await database["Edge"].insert_many(EDGE_DOCS)
    yield database
    await client.drop_database(database.name)
    await client.close()


def _day(day: int) -> datetime:
    return datetime(2026, 1, day, tzinfo=UTC)


EDGE_DOCS: list[dict[str, Any]] = [
    {"_id": "scalar-int", "v": 5, "s": "abc", "t": _day(5)},
    {"_id": "scalar-float", "v": 5.0, "s": "ABC"},
    {"_id": "scalar-string-number", "v": "5", "s": "5"},
    {"_id": "null", "v": None, "s": None, "t": None},
    {"_id": "missing"},
    {"_id": "bool", "v": True, "s": False},
    {"_id": "array-mixed", "v": [1, "7", 10, None], "s": ["abd", "zz"], "t": [_day(2), _day(20)]},
    {"_id": "array-split", "v": [1, 10], "s": ["aa", "zz"]},
    {"_id": "array-inside", "v": [4, 6], "s": ["abc"]},
    {"_id": "array-empty", "v": [], "s": []},
    {"_id": "array-nested", "v": [[5], 7], "s": [["abc"]]},
    {"_id": "date", "v": _day(5), "t": _day(10)},
    {"_id": "oid", "v": ObjectId("0123456789ab0123456789ab")},
    {"_id": "subdocs", "a": [{"b": 1}, {"b": [2, 3]}, {"c": 1}], "sp": {"x": ["a|b", "b"]}},
    {"_id": "subdoc", "a": {"b": 2}, "sp": {"x": "b", "y": None}},
    {"_id": "subdoc-null", "a": {"b": None}, "sp": {}},
    {"_id": "scalars-in-array", "a": [1, 2]},
]

EDGE_FILTERS: list[dict[str, Any]] = [
    {"v": 5}, {"v": 5.0}, {"v": "5"}, {"v": None}, {"v": True}, {"v": 7}, {"v": 1},
    {"v": {"$eq": 5}}, {"v": {"$ne": 5}}, {"v": {"$ne": None}}, {"v": {"$in": [5, "7"]}},
    {"v": {"$in": [None]}}, {"v": {"$nin": [5, None]}}, {"v": {"$nin": []}}, {"v": {"$in": []}},
    {"v": {"$gt": 4}}, {"v": {"$gte": 5}}, {"v": {"$lt": 5}}, {"v": {"$lte": 1}},
    {"v": {"$gt": 5, "$lt": 2}}, {"v": {"$gt": 2, "$lt": 9}}, {"v": {"$elemMatch": {"$gt": 2, "$lt": 9}}},
    {"v": {"$elemMatch": {"$gte": 1}}}, {"v": {"$gt": "4"}}, {"v": {"$lt": "8"}},
    {"v": {"$gte": _day(1)}}, {"v": {"$gt": True}}, {"v": {"$gte": False}},
    {"v": {"$gt": ObjectId("000000000000000000000000")}},
    {"v": {"$exists": True}}, {"v": {"$exists": False}}, {"v": {"$not": {"$gt": 4}}},
    {"v": {"$not": {"$in": [5]}}},
    {"s": {"$regex": "b"}}, {"s": {"$regex": "^ab"}}, {"s": {"$regex": "B"}}, {"s": {"$gte": "ab", "$lt": "ac"}},
    {"s": {"$elemMatch": {"$gte": "ab", "$lt": "ac"}}}, {"s": {"$gte": "b", "$lt": "ab"}},
    {"s": {"$elemMatch": {"$gte": "b", "$lt": "ab"}}}, {"s": "abc"}, {"s": {"$in": ["zz", "5"]}},
    {"t": {"$gt": _day(3), "$lt": _day(15)}}, {"t": {"$elemMatch": {"$gt": _day(3), "$lt": _day(15)}}},
    {"t": {"$lte": datetime(2026, 1, 5, 0, 0, 0, 400, tzinfo=UTC)}}, {"t": {"$gt": "2026"}},
    {"a.b": 1}, {"a.b": 2}, {"a.b": 3}, {"a.b": {"$gt": 1}}, {"a.b": {"$exists": True}},
    {"a.b": {"$exists": False}}, {"a.b": {"$ne": 2}}, {"a.b": {"$in": [3, 9]}},
    {"sp.x": "b"}, {"sp.x": {"$nin": ["b"]}}, {"sp.y": {"$exists": True}}, {"sp.x": {"$exists": False}},
    {"sp.y": None}, {"sp.y": {"$ne": None}},
    {"$or": [{"v": 5}, {"s": "zz"}]}, {"$nor": [{"v": {"$exists": True}}]},
    {"$and": [{"v": {"$gt": 0}}, {"$or": [{"s": {"$regex": "a"}}, {"t": {"$exists": True}}]}]},
    {"_id": {"$gt": "b"}}, {"_id": {"$lt": "array-split"}, "v": {"$ne": 5}},
]


async def _datastore_ids(db: Any, collection: str, filt: dict[str, Any]) -> set[str]:
    return {str(d["_id"]) async for d in db[collection].find(filt, {"_id": 1})}


def _matcher_ids(docs: list[dict[str, Any]], filt: dict[str, Any]) -> set[str]:
    return {str(d["_id"]) for d in docs if matcher.matches(filt, d)}


async def test_hand_written_edge_cases_match_the_datastore(db: Any) -> None:
    docs = await db["Edge"].find({}).to_list()
    problems = []
    for filt in EDGE_FILTERS:
        expected, got = await _datastore_ids(db, "Edge", filt), _matcher_ids(docs, filt)
        if expected != got:
            problems.append(f"{filt}: datastore {sorted(expected)} matcher {sorted(got)}")
    assert not problems, "\n".join(problems)


def _values(kind: str) -> list[list[tuple[str, str]]]:
    """Search parameters of `kind`, one list per parameter: every form query.parse accepts."""
    dates = [f"{p}{v}" for p in ("", "eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")
             for v in ("2026", "2026-03", "2026-03-10", "2026-01-10T10:00:00Z")]
    common = [
        [("_lastUpdated", f"{p}2020-01-01") for p in ("gt", "lt")],
        [("_security", f"{CONF}|R"), ("_security:not", f"{CONF}|R"), ("_tag", "t1"), ("_tag:not", "t1")],
        [("_id", "p1,p2"), ("_id", "nope")],
    ]
    if kind == "Patient":
        return [*common,
                [("name", v) for v in ("riv", "RIV", "zoe", "ana maria", "núñez", "o'b", "x", "ana,chen")],
                [("name:exact", "Rivera"), ("name:exact", "rivera"), ("name:contains", "ver"),
                 ("name:contains", "ia nu"), ("family:exact", "Chen")],
                [("family", "ri"), ("given", "al"), ("given", "marí"), ("family:missing", "true")],
                [("birthdate", d) for d in ("1990", "ge1985", "lt1984-06", "eq1971-12", "ne1990",
                                            "ap2001-01-01", "sa1980")],
                [("birthdate:missing", "true"), ("birthdate:missing", "false")],
                [("gender", "female"), ("gender:not", "male"), ("gender", "female,other")],
                [("identifier", "urn:mrn|m1"), ("identifier", "m2"), ("identifier", "urn:mrn|")]]
    if kind == "DocumentReference":
        return [*common,
                [("patient", "p1"), ("patient", "Patient/p2,p3"), ("subject", "p4"), ("patient", "nobody")],
                [("category", "clinical-note"), ("category:not", "clinical-note")],
                [("type", f"{LOINC}|11506-3"), ("type", "11510-5"), ("type", "|34746-8"), ("type", f"{LOINC}|"),
                 ("type:not", "11506-3")],
                [("date", d) for d in dates],
                [("period", d) for d in ("ge2026-02-02", "le2026-01", "eq2026-02", "ap2026-02-02", "gt2026-03")],
                [("date:missing", "true"), ("period:missing", "false"), ("status", "current")],
                [("identifier", "shared"), ("identifier", "urn:doc|d1"), ("identifier:missing", "true")]]
    return [*common,
            [("patient", "p1"), ("patient", "p0,p4")],
            [("code", f"{LOINC}|44261-6"), ("code", "70274-6"), ("code:not", "44261-6"), ("category", "survey")],
            [("date", d) for d in dates],
            [("value-quantity", v) for v in ("14", "gt4.5", "ge4.5", "lt10", "le0", "ne14", "ap10",
                                             "ap0", "sa9.99", "eb4.5", "14|http://unitsofmeasure.org|{score}",
                                             "4.5,27")],
            [("value-quantity:missing", "true"), ("date:missing", "false")]]


POLICIES = [
    ("system/*.rs", None),
    ("patient/*.rs", "p1"),
    ("patient/*.rs", "nobody"),
    ("patient/DocumentReference.rs?category=clinical-note patient/Observation.rs?code=44261-6 "
     "patient/Patient.rs", "p2"),
    ("system/Observation.rs?code=70274-6 system/Observation.rs?category=survey system/DocumentReference.rs"
     "?type=11506-3 system/Patient.rs?gender=female", None),
]


def _generated_filters(kind: str) -> list[dict[str, Any]]:
    definition = RESOURCES[kind]
    groups = _values(kind)
    searches = [[item] for group in groups for item in group]
    for left, right in itertools.combinations(groups, 2):
        searches += [[a, b] for a, b in zip(left, itertools.islice(itertools.cycle(right), len(left)),
                                             strict=False)]
    filters = []
    for scope, pid in POLICIES:
        try:
            policy_filter = AccessPolicy(token(scope, pid), BASE).filter_for(definition, "search-type")
        except errors.Forbidden:
            continue
        for items in searches:
            request = query.parse(definition, items, base_url=BASE, resources=RESOURCES)
            filters.append(store._and(policy_filter, request.filter, {"deleted": {"$ne": True}}))
    if kind in ("DocumentReference", "Observation"):  # $everything's start/end clauses
        for start, end in (("2026-02", None), (None, "2026-03-01"), ("2026", "2026-03-10")):
            care = _care_clause(definition, start and extract.date_range(start),
                                end and extract.date_range(end))
            filters.append(store._and({"c": "p1"}, care, {"deleted": {"$ne": True}}))
    return filters


@pytest.mark.parametrize("kind", ["DocumentReference", "Observation", "Patient"])
async def test_records_filters_match_the_datastore(db: Any, kind: str) -> None:
    docs = await db[kind].find({}).to_list()
    filters = _generated_filters(kind)
    assert len(filters) > 150
    problems, nonempty = [], 0
    for filt in filters:
        expected, got = await _datastore_ids(db, kind, filt), _matcher_ids(docs, filt)
        nonempty += bool(expected) and len(expected) < len(docs)
        if expected != got:
            problems.append(f"{filt}: datastore {sorted(expected)} matcher {sorted(got)}")
    assert not problems, "\n".join(problems[:20])
    assert nonempty > len(filters) // 5  # the filters discriminate, not all-or-nothing


@pytest.mark.parametrize("kind", ["DocumentReference", "Observation", "Patient"])
async def test_the_two_phase_executor_answers_as_the_datastore(db: Any, kind: str) -> None:
    drivers = store.indexed_fields(kind)
    collection = db[kind]
    for filt in _generated_filters(kind)[::7]:
        expected = [d["_id"] async for d in collection.find(filt, {"_id": 1}).sort("_id", 1)]
        selected = await store.select(collection, filt, drivers, order=[("_id", 1)])
        assert [d["_id"] for d in selected] == expected, filt
        assert all(d.get("raw") is not None for d in selected)
        assert await store.count(collection, filt, drivers) == len(expected)
        streamed = sorted([d["_id"] async for d in store.stream(collection, filt, drivers, 4)])
        assert streamed == expected, filt
        # A candidate cap smaller than the driver's matches falls back to the whole filter.
        capped = await store.matching(collection, filt, drivers, cap=0)
        assert capped is None or capped == []


@pytest.mark.parametrize("filt", [
    {"v": {"$where": "1"}}, {"$where": "1"}, {"v": {"$size": 1}}, {"v": {"$all": [1]}},
    {"v": {"$elemMatch": {"b": 1}}}, {"v": {"b": 1}}, {"v": {"$regex": "a", "$options": "i"}},
    {"v.0": 1}, {"$or": []}, {"v": {"$in": 5}}, {"$expr": {"$eq": ["$v", 1]}}, {"v": {"$gt": None}},
    {"v": {"$type": "string"}}, {"$text": {"$search": "x"}},
])
def test_an_unknown_operator_raises_rather_than_matching(filt: dict[str, Any]) -> None:
    with pytest.raises(matcher.UnsupportedFilter):
        matcher.check(filt)
    with pytest.raises(matcher.UnsupportedFilter):
        for doc in ({"v": [1, "a"]}, {}, {"v": {"b": 1}}):
            matcher.matches(filt, doc)


# -- chained and _has parameters (records.search.chain) ------------------------------------------
# A chain is resolved to ids through the caller's policy, then becomes an ordinary filter: that
# filter, as the datastore evaluates it whole, the matcher evaluates it, and a search answers it,
# must agree, for every kind of caller.

CHAINS: dict[str, list[list[tuple[str, str]]]] = {
    "DocumentReference": [
        [("patient.identifier", "urn:mrn|m1")], [("patient.identifier", "m1,m3")],
        [("subject:Patient.name", "rivera")], [("patient.birthdate", "1990"), ("type", "11510-5")],
        [("patient.gender", "female")], [("patient.identifier", "nobody")],
    ],
    "Patient": [
        [("_has:Observation:patient:code", "44261-6")], [("_has:DocumentReference:subject:type", "34746-8")],
        [("_has:Observation:patient:value-quantity", "gt10")], [("_has:Observation:patient:code", "0000-0")],
        [("_has:Observation:patient:code", "70274-6"), ("gender", "male")],
    ],
}
CALLERS = [token("system/*.rs"), token("patient/*.rs", "p1"),
           token(f"system/Patient.rs system/DocumentReference.rs system/Observation.rs?code={LOINC}|70274-6")]


@pytest.mark.parametrize("kind", sorted(CHAINS))
async def test_chained_filters_match_the_datastore(db: Any, mongo_url: str, kind: str) -> None:
    from records.search import chain

    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_url, tz_aware=True)
    definition = RESOURCES[kind]
    docs = await db[kind].find({}).to_list()
    answers: set[frozenset[str]] = set()
    try:
        for caller in CALLERS:
            reader = store.ResourceStore(client, client[db.name], AccessPolicy(caller, BASE))
            for items in CHAINS[kind]:
                request = chain.parse_search(definition, items, BASE, strict=True)
                request.count = 1000
                await chain.apply(reader, definition, request)
                filt = reader._search_filter(definition, request)
                expected = await _datastore_ids(db, kind, filt)
                assert _matcher_ids(docs, filt) == expected, (items, filt)
                found = {r.id for r in (await reader.search(definition, request)).resources}
                assert found == expected, (items, caller.scope)
                answers.add(frozenset(expected))
    finally:
        await client.close()
    assert len(answers) > 3  # the chains and callers discriminate
