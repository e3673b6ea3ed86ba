"""The bad-input catalogue: hostile but well-formed (and not well-formed) requests get a clear 4xx
with an OperationOutcome, store nothing, and leave records healthy."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import pytest

from tests.resilience.conftest import ResilientStack, report

IDENT = "urn:mindchart:bad-input"


def _patient(marker: str, **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Patient", "identifier": [{"system": IDENT, "value": marker}], **extra}


def _nested(depth: int) -> dict[str, Any]:
    node: dict[str, Any] = {"url": "http://example.org/x", "valueString": "leaf"}
    for _ in range(depth):
        node = {"url": "http://example.org/x", "extension": [node]}
    return node


# (name, JSON-able resource or raw bytes); each is sent as a create of a Patient, Observation or
# Encounter carrying a unique identifier, so "nothing stored" is a search for that identifier.
def catalogue(marker: str) -> list[tuple[str, str, Any]]:
    obs = {"resourceType": "Observation", "status": "final", "code": {"text": "PHQ-9"},
           "identifier": [{"system": IDENT, "value": marker}]}
    enc = {"resourceType": "Encounter", "status": "finished", "class": {"code": "AMB"},
           "identifier": [{"system": IDENT, "value": marker}]}
    return [
        ("boolean as string", "Patient", _patient(marker, active="yes")),
        ("integer as boolean", "Patient", _patient(marker, multipleBirthInteger=True)),
        ("score as string", "Observation", {**obs, "valueQuantity": {"value": "21"}}),
        ("dateTime as number", "Observation", {**obs, "effectiveDateTime": 5}),
        ("period start as number", "Encounter", {**enc, "period": {"start": 5}}),
        ("string as number", "Patient", _patient(marker, name=[{"family": 5}])),
        ("date edge with offset", "Encounter", {**enc, "period": {"start": "0001-01-01T00:00:00+14:00"}}),
        ("date edge at year 9999", "Encounter", {**enc, "period": {"start": "9999-12-31T23:59:59-14:00"}}),
        ("impossible date", "Patient", _patient(marker, birthDate="2023-02-30")),
        ("deep nesting", "Patient", _patient(marker, extension=[_nested(60)])),
        ("huge array", "Patient", _patient(marker, name=[{"family": "x"}] * 200_000)),
        ("mongodb operator key", "Patient", _patient(marker, **{"$where": "1"})),
        ("mongodb operator in value", "Patient", _patient(marker, name=[{"family": {"$ne": 1}}])),
        ("NUL byte in element name", "Patient", _patient(marker, **{"act\u0000ive": True})),
        ("null value", "Patient", _patient(marker, active=None)),
        ("unknown element", "Patient", _patient(marker, favouriteColour="blue")),
        ("NaN", "Patient", f'{{"resourceType":"Patient","identifier":[{{"system":"{IDENT}",'
                           f'"value":"{marker}"}}],"multipleBirthInteger":NaN}}'.encode()),
        ("duplicate keys", "Patient", f'{{"resourceType":"Patient","identifier":[{{"system":"{IDENT}",'
                                      f'"value":"{marker}"}}],"active":true,"active":"x"}}'.encode()),
        ("invalid UTF-8", "Patient", b'{"resourceType":"Patient","identifier":[{"system":"' +
         IDENT.encode() + b'","value":"' + marker.encode() + b'"}],"name":[{"family":"\xff\xfe"}]}'),
        ("not JSON", "Patient", b"{resourceType: Patient"),
    ]


def _send(fhir: httpx.Client, resource_type: str, body: Any) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return fhir.post(f"/{resource_type}", content=content)


def test_bad_input_catalogue(resilient: ResilientStack, fhir: httpx.Client) -> None:
    refused = stored = 0
    problems: list[str] = []
    for name, resource_type, body in catalogue(marker := f"bad-{uuid.uuid4().hex[:10]}"):
        r = _send(fhir, resource_type, body)
        if not 400 <= r.status_code < 500:
            problems.append(f"{name}: {r.status_code} {r.text[:200]}")
            continue
        outcome = r.json()
        if outcome.get("resourceType") != "OperationOutcome":
            problems.append(f"{name}: not an OperationOutcome")
        refused += 1
        found = fhir.get(f"/{resource_type}", params={"identifier": f"{IDENT}|{marker}"})
        if found.json().get("total", len(found.json().get("entry", []))):
            stored += 1
            problems.append(f"{name}: stored")
        assert httpx.get(f"{resilient.direct_url('records')}/readyz", timeout=10).status_code == 200
    report("bad-input catalogue", requests=len(catalogue(marker)), refused_4xx=refused,
           stored=stored, **{"5xx": sum(": 5" in p for p in problems)})
    assert not problems, problems


@pytest.mark.parametrize(("resource", "element"), [
    ({"resourceType": "Patient", "active": "yes"}, "Patient.active"),
    ({"resourceType": "Observation", "status": "final", "code": {"text": "PHQ-9"},
      "valueQuantity": {"value": "21"}}, "Observation.valueQuantity.value"),
])
def test_validate_refuses_typed_primitive_violations(fhir: httpx.Client, resource: dict[str, Any],
                                                     element: str) -> None:
    r = fhir.post(f"/{resource['resourceType']}/$validate", json=resource)
    outcome = r.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert any(i["severity"] == "error" and element in json.dumps(i) for i in outcome["issue"]), outcome


@pytest.mark.parametrize("search", [
    {"identifier": '{"$ne": null}'}, {"family": "$where"}, {"_id": '{"$gt": ""}'},
    {"birthdate": "ge0001-01-01T00:00:00+14:00"}, {"birthdate": "le9999-12-31T23:59:59-14:00"},
    {"family": "a\u0000b"},
])
def test_hostile_search_values_are_4xx_or_empty(fhir: httpx.Client, search: dict[str, str]) -> None:
    r = fhir.get("/Patient", params=search)
    assert r.status_code < 500, r.text
    body = r.json()
    if r.status_code == 200:
        assert body["resourceType"] == "Bundle"
        assert not body.get("entry"), "an operator-shaped search value matched resources"
    else:
        assert body["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize(("period", "statuses"), [
    ({"start": "2026-01-01", "end": "9999-12-31"}, {201}),  # "until revoked": the latest day there is
    ({"start": "0001-01-01T00:00:00+14:00", "end": "2030-01-01"}, {400, 422}),  # before year 1 in UTC
    ({"start": "2026-01-01", "end": "9999-12-31T23:59:59-14:00"}, {400, 422}),  # after 9999 in UTC
])
def test_psychnotes_consent_dates_at_the_edges(resilient: ResilientStack, period: dict[str, str],
                                               statuses: set[int]) -> None:
    from tests.e2e.test_psychnotes import authorization, headers, patient_token

    patient_id = f"edge-{uuid.uuid4().hex[:8]}"
    consent = authorization(patient_id, recipient={"reference": "Practitioner/edge"},
                            data_period={"start": "2026-01-01"})
    consent["provision"]["period"] = period
    r = httpx.post(f"{resilient.psychnotes}/Consent", headers=headers(patient_token(resilient, patient_id)),
                   json=consent, timeout=30)
    assert r.status_code in statuses, r.text
    assert r.json()["resourceType"] in ("Consent", "OperationOutcome")
    assert httpx.get(f"{resilient.direct_url('psychnotes')}/readyz", timeout=10).status_code == 200
