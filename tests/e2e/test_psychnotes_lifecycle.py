"""Psychotherapy notes follow the same sign/lock rules as progress notes (issue 14, minus
45 CFR 164.526): a draft changes by its author until `$sign`; a signed note, or one that arrives
signed, refuses every update and delete with 409; one without docStatus behaves as before."""

from __future__ import annotations

import uuid

import httpx

from tests.conftest import RunningStack
from tests.e2e.test_psychnotes import headers, marker, mint_consent_token, psy_note, user_token, write_note


def test_a_signed_psychotherapy_note_is_locked(live: RunningStack) -> None:
    therapist = user_token(live, "Practitioner/th-sign")
    colleague = user_token(live, "Practitioner/th-sign-other")
    patient = f"w-sign-{uuid.uuid4().hex[:6]}"
    draft_text, later = marker("sign-draft"), marker("sign-later")
    note_id = write_note(live, therapist, patient, draft_text, docStatus="preliminary")
    url = f"{live.psychnotes}/DocumentReference/{note_id}"
    body = {**psy_note(patient, draft_text, docStatus="preliminary"), "id": note_id}
    assert httpx.put(url, headers=headers(therapist), json=body).status_code == 200
    finalised = httpx.put(url, headers=headers(therapist), json={**body, "docStatus": "final"})
    assert finalised.status_code == 422 and "$sign" in finalised.text
    assert httpx.post(f"{url}/$sign", headers=headers(colleague)).status_code == 404  # not theirs

    signed = httpx.post(f"{url}/$sign", headers=headers(therapist))
    assert signed.status_code == 200, signed.text
    own = mint_consent_token(live, therapist, basis="originator-treatment",
                             patient={"reference": f"Patient/{patient}"})
    read = httpx.get(url, headers=headers(therapist, own)).json()
    assert read["docStatus"] == "final" and read["authenticator"]["reference"].endswith("Practitioner/th-sign")
    for response in (httpx.put(url, headers=headers(therapist), json={**body, "description": later}),
                     httpx.delete(url, headers=headers(therapist)),
                     httpx.post(f"{url}/$sign", headers=headers(therapist))):
        assert response.status_code == 409, response.text
        assert response.json()["issue"][0]["code"] == "business-rule"
    assert httpx.get(url, headers=headers(therapist, own)).json()["meta"]["versionId"] == "3"

    arrived = write_note(live, therapist, patient, marker("arrived-final"), docStatus="final")
    assert httpx.delete(f"{live.psychnotes}/DocumentReference/{arrived}",
                        headers=headers(therapist)).status_code == 409
    plain = write_note(live, therapist, patient, marker("plain"))  # no docStatus: as before
    assert httpx.delete(f"{live.psychnotes}/DocumentReference/{plain}",
                        headers=headers(therapist)).status_code == 204
