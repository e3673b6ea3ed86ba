"""Revoking a 45 CFR 164.508(a)(2) exception grant (`POST /psychnotes/fhir/$revoke-consent-token`):
the grantee or the compliance role may end it, at once for every later read with its consent
token; anyone else is refused; every decision is audited."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import httpx
import pytest

from tests.actors import mint_token
from tests.conftest import RunningStack
from tests.e2e.test_psychnotes import (
    assert_audited,
    assert_refused,
    headers,
    marker,
    mint_consent_token,
    parameters,
    user_token,
    write_note,
)

WHY = "Coroner's request 2026-MX-311 for the inquest into the death of the patient, received today."


def revoke(live: RunningStack, access: str, **values: Any) -> httpx.Response:
    return httpx.post(f"{live.psychnotes}/$revoke-consent-token", headers=headers(access),
                      json=parameters(**values), timeout=30)


def jti_of(token: str) -> str:
    payload = token.split(".")[1]
    return str(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["jti"])


def officer(live: RunningStack, name: str, *, compliance: bool = True) -> str:
    return mint_token(live, audience=live.psychnotes, sub=name, client_id="compliance-console",
                      scope="user/DocumentReference.rs", roles=["compliance"] if compliance else [],
                      fhirUser=f"{live.fhir}/Practitioner/{name}")


@pytest.fixture(scope="module")
def case(live: RunningStack) -> dict[str, Any]:
    patient = f"rev-{uuid.uuid4().hex[:6]}"
    therapist = user_token(live, "Practitioner/th-revocation")
    text = marker("revocation")
    note = write_note(live, therapist, patient, text)
    return {"patient": patient, "therapist": therapist, "note": note, "text": text}


def read(live: RunningStack, case: dict[str, Any], access: str, consent: str) -> httpx.Response:
    return httpx.get(f"{live.psychnotes}/DocumentReference/{case['note']}",
                     headers=headers(access, consent), timeout=30)


def test_the_grantee_revokes_its_grant_and_the_token_stops_working_at_once(
    live: RunningStack, case: dict[str, Any]
) -> None:
    coroner_liaison = officer(live, "liaison-1")
    token = mint_consent_token(live, coroner_liaison, basis="coroner",
                               patient={"reference": f"Patient/{case['patient']}"}, justification=WHY)
    assert read(live, case, coroner_liaison, token).status_code == 200

    revoked = revoke(live, coroner_liaison, token=token)
    assert revoked.status_code == 200, revoked.text
    assert revoked.headers["cache-control"] == "no-store"
    answer = {p["name"]: p for p in revoked.json()["parameter"]}
    assert answer["jti"]["valueString"] == jti_of(token)
    assert answer["basis"]["valueString"] == "exception:coroner"
    assert answer["revoked"]["valueBoolean"] is True
    assert answer["revokedBy"]["valueString"] == "Practitioner/liaison-1"
    assert_audited(live, revoked, permit=True, reason="revoked by the grantee")
    grant = live.db("psychnotes").exception_grants.find_one({"_id": jti_of(token)})
    assert grant["revoked"] is True and grant["revoked_by"] == "Practitioner/liaison-1"

    after = read(live, case, coroner_liaison, token)
    assert_refused(after, 403, case["text"])
    assert_audited(live, after, permit=False, reason="revoked")
    # Revoking again changes nothing and says the same.
    again = revoke(live, coroner_liaison, jti=jti_of(token))
    assert again.status_code == 200
    assert {p["name"]: p for p in again.json()["parameter"]}["revokedAt"] == answer["revokedAt"]


def test_only_the_grantee_or_the_compliance_role_may_revoke(live: RunningStack, case: dict[str, Any]) -> None:
    own = mint_consent_token(live, case["therapist"], basis="originator-treatment",
                             patient={"reference": f"Patient/{case['patient']}"})
    jti = jti_of(own)
    colleague = user_token(live, "Practitioner/th-colleague-rev")
    clerk = officer(live, "clerk-1", compliance=False)
    for stranger in (colleague, clerk):
        refused = revoke(live, stranger, jti=jti)
        assert_refused(refused, 403, case["text"])
        assert_audited(live, refused, permit=False, reason="grantee or the compliance role")
    assert read(live, case, case["therapist"], own).status_code == 200  # still in force

    privacy_officer = officer(live, "privacy-officer-1")
    revoked = revoke(live, privacy_officer, jti=jti)
    assert revoked.status_code == 200, revoked.text
    assert_audited(live, revoked, permit=True, reason="revoked by the compliance officer")
    assert_refused(read(live, case, case["therapist"], own), 403, case["text"])


def test_revocation_requests_that_name_no_grant(live: RunningStack, case: dict[str, Any]) -> None:
    access = officer(live, "privacy-officer-2")
    assert revoke(live, access, jti=uuid.uuid4().hex).status_code == 404
    assert revoke(live, access).status_code == 400
    assert revoke(live, access, jti="a", token="b").status_code == 400
    assert revoke(live, access, token="not-a-consent-token").status_code == 400
    assert httpx.post(f"{live.psychnotes}/$revoke-consent-token", json=parameters(jti="x"),
                      timeout=30).status_code == 401
