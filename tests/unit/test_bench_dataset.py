"""The bench's data for measurement 3: its notes stored in records' own shape (by records'
`stored_document`) with the values its searches look for, patients with equal
numbers of notes, and the flat-filter diagnostic built from records' own search parsing."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson

from bench import dataset
from bench.measures import search
from records.resources import RESOURCES
from records.store import stored_document

BASE = "http://127.0.0.1:8000/fhir"


def test_stored_note_has_records_shape_and_searchable_values() -> None:
    moment = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
    doc = stored_document(RESOURCES["DocumentReference"], dataset.progress_note(23, 10), BASE, moment)
    assert doc["_id"] == "bench-note-23" and doc["vid"] == 1 and doc["deleted"] is False
    assert doc["c"] == ["bench-p2"]
    assert "Patient/bench-p2" in doc["sp"]["patient"]
    body = orjson.loads(bytes(doc["raw"]))
    assert list(body)[:2] == ["resourceType", "id"]
    assert body["meta"]["versionId"] == "1" and body["meta"]["lastUpdated"] == "2026-11-22T12:00:00.000Z"


def test_every_patient_has_the_same_notes_whatever_the_total() -> None:
    per = 10
    assert {dataset.patient_of(i, per) for i in range(per)} == {"bench-p0"}
    days = [dataset.note_day(i, per) for i in range(per)]
    assert days == [dataset.note_day(i + 5 * per, per) for i in range(per)]
    assert dataset.score(0, per)["code"]["coding"][0]["code"] == dataset.PHQ9
    assert dataset.score(1, per)["code"]["coding"][0]["code"] == dataset.GAD7


def test_expected_matches_per_search() -> None:
    expected = {name: n for name, (_, n) in search.searches(10).items()}
    assert expected == {"patient+category": 10, "patient+category+date": 4, "patient+code": 5}


def test_flat_filter_merges_records_clauses_into_one_document() -> None:
    url = search.searches(10)["patient+category+date"][0]("bench-p7")
    collection, flat = search.flat_filter(url, BASE)
    assert collection == "DocumentReference"
    assert "$and" not in flat
    assert flat["deleted"] == {"$ne": True}
    assert any(key.startswith("sp.patient") for key in flat)
    assert any(key.startswith("sp.date") for key in flat)
