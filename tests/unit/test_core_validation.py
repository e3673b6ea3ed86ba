"""mindchart_core.validation: what the fhir.resources models miss, we refuse."""

from __future__ import annotations

from typing import Any

import pytest

from mindchart_core import errors, validation

OBSERVATION: dict[str, Any] = {
    "resourceType": "Observation", "status": "final",
    "code": {"coding": [{"system": "http://loinc.org", "code": "44261-6"}]},
    "subject": {"reference": "Patient/1"}, "valueQuantity": {"value": 12},
}


def with_(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**base, **changes}


def test_a_valid_resource_passes_unchanged() -> None:
    assert validation.validate_resource(dict(OBSERVATION), "Observation") == OBSERVATION


@pytest.mark.parametrize(("body", "fragment"), [
    (with_(OBSERVATION, status="bogus"), "Observation.status must be one of"),
    (with_(OBSERVATION, category=[]), "Empty arrays"),
    (with_(OBSERVATION, note=None), "null"),
    (with_(OBSERVATION, issued=""), "blank"),
    (with_(OBSERVATION, issued="   "), "blank"),
    (with_(OBSERVATION, interpretation=[{}]), "Empty objects"),
    (with_(OBSERVATION, colour="red"), "Unknown element at Observation.colour"),
    (with_(OBSERVATION, effectiveDateTime="2024-13-45"), "Observation.effectiveDateTime"),
    ({k: v for k, v in OBSERVATION.items() if k != "status"}, "Observation.status"),
    (with_(OBSERVATION, extension=[{"url": "http://x", "$where": "1"}]), "Invalid element name"),
])
def test_invalid_resources_are_refused_with_where(body: dict[str, Any], fragment: str) -> None:
    with pytest.raises(errors.FhirError) as caught:
        validation.validate_resource(body, "Observation")
    assert caught.value.status == 400
    assert fragment in caught.value.diagnostics


def test_resource_type_must_match_the_endpoint_and_be_known() -> None:
    with pytest.raises(errors.Invalid, match="does not match"):
        validation.validate_resource(OBSERVATION, "Patient")
    with pytest.raises(errors.Invalid, match="Unknown resourceType"):
        validation.validate_resource({"resourceType": "Starship"})
    with pytest.raises(errors.Structure):
        validation.validate_resource(["not", "a", "resource"])


def test_deep_nesting_is_refused_before_the_models_see_it() -> None:
    deep: dict[str, Any] = {"url": "http://x", "valueString": "leaf"}
    for _ in range(200):
        deep = {"url": "http://x", "extension": [deep]}
    with pytest.raises(errors.Structure, match="too deeply"):
        validation.validate_resource(with_(OBSERVATION, extension=[deep]), "Observation")


def test_outcome_shape() -> None:
    outcome = errors.Forbidden("nope").outcome()
    assert outcome == {"resourceType": "OperationOutcome",
                       "issue": [{"severity": "error", "code": "forbidden", "diagnostics": "nope"}]}
    assert errors.Unauthorized().headers["WWW-Authenticate"].startswith("Bearer")
