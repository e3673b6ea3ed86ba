"""Bulk export pieces that need no datastore: kick-off parsing (Bulk Data 2.0 §kick-off),
`_elements` subsetting, the withheld-data OperationOutcome and the CapabilityStatement entries."""

from __future__ import annotations

import orjson
import pytest

from mindchart_core import errors
from records import export
from records.export import exporter, kickoff, ndjson
from records.export.settings import ExportSettings
from records.resources import RESOURCES
from tests.fhir_schema import assert_valid

BASE = "https://ehr.example/fhir"


def parse(level: str, pairs: list[tuple[str, object]], *, post: bool = False,
          lenient: bool = False) -> kickoff.ExportRequest:
    return kickoff.parse(level, pairs, post=post, lenient_handling=lenient, base_url=BASE)


def test_group_is_declared_with_a_member_search() -> None:
    group = RESOURCES["Group"]
    assert group.param("member") is not None and group.patient_compartment == ("member.entity",)


def test_every_output_format_spelling_is_accepted() -> None:
    for fmt in kickoff.OUTPUT_FORMATS:
        parse("system", [("_outputFormat", fmt)])
    with pytest.raises(errors.FhirError):
        parse("system", [("_outputFormat", "text/csv")])


def test_repeated_type_parameters_merge_and_patient_level_keeps_compartment_types() -> None:
    request = parse("patient", [("_type", "Observation"), ("_type", "Patient,Observation")])
    assert request.types == ["Observation", "Patient"] and request.explicit_types
    assert "Practitioner" not in parse("patient", []).types
    assert "Practitioner" in parse("system", []).types


def test_unsupported_parameters_fail_unless_lenient() -> None:
    with pytest.raises(errors.FhirError) as refused:
        parse("system", [("includeAssociatedData", "LatestProvenanceResources")])
    assert refused.value.status == 400
    lenient = parse("system", [("includeAssociatedData", "x"), ("_type", "Nope,Patient")], lenient=True)
    assert lenient.types == ["Patient"] and len(lenient.ignored) == 2
    with pytest.raises(errors.FhirError):
        parse("patient", [("patient", "Patient/1")])  # GET: patient is a POST parameter


def test_type_filters_parse_as_searches_and_commas_separate_alternatives() -> None:
    request = parse("system", [("_typeFilter",
                                "Observation?code=http://loinc.org|44261-6,Observation?status=final")])
    assert request.type_filters == {"Observation": ["code=http://loinc.org|44261-6", "status=final"]}
    for bad in ("Observation?_sort=date", "Observation?nope=1", "Nope?x=1", "Observation"):
        with pytest.raises(errors.FhirError):
            parse("system", [("_typeFilter", bad)])


def test_since_must_be_an_instant_and_patient_references_are_read_from_parameters() -> None:
    assert parse("system", [("_since", "2026-01-01T00:00:00Z")]).since is not None
    with pytest.raises(errors.FhirError):
        parse("system", [("_since", "yesterday")])
    pairs = kickoff.parameters_body({"resourceType": "Parameters", "parameter": [
        {"name": "patient", "valueReference": {"reference": "Patient/b"}},
        {"name": "patient", "valueReference": {"reference": f"{BASE}/Patient/a"}}]})
    assert parse("group", pairs, post=True).patients == ["a", "b"]


def test_elements_keep_listed_and_mandatory_elements_and_tag_subsetted() -> None:
    raw = orjson.dumps({"resourceType": "Observation", "id": "o1", "status": "final",
                        "code": {"text": "PHQ-9"}, "subject": {"reference": "Patient/p"},
                        "valueQuantity": {"value": 4}})
    keep = ndjson.elements_for("Observation", ["subject", "Patient.name"])
    reduced = orjson.loads(ndjson.subset(raw, keep))
    assert set(reduced) == {"resourceType", "id", "meta", "status", "code", "subject"}
    assert reduced["meta"]["tag"][0]["code"] == "SUBSETTED"
    assert_valid(reduced)
    assert ndjson.elements_for("Observation", ["Patient.name"]) is None  # nothing listed for it


def test_withheld_outcome_counts_without_ids_and_is_valid() -> None:
    outcome = orjson.loads(exporter.withheld_outcome({"Observation": 3, "Patient": 0}))
    assert_valid(outcome)
    assert len(outcome["issue"]) == 1 and "3 Observation resources withheld" in outcome["issue"][0]["diagnostics"]


def test_capability_statement_gets_the_bulk_data_operations() -> None:
    statement = export.declare({"resourceType": "CapabilityStatement", "rest": [
        {"mode": "server", "resource": [{"type": "Patient"}, {"type": "Group"}]}]})
    assert statement["instantiates"] == ["http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data"]
    names = {r["type"]: [o["name"] for o in r["operation"]] for r in statement["rest"][0]["resource"]}
    assert names == {"Patient": ["export", "everything"], "Group": ["export"]}


@pytest.mark.parametrize("env", [
    {"MINDCHART_RECORDS_EXPORT_PENDING_PATIENTS": "0"},
    {"MINDCHART_RECORDS_EXPORT_RESOURCES_PER_FILE": "-1"},
    {"MINDCHART_RECORDS_EXPORT_BATCH_SIZE": "0"},
    {"MINDCHART_RECORDS_EXPORT_LEASE_SECONDS": "5", "MINDCHART_RECORDS_EXPORT_HEARTBEAT_SECONDS": "5"},
])
def test_settings_that_would_stall_or_double_an_export_are_refused_at_start(
        env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError):
        ExportSettings()


def test_a_replica_may_run_no_export_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINDCHART_RECORDS_EXPORT_WORKERS", "0")
    assert ExportSettings().workers == 0
