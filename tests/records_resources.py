"""Records test data and answers shared by the records test modules: US Core-shaped builders
(Patient, progress note, PHQ-9 total), small checks of FHIR answers, and verified-token stand-ins
for tests that drive records' store directly."""

from __future__ import annotations

import base64
import time
from typing import Any

import httpx

from mindchart_core import scopes
from mindchart_core.tokens import AccessToken

LOINC = "http://loinc.org"
NOTE_CATEGORY = "http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"


def patient(family: str = "Rivera", **changes: Any) -> dict[str, Any]:
    body = {"resourceType": "Patient", "name": [{"family": family, "given": ["Alex"]}],
            "gender": "other", "birthDate": "1990-05-17"}
    body.update(changes)
    return body


def progress_note(patient_id: str, *, code: str = "11506-3", date: str = "2026-11-20T10:00:00Z",
                  text: str = "S: low mood. O: PHQ-9 14. A: moderate. P: CBT weekly.",
                  **changes: Any) -> dict[str, Any]:
    note = {
        "resourceType": "DocumentReference", "status": "current",
        "type": {"coding": [{"system": LOINC, "code": code}]},
        "category": [{"coding": [{"system": NOTE_CATEGORY, "code": "clinical-note"}]}],
        "subject": {"reference": f"Patient/{patient_id}"},
        "date": date,
        "content": [{"attachment": {"contentType": "text/plain",
                                    "data": base64.b64encode(text.encode()).decode()}}],
    }
    note.update(changes)
    return note


def phq9_total(patient_id: str, score: float = 14, *, when: str = "2026-11-20",
               code: str = "44261-6", **changes: Any) -> dict[str, Any]:
    body = {
        "resourceType": "Observation", "status": "final",
        "category": [{"coding": [{"system": OBS_CATEGORY, "code": "survey"}]}],
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": when,
        "valueQuantity": {"value": score, "system": "http://unitsofmeasure.org", "code": "{score}"},
    }
    body.update(changes)
    return body


def provenance_of(note_id: str, **changes: Any) -> dict[str, Any]:
    """A Provenance whose target is the progress note `note_id` (R4 Provenance: target 1..*,
    recorded 1..1, agent 1..* with who 1..1)."""
    body = {"resourceType": "Provenance", "recorded": "2026-11-20T10:00:00Z",
            "target": [{"reference": f"DocumentReference/{note_id}"}],
            "agent": [{"who": {"display": "Dr Chen"}}]}
    body.update(changes)
    return body


def outcome(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    if code is not None:
        assert body["issue"][0]["code"] == code, body
    return dict(body)


def created_id(response: httpx.Response) -> str:
    """The id of the resource a create answered 201 for."""
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def ids_of(bundle: dict[str, Any], mode: str | None = "match") -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", [])
            if mode is None or e.get("search", {}).get("mode") == mode]


def access_token(scope: str, patient: str | None = None, *, audience: str) -> AccessToken:
    """What records' policy receives once a token is verified (for tests below the HTTP layer)."""
    return AccessToken(subject="t", client_id="t", scope=scopes.parse(scope), audience=audience, jti="j",
                       expires_at=int(time.time()) + 300, patient=patient)
