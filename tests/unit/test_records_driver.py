"""Which conjunct records sends the datastore in phase 1 (query.driving_clause): always one that
every match satisfies, on an indexed field, of a kind SecantusDB answers with an IXSCAN."""

from __future__ import annotations

from records import store
from records.policy import NOTHING
from records.resources import RESOURCES
from records.search import query

BASE = "http://127.0.0.1:8000/fhir"
NOTES = store.indexed_fields("DocumentReference")


def driver(kind: str, items: list[tuple[str, str]], *scope: dict[str, object]) -> dict[str, object] | None:
    request = query.parse(RESOURCES[kind], items, base_url=BASE, resources=RESOURCES)
    filt = store._and(*scope, request.filter, {"deleted": {"$ne": True}})
    return query.driving_clause(filt, store.indexed_fields(kind))


def test_id_then_patient_then_compartment_then_other_equalities_then_ranges() -> None:
    assert driver("DocumentReference", [("patient", "p1"), ("_id", "n1")], {"c": "p1"}) == {
        "_id": {"$in": ["n1"]}}
    assert driver("DocumentReference", [("category", "clinical-note"), ("patient", "p1")], {"c": "p1"}) == {
        "sp.patient": {"$in": ["Patient/p1"]}}
    assert driver("DocumentReference", [("category", "clinical-note")], {"c": "p1"}) == {"c": "p1"}
    assert driver("Observation", [("date", "ge2026"), ("code", "44261-6")]) == {"sp.code": {"$in": ["44261-6"]}}
    ranged = driver("Observation", [("date", "lt2026")])
    assert ranged is not None and set(ranged) == {"sp.date_lo"}


def test_never_a_clause_the_datastore_would_scan_for() -> None:
    # Unindexed fields (status, category, _security, _hi), negations, alternatives, _id ranges.
    assert driver("DocumentReference", [("status", "current"), ("category", "clinical-note")]) is None
    assert driver("DocumentReference", [("_security:not", "x|R"), ("date", "gt2026")]) is None
    assert driver("DocumentReference", [("patient", "p1,p2")]) == {"sp.patient": {"$in": ["Patient/p1", "Patient/p2"]}}
    assert query.driving_clause({"$or": [{"c": "a"}, {"c": "b"}]}, NOTES) is None
    assert query.driving_clause({"$nor": [{"c": "a"}]}, NOTES) is None
    assert query.driving_clause({"_id": {"$gt": "x"}}, NOTES) is None
    assert query.driving_clause(NOTHING, NOTES) == NOTHING  # an empty $in: no candidates at all


def test_a_starts_with_search_drives_as_the_plain_range() -> None:
    clause = driver("Patient", [("family", "riv")])
    assert clause == {"sp.family": {"$gte": "riv", "$lt": "riw"}}  # $elemMatch would COLLSCAN


def test_index_specs_hold_only_drivers() -> None:
    for definition in RESOURCES.values():
        fields = [spec[0][0] for spec in store.index_specs(definition)]
        assert all(len(spec) == 1 for spec in store.index_specs(definition))
        assert not any(f.endswith(("_hi", "_x")) or f in ("sp._security", "sp._tag", "sp.status",
                                                          "sp.category") for f in fields), fields
        assert "c" in fields and "sp.lastUpdated_lo" in fields
