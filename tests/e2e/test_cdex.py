"""Da Vinci CDex 2.1 through the gateway: payers resolve members and query directly, file Task
requests that a practitioner reviews, and receive only what was approved (records/cdex)."""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from joserfc.jwk import KeySet

from mindchart_core import signatures
from tests.actors import (
    BackendAuth,
    BackendClient,
    auditor_token,
    create_user,
    records_client,
    register_app,
    register_backend,
    smart_login,
)
from tests.conftest import RunningStack

PASSWORD = "cdex-reviewer-password-1"
LOINC = "http://loinc.org"
CDEX_TEMP = "http://hl7.org/fhir/us/davinci-cdex/CodeSystem/cdex-temp"
HREX_TEMP = "http://hl7.org/fhir/us/davinci-hrex/CodeSystem/hrex-temp"
CONF = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
MEMBER_IDS = "http://payer.example/member-ids"
PAYER_SCOPE = "system/Task.crs system/Patient.rs system/DocumentReference.rs system/Observation.rs"
REVIEWER_SCOPE = "user/Task.rus user/Patient.rs user/DocumentReference.rs user/Observation.rs"


@dataclass
class Cdex:
    payer: httpx.Client
    other_payer: httpx.Client
    reviewer: httpx.Client
    patient: str
    member_id: str
    notes: dict[str, str]
    payer_id: str


def note(patient: str, label: str, *, start: str, signed: bool = True,
         security: list[dict[str, str]] | None = None) -> dict[str, Any]:
    text = base64.b64encode(f"Progress note {label}".encode()).decode()
    resource: dict[str, Any] = {
        "resourceType": "DocumentReference", "status": "current",
        "type": {"coding": [{"system": LOINC, "code": "11506-3", "display": "Progress note"}]},
        "category": [{"coding": [{
            "system": "http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category",
            "code": "clinical-note"}]}],
        "subject": {"reference": f"Patient/{patient}"}, "date": f"{start}T10:00:00Z",
        "context": {"period": {"start": f"{start}T09:00:00Z", "end": f"{start}T09:50:00Z"}},
        "content": [{"attachment": {"contentType": "text/plain", "data": text}}],
    }
    if signed:
        resource["docStatus"] = "final"
    if security:
        resource["meta"] = {"security": security}
    return resource


@pytest.fixture(scope="module")
def cdex(live: RunningStack, writer_http: httpx.Client,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cdex]:
    suffix = uuid.uuid4().hex[:6]
    member_id = f"M-{suffix}"
    patient = writer_http.post("/Patient", json={
        "resourceType": "Patient", "identifier": [{"system": MEMBER_IDS, "value": member_id}],
        "name": [{"family": f"Shaw{suffix}", "given": ["Amy"]}], "birthDate": "1987-02-20",
        "gender": "female"}).json()["id"]
    notes = {}
    for label, body in {
        "plain": note(patient, "plain", start="2026-03-02"),
        "newest": note(patient, "newest", start="2026-05-04"),
        "restricted": note(patient, "restricted", start="2026-04-01",
                           security=[{"system": CONF, "code": "R"}, {"system": ACT_CODE, "code": "BH"}]),
        "unsigned": note(patient, "unsigned", start="2026-01-15", signed=False),
        "process": note(patient, "process", start="2026-02-01", security=[
            {"system": CONF, "code": "V"}, {"system": ACT_CODE, "code": "PSYTHPN"}]),
    }.items():
        response = writer_http.post("/DocumentReference", json=body)
        assert response.status_code == 201, response.text
        notes[label] = response.json()["id"]
    phq9 = writer_http.post("/Observation", json={
        "resourceType": "Observation", "status": "final",
        "meta": {"security": [{"system": CONF, "code": "R"}, {"system": ACT_CODE, "code": "BH"}]},
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                  "code": "survey"}]}],
        "code": {"coding": [{"system": LOINC, "code": "44261-6"}]},
        "subject": {"reference": f"Patient/{patient}"}, "effectiveDateTime": "2026-03-02T09:40:00Z",
        "valueQuantity": {"value": 14, "unit": "{score}", "system": "http://unitsofmeasure.org",
                          "code": "{score}"}})
    assert phq9.status_code == 201, phq9.text
    notes["phq9"] = phq9.json()["id"]
    keys = tmp_path_factory.mktemp("cdex-keys")
    payer = BackendClient(f"payer-{suffix}", live.gateway_url)
    register_backend(live.cli_env, payer, PAYER_SCOPE, tmp=keys, roles=("payer",))
    other = BackendClient(f"payer2-{suffix}", live.gateway_url)
    register_backend(live.cli_env, other, PAYER_SCOPE, tmp=keys, roles=("payer",))
    app = f"review-app-{suffix}"
    register_app(live.cli_env, app, f"{REVIEWER_SCOPE} openid fhirUser")
    create_user(live.cli_env, f"rev-{suffix}", PASSWORD, "practitioner", "Practitioner/cdex-reviewer")
    reviewer_token = smart_login(live.gateway_url, client_id=app, username=f"rev-{suffix}",
                                 password=PASSWORD, scope=REVIEWER_SCOPE, aud=live.fhir)["access_token"]
    with records_client(live, auth=BackendAuth(payer, PAYER_SCOPE)) as payer_http, \
            records_client(live, auth=BackendAuth(other, PAYER_SCOPE)) as other_http, \
            records_client(live, token=reviewer_token) as reviewer_http:
        yield Cdex(payer_http, other_http, reviewer_http, patient, member_id, notes, payer.client_id)


def data_request(member_id: str, *, code: str = "11506-3", due: str = "2099-01-01",
                 purpose: str = "CLMATTCH") -> dict[str, Any]:
    """A cdex-task-data-request as a payer sends it (CDex 2.1 examples): member contained."""
    return {
        "resourceType": "Task",
        "meta": {"profile": ["http://hl7.org/fhir/us/davinci-cdex/StructureDefinition/cdex-task-data-request"]},
        "contained": [{"resourceType": "Patient", "id": "member",
                       "identifier": [{"system": MEMBER_IDS, "value": member_id}]}],
        "status": "requested", "intent": "order",
        "code": {"coding": [{"system": CDEX_TEMP, "code": "data-request-code"}]},
        "for": {"reference": "#member"},
        "requester": {"identifier": {"system": "http://payer.example/payer-ids", "value": "Payer123"}},
        "owner": {"identifier": {"system": "http://hl7.org/fhir/sid/us-npi", "value": "9941339108"}},
        "reasonCode": {"coding": [{"system": "http://hl7.org/fhir/claim-use", "code": "claim"}]},
        "reasonReference": {"identifier": {"system": "http://payer.example/claims", "value": "Claim-1"}},
        "restriction": {"period": {"end": due}},
        "input": [
            {"type": {"coding": [{"system": HREX_TEMP, "code": "data-code"}]},
             "valueCodeableConcept": {"coding": [{"system": LOINC, "code": code}]}},
            {"type": {"coding": [{"system": CDEX_TEMP, "code": "purpose-of-use"}]},
             "valueCodeableConcept": {"coding": [{
                 "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": purpose}]}},
            {"type": {"coding": [{"system": CDEX_TEMP, "code": "signature-flag"}]}, "valueBoolean": True},
        ],
    }


def params(*parts: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Parameters", "parameter": list(parts)}


def release(reference: str) -> dict[str, Any]:
    return {"name": "release", "valueReference": {"reference": reference}}


def file(cdex: Cdex, task: dict[str, Any]) -> str:
    response = cdex.payer.post("/Task", json=task)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def accounting(live: RunningStack, patient: str) -> list[dict[str, Any]]:
    token = auditor_token(live, "auditor")  # a registered compliance backend (issue 12)
    response = httpx.get(f"{live.gateway_url}/audit/Patient/{patient}/$disclosures",
                         headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert response.status_code == 200, response.text
    return [e["resource"] for e in response.json().get("entry", [])]


def test_payer_resolves_its_member_and_reads_signed_notes_by_direct_query(cdex: Cdex) -> None:
    found = cdex.payer.get("/Patient", params={"identifier": f"{MEMBER_IDS}|{cdex.member_id}",
                                               "birthdate": "1987-02-20", "name": "Amy"}).json()
    assert [e["resource"]["id"] for e in found["entry"]] == [cdex.patient]

    matched = cdex.payer.post("/Patient/$match", json=params(
        {"name": "resource", "resource": {"resourceType": "Patient", "birthDate": "1987-02-20",
                                          "identifier": [{"system": MEMBER_IDS, "value": cdex.member_id}],
                                          "name": [{"family": found["entry"][0]["resource"]["name"][0]["family"]}]}},
        {"name": "onlyCertainMatches", "valueBoolean": True}))
    assert matched.status_code == 200, matched.text
    [entry] = matched.json()["entry"]
    assert entry["resource"]["id"] == cdex.patient
    assert entry["search"]["score"] == 0.9  # identifier + birthDate + family (match.py weights)
    grade = entry["search"]["extension"][0]
    assert grade == {"url": "http://hl7.org/fhir/StructureDefinition/match-grade", "valueCode": "certain"}
    weak = cdex.payer.post("/Patient/$match", json=params({"name": "resource", "resource": {
        "resourceType": "Patient", "birthDate": "1987-02-20", "name": [{"family": "Nobody"}]}}))
    assert weak.status_code == 200 and "entry" not in weak.json()
    assert cdex.payer.post("/Patient/$match", json=params()).status_code == 400

    # CDex 2.1 direct query: the latest progress note, newest period first, one at a time.
    latest = cdex.payer.get("/DocumentReference", params={
        "patient": cdex.patient, "type": f"{LOINC}|11506-3", "_sort": "-period", "_count": "1"})
    assert latest.status_code == 200, latest.text
    body = latest.json()
    assert [e["resource"]["id"] for e in body["entry"]] == [cdex.notes["newest"]]
    assert body["entry"][0]["resource"]["docStatus"] == "final"
    assert any(link["relation"] == "next" for link in body["link"])
    by_date = cdex.payer.get("/DocumentReference", params={
        "patient": cdex.patient, "type": f"{LOINC}|11506-3", "_sort": "-date", "_count": "2"}).json()
    assert [e["resource"]["id"] for e in by_date["entry"]] == [
        cdex.notes["newest"], cdex.notes["restricted"]]


def test_payers_see_only_their_own_tasks_and_cannot_change_them(live: RunningStack, cdex: Cdex,
                                                                 writer_http: httpx.Client) -> None:
    task_id = file(cdex, data_request(cdex.member_id))
    mine = cdex.payer.get(f"/Task/{task_id}").json()
    assert mine["status"] == "requested"
    assert mine["businessStatus"]["coding"][0]["code"] == "awaiting-review"
    assert cdex.other_payer.get(f"/Task/{task_id}").status_code == 404
    others = cdex.other_payer.get("/Task").json()
    assert task_id not in [e["resource"]["id"] for e in others.get("entry", [])]
    assert task_id in [e["resource"]["id"] for e in cdex.payer.get("/Task").json()["entry"]]
    # A forged requester tag changes nothing: records tags the Task with the caller.
    forged = data_request(cdex.member_id)
    forged["meta"]["tag"] = [{"system": "https://mindchart.dev/fhir/CodeSystem/cdex-requester-client",
                              "code": "someone-else"}]
    forged_id = file(cdex, forged)
    assert cdex.other_payer.get(f"/Task/{forged_id}").status_code == 404
    # Nobody changes a Task by REST: not its payer, not a writer with system/*.cruds.
    changed = {**mine, "status": "completed"}
    for client in (cdex.payer, writer_http):
        assert client.put(f"/Task/{task_id}", json=changed).status_code in (403, 405)
        assert client.delete(f"/Task/{task_id}").status_code in (403, 405)
    assert writer_http.post("/Task", json=data_request(cdex.member_id)).status_code == 403
    via_bundle = writer_http.post("", json={"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": data_request(cdex.member_id), "request": {"method": "POST", "url": "Task"}}]})
    assert via_bundle.status_code in (403, 400), via_bundle.text
    assert cdex.payer.get(f"/Task/{task_id}").json()["status"] == "requested"
    # Bad requests: a clear 4xx, nothing stored.
    wrong = data_request(cdex.member_id)
    wrong["code"] = {"coding": [{"system": CDEX_TEMP, "code": "no-such-request"}]}
    before = len(cdex.payer.get("/Task", params={"_count": "100"}).json().get("entry", []))
    assert cdex.payer.post("/Task", json=wrong).status_code == 422
    assert cdex.payer.post("/Task", json={"resourceType": "Task"}).status_code in (400, 422)
    after = len(cdex.payer.get("/Task", params={"_count": "100"}).json().get("entry", []))
    assert before == after


def test_a_reviewed_request_releases_only_the_approved_signed_notes(live: RunningStack, cdex: Cdex) -> None:
    task_id = file(cdex, data_request(cdex.member_id))
    queue = cdex.reviewer.get("/Task", params={"status": "requested", "_count": "100"}).json()
    assert task_id in [e["resource"]["id"] for e in queue["entry"]]
    assert cdex.payer.get(f"/Task/{task_id}/$candidates").status_code == 403

    listed = cdex.reviewer.get(f"/Task/{task_id}/$candidates")
    assert listed.status_code == 200, listed.text
    offered = {}
    for candidate in listed.json()["parameter"]:
        parts = {p["name"]: p for p in candidate["part"]}
        offered[parts["reference"]["valueReference"]["reference"]] = parts["restricted"]["valueBoolean"]
    notes = cdex.notes
    assert offered == {f"DocumentReference/{notes['plain']}": False,
                       f"DocumentReference/{notes['newest']}": False,
                       f"DocumentReference/{notes['restricted']}": True}

    # Restricted data only when the reviewer explicitly includes it; a non-candidate never.
    for choice in (params(release(f"DocumentReference/{notes['restricted']}")),
                   params(release(f"DocumentReference/{notes['unsigned']}")),
                   params(release(f"DocumentReference/{notes['process']}")),
                   params(release(f"DocumentReference/{notes['plain']}"),
                          release(f"DocumentReference/{notes['restricted']}"))):
        refused = cdex.reviewer.post(f"/Task/{task_id}/$approve", json=choice)
        assert refused.status_code == 422, refused.text
    assert cdex.payer.get(f"/Task/{task_id}").json()["status"] == "requested"

    approved = cdex.reviewer.post(f"/Task/{task_id}/$approve", json=params(
        release(f"DocumentReference/{notes['plain']}")))
    assert approved.status_code == 200, approved.text
    assert cdex.reviewer.post(f"/Task/{task_id}/$approve", json=params(
        release(f"DocumentReference/{notes['newest']}"))).status_code == 409

    deadline = time.monotonic() + 10
    polled = cdex.payer.get(f"/Task/{task_id}").json()
    while polled["status"] != "completed" and time.monotonic() < deadline:
        time.sleep(0.2)
        polled = cdex.payer.get(f"/Task/{task_id}").json()
    assert polled["status"] == "completed"
    assert polled["output"][0]["type"]["coding"][0] == {"system": HREX_TEMP, "code": "data-value"}
    ref = polled["output"][0]["valueReference"]["reference"]
    answer = next(r for r in polled["contained"] if f"#{r['id']}" == ref)
    assert answer["resourceType"] == "Bundle" and answer["type"] == "searchset"
    assert [e["resource"]["id"] for e in answer["entry"]] == [notes["plain"]]
    # The payer verifies records' signature against the published keys (CDex 2.1 signatures).
    signature = answer["signature"]
    assert signature["sigFormat"] == "application/jose"
    assert signature["type"][0]["code"] == "1.2.840.10065.1.12.1.5"
    published = KeySet.import_key_set(httpx.get(f"{live.fhir}/.well-known/jwks.json", timeout=30).json())
    jws = base64.b64decode(signature["data"]).decode()
    unsigned = {k: v for k, v in answer.items() if k != "signature"}
    signatures.verify_detached(jws, signatures.canonical(unsigned), published)
    tampered = {**unsigned, "total": 2}
    with pytest.raises(signatures.SignatureInvalid):
        signatures.verify_detached(jws, signatures.canonical(tampered), published)

    released = [e for e in accounting(live, cdex.patient) if task_id in e.get("entity", [{}])[-1].get(
        "description", "") or task_id in str(e)]
    assert len(released) == 1
    event = released[0]
    assert event["purposeOfEvent"][0]["coding"][0]["code"] == "CLMATTCH"
    assert cdex.payer_id in str(event["agent"])
    decisions = list(live.db("records").cdex_decisions.find({"task": task_id}))
    assert [d["decision"] for d in decisions] == ["approve"]
    assert decisions[0]["reviewer"] == "Practitioner/cdex-reviewer"
    assert decisions[0]["released"] == [f"DocumentReference/{notes['plain']}"]


def test_restricted_notes_go_only_when_the_reviewer_includes_them(cdex: Cdex) -> None:
    task_id = file(cdex, data_request(cdex.member_id))
    restricted = f"DocumentReference/{cdex.notes['restricted']}"
    approved = cdex.reviewer.post(f"/Task/{task_id}/$approve", json=params(
        release(restricted), {"name": "includeRestricted", "valueBoolean": True}))
    assert approved.status_code == 200, approved.text
    answer = approved.json()["contained"][-1]
    assert [e["resource"]["id"] for e in answer["entry"]] == [cdex.notes["restricted"]]


def test_a_refused_request_ends_rejected_with_the_reason(live: RunningStack, cdex: Cdex) -> None:
    task_id = file(cdex, data_request(cdex.member_id))
    assert cdex.reviewer.post(f"/Task/{task_id}/$refuse", json=params()).status_code == 400
    reason = "Not needed for this claim: minimum necessary (45 CFR 164.502(b))"
    refused = cdex.reviewer.post(f"/Task/{task_id}/$refuse", json=params(
        {"name": "reason", "valueString": reason}))
    assert refused.status_code == 200, refused.text
    polled = cdex.payer.get(f"/Task/{task_id}").json()
    assert polled["status"] == "rejected"
    assert polled["statusReason"]["text"] == reason
    assert "output" not in polled
    assert cdex.reviewer.post(f"/Task/{task_id}/$approve", json=params(
        release(f"DocumentReference/{cdex.notes['plain']}"))).status_code == 409
    assert [d["decision"] for d in live.db("records").cdex_decisions.find({"task": task_id})] == ["refuse"]
    # The gateway's audit trail holds each decision request too: who, when, outcome.
    recorded = list(live.db("gateway").audit_events.find({"path": f"/fhir/Task/{task_id}/$refuse"}))
    assert sorted(r["status"] for r in recorded) == [200, 400]
    assert all("Practitioner/cdex-reviewer" in r["agents"] for r in recorded)
    assert not any(task_id in str(e) for e in accounting(live, cdex.patient))


def test_the_capability_statement_declares_cdex(live: RunningStack) -> None:
    statement = httpx.get(f"{live.fhir}/metadata", timeout=30).json()
    assert "http://hl7.org/fhir/us/davinci-cdex/CapabilityStatement/data-source-server" in \
        statement["instantiates"]
    resources = {r["type"]: r for r in statement["rest"][0]["resource"]}
    task = resources["Task"]
    assert "http://hl7.org/fhir/us/davinci-cdex/StructureDefinition/cdex-task-attachment-request" in \
        task["supportedProfile"]
    assert {i["code"] for i in task["interaction"]} == {
        "read", "vread", "search-type", "history-instance", "create"}
    assert "Questionnaire-based requests" in task["documentation"]
    operations = {o["name"]: o["definition"] for o in task["operation"]}
    assert set(operations) >= {"candidates", "approve", "refuse"}
    for url in operations.values():  # each OperationDefinition it cites is served, publicly
        if url.startswith(live.fhir):
            definition = httpx.get(url, timeout=30)
            assert definition.status_code == 200, url
            assert definition.json()["resourceType"] == "OperationDefinition"
    assert {"name": "match", "definition": "http://hl7.org/fhir/OperationDefinition/Patient-match"} in \
        resources["Patient"]["operation"]


def test_an_unreviewed_request_past_its_due_date_is_marked_and_releases_nothing(
        live: RunningStack, cdex: Cdex) -> None:
    task_id = file(cdex, data_request(cdex.member_id, due="2020-01-01"))
    deadline = time.monotonic() + 30
    polled = cdex.payer.get(f"/Task/{task_id}").json()
    while polled["businessStatus"]["coding"][0]["code"] != "overdue" and time.monotonic() < deadline:
        time.sleep(0.5)
        polled = cdex.payer.get(f"/Task/{task_id}").json()
    assert polled["businessStatus"]["coding"][0]["code"] == "overdue"
    assert polled["status"] == "requested"
    assert "output" not in polled and not polled.get("contained", [])[1:]
    assert not any(task_id in str(e) for e in accounting(live, cdex.patient))


# -- attachments: records calls the payer's $submit-attachment itself -----------------------------

class PayerServer:
    """A payer's token endpoint and $submit-attachment, as the test's own HTTP server. It checks
    records' client assertion against records' published JWK Set and the bearer token it issued."""

    def __init__(self, jwks_url: str, client_id: str) -> None:
        import http.server
        import threading
        import urllib.parse

        from joserfc import jwt
        from joserfc.jwk import KeySet

        self.submissions: dict[str, list[dict[str, Any]]] = {}
        self.assertions: list[dict[str, Any]] = []
        self.issued: set[str] = set()
        self.unavailable_for = 0  # answer this many submissions with 503 first (records retries)
        self.refused_attempts = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return

            def _answer(self, status: int, body: dict[str, Any]) -> None:
                payload = httpx.Response(200, json=body).content
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.path == "/token":
                    form = dict(urllib.parse.parse_qsl(raw.decode()))
                    keys = KeySet.import_key_set(httpx.get(jwks_url, timeout=10).json())
                    try:
                        claims = jwt.decode(form["client_assertion"], keys, algorithms=["ES384"]).claims
                    except Exception:
                        self._answer(401, {"error": "invalid_client"})
                        return
                    if claims.get("iss") != client_id or claims.get("aud") != server.token_url:
                        self._answer(401, {"error": "invalid_client"})
                        return
                    server.assertions.append(claims)
                    token = uuid.uuid4().hex
                    server.issued.add(token)
                    self._answer(200, {"access_token": token, "token_type": "bearer", "expires_in": 300})
                    return
                bearer = self.headers.get("Authorization", "").removeprefix("Bearer ")
                if bearer not in server.issued:
                    self._answer(401, {"error": "invalid_token"})
                    return
                if server.unavailable_for > 0:
                    server.unavailable_for -= 1
                    server.refused_attempts += 1
                    self._answer(503, {"error": "try later"})
                    return
                server.submissions.setdefault(self.path, []).append(httpx.Response(200, content=raw).json())
                self._answer(200, {"resourceType": "OperationOutcome", "issue": [
                    {"severity": "information", "code": "informational", "diagnostics": "received"}]})

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.token_url = f"{self.base}/token"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


RECORDS_AT_PAYER = "mindchart-records-at-payer"


@pytest.fixture(scope="module")
def attachments(live: RunningStack, cdex: Cdex,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[httpx.Client, PayerServer]]:
    server = PayerServer(f"{live.fhir}/.well-known/cdex-client-jwks.json", RECORDS_AT_PAYER)
    payer = BackendClient(f"payer-att-{uuid.uuid4().hex[:6]}", live.gateway_url)
    register_backend(live.cli_env, payer, PAYER_SCOPE, tmp=tmp_path_factory.mktemp("att"),
                     roles=("payer",), extra=(
                         "--payer-endpoint", f"{server.base}/payer/$submit-attachment",
                         "--payer-token-url", server.token_url,
                         "--payer-client-id", RECORDS_AT_PAYER))
    with records_client(live, auth=BackendAuth(payer, PAYER_SCOPE)) as http:
        yield http, server
    server.close()


def attachment_request(member_id: str, payer_url: str) -> dict[str, Any]:
    """A cdex-task-attachment-request (CDex 2.1 claim attachment example's shape)."""
    task = data_request(member_id)
    task["meta"]["profile"] = [
        "http://hl7.org/fhir/us/davinci-cdex/StructureDefinition/cdex-task-attachment-request"]
    task["code"] = {"coding": [{"system": CDEX_TEMP, "code": "attachment-request-code"}]}
    task["identifier"] = [{"type": {"coding": [{"system": CDEX_TEMP, "code": "tracking-id"}]},
                           "system": "http://payer.example/tracking", "value": "TRK-42"}]
    task["contained"].append({"resourceType": "PractitionerRole", "id": "provider",
                              "practitioner": {"identifier": {
                                  "system": "http://hl7.org/fhir/sid/us-npi", "value": "9941339108"}}})
    task["owner"] = {"reference": "#provider"}
    task["input"][0]["extension"] = [{
        "url": "http://hl7.org/fhir/us/davinci-pas/StructureDefinition/extension-serviceLineNumber",
        "valuePositiveInt": 1}]
    task["input"] += [
        {"type": {"coding": [{"system": CDEX_TEMP, "code": "payer-url"}]}, "valueUrl": payer_url},
        {"type": {"coding": [{"system": CDEX_TEMP, "code": "service-date"}]}, "valueDate": "2026-03-02"},
    ]
    return task


def test_an_approved_attachment_request_is_submitted_to_the_registered_payer_endpoint(
        live: RunningStack, cdex: Cdex, attachments: tuple[httpx.Client, PayerServer]) -> None:
    payer, server = attachments
    endpoint = f"{server.base}/payer/$submit-attachment"
    filed = payer.post("/Task", json=attachment_request(cdex.member_id, endpoint))
    assert filed.status_code == 201, filed.text
    task_id = filed.json()["id"]
    assert server.submissions == {}  # nothing leaves before the review
    server.unavailable_for = 1  # the payer is down for the first attempt: records retries
    approved = cdex.reviewer.post(f"/Task/{task_id}/$approve", json=params(
        release(f"DocumentReference/{cdex.notes['plain']}")))
    assert approved.status_code == 200, approved.text

    deadline = time.monotonic() + 30
    polled = payer.get(f"/Task/{task_id}").json()
    while polled["status"] != "completed" and time.monotonic() < deadline:
        time.sleep(0.3)
        polled = payer.get(f"/Task/{task_id}").json()
    assert polled["status"] == "completed", polled
    assert polled["businessStatus"]["coding"][0]["code"] == "delivered"
    [submitted] = server.submissions["/payer/$submit-attachment"]
    assert server.refused_attempts == 1
    assert [a["sub"] for a in server.assertions] == [RECORDS_AT_PAYER] * 2
    by_name: dict[str, list[dict[str, Any]]] = {}
    for p in submitted["parameter"]:
        by_name.setdefault(p["name"], []).append(p)
    assert by_name["TrackingId"][0]["valueIdentifier"] == {
        "system": "http://payer.example/tracking", "value": "TRK-42"}
    assert by_name["AttachTo"][0]["valueCode"] == "claim"
    assert by_name["MemberId"][0]["valueIdentifier"]["value"] == cdex.member_id
    assert by_name["ProviderId"][0]["valueIdentifier"]["value"] == "9941339108"
    assert by_name["ServiceDate"][0]["valueDateTime"] == "2026-03-02"
    assert by_name["Final"][0]["valueBoolean"] is True
    [attachment] = by_name["Attachment"]
    parts = {p["name"]: p for p in attachment["part"]}
    assert parts["LineItem"]["valueString"] == "1"
    assert parts["Code"]["valueCodeableConcept"]["coding"][0]["code"] == "11506-3"
    answer = next(r for r in polled["contained"] if r["resourceType"] == "Bundle")
    assert parts["Content"]["resource"] == answer["entry"][0]["resource"]
    assert parts["Content"]["resource"]["id"] == cdex.notes["plain"]
    assert any(task_id in str(e) for e in accounting(live, cdex.patient))
    from tests.fhir_schema import assert_valid
    assert_valid(submitted)


def test_a_task_naming_an_unregistered_payer_url_releases_nothing_and_calls_nothing(
        live: RunningStack, cdex: Cdex, attachments: tuple[httpx.Client, PayerServer]) -> None:
    payer, server = attachments
    before = live.db("records").Task.count_documents({})
    for url in (f"{server.base}/elsewhere/$submit-attachment", "http://169.254.169.254/latest/meta-data"):
        refused = payer.post("/Task", json=attachment_request(cdex.member_id, url))
        assert refused.status_code == 422, refused.text
        assert "registered" in refused.json()["issue"][0]["diagnostics"]
    # A payer without registered endpoints cannot file attachment requests at all.
    assert cdex.other_payer.post("/Task", json=attachment_request(
        cdex.member_id, f"{server.base}/payer/$submit-attachment")).status_code == 422
    assert live.db("records").Task.count_documents({}) == before
    time.sleep(1)
    assert "/elsewhere/$submit-attachment" not in server.submissions


def test_observations_asked_for_are_candidates_too(cdex: Cdex) -> None:
    task_id = file(cdex, data_request(cdex.member_id, code="44261-6"))
    listed = cdex.reviewer.get(f"/Task/{task_id}/$candidates").json()
    [candidate] = listed["parameter"]
    parts = {p["name"]: p for p in candidate["part"]}
    assert parts["reference"]["valueReference"]["reference"] == f"Observation/{cdex.notes['phq9']}"
    assert parts["restricted"]["valueBoolean"] is True  # labelled R: only if explicitly included


def test_two_reviewers_approving_at_once_release_once(live: RunningStack, cdex: Cdex) -> None:
    from concurrent.futures import ThreadPoolExecutor

    task_id = file(cdex, data_request(cdex.member_id))
    choice = params(release(f"DocumentReference/{cdex.notes['plain']}"))
    with ThreadPoolExecutor(4) as pool:
        statuses = sorted(pool.map(
            lambda _: cdex.reviewer.post(f"/Task/{task_id}/$approve", json=choice).status_code, range(4)))
    assert statuses.count(200) == 1 and set(statuses) <= {200, 409}, statuses
    db = live.db("records")
    assert db.cdex_decisions.count_documents({"task": task_id}) == 1
    assert db.disclosures.count_documents({"job": task_id}) == 1
    assert sum(task_id in str(e) for e in accounting(live, cdex.patient)) == 1
