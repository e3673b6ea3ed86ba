"""records/cdex: the documented $match score and what a CDex Task must carry."""

from __future__ import annotations

from typing import Any

import pytest

from mindchart_core import errors
from records.cdex import match, requests

CDEX_TEMP = requests.CDEX_TEMP
MEMBER = {"system": "http://payer.example/member-ids", "value": "M-1"}


def patient(**parts: Any) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": "p", **parts}


@pytest.mark.parametrize(("wanted", "expected", "grade"), [
    (patient(identifier=[MEMBER], birthDate="1987-02-20", name=[{"family": "Shaw", "given": ["Amy"]}],
             gender="female"), 1.0, "certain"),
    (patient(identifier=[MEMBER], birthDate="1987-02-20", name=[{"family": "SHAW"}]), 0.9, "certain"),
    (patient(identifier=[MEMBER], birthDate="1987-02-20"), 0.75, "probable"),
    (patient(identifier=[MEMBER]), 0.5, "possible"),
    (patient(birthDate="1987-02-20", name=[{"family": "Shaw"}]), 0.4, "possible"),
    (patient(birthDate="1987-02-20"), 0.25, None),
])
def test_match_score_follows_the_documented_weights(wanted: dict[str, Any], expected: float,
                                                    grade: str | None) -> None:
    candidate = patient(identifier=[MEMBER], birthDate="1987-02-20", gender="female",
                        name=[{"family": "Shaw", "given": ["Amy"]}])
    assert match.score(wanted, candidate) == expected
    assert match.grade(expected) == grade


def task(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "resourceType": "Task", "status": "requested", "intent": "order",
        "code": {"coding": [{"system": CDEX_TEMP, "code": "data-request-code"}]},
        "for": {"reference": "Patient/p"},
        "input": [{"type": {"coding": [{"system": requests.HREX_TEMP, "code": "data-code"}]},
                   "valueCodeableConcept": {"coding": [{"system": "http://loinc.org", "code": "11506-3"}]}}],
    }
    base.update(changes)
    return base


def test_a_data_request_names_its_codes_and_defaults_to_payment_purpose() -> None:
    parsed = requests.parse(task())
    assert parsed.kind == "data"
    assert parsed.codes == [("http://loinc.org", "11506-3")]
    assert parsed.purpose == "HPAYMT"


@pytest.mark.parametrize("changes", [
    {"code": {"coding": [{"system": CDEX_TEMP, "code": "data-request-questionnaire"}]}},
    {"intent": "plan"},
    {"for": {}},
    {"input": []},
    {"for": {"reference": "#nobody"}},
    {"input": [{"type": {"coding": [{"system": CDEX_TEMP, "code": "purpose-of-use"}]},
                "valueCodeableConcept": {"coding": [{
                    "system": requests.ACT_REASON, "code": "HMARKT"}]}}]},
])
def test_requests_records_cannot_serve_are_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(errors.FhirError):
        requests.parse(task(**changes))


def test_an_attachment_request_needs_a_tracking_id_and_a_payer_url() -> None:
    attachment = task(code={"coding": [{"system": CDEX_TEMP, "code": "attachment-request-code"}]})
    with pytest.raises(errors.Unprocessable, match="tracking-id"):
        requests.parse(attachment)
    attachment["identifier"] = [{"type": {"coding": [{"system": CDEX_TEMP, "code": "tracking-id"}]},
                                 "value": "T-1"}]
    with pytest.raises(errors.Unprocessable, match="payer-url"):
        requests.parse(attachment)
