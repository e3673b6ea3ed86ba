"""Issue 12: what an outside review opened in the audit trail, the records write paths and the
token endpoints, each as the attack it was, through the gateway. Each test failed on the code
before the fix (the psychotherapy-note findings are in test_psychnotes_attacks.py)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import httpx

from tests.actors import JWT_BEARER, BackendClient, mint_token, register_backend, run_cli
from tests.conftest import RunningStack
from tests.e2e.test_records_access import as_patient
from tests.records_resources import outcome, patient, phq9_total, progress_note


def audit_routes(live: RunningStack, token: str) -> list[int]:
    headers = {"Authorization": f"Bearer {token}"}
    return [httpx.get(f"{live.gateway_url}{path}", headers=headers, timeout=30).status_code
            for path in ("/audit/AuditEvent?_count=1", "/audit/Patient/anyone/$disclosures")]


# -- Critical 3: the audit trail is not reachable through a wildcard or a scope string alone ------

def test_a_wildcard_backend_is_never_granted_the_audit_trail(live: RunningStack, tmp_path: Path) -> None:
    """A backend registered with system/*.rs asked for system/AuditEvent.rs and got it, then read
    /audit/AuditEvent and every patient's accounting. A wildcard never names AuditEvent."""
    wildcard = BackendClient(f"wild-{uuid.uuid4().hex[:6]}", live.gateway_url)
    register_backend(live.cli_env, wildcard, "system/*.rs", tmp=tmp_path)
    refused = wildcard.token_request("system/AuditEvent.rs")
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_scope", refused.text
    mixed = wildcard.token_request("system/Patient.rs system/AuditEvent.rs")
    assert mixed.status_code == 200 and mixed.json()["scope"] == "system/Patient.rs"
    assert audit_routes(live, mixed.json()["access_token"]) == [403, 403]
    everything = wildcard.token("system/*.rs")
    assert audit_routes(live, everything) == [403, 403]


def test_the_audit_routes_check_the_callers_registration_and_role(live: RunningStack,
                                                                  tmp_path: Path) -> None:
    """A scope naming AuditEvent is not enough: the client must hold the admin or compliance role
    in its registration, read again on each request (a role taken away ends access at once)."""
    siem = BackendClient(f"siem-{uuid.uuid4().hex[:6]}", live.gateway_url)
    register_backend(live.cli_env, siem, "system/AuditEvent.rs", tmp=tmp_path)
    assert audit_routes(live, siem.token("system/AuditEvent.rs")) == [403, 403]
    register_backend(live.cli_env, siem, "system/AuditEvent.rs", tmp=tmp_path, roles=("compliance",))
    token = siem.token("system/AuditEvent.rs")
    assert audit_routes(live, token) == [200, 200]
    register_backend(live.cli_env, siem, "system/AuditEvent.rs", tmp=tmp_path)  # role removed
    assert audit_routes(live, token) == [403, 403]
    result = run_cli(live.cli_env, "client", "create", "--id", siem.client_id, "--auth",
                     "private_key_jwt", "--jwks", str(tmp_path / f"{siem.client_id}.jwks.json"),
                     "--scope", "system/Patient.rs", "--role", "compliance")
    assert result.returncode == 0, result.stderr
    assert audit_routes(live, token) == [403, 403]  # no longer registered for the trail


# -- High 6 and update-as-create: a patient's writes stay inside their own compartment ------------

def _created(response: httpx.Response) -> str:
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def test_a_patient_cannot_write_into_another_patients_record(live: RunningStack,
                                                             writer_http: httpx.Client) -> None:
    """A Group with patient B as a member, created with patient A's token, showed in B's
    `$everything`; a Provenance targeting B's note was accepted. Every write by a
    patient-context token falls inside that patient's compartment, references included."""
    a = _created(writer_http.post("/Patient", json=patient("Writer")))
    b = _created(writer_http.post("/Patient", json=patient("Victim")))
    their_note = _created(writer_http.post("/DocumentReference", json=progress_note(b)))
    my_note = _created(writer_http.post("/DocumentReference", json=progress_note(a)))
    group = {"resourceType": "Group", "type": "person", "actual": True,
             "member": [{"entity": {"reference": f"Patient/{a}"}},
                        {"entity": {"reference": f"Patient/{b}"}}]}
    provenance = {"resourceType": "Provenance", "recorded": "2026-11-20T10:00:00Z",
                  "agent": [{"who": {"display": "me"}}]}
    with as_patient(live, a, "patient/*.cruds") as me:
        outcome(me.post("/Group", json=group), 403)
        outcome(me.post("/Provenance", json={
            **provenance, "target": [{"reference": f"DocumentReference/{their_note}"}]}), 403)
        outcome(me.post("/Observation", json=phq9_total(a, hasMember=[
            {"reference": f"DocumentReference/{their_note}"}])), 403)
        # a reference to nothing answers as a reference to another's: no existence oracle
        outcome(me.post("/Observation", json=phq9_total(a, hasMember=[
            {"reference": "Observation/no-such-thing"}])), 403)
        assert me.post("/Provenance", json={
            **provenance, "target": [{"reference": f"DocumentReference/{my_note}"}]}).status_code == 201
    everything = writer_http.get(f"/Patient/{b}/$everything").json()
    kinds = {e["resource"]["resourceType"] for e in everything.get("entry", [])}
    assert "Group" not in kinds and "Provenance" not in kinds


def test_update_as_create_reveals_no_ids_to_a_patient(live: RunningStack,
                                                      writer_http: httpx.Client) -> None:
    """PUT to another patient's id was 404 and to a free id 201: an existence oracle and id
    squatting. A patient-context token never creates by PUT; both answer 404."""
    a = _created(writer_http.post("/Patient", json=patient("Prober")))
    b = _created(writer_http.post("/Patient", json=patient("Probed")))
    their_obs = _created(writer_http.post("/Observation", json=phq9_total(b)))
    free = f"free-{uuid.uuid4().hex[:8]}"
    with as_patient(live, a, "patient/*.cruds") as me:
        taken = me.put(f"/Observation/{their_obs}", json={**phq9_total(a), "id": their_obs})
        unused = me.put(f"/Observation/{free}", json={**phq9_total(a), "id": free})
        outcome(taken, 404)
        outcome(unused, 404)
        assert taken.json()["issue"][0]["code"] == unused.json()["issue"][0]["code"]
        mine = _created(me.post("/Observation", json=phq9_total(a)))
        current = me.get(f"/Observation/{mine}").json()
        assert me.put(f"/Observation/{mine}", json={**current, "status": "amended"}).status_code == 200
    assert writer_http.get(f"/Observation/{free}").status_code == 404


# -- High 5: records and psychnotes refuse a revoked access token themselves ---------------------

def _after_revocation(url: str, token: str, *, within: float = 15.0) -> int:
    """The status a backend answers once the revocation had time to reach it (bounded poll)."""
    deadline = time.monotonic() + within
    while True:
        status = httpx.get(url, headers={"Authorization": f"Bearer {token}",
                                         "Accept": "application/fhir+json"}, timeout=30).status_code
        if status == 401 or time.monotonic() > deadline:
            return status
        time.sleep(0.2)


def test_backends_refuse_a_revoked_token_called_directly(live: RunningStack, tmp_path: Path,
                                                         writer_http: httpx.Client) -> None:
    """A revoked access token sent straight to records or psychnotes still read data: the
    backends learn revocations within the gateway's refresh interval and refuse them."""
    reader = BackendClient(f"revoked-{uuid.uuid4().hex[:6]}", live.gateway_url)
    register_backend(live.cli_env, reader, "system/Patient.rs system/Consent.rs",
                     audiences=("records", "psychnotes"), tmp=tmp_path)
    pid = _created(writer_http.post("/Patient", json=patient("Revoked")))
    records_url = f"{live.direct_url('records')}/fhir/Patient/{pid}"
    vault_url = f"{live.direct_url('psychnotes')}/psychnotes/fhir/Consent?patient={pid}"
    records_token = reader.token("system/Patient.rs")
    vault_token = reader.token("system/Consent.rs", aud=live.psychnotes)
    auth = {"Authorization": f"Bearer {records_token}"}
    assert httpx.get(records_url, headers=auth, timeout=30).status_code == 200
    assert httpx.get(vault_url, headers={"Authorization": f"Bearer {vault_token}"},
                     timeout=30).status_code == 403  # known caller, not a party: not 401
    for token in (records_token, vault_token):
        revoked = httpx.post(f"{live.gateway_url}/oauth/revoke", data={
            "token": token, "client_assertion_type": JWT_BEARER,
            "client_assertion": reader.assertion()}, timeout=30)
        assert revoked.status_code == 200, revoked.text
    assert _after_revocation(records_url, records_token) == 401
    assert _after_revocation(vault_url, vault_token) == 401
    fresh = reader.token("system/Patient.rs")  # other tokens of the client are unaffected
    assert httpx.get(records_url, headers={"Authorization": f"Bearer {fresh}"},
                     timeout=30).status_code == 200


# -- introspection callers and forwarded addresses ------------------------------------------------

def _introspect(live: RunningStack, token: str, caller: str) -> dict[str, object]:
    response = httpx.post(f"{live.gateway_url}/oauth/introspect", data={"token": token},
                          headers={"Authorization": f"Bearer {caller}"}, timeout=30)
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_introspection_tells_a_caller_only_about_its_own_tokens(live: RunningStack,
                                                                tmp_path: Path) -> None:
    """Any bearer token could introspect any other: a patient's token learned the therapist's
    scopes, fhirUser and patient context. RFC 7662 §2.1 and §4: only a registered resource server
    learns about any token; another caller only about its own client's (and own user's)."""
    therapist = mint_token(live, sub="dr-intro", client_id="ehr-app", scope="user/*.rs",
                           fhirUser=f"{live.fhir}/Practitioner/dr-intro")
    patient_token = mint_token(live, sub="patient-intro", client_id="patient-app",
                               scope="patient/*.rs", patient="p-intro")
    same_app_patient = mint_token(live, sub="patient-intro", client_id="ehr-app",
                                  scope="patient/*.rs", patient="p-intro")
    assert _introspect(live, therapist, patient_token) == {"active": False}
    assert _introspect(live, therapist, same_app_patient) == {"active": False}
    assert _introspect(live, patient_token, patient_token)["active"] is True  # its own
    server = BackendClient(f"rs-{uuid.uuid4().hex[:6]}", live.gateway_url)
    register_backend(live.cli_env, server, "system/Patient.rs", tmp=tmp_path, roles=("resource-server",))
    seen = _introspect(live, therapist, server.token("system/Patient.rs"))
    assert seen["active"] is True and seen["fhirUser"] == f"{live.fhir}/Practitioner/dr-intro"


def test_forwarded_for_is_believed_only_from_a_configured_proxy(live: RunningStack) -> None:
    """X-Forwarded-For from any local peer fed the audit record and the token endpoint's rate
    limit; it is believed only from MINDCHART_GATEWAY_TRUSTED_PROXIES (none here)."""
    spoofed = "203.0.113.77"
    response = httpx.get(f"{live.gateway_url}/fhir/metadata", headers={"X-Forwarded-For": spoofed},
                         timeout=30)
    assert response.status_code == 200
    record = live.db("gateway").audit_events.find_one({"request_id": response.headers["x-request-id"]})
    assert record is not None
    addresses = [a.get("network", {}).get("address") for a in record["event"]["agent"]]
    assert spoofed not in addresses and "127.0.0.1" in addresses, addresses
