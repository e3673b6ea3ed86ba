"""Records search parsing, JSON Patch and result shaping, without a server (fast checks of the
rules the e2e suites exercise through the gateway)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from mindchart_core import errors
from records import patch, subsetting
from records.resources import RESOURCES
from records.search import extract, query

BASE = "https://ehr.example/fhir"
NOTES = RESOURCES["DocumentReference"]


def parse(*items: tuple[str, str], strict: bool = False) -> query.SearchRequest:
    return query.parse(NOTES, list(items), base_url=BASE, strict=strict, resources=RESOURCES)


def test_repeated_parameters_and_commas_or() -> None:
    request = parse(("status", "current,superseded"), ("type", "11506-3"))
    assert request.filter == {"$and": [{"sp.status": {"$in": ["current", "superseded"]}},
                                       {"sp.type": {"$in": ["11506-3"]}}]}
    assert request.applied == [("status", "current,superseded"), ("type", "11506-3")]


@pytest.mark.parametrize(("value", "ref"), [
    ("123", "Patient/123"), ("Patient/123", "Patient/123"), (f"{BASE}/Patient/123", "Patient/123"),
    ("Patient/123/_history/2", "Patient/123"),
])
def test_reference_forms(value: str, ref: str) -> None:
    assert parse(("patient", value)).filter == {"sp.patient": {"$in": [ref]}}


def test_string_prefix_is_an_index_range_and_exact_is_verbatim() -> None:
    family = query.param_clause(RESOURCES["Patient"].param("family"), "", "Zoë", BASE)  # type: ignore[arg-type]
    assert family == {"sp.family": {"$elemMatch": {"$gte": "zoe", "$lt": "zof"}}}
    exact = query.param_clause(RESOURCES["Patient"].param("family"), "exact", "Zoë", BASE)  # type: ignore[arg-type]
    assert exact == {"sp.family_x": "Zoë"}


def test_partial_dates_are_ranges() -> None:
    lo, hi = extract.date_range("2026-02")
    assert (lo.isoformat(), hi.isoformat()) == ("2026-02-01T00:00:00+00:00", "2026-03-01T00:00:00+00:00")
    lo, hi = extract.date_range("2026-11-12T15:30:00+01:00")
    assert lo.isoformat() == "2026-11-12T14:30:00+00:00" and (hi - lo).total_seconds() == 1


@pytest.mark.parametrize("items", [
    [("patient[$ne]", "x")], [("code", '{"$where": "1"}')], [("status", "$ne")], [("_count", "5000")],
    [("_cursor", "!!")], [("_sort", "colour")], [("_include", "Observation:subject")],
    [("date", "2026-02-30")], [("patient", "Patient/../../x")],
])
def test_hostile_or_invalid_values_are_refused(items: list[tuple[str, str]]) -> None:
    with pytest.raises(errors.FhirError) as raised:
        parse(*items)
    assert raised.value.status == 400


def test_unknown_parameters_are_ignored_unless_strict() -> None:
    assert parse(("colour", "blue")).ignored == ["colour"]
    with pytest.raises(errors.Invalid):
        parse(("colour", "blue"), strict=True)


def test_cursor_round_trip_is_opaque_and_checked() -> None:
    cursor = query.Cursor(True, ["2026-01-01T00:00:00.000000", 3.5, None], "abc")
    assert query.Cursor.decode(cursor.encode()) == cursor
    with pytest.raises(errors.Invalid):
        query.Cursor.decode("eyJ4IjoxfQ")  # valid base64 of {"x":1}


def test_driving_field_prefers_selective_equalities() -> None:
    indexed = {"_id", "c", "sp.patient", "sp.category", "sp.date_lo", "sp.date_hi"}
    filt: dict[str, Any] = {"$and": [{"c": "p1"}, {"$and": [
        {"sp.category": {"$in": ["clinical-note"]}}, {"sp.patient": {"$in": ["Patient/p1"]}},
        {"sp.date_hi": {"$gt": 1}}]}, {"deleted": {"$ne": True}}]}
    assert query.driving_field(filt, indexed) == "sp.patient"
    assert query.driving_field({"$and": [{"sp.date_hi": {"$gt": 1}}, {"deleted": {"$ne": True}}]},
                               indexed) == "sp.date_hi"
    assert query.driving_field({"_id": {"$gt": "x"}}, indexed) is None  # ranges on _id scan
    assert query.driving_field({"$or": [{"c": "a"}, {"c": "b"}]}, indexed) is None


MAX = 1024 * 1024  # records' default max_body_bytes


def test_json_patch_operations_and_guards() -> None:
    resource = {"resourceType": "Patient", "id": "1", "meta": {"versionId": "1"}, "name": [{"family": "A"}]}
    patched = patch.apply(resource, [
        {"op": "add", "path": "/name/-", "value": {"family": "B"}},
        {"op": "copy", "from": "/name/0", "path": "/name/0"},
        {"op": "move", "from": "/name/2", "path": "/name/1"},
        {"op": "replace", "path": "/name/0/family", "value": "C"},
        {"op": "test", "path": "/name/1/family", "value": "B"},
        {"op": "remove", "path": "/name/2"},
    ], max_bytes=MAX)
    assert patched["name"] == [{"family": "C"}, {"family": "B"}]
    assert resource["name"] == [{"family": "A"}]  # the input is never changed
    for bad in ([{"op": "replace", "path": "/id", "value": "2"}],
                [{"op": "remove", "path": "/meta"}],
                [{"op": "add", "path": "/meta/versionId", "value": "9"}],
                [{"op": "remove", "path": "/nothing"}]):
        with pytest.raises(errors.Unprocessable):
            patch.apply(resource, bad, max_bytes=MAX)
    for malformed in ({}, [], [{"op": "frobnicate", "path": "/name"}], [{"path": "/name"}]):
        with pytest.raises(errors.Invalid):
            patch.apply(resource, malformed, max_bytes=MAX)


def test_json_patch_result_is_bounded_as_it_is_applied() -> None:
    """Each copy of an array into itself doubles the document: 30 of them ask for ~100 GiB.
    Refused at the limit, long before."""
    resource = {"resourceType": "Patient", "id": "1", "name": [{"family": "A" * 100}]}
    bomb = [{"op": "copy", "from": "/name", "path": "/name/-"}] * 30
    with pytest.raises(errors.FhirError) as refused:
        patch.apply(resource, bomb, max_bytes=MAX)
    assert (refused.value.status, refused.value.code) == (422, "too-costly")
    many_adds = [{"op": "add", "path": "/name/-", "value": {"family": "B" * 1000}}] * 400
    with pytest.raises(errors.FhirError):
        patch.apply(resource, many_adds, max_bytes=100_000)
    # A patch that stays under the limit still applies, however it gets there.
    assert len(orjson.dumps(patch.apply(resource, bomb[:5], max_bytes=MAX))) > 32 * 100


def test_summary_and_elements_keep_mandatory_parts_and_tag_subsetted() -> None:
    raw = orjson.dumps({"resourceType": "Observation", "id": "1", "status": "final",
                        "code": {"text": "PHQ-9"}, "text": {"status": "generated", "div": "<div/>"},
                        "note": [{"text": "long"}], "valueQuantity": {"value": 9}})
    summary = orjson.loads(subsetting.subset(raw, "true", None))
    assert "note" not in summary and "text" not in summary and summary["valueQuantity"] == {"value": 9}
    assert summary["meta"]["tag"] == [subsetting.SUBSETTED]
    data = orjson.loads(subsetting.subset(raw, "data", None))
    assert "text" not in data and data["note"]
    elements = orjson.loads(subsetting.subset(raw, None, ["valueQuantity"]))
    assert set(elements) == {"resourceType", "id", "meta", "status", "code", "valueQuantity"}
    assert subsetting.subset(raw, None, None) is raw
