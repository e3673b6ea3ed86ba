"""The walking skeleton end to end, speaking only HTTP to the gateway (issue: walking skeleton)."""

from __future__ import annotations

import base64
import http.client
import json
import time
import uuid
from typing import Any

import httpx
import pytest
from joserfc import jwt

from tests.actors import BackendClient, mint_token, register_backend, run_cli, sensitive
from tests.conftest import RunningStack
from tests.e2e.test_psychnotes import care_team

NOTE_TEXT = sensitive("S: sleeping poorly. O: PHQ-9 14. A: moderate depression. P: weekly CBT.")


def progress_note(patient_id: str, **changes: Any) -> dict[str, Any]:
    note = {
        "resourceType": "DocumentReference",
        "status": "current",
        "type": {"coding": [{"system": "http://loinc.org", "code": "11506-3"}]},
        "category": [{"coding": [{
            "system": "http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category",
            "code": "clinical-note"}]}],
        "subject": {"reference": f"Patient/{patient_id}"},
        "date": "2026-11-20T10:00:00Z",
        "content": [{"attachment": {"contentType": "text/plain",
                                    "data": base64.b64encode(NOTE_TEXT.encode()).decode()}}],
    }
    note.update(changes)
    return note


def assert_outcome(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    if code is not None:
        assert body["issue"][0]["code"] == code
    return dict(body)


def audit_for(live: RunningStack, request_id: str) -> dict[str, Any] | None:
    doc: dict[str, Any] | None = live.db("gateway").audit_events.find_one({"request_id": request_id})
    return doc


@pytest.fixture(scope="module")
def patient_id(writer_http: httpx.Client) -> str:
    response = writer_http.post("/Patient", json={
        "resourceType": "Patient", "name": [{"family": "Nguyen", "given": ["Sam"]}],
        "gender": "female", "birthDate": "1988-02-03"})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def test_backend_client_gets_a_signed_token_with_its_own_assertion(live: RunningStack, writer: BackendClient) -> None:
    response = writer.token_request("system/Patient.rs")
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["token_type"].lower() == "bearer"
    assert body["scope"] == "system/Patient.rs"
    assert 0 < body["expires_in"] <= 300
    keys = httpx.get(f"{live.gateway_url}/oauth/jwks").json()
    assert keys["keys"] and all("d" not in k for k in keys["keys"])
    from joserfc.jwk import KeySet
    claims = jwt.decode(body["access_token"], KeySet.import_key_set(keys)).claims
    assert claims["aud"] == live.fhir
    assert claims["iss"] == live.gateway_url
    assert claims["client_id"] == "test-writer"
    assert claims["exp"] - time.time() <= 300
    assert claims["jti"]


def test_create_read_and_search_a_progress_note(writer_http: httpx.Client, patient_id: str, live: RunningStack) -> None:
    created = writer_http.post("/DocumentReference", json=progress_note(patient_id, id="ignored"))
    assert created.status_code == 201, created.text
    note = created.json()
    assert note["id"] != "ignored"
    assert created.headers["etag"] == 'W/"1"'
    assert created.headers["location"] == f"{live.fhir}/DocumentReference/{note['id']}/_history/1"
    assert "last-modified" in created.headers

    read = writer_http.get(f"/DocumentReference/{note['id']}")
    assert read.status_code == 200
    assert read.json() == note
    assert read.headers["etag"] == 'W/"1"'

    note["status"] = "superseded"
    updated = writer_http.put(f"/DocumentReference/{note['id']}", json=note)
    assert updated.status_code == 200, updated.text
    assert updated.headers["etag"] == 'W/"2"'
    assert updated.json()["meta"]["versionId"] == "2"

    by_patient = writer_http.get("/DocumentReference", params={"patient": patient_id}).json()
    assert by_patient["resourceType"] == "Bundle" and by_patient["type"] == "searchset"
    assert [e["resource"]["id"] for e in by_patient["entry"]] == [note["id"]]
    assert by_patient["entry"][0]["fullUrl"] == f"{live.fhir}/DocumentReference/{note['id']}"
    by_id = writer_http.get("/DocumentReference", params={"_id": note["id"]}).json()
    assert by_id["total"] == 1
    other = writer_http.get("/DocumentReference", params={"patient": "nobody"}).json()
    assert other["total"] == 0 and "entry" not in other


def test_patient_search_by_id_and_paging(writer_http: httpx.Client, patient_id: str) -> None:
    for _ in range(3):
        assert writer_http.post("/Observation", json={
            "resourceType": "Observation", "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                      "code": "survey"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "44261-6"}]},
            "subject": {"reference": f"Patient/{patient_id}"},
            "effectiveDateTime": "2026-11-20", "valueQuantity": {"value": 9}}).status_code == 201
    first = writer_http.get("/Observation", params={"patient": patient_id, "_count": 2}).json()
    assert len(first["entry"]) == 2
    nxt = next(link["url"] for link in first["link"] if link["relation"] == "next")
    second = writer_http.get(nxt).json()
    ids = {e["resource"]["id"] for e in first["entry"]} | {e["resource"]["id"] for e in second["entry"]}
    assert len(ids) == 3
    assert writer_http.get("/Patient", params={"_id": patient_id}).json()["total"] == 1


# -- refusals -----------------------------------------------------------------------------------

def test_no_token_is_refused_with_a_bearer_challenge(live: RunningStack) -> None:
    response = httpx.get(f"{live.fhir}/Patient")
    assert_outcome(response, 401, "login")
    assert response.headers["www-authenticate"].startswith("Bearer")
    audit = audit_for(live, response.headers["x-request-id"])
    assert audit is not None and audit["status"] == 401 and audit["event"]["outcome"] == "4"


def test_token_for_another_audience_is_refused(live: RunningStack, tmp_path: Any) -> None:
    both = BackendClient(f"both-{uuid.uuid4().hex[:6]}", live.gateway_url)
    register_backend(live.cli_env, both, "system/*.rs", audiences=("records", "psychnotes"), tmp=tmp_path)
    psych_token = both.token("system/*.rs", aud=live.psychnotes)
    assert_outcome(httpx.get(f"{live.fhir}/Patient", headers={"Authorization": f"Bearer {psych_token}"}), 401)
    records_token = both.token("system/*.rs")
    assert_outcome(httpx.get(f"{live.psychnotes}/DocumentReference",
                             headers={"Authorization": f"Bearer {records_token}"}), 401)
    # An audience the client is not registered for is refused at the token endpoint.
    refused = BackendClient(f"rec-{uuid.uuid4().hex[:6]}", live.gateway_url)
    register_backend(live.cli_env, refused, "system/*.rs", tmp=tmp_path)
    response = refused.token_request("system/*.rs", aud=live.psychnotes)
    assert response.status_code == 400 and response.json()["error"] == "invalid_request"


def test_scope_too_narrow_is_refused(live: RunningStack, writer: BackendClient, patient_id: str) -> None:
    token = writer.token("system/Patient.rs")
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"}
    assert httpx.get(f"{live.fhir}/Patient/{patient_id}", headers=headers).status_code == 200
    assert_outcome(httpx.get(f"{live.fhir}/DocumentReference", headers=headers), 403, "forbidden")
    assert_outcome(httpx.post(f"{live.fhir}/Patient", headers=headers,
                              content=json.dumps({"resourceType": "Patient"})), 403, "forbidden")


def test_scopes_are_capped_by_registration(live: RunningStack, tmp_path: Any) -> None:
    reader = BackendClient(f"reader-{uuid.uuid4().hex[:6]}", live.gateway_url)
    register_backend(live.cli_env, reader, "system/Observation.rs", tmp=tmp_path)
    granted = reader.token_request("system/Observation.rs system/Patient.rs system/*.cruds").json()
    assert granted["scope"] == "system/Observation.rs"
    refused = reader.token_request("system/Patient.rs")
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_scope"


def test_replayed_assertion_is_refused(writer: BackendClient) -> None:
    assertion = writer.assertion()
    assert writer.token_request("system/*.rs", assertion=assertion).status_code == 200
    replay = writer.token_request("system/*.rs", assertion=assertion)
    assert replay.status_code in (400, 401)
    assert replay.json()["error"] == "invalid_client"
    assert replay.headers["cache-control"] == "no-store"


@pytest.mark.parametrize("claims", [
    {"aud": "http://elsewhere.example/token"},
    {"exp": int(time.time()) + 3600},
    {"exp": int(time.time()) - 60},
    {"iss": "someone-else"},
])
def test_bad_assertions_are_invalid_client(writer: BackendClient, claims: dict[str, Any]) -> None:
    response = writer.token_request("system/*.rs", assertion=writer.assertion(**claims))
    assert response.status_code in (400, 401)
    assert response.json()["error"] == "invalid_client"


def test_assertion_signed_by_an_unregistered_key_is_refused(live: RunningStack, writer: BackendClient) -> None:
    impostor = BackendClient(writer.client_id, live.gateway_url)  # same id, different key
    assert impostor.token_request("system/*.rs").json()["error"] == "invalid_client"


def test_expired_and_tampered_tokens_are_refused(live: RunningStack, writer: BackendClient) -> None:
    url = f"{live.fhir}/Patient"
    assert httpx.get(url, headers={"Authorization": f"Bearer {mint_token(live)}"}).status_code == 200
    expired = mint_token(live, exp=int(time.time()) - 120, iat=int(time.time()) - 600)
    assert_outcome(httpx.get(url, headers={"Authorization": f"Bearer {expired}"}), 401, "login")
    header, payload, signature = writer.token("system/Patient.rs").split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["scope"] = "system/*.cruds"
    forged_payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    tampered = f"{header}.{forged_payload}.{signature}"
    assert_outcome(httpx.get(url, headers={"Authorization": f"Bearer {tampered}"}), 401, "login")
    unsigned_header = base64.urlsafe_b64encode(b'{"alg":"none"}').rstrip(b"=").decode()
    none_alg = f"{unsigned_header}.{forged_payload}."
    assert_outcome(httpx.get(url, headers={"Authorization": f"Bearer {none_alg}"}), 401, "login")


def test_backends_refuse_direct_calls_without_a_valid_token(live: RunningStack, writer: BackendClient) -> None:
    for service, path in (("records", "/fhir/Patient"), ("psychnotes", "/psychnotes/fhir/DocumentReference")):
        base = live.direct_url(service)
        assert_outcome(httpx.get(base + path), 401, "login")
        forged = {"Authorization": "Bearer not-a-jwt", "X-Client-Id": "admin", "X-Forwarded-User": "admin"}
        assert_outcome(httpx.get(base + path, headers=forged), 401, "login")


def test_identity_headers_are_not_forwarded(live: RunningStack, writer: BackendClient) -> None:
    token = writer.token("system/Patient.rs")
    response = httpx.get(f"{live.fhir}/DocumentReference", headers={
        "Authorization": f"Bearer {token}", "X-Forwarded-User": "Practitioner/1",
        "X-Scope": "system/*.cruds", "X-Mindchart-Client": "admin"})
    assert_outcome(response, 403, "forbidden")


def test_psychotherapy_note_reads_are_refused(live: RunningStack, tmp_path: Any) -> None:
    client = BackendClient(f"psy-{uuid.uuid4().hex[:6]}", live.gateway_url)
    register_backend(live.cli_env, client, "system/DocumentReference.rs", audiences=("psychnotes",), tmp=tmp_path)
    token = client.token("system/DocumentReference.rs", aud=live.psychnotes)
    headers = {"Authorization": f"Bearer {token}"}
    for path in ("/DocumentReference", "/DocumentReference/anything", "/DocumentReference?patient=1"):
        assert_outcome(httpx.get(live.psychnotes + path, headers=headers), 403, "forbidden")


def test_psychotherapy_note_is_labelled_by_the_server(live: RunningStack, tmp_path: Any) -> None:
    """Create through the gateway with a practitioner-bound token; the stored note carries V/PSYTHPN/NOAUTH."""
    token = mint_token(live, audience=live.psychnotes, sub="therapist", client_id="app",
                       scope="user/DocumentReference.c", fhirUser=f"{live.fhir}/Practitioner/p1")
    note = progress_note("p9", meta={"security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "N"}]})
    care_team(live, "p9", "Practitioner/p1")  # only the patient's care team writes their notes
    response = httpx.post(f"{live.psychnotes}/DocumentReference", json=note,
                          headers={"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"})
    assert response.status_code == 201, response.text
    note_id = response.headers["location"].split("/")[-3]
    stored = live.db("psychnotes").notes.find_one({"_id": note_id})
    codes = {c["code"] for c in stored["resource"]["meta"]["security"]}
    assert codes == {"V", "PSYTHPN", "NOAUTH"}
    assert stored["author"] == "Practitioner/p1"


# -- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("body", "status"), [
    (b'{"resourceType": "Patient",', 400),
    (json.dumps({"resourceType": "Observation", "status": "final", "code": {"text": "x"}}).encode(), 400),
    (json.dumps({"resourceType": "Patient", "favouriteColour": "blue"}).encode(), 400),
    (json.dumps({"resourceType": "Patient", "name": []}).encode(), 400),
    (json.dumps({"resourceType": "Patient", "gender": None}).encode(), 400),
    (json.dumps({"resourceType": "Patient", "gender": "bogus"}).encode(), 400),
    (json.dumps(["not", "an", "object"]).encode(), 400),
    (b"", 400),
])
def test_bad_patient_input_is_refused_and_nothing_is_stored(
    live: RunningStack, writer_http: httpx.Client, body: bytes, status: int
) -> None:
    before = live.db("records").Patient.count_documents({})
    response = writer_http.post("/Patient", content=body)
    assert_outcome(response, status)
    assert live.db("records").Patient.count_documents({}) == before
    assert httpx.get(f"{live.direct_url('records')}/readyz").status_code == 200


def test_bogus_status_and_oversized_body(live: RunningStack, writer_http: httpx.Client, patient_id: str) -> None:
    before = live.db("records").DocumentReference.count_documents({})
    assert_outcome(writer_http.post("/DocumentReference", json=progress_note(patient_id, status="bogus")), 400)
    huge = progress_note(patient_id, description="x" * (2 * 1024 * 1024))
    assert_outcome(writer_http.post("/DocumentReference", json=huge), 413)
    assert_outcome(writer_http.post("/DocumentReference", content=b"{}",
                                    headers={"Content-Type": "text/plain"}), 415)
    assert_outcome(writer_http.get("/Patient", headers={"Accept": "application/xml"}), 406)
    assert live.db("records").DocumentReference.count_documents({}) == before


def test_unknown_type_and_path_tricks(live: RunningStack, writer_http: httpx.Client) -> None:
    assert_outcome(writer_http.get("/Spaceship"), 404, "not-found")
    token = writer_http.auth.client.token("system/*.rs")  # type: ignore[attr-defined]
    host, port = live.gateway_url.removeprefix("http://").split(":")
    for raw in ("/psychnotes/fhir/../../fhir/Patient", "/fhir/%2e%2e/psychnotes/fhir/DocumentReference",
                "/fhir/Patient/..%2F..%2Fpsychnotes", "/psychnotes/fhir/./DocumentReference"):
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("GET", raw, headers={"Authorization": f"Bearer {token}"})
        response = conn.getresponse()
        body = json.loads(response.read())
        conn.close()
        assert response.status == 400, raw
        assert body["issue"][0]["code"] == "invalid"


# -- audit, request ids, health -----------------------------------------------------------------

def test_every_request_is_audited_with_its_request_id(live: RunningStack, writer_http: httpx.Client, patient_id: str) -> None:
    ok = writer_http.get(f"/Patient/{patient_id}", headers={"X-Request-ID": "trace-abc-123"})
    assert ok.headers["x-request-id"] == "trace-abc-123"
    record = audit_for(live, "trace-abc-123")
    assert record is not None
    assert record["status"] == 200 and record["method"] == "GET"
    assert record["client_id"] == "test-writer" and record["path"] == f"/fhir/Patient/{patient_id}"
    assert record["latency_ms"] >= 0 and record["patient"] == f"Patient/{patient_id}"
    event = record["event"]
    assert event["resourceType"] == "AuditEvent" and event["action"] == "R"
    assert event["subtype"][0]["code"] == "read"
    missing = writer_http.get("/Patient/does-not-exist")
    assert missing.status_code == 404
    assert audit_for(live, missing.headers["x-request-id"])["status"] == 404
    generated = httpx.get(f"{live.gateway_url}/nowhere")
    assert generated.status_code == 404 and len(generated.headers["x-request-id"]) >= 16
    assert audit_for(live, generated.headers["x-request-id"]) is not None


def test_health_endpoints(live: RunningStack) -> None:
    for service in ("gateway", "records", "psychnotes"):
        base = live.direct_url(service)
        assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}
        assert httpx.get(f"{base}/readyz").status_code == 200
        assert "mindchart_http_requests_total" in httpx.get(f"{base}/metrics").text


def test_cli_creates_clients_and_users_as_json(live: RunningStack, tmp_path: Any) -> None:
    result = run_cli(live.cli_env, "client", "create", "--id", "secret-app", "--auth", "client_secret",
                     "--secret", sensitive("a-very-long-secret-value"), "--scope", "system/Patient.rs",
                     "--audience", "records")
    assert result.returncode == 0, result.stderr
    created = json.loads(result.stdout)
    assert created["id"] == "secret-app" and created["auth"] == "client_secret"
    assert "a-very-long-secret-value" not in result.stdout
    token = httpx.post(f"{live.gateway_url}/oauth/token", data={"grant_type": "client_credentials",
                       "scope": "system/Patient.rs"}, auth=("secret-app", "a-very-long-secret-value"))
    assert token.status_code == 200
    wrong = httpx.post(f"{live.gateway_url}/oauth/token", data={"grant_type": "client_credentials",
                       "scope": "system/Patient.rs"}, auth=("secret-app", "wrong-secret-value!!"))
    assert wrong.status_code == 401 and wrong.json()["error"] == "invalid_client"
    user = run_cli(live.cli_env, "user", "create", "--username", "drsmith", "--password",
                   sensitive("correct horse battery"), "--role", "practitioner", "--fhir-user", "Practitioner/p1")
    assert user.returncode == 0, user.stderr
    assert json.loads(user.stdout)["fhir_user"] == "Practitioner/p1"
    stored = live.db("gateway").users.find_one({"_id": "drsmith"})
    assert stored["password_hash"].startswith("$argon2") and "correct horse" not in str(stored)
    bad = run_cli(live.cli_env, "user", "create", "--username", "x", "--password", "short", "--role", "admin")
    assert bad.returncode == 2 and "password" in bad.stderr


def test_the_gateway_refuses_oversized_bodies_at_the_edge(live: RunningStack, writer: BackendClient) -> None:
    big = b"x" * (1024 * 1024 + 1)
    token = httpx.post(f"{live.gateway_url}/oauth/token", content=big,
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert token.status_code == 413 and token.json()["error"] == "invalid_request"
    assert audit_for(live, token.headers["x-request-id"])["status"] == 413
    headers = {"Authorization": f"Bearer {writer.token('system/*.cruds')}",
               "Content-Type": "application/fhir+json"}
    declared = httpx.post(f"{live.fhir}/Patient", content=big, headers=headers)
    assert_outcome(declared, 413, "too-costly")

    def chunks():  # no Content-Length: the gateway counts as the body streams
        for _ in range(20):
            yield b"x" * 65536

    streamed = httpx.post(f"{live.fhir}/Patient", content=chunks(), headers=headers)
    assert_outcome(streamed, 413, "too-costly")
    assert httpx.get(f"{live.gateway_url}/readyz").status_code == 200
