"""Writing psychotherapy notes and authorizations: what the server sets, what it refuses as
progress-note content (45 CFR 164.501), author-only updates with history, soft delete, and the
164.508(c) core elements of an authorization."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.actors import mint_token
from tests.conftest import RunningStack
from tests.e2e.test_psychnotes import (
    READER_SCOPE,
    assert_refused,
    authorization,
    care_team,
    headers,
    marker,
    mint_consent_token,
    mint_response,
    patient_token,
    psy_note,
    record_consent,
    user_token,
    write_note,
)

LOINC = "http://loinc.org"


@pytest.mark.parametrize(("changes", "where"), [
    ({"context": {"period": {"start": "2026-11-20T10:00:00Z", "end": "2026-11-20T10:50:00Z"}}},
     "context.period"),
    ({"context": {"event": [{"coding": [{"system": "http://snomed.info/sct", "code": "228557008"}]}]}},
     "context.event"),
    ({"context": {"related": [{"reference": "Condition/dx-1"}]}}, "context.related[0]"),
    ({"context": {"related": [{"reference": "MedicationRequest/rx-1"}]}}, "context.related[0]"),
    ({"context": {"related": [{"reference": "Observation/phq9-1"}]}}, "context.related[0]"),
    ({"context": {"related": [{"reference": "CarePlan/plan-1"}]}}, "context.related[0]"),
    ({"contained": [{"resourceType": "Condition", "id": "dx",
                     "subject": {"reference": "Patient/p"}}]}, "contained"),
    ({"type": {"coding": [{"system": LOINC, "code": "18776-5"}]}}, "type"),
    ({"category": [{"coding": [{"system": LOINC, "code": "11502-2"}]}]}, "category"),
    ({"content": [{"attachment": {"contentType": "application/fhir+json",
                                  "data": base64.b64encode(b'{"resourceType":"Bundle"}').decode()}}]},
     "content[0].attachment.contentType"),
])
def test_progress_note_content_is_refused(live: RunningStack, changes: dict[str, Any], where: str) -> None:
    therapist = user_token(live, "Practitioner/th-writes")
    before = live.db("psychnotes").notes.count_documents({})
    text = marker("refused-content")
    response = httpx.post(f"{live.psychnotes}/DocumentReference", headers=headers(therapist),
                          json=psy_note("w-patient", text, **changes))
    body = assert_refused(response, 422, text)
    assert "progress note" in body["issue"][0]["diagnostics"]
    assert body["issue"][0]["expression"] == [f"DocumentReference.{where}"]
    assert live.db("psychnotes").notes.count_documents({}) == before


@pytest.mark.parametrize(("changes", "status"), [
    ({"content": [{"attachment": {"contentType": "text/plain", "url": "https://elsewhere.example/n"}}]}, 422),
    ({"context": {"encounter": [{"reference": "EpisodeOfCare/1"}]}}, 422),
    ({"subject": {"reference": "Group/1"}}, 422),
    ({"status": "bogus"}, 400),
    ({"favouriteColour": "blue"}, 400),
])
def test_other_bad_notes_are_refused(live: RunningStack, changes: dict[str, Any], status: int) -> None:
    therapist = user_token(live, "Practitioner/th-writes")
    response = httpx.post(f"{live.psychnotes}/DocumentReference", headers=headers(therapist),
                          json=psy_note("w-patient", "x", **changes))
    assert_refused(response, status)


def test_only_practitioners_write_and_the_server_sets_labels_and_author(live: RunningStack) -> None:
    text = marker("labels")
    note = psy_note("w-labels", text, author=[{"reference": "Practitioner/someone-else"}],
                    meta={"security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality",
                                        "code": "N"}]},
                    securityLabel=[{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality",
                                                "code": "N"}]}])
    for access in (patient_token(live, "w-labels"),
                   mint_token(live, audience=live.psychnotes, scope="system/DocumentReference.cruds"),
                   user_token(live, "Practitioner/th-x", scope=READER_SCOPE)):
        assert_refused(httpx.post(f"{live.psychnotes}/DocumentReference", headers=headers(access), json=note),
                       403, text)
    therapist = user_token(live, "Practitioner/th-labels")
    care_team(live, "w-labels", "Practitioner/th-labels")
    created = httpx.post(f"{live.psychnotes}/DocumentReference", headers=headers(therapist), json=note)
    assert created.status_code == 201 and created.content == b""  # the words are not echoed back
    note_id = created.headers["location"].split("/")[-3]
    own = mint_consent_token(live, therapist, basis="originator-treatment",
                             patient={"reference": "Patient/w-labels"})
    stored = httpx.get(f"{live.psychnotes}/DocumentReference/{note_id}", headers=headers(therapist, own)).json()
    assert stored["author"] == [{"reference": "Practitioner/th-labels"}]
    labels = {"V", "PSYTHPN", "NOAUTH"}
    assert {c["code"] for c in stored["meta"]["security"]} == labels
    assert {c["coding"][0]["code"] for c in stored["securityLabel"]} == labels


def test_update_is_author_only_and_keeps_history_delete_is_soft(live: RunningStack) -> None:
    therapist = user_token(live, "Practitioner/th-history")
    patient = f"w-hist-{uuid.uuid4().hex[:6]}"
    v1, v2 = marker("hist-v1"), marker("hist-v2")
    note_id = write_note(live, therapist, patient, v1)
    url = f"{live.psychnotes}/DocumentReference/{note_id}"
    body = {**psy_note(patient, v2), "id": note_id}
    colleague = user_token(live, "Practitioner/th-colleague-2")
    assert_refused(httpx.put(url, headers=headers(colleague), json=body), 404, v1, v2)
    assert_refused(httpx.delete(url, headers=headers(colleague)), 404, v1)
    assert httpx.put(url, headers=headers(therapist, **{"If-Match": 'W/"7"'}), json=body).status_code == 412
    moved = {**psy_note("someone-else", v2), "id": note_id}
    assert_refused(httpx.put(url, headers=headers(therapist), json=moved), 422, v1, v2)
    updated = httpx.put(url, headers=headers(therapist, **{"If-Match": 'W/"1"'}), json=body)
    assert updated.status_code == 200 and updated.headers["etag"] == 'W/"2"'

    own = mint_consent_token(live, therapist, basis="originator-treatment",
                             patient={"reference": f"Patient/{patient}"})
    read = httpx.get(url, headers=headers(therapist, own))
    assert read.json()["description"] == v2 and read.json()["meta"]["versionId"] == "2"
    first = httpx.get(f"{url}/_history/1", headers=headers(therapist, own))
    assert first.status_code == 200 and first.json()["description"] == v1

    assert httpx.delete(url, headers=headers(therapist)).status_code == 204
    assert_refused(httpx.get(url, headers=headers(therapist, own)), 410, v1, v2)
    search = httpx.get(f"{live.psychnotes}/DocumentReference", params={"patient": patient},
                       headers=headers(therapist, own))
    assert search.json()["total"] == 0
    history = httpx.get(f"{url}/_history", headers=headers(therapist, own)).json()
    assert [e["request"]["method"] for e in history["entry"]] == ["DELETE", "PUT", "POST"]
    assert history["entry"][2]["resource"]["description"] == v1  # the audit trail survives
    trail = live.db("psychnotes").decisions.find({"entities": f"DocumentReference/{note_id}",
                                                  "action": {"$in": ["create", "update", "delete"]}})
    assert sorted(d["action"] for d in trail) == ["create", "delete", "update"]


def _without(consent: dict[str, Any], path: str) -> dict[str, Any]:
    out: Any = consent
    *parents, last = path.split(".")
    for part in parents:
        out = out[int(part)] if part.isdigit() else out[part]
    if last.isdigit():
        out.pop(int(last))
    else:
        out.pop(last)
    return consent


@pytest.mark.parametrize(("missing", "element"), [
    ("dateTime", "Consent.dateTime"),
    ("sourceAttachment", "Consent.sourceAttachment"),
    ("organization", None),
    ("provision.period.end", "Consent.provision.period.end"),
    ("provision.provision.0.actor", "Consent.provision.provision.actor"),
    ("provision.provision.0.purpose", "Consent.provision.provision.purpose"),
    ("provision.provision.0.data", "Consent.provision.data"),
    ("patient", "Consent.patient"),
])
def test_an_authorization_without_a_core_element_is_refused(live: RunningStack, missing: str,
                                                            element: str | None) -> None:
    consent = authorization("c-patient", recipient={"reference": "Practitioner/dr-c"}, notes=["n1"])
    if missing == "organization":
        consent.pop("performer")
    consent = _without(consent, missing)
    response = httpx.post(f"{live.psychnotes}/Consent", headers=headers(patient_token(live, "c-patient")),
                          json=consent)
    body = assert_refused(response, 422)
    assert "164.508(c)" in body["issue"][0]["diagnostics"]
    if element:
        assert body["issue"][0]["expression"] == [element]


def test_only_the_patient_or_a_treating_practitioner_records_an_authorization(live: RunningStack) -> None:
    patient = f"c-who-{uuid.uuid4().hex[:6]}"
    consent = authorization(patient, recipient={"reference": "Practitioner/dr-c"},
                            data_period={"start": "2026-01-01", "end": "2026-12-31"})
    for access in (patient_token(live, "someone-else"), user_token(live, "Practitioner/th-stranger"),
                   mint_token(live, audience=live.psychnotes, scope="system/Consent.cru")):
        assert_refused(httpx.post(f"{live.psychnotes}/Consent", headers=headers(access), json=consent), 403)
    therapist = user_token(live, "Practitioner/th-treating")
    treating = write_note(live, therapist, patient, marker("treating"))  # dated 2026-11-20
    consent_id = record_consent(live, therapist, consent)
    recipient = user_token(live, "Practitioner/dr-c", scope="user/Consent.r user/DocumentReference.rs")
    assert httpx.get(f"{live.psychnotes}/Consent/{consent_id}", headers=headers(recipient)).status_code == 200
    stranger = user_token(live, "Practitioner/th-stranger")
    assert_refused(httpx.get(f"{live.psychnotes}/Consent/{consent_id}", headers=headers(stranger)), 404)
    listed = httpx.get(f"{live.psychnotes}/Consent", params={"patient": patient},
                       headers=headers(patient_token(live, patient)))
    assert listed.status_code == 200, listed.text
    assert [e["resource"]["id"] for e in listed.json()["entry"]] == [consent_id]
    assert_refused(httpx.get(f"{live.psychnotes}/Consent", params={"patient": patient},
                             headers=headers(stranger)), 403)
    # A date-range authorization releases the notes dated inside it, and only those.
    inside = write_note(live, therapist, patient, marker("inside"), date="2026-06-01T09:00:00Z")
    outside = write_note(live, therapist, patient, marker("outside"), date="2025-06-01T09:00:00Z")
    token = mint_consent_token(live, recipient, consent_id, purpose="TREAT")
    found = httpx.get(f"{live.psychnotes}/DocumentReference", params={"patient": patient},
                      headers=headers(recipient, token)).json()
    ids = {e["resource"]["id"] for e in found["entry"]}
    assert inside in ids and outside not in ids
    for date, expected in (("ge2026-06-01", {inside, treating}), ("lt2026-06-01", set()),
                           ("2026-06-01", {inside}), ("le2026-06-01", {inside}),
                           ("ge2020-01-01", {inside, treating})):
        dated = httpx.get(f"{live.psychnotes}/DocumentReference", params={"patient": patient, "date": date},
                          headers=headers(recipient, token)).json()
        assert {e["resource"]["id"] for e in dated.get("entry", [])} == expected, date
    assert httpx.get(f"{live.psychnotes}/DocumentReference/{outside}",
                     headers=headers(recipient, token)).status_code == 403


def test_a_consent_token_never_outlives_its_authorization(live: RunningStack) -> None:
    patient = f"c-exp-{uuid.uuid4().hex[:6]}"
    therapist = user_token(live, "Practitioner/th-exp")
    note_id = write_note(live, therapist, patient, marker("exp-cap"))
    ends = datetime.now(UTC) + timedelta(seconds=90)
    consent_id = record_consent(live, therapist, authorization(
        patient, recipient={"reference": "Practitioner/dr-exp"}, notes=[note_id], end=ends))
    reader = user_token(live, "Practitioner/dr-exp", scope=READER_SCOPE)
    response = mint_response(live, reader, consent_id, purpose="TREAT")
    assert response.status_code == 200, response.text
    token = next(p["valueString"] for p in response.json()["parameter"] if p["name"] == "token")
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["exp"] <= int(ends.timestamp())
    assert claims["aud"] == claims["iss"] == live.psychnotes
    assert claims["grantee"] == {"client_id": "therapy-app", "fhirUser": "Practitioner/dr-exp"}
    assert claims["basis"] == f"Consent/{consent_id}" and claims["notes"] == {"ids": [note_id]}
    assert claims["patient"] == f"Patient/{patient}" and claims["purpose_of_use"] == ["TREAT"]
    assert claims["jti"]
