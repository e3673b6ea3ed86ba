"""Issue 5 end to end, through the gateway only: a therapist writes psychotherapy notes, reads are
refused without a consent token, the author reads under the originator exception, the patient
authorizes a named recipient, who reads exactly those notes until the patient revokes; every step
is audited (gateway per request, psychnotes per consent decision) and every release is a
disclosure in the patient's accounting.

The helpers at the top are shared with the other test_psychnotes_* modules.
"""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from mindchart_core.audit import DISCLOSURE_HEADER, decode_disclosures
from tests.actors import auditor_token, mint_token, sensitive
from tests.conftest import RunningStack

PSY_SCOPE = "user/DocumentReference.cruds user/Consent.cru"
READER_SCOPE = "user/DocumentReference.rs"


# -- shared helpers -----------------------------------------------------------------------------

def marker(label: str) -> str:
    """A unique note text the tests hunt for in every response, log and datastore byte."""
    return sensitive(f"PSYNOTE-{label}-{uuid.uuid4().hex[:12]} the client fears the lake again")


def user_token(live: RunningStack, fhir_user: str, *, client_id: str = "therapy-app",
               scope: str = PSY_SCOPE, **claims: Any) -> str:
    """An access token for a signed-in person (gateway-signed, psychnotes audience)."""
    return mint_token(live, audience=live.psychnotes, sub=fhir_user.replace("/", "-"),
                      client_id=client_id, scope=scope, fhirUser=f"{live.fhir}/{fhir_user}",
                      **claims)


def patient_token(live: RunningStack, patient_id: str, *, client_id: str = "patient-app") -> str:
    return mint_token(live, audience=live.psychnotes, sub=f"patient-{patient_id}",
                      client_id=client_id, scope="patient/Consent.crus", patient=patient_id,
                      fhirUser=f"{live.fhir}/Patient/{patient_id}")


def headers(access: str, consent: str | None = None, **extra: str) -> dict[str, str]:
    out = {"Authorization": f"Bearer {access}", "Content-Type": "application/fhir+json",
           "Accept": "application/fhir+json", **extra}
    if consent is not None:
        out["Consent-Token"] = consent
    return out


def psy_note(patient_id: str, text: str, **changes: Any) -> dict[str, Any]:
    note = {
        "resourceType": "DocumentReference",
        "status": "current",
        "type": {"text": "Psychotherapy process note"},
        "subject": {"reference": f"Patient/{patient_id}"},
        "date": "2026-11-20T10:00:00Z",
        "description": text,
        "content": [{"attachment": {"contentType": "text/plain", "title": text,
                                    "data": base64.b64encode(text.encode()).decode()}}],
    }
    note.update(changes)
    return note


_CARE_TEAMS: set[tuple[str, str, str]] = set()


def care_team(live: RunningStack, patient_id: str, practitioner: str, *,
              status: str = "active") -> str:
    """An active CareTeam in records naming `practitioner` for the patient (what the EHR keeps):
    psychnotes lets only its members write the patient's psychotherapy notes."""
    token = mint_token(live, scope="system/CareTeam.cruds")
    response = httpx.post(f"{live.fhir}/CareTeam", headers=headers(token), json={
        "resourceType": "CareTeam", "status": status, "subject": {"reference": f"Patient/{patient_id}"},
        "participant": [{"member": {"reference": practitioner}}]})
    assert response.status_code == 201, response.text
    _CARE_TEAMS.add((live.gateway_url, patient_id, practitioner))
    return str(response.json()["id"])


def fhir_user_of(access: str) -> str:
    payload = access.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return "/".join(str(claims.get("fhirUser", "")).split("/")[-2:])


def write_note(live: RunningStack, access: str, patient_id: str, text: str, **changes: Any) -> str:
    """A note by the token's practitioner, who is put on the patient's care team first."""
    author = fhir_user_of(access)
    if (live.gateway_url, patient_id, author) not in _CARE_TEAMS:
        care_team(live, patient_id, author)
    response = httpx.post(f"{live.psychnotes}/DocumentReference", headers=headers(access),
                          json=psy_note(patient_id, text, **changes))
    assert response.status_code == 201, response.text
    return response.headers["location"].split("/")[-3]


def authorization(patient_id: str, *, recipient: dict[str, Any], notes: list[str] | None = None,
                  purposes: tuple[str, ...] = ("TREAT",), end: datetime | None = None,
                  data_period: dict[str, str] | None = None, **changes: Any) -> dict[str, Any]:
    """A Consent carrying every 45 CFR 164.508(c)(1) core element."""
    until = end or datetime.now(UTC) + timedelta(days=30)
    permit: dict[str, Any] = {
        "type": "permit",
        "actor": [{"role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                        "code": "IRCP"}]},
                   "reference": recipient}],
        "action": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentaction",
                                "code": "disclose"}]}],
        "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": p}
                    for p in purposes],
        "securityLabel": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "PSYTHPN"}],
    }
    if notes:
        permit["data"] = [{"meaning": "instance", "reference": {"reference": f"DocumentReference/{n}"}}
                          for n in notes]
    if data_period:
        permit["dataPeriod"] = data_period
    consent = {
        "resourceType": "Consent",
        "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                              "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "64292-6"}]}],
        "patient": {"reference": f"Patient/{patient_id}"},
        "dateTime": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "performer": [{"reference": f"Patient/{patient_id}"}],
        "organization": [{"display": "Mindchart Behavioral Health"}],
        "sourceAttachment": {"contentType": "application/pdf", "title": "Signed authorization",
                             "data": base64.b64encode(b"%PDF-1.4 signed form").decode()},
        "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentpolicycodes",
                                   "code": "hipaa-auth"}]},
        "provision": {"period": {"start": "2026-01-01T00:00:00Z",
                                 "end": until.isoformat(timespec="seconds").replace("+00:00", "Z")},
                      "provision": [permit]},
    }
    consent.update(changes)
    return consent


def compliance_token(live: RunningStack, who: str = "Practitioner/privacy-officer") -> str:
    """A compliance officer (user with the compliance role), who attests authorizations."""
    return user_token(live, who, client_id="privacy-app", scope="user/Consent.rus",
                      roles=["compliance"])


def attest(live: RunningStack, consent_id: str, access: str | None = None) -> httpx.Response:
    return httpx.post(f"{live.psychnotes}/Consent/{consent_id}/$attest",
                      headers=headers(access or compliance_token(live)))


def record_consent(live: RunningStack, access: str, consent: dict[str, Any], *,
                   attested: bool = True) -> str:
    """Record an authorization; one recorded by anyone but the patient stays `proposed` until a
    compliance officer attests it, which this does unless `attested=False`."""
    response = httpx.post(f"{live.psychnotes}/Consent", headers=headers(access), json=consent)
    assert response.status_code == 201, response.text
    consent_id = str(response.json()["id"])
    if attested and response.json()["status"] == "proposed" and consent.get("status") == "active":
        done = attest(live, consent_id)
        assert done.status_code == 200 and done.json()["status"] == "active", done.text
    return consent_id


def parameters(**values: Any) -> dict[str, Any]:
    out = []
    for name, value in values.items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict):
                out.append({"name": name, "valueReference": item})
            elif name in ("purpose", "basis"):
                out.append({"name": name, "valueCode": item})
            else:
                out.append({"name": name, "valueString": item})
    return {"resourceType": "Parameters", "parameter": out}


def mint_response(live: RunningStack, access: str, consent_id: str | None = None,
                  **values: Any) -> httpx.Response:
    url = (f"{live.psychnotes}/Consent/{consent_id}/$consent-token" if consent_id
           else f"{live.psychnotes}/$consent-token")
    return httpx.post(url, headers=headers(access), json=parameters(**values))


def mint_consent_token(live: RunningStack, access: str, consent_id: str | None = None,
                       **values: Any) -> str:
    response = mint_response(live, access, consent_id, **values)
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    found = {p["name"]: p for p in response.json()["parameter"]}
    return str(found["token"]["valueString"])


def note_text(resource: dict[str, Any]) -> str:
    return base64.b64decode(resource["content"][0]["attachment"]["data"]).decode()


def assert_refused(response: httpx.Response, status: int, *secrets: str) -> dict[str, Any]:
    """Refused with an OperationOutcome, and not one byte of any note in the answer."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    expected = {401: {"login"}, 403: {"forbidden"}, 400: {"invalid", "structure"},
                404: {"not-found"}, 410: {"deleted"}, 422: {"business-rule"}, 500: {"exception"}}
    assert body["issue"][0]["code"] in expected.get(status, {body["issue"][0]["code"]})
    assert_no_secret(response, *secrets)
    return dict(body)


def assert_no_secret(response: httpx.Response, *secrets: str) -> None:
    blob = response.content + str(response.headers).encode()
    for secret in secrets:
        for form in (secret.encode(), base64.b64encode(secret.encode())):
            assert form not in blob, "note content left the service"


def decisions(live: RunningStack, request_id: str) -> list[dict[str, Any]]:
    return list(live.db("psychnotes").decisions.find({"request_id": request_id}))


def gateway_audit(live: RunningStack, request_id: str) -> dict[str, Any] | None:
    found: dict[str, Any] | None = live.db("gateway").audit_events.find_one({"request_id": request_id})
    return found


def assert_audited(live: RunningStack, response: httpx.Response, *, permit: bool | None,
                   reason: str | None = None) -> None:
    """The gateway's per-request record, and (for gate decisions) psychnotes' AuthZconsent one."""
    request_id = response.headers["x-request-id"]
    record = gateway_audit(live, request_id)
    assert record is not None and record["status"] == response.status_code
    if permit is None:
        return
    found = decisions(live, request_id)
    assert found, f"no consent decision recorded for {request_id}"
    assert found[-1]["permit"] is permit
    event = found[-1]["event"]
    assert event["resourceType"] == "AuditEvent"
    assert event["subtype"][0]["code"] == "AuthZ-Consent"
    assert event["outcome"] == ("0" if permit else "4")
    if reason is not None:
        assert reason in found[-1]["reason"], found[-1]["reason"]


# -- the story ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def patient_id(writer_http: httpx.Client) -> str:
    response = writer_http.post("/Patient", json={
        "resourceType": "Patient", "name": [{"family": "Psynotestory", "given": ["Ada"]}],
        "gender": "female", "birthDate": "1990-05-06"})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


@pytest.fixture(scope="module")
def session_encounter(writer_http: httpx.Client, patient_id: str) -> str:
    response = writer_http.post("/Encounter", json={
        "resourceType": "Encounter", "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": f"Patient/{patient_id}"},
        "period": {"start": "2026-11-20T10:00:00Z", "end": "2026-11-20T10:50:00Z"}})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def test_the_consent_gated_vault_story(live: RunningStack, patient_id: str, session_encounter: str) -> None:
    therapist = user_token(live, "Practitioner/th-story")
    texts = [marker(f"story{i}") for i in range(3)]

    # A therapist writes three notes; the first is linked to the session Encounter in records.
    first = write_note(live, therapist, patient_id, texts[0],
                       context={"encounter": [{"reference": f"Encounter/{session_encounter}"}]})
    second = write_note(live, therapist, patient_id, texts[1])
    third = write_note(live, therapist, patient_id, texts[2])

    # Reading it without a consent token is refused, and the refusal is audited with its reason.
    refused = httpx.get(f"{live.psychnotes}/DocumentReference/{first}", headers=headers(therapist))
    assert_refused(refused, 403, *texts)
    assert_audited(live, refused, permit=False, reason="no consent token")

    # The author mints an originator-treatment token and reads the note.
    own = mint_consent_token(live, therapist, basis="originator-treatment",
                             patient={"reference": f"Patient/{patient_id}"})
    read = httpx.get(f"{live.psychnotes}/DocumentReference/{first}", headers=headers(therapist, own))
    assert read.status_code == 200, read.text
    note = read.json()
    assert note_text(note) == texts[0] and note["description"] == texts[0]
    assert {c["code"] for c in note["meta"]["security"]} == {"V", "PSYTHPN", "NOAUTH"}
    assert note["author"] == [{"reference": "Practitioner/th-story"}]
    assert note["context"]["encounter"] == [{"reference": f"Encounter/{session_encounter}"}]
    assert read.headers["cache-control"] == "no-store"
    assert DISCLOSURE_HEADER not in read.headers  # the gateway keeps its internal report
    assert_audited(live, read, permit=True)

    # The patient records an authorization naming Dr Bello (through any app) for two notes.
    patient = patient_token(live, patient_id)
    consent_id = record_consent(live, patient, authorization(
        patient_id, recipient={"reference": "Practitioner/dr-bello"}, notes=[first, second]))
    stored = httpx.get(f"{live.psychnotes}/Consent/{consent_id}", headers=headers(patient))
    assert stored.status_code == 200 and stored.json()["status"] == "active"

    # The recipient mints a token and reads exactly the authorized notes, and no others.
    bello = user_token(live, "Practitioner/dr-bello", client_id="referral-ehr", scope=READER_SCOPE)
    granted = mint_consent_token(live, bello, consent_id, purpose="TREAT")
    for note_id, text in ((first, texts[0]), (second, texts[1])):
        response = httpx.get(f"{live.psychnotes}/DocumentReference/{note_id}",
                             headers=headers(bello, granted))
        assert response.status_code == 200, response.text
        assert note_text(response.json()) == text
        assert_audited(live, response, permit=True)
    outside = httpx.get(f"{live.psychnotes}/DocumentReference/{third}", headers=headers(bello, granted))
    assert_refused(outside, 403, texts[2])
    assert_audited(live, outside, permit=False, reason="not inside")
    search = httpx.get(f"{live.psychnotes}/DocumentReference", params={"patient": patient_id},
                       headers=headers(bello, granted))
    assert search.status_code == 200, search.text
    bundle = search.json()
    assert bundle["type"] == "searchset" and bundle["total"] == 2
    assert sorted(e["resource"]["id"] for e in bundle["entry"]) == sorted([first, second])
    assert texts[2] not in search.text

    # The patient revokes; the same token is refused on its very next use.
    revoked = httpx.post(f"{live.psychnotes}/Consent/{consent_id}/$revoke", headers=headers(patient))
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["status"] == "inactive"
    assert_audited(live, revoked, permit=True, reason="revoked")
    replay = httpx.get(f"{live.psychnotes}/DocumentReference/{first}", headers=headers(bello, granted))
    assert_refused(replay, 403, *texts)
    assert_audited(live, replay, permit=False, reason="revoked")
    assert_refused(httpx.get(f"{live.psychnotes}/DocumentReference", params={"patient": patient_id},
                             headers=headers(bello, granted)), 403, *texts)
    assert_refused(mint_response(live, bello, consent_id, purpose="TREAT"), 403, *texts)

    # psychnotes' own disclosure records: one per release, basis and recipient as expected.
    released = list(live.db("psychnotes").disclosures.find({"patient": f"Patient/{patient_id}"}))
    bello_releases = [d for d in released if d["recipient_user"] == "Practitioner/dr-bello"]
    assert {ref for d in bello_releases for ref in d["entities"]} == {
        f"DocumentReference/{first}", f"DocumentReference/{second}"}
    assert all(d["basis"] == f"Consent/{consent_id}" for d in bello_releases)
    assert all(d["event"]["subtype"][0]["code"] == "disclose" for d in bello_releases)
    own_releases = [d for d in released if d["basis"] == "exception:originator-treatment"]
    assert [d["entities"] for d in own_releases] == [[f"DocumentReference/{first}"]]

    # The writes and the authorization's life are in psychnotes' decision trail too.
    trail = live.db("psychnotes").decisions
    for note_id in (first, second, third):
        assert trail.find_one({"action": "create", "entities": f"DocumentReference/{note_id}",
                               "fhir_user": "Practitioner/th-story"}) is not None
    assert [d["action"] for d in trail.find({"basis": f"Consent/{consent_id}", "permit": True,
                                            "action": {"$in": ["consent-create", "consent-revoke"]}})
            ] == ["consent-create", "consent-revoke"]

    # And the gateway's accounting of disclosures (45 CFR 164.528) lists each release.
    listed = accounting(live, patient_id)
    events = [e["resource"] for e in listed.get("entry", [])]
    to_bello = [e for e in events if any(a.get("who", {}).get("reference", "").endswith("Practitioner/dr-bello")
                                         for a in e["agent"])]
    released_refs = {ent["what"]["reference"] for e in to_bello for ent in e["entity"]
                     if ent.get("role", {}).get("code") == "4"}
    assert released_refs == {f"DocumentReference/{first}", f"DocumentReference/{second}"}
    assert f"DocumentReference/{third}" not in json.dumps(to_bello)
    assert all(any(ent.get("what", {}).get("identifier", {}).get("value") == f"Consent/{consent_id}"
                   for ent in e["entity"]) for e in to_bello)
    assert not any(text in json.dumps(events) for text in texts)


def accounting(live: RunningStack, patient_id: str) -> dict[str, Any]:
    """The gateway's `$disclosures` Bundle for a patient, or xfail while it has not landed."""
    auditor = auditor_token(live)
    response = httpx.get(f"{live.gateway_url}/audit/Patient/{patient_id}/$disclosures",
                         headers={"Authorization": f"Bearer {auditor}", "Accept": "application/fhir+json"})
    if response.status_code != 200:
        pytest.xfail("gateway accounting endpoint not landed yet")
    body: dict[str, Any] = response.json()
    assert body["resourceType"] == "Bundle"
    return body


def test_disclosures_appear_in_the_patients_accounting(live: RunningStack) -> None:
    therapist = user_token(live, "Practitioner/th-accounting")
    patient_ref = f"acct-{uuid.uuid4().hex[:8]}"
    text = marker("accounting")
    note_id = write_note(live, therapist, patient_ref, text)
    consent_id = record_consent(live, patient_token(live, patient_ref), authorization(
        patient_ref, recipient={"identifier": {"system": "urn:ietf:params:oauth:client-id",
                                               "value": "insurer-appeals"}},
        notes=[note_id], purposes=("HPAYMT",)))
    insurer = mint_token(live, audience=live.psychnotes, sub="insurer-appeals",
                         client_id="insurer-appeals", scope="system/DocumentReference.rs")
    token = mint_consent_token(live, insurer, consent_id, purpose="HPAYMT")
    read = httpx.get(f"{live.psychnotes}/DocumentReference/{note_id}", headers=headers(insurer, token))
    assert read.status_code == 200, read.text

    # psychnotes itself announces the release to the gateway in the disclosure header.
    direct = httpx.get(f"{live.direct_url('psychnotes')}/psychnotes/fhir/DocumentReference/{note_id}",
                       headers=headers(insurer, token))
    assert direct.status_code == 200, direct.text
    [disclosure] = decode_disclosures(direct.headers[DISCLOSURE_HEADER])
    assert disclosure.patient == f"Patient/{patient_ref}"
    assert disclosure.entities == [f"DocumentReference/{note_id}"]
    assert disclosure.basis == f"Consent/{consent_id}"
    assert disclosure.purpose_of_use == ["HPAYMT"]
    assert disclosure.recipient_client_id == "insurer-appeals" and disclosure.recipient_user is None
    assert text not in base64.urlsafe_b64decode(direct.headers[DISCLOSURE_HEADER]).decode()

    listed = json.dumps(accounting(live, patient_ref))
    assert f"DocumentReference/{note_id}" in listed
    assert f"Consent/{consent_id}" in listed
    assert "insurer-appeals" in listed
    assert text not in listed

