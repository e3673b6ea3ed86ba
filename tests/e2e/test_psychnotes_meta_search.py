"""Psychotherapy-note search by the common parameters its CapabilityStatement declares:
`_tag` (meta.tag), `_security` (meta.security) and `_lastUpdated` (R4 search.html §2.1.1.2; the
definitions Resource-tag, Resource-security, Resource-lastUpdated), through the gateway, with a
consent token, and each refused with a 400 OperationOutcome when malformed."""

from __future__ import annotations

import uuid
from typing import Any

import httpx

from tests.conftest import RunningStack
from tests.e2e.test_psychnotes import (
    assert_refused,
    headers,
    marker,
    mint_consent_token,
    user_token,
    write_note,
)

WORKFLOW = "https://clinic.example/tags"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"


def _ids(bundle: dict[str, Any]) -> set[str]:
    return {e["resource"]["id"] for e in bundle.get("entry", [])}


def test_tag_security_and_last_updated_narrow_a_search(live: RunningStack) -> None:
    therapist = user_token(live, "Practitioner/th-meta-search")
    patient = f"meta-search-{uuid.uuid4().hex[:6]}"
    texts = [marker(f"meta-search-{i}") for i in range(3)]
    first = write_note(live, therapist, patient, texts[0],
                       meta={"tag": [{"system": WORKFLOW, "code": "review"}]})
    second = write_note(live, therapist, patient, texts[1],
                        meta={"tag": [{"system": WORKFLOW, "code": "supervision"}]})
    third = write_note(live, therapist, patient, texts[2])
    consent = mint_consent_token(live, therapist, basis="originator-treatment",
                                 patient={"reference": f"Patient/{patient}"})

    def search(query: str) -> httpx.Response:
        return httpx.get(f"{live.psychnotes}/DocumentReference?patient={patient}&{query}",
                         headers=headers(therapist, consent))

    def found(query: str) -> set[str]:
        response = search(query)
        assert response.status_code == 200, response.text
        return _ids(response.json())

    assert found(f"_tag={WORKFLOW}|review") == {first}
    assert found("_tag=review") == {first}
    assert found(f"_tag={WORKFLOW}|") == {first, second}
    assert found(f"_tag={WORKFLOW}|review,{WORKFLOW}|supervision") == {first, second}
    assert found("_tag=https://other.example/tags|review") == set()
    assert found("_tag=|review") == set()  # a tag without a system: none here
    # Every psychotherapy note carries V + PSYTHPN + NOAUTH, whatever the client sent.
    assert found(f"_security={ACT_CODE}|PSYTHPN") == {first, second, third}
    assert found(f"_security={CONFIDENTIALITY}|V&_tag=supervision") == {second}
    assert found(f"_security={CONFIDENTIALITY}|N") == set()
    self_link = search(f"_tag={WORKFLOW}|review").json()["link"][0]["url"]
    assert "_tag=" in self_link

    notes = {e["resource"]["id"]: e["resource"] for e in search("").json()["entry"]}
    written = {note_id: notes[note_id]["meta"]["lastUpdated"] for note_id in (first, second, third)}
    assert found(f"_lastUpdated=ge{written[first]}") == {first, second, third}
    assert found(f"_lastUpdated=gt{written[first]}") == {second, third}
    assert found(f"_lastUpdated=lt{written[first]}") == set()
    assert found(f"_lastUpdated=le{written[second]}") == {first, second}
    assert found(f"_lastUpdated={written[third]}") == {third}


def test_malformed_meta_parameters_are_400(live: RunningStack) -> None:
    therapist = user_token(live, "Practitioner/th-meta-search-bad")
    patient = f"meta-bad-{uuid.uuid4().hex[:6]}"
    text = marker("meta-search-bad")
    write_note(live, therapist, patient, text)
    consent = mint_consent_token(live, therapist, basis="originator-treatment",
                                 patient={"reference": f"Patient/{patient}"})
    for query in ("_lastUpdated=yesterday", "_lastUpdated=ge2026-13-01", "_tag=|", "_tag=",
                  "_tag:not=review", "_security:below=x"):
        response = httpx.get(f"{live.psychnotes}/DocumentReference?patient={patient}&{query}",
                             headers=headers(therapist, consent))
        assert_refused(response, 400, text)
