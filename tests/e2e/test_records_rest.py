"""Records REST interactions through the gateway (issue 3 §Interactions), every answer checked
against the official FHIR R4 JSON schema."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from tests.actors import BackendAuth, BackendClient, records_client
from tests.conftest import RunningStack
from tests.records_resources import (
    outcome,
    patient,
    phq9_total,
    progress_note,
)


@pytest.fixture(scope="module")
def direct(live: RunningStack, writer: BackendClient) -> Iterator[httpx.Client]:
    """Records without the gateway, for what the gateway does not route yet (see each test)."""
    with records_client(live, auth=BackendAuth(writer, "system/*.cruds"), direct=True) as client:
        yield client


@pytest.fixture(scope="module")
def pid(fhir: httpx.Client) -> str:
    created = fhir.post("/Patient", json=patient())
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


def test_capability_statement_states_what_is_implemented(live: RunningStack) -> None:
    with records_client(live) as anonymous:
        statement = anonymous.get("/metadata").json()
    assert statement["fhirVersion"] == "4.0.1" and statement["kind"] == "instance"
    rest = statement["rest"][0]
    assert rest["security"]["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"
    oauth = {e["url"]: e["valueUri"] for e in rest["security"]["extension"][0]["extension"]}
    assert oauth["token"] == f"{live.gateway_url}/oauth/token"
    assert {i["code"] for i in rest["interaction"]} == {"transaction", "batch", "history-system"}
    by_type = {r["type"]: r for r in rest["resource"]}
    assert set(by_type) >= {"Patient", "Practitioner", "Encounter", "DocumentReference",
                            "Observation", "Condition", "Provenance"}
    notes = by_type["DocumentReference"]
    assert {i["code"] for i in notes["interaction"]} >= {
        "read", "vread", "update", "patch", "delete", "history-instance", "history-type",
        "create", "search-type"}
    assert {p["name"] for p in notes["searchParam"]} >= {
        "patient", "category", "type", "date", "status", "period", "_id", "_lastUpdated"}
    assert "Provenance:target" in notes["searchRevInclude"]
    assert notes["operation"][0]["name"] == "validate"
    assert notes["conditionalCreate"] is True and notes["conditionalUpdate"] is True


def test_vread_history_and_delete(fhir: httpx.Client, pid: str) -> None:
    note = fhir.post("/DocumentReference", json=progress_note(pid)).json()
    url = f"/DocumentReference/{note['id']}"
    note["status"] = "superseded"
    assert fhir.put(url, json=note).status_code == 200
    first = fhir.get(f"{url}/_history/1")
    assert first.status_code == 200 and first.json()["status"] == "current"
    assert first.headers["etag"] == 'W/"1"'
    assert fhir.get(f"{url}/_history/2").json()["status"] == "superseded"
    outcome(fhir.get(f"{url}/_history/9"), 404, "not-found")

    deleted = fhir.delete(url)
    assert deleted.status_code == 204
    outcome(fhir.get(url), 410, "deleted")
    outcome(fhir.get(f"{url}/_history/3"), 410, "deleted")
    assert fhir.get(f"{url}/_history/1").status_code == 200  # old versions stay readable

    history = fhir.get(f"{url}/_history").json()
    assert history["type"] == "history" and history["total"] == 3
    entries = history["entry"]
    assert [e["request"]["method"] for e in entries] == ["DELETE", "PUT", "POST"]
    assert "resource" not in entries[0]
    assert entries[0]["response"]["etag"] == 'W/"3"'
    assert entries[1]["resource"]["meta"]["versionId"] == "2"
    assert entries[2]["response"]["status"].startswith("201")
    assert all(e["fullUrl"].endswith(url) for e in entries)
    search = fhir.get("/DocumentReference", params={"_id": note["id"]}).json()
    assert search["total"] == 0  # a deleted resource no longer matches


def test_type_history_with_since_and_count(fhir: httpx.Client, pid: str) -> None:
    time.sleep(0.01)
    since = fhir.get("/Patient/" + pid).json()["meta"]["lastUpdated"]
    time.sleep(0.01)
    made = [fhir.post("/Condition", json={
        "resourceType": "Condition", "subject": {"reference": f"Patient/{pid}"},
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "35489007"}]}}).json()
        for _ in range(3)]
    page = fhir.get("/Condition/_history", params={"_since": since, "_count": 2}).json()
    assert page["type"] == "history" and len(page["entry"]) == 2
    nxt = next(link["url"] for link in page["link"] if link["relation"] == "next")
    rest = fhir.get(nxt).json()
    seen = [e["resource"]["id"] for e in page["entry"] + rest["entry"]]
    assert sorted(seen) == sorted(c["id"] for c in made)
    assert seen[0] == made[-1]["id"]  # newest first
    later = fhir.get("/Condition/_history", params={"_since": "2999-01-01T00:00:00Z"}).json()
    assert "entry" not in later


def test_if_match_update_and_delete(fhir: httpx.Client, pid: str) -> None:
    obs = fhir.post("/Observation", json=phq9_total(pid)).json()
    url = f"/Observation/{obs['id']}"
    obs["status"] = "amended"
    outcome(fhir.put(url, json=obs, headers={"If-Match": 'W/"7"'}), 412)
    ok = fhir.put(url, json=obs, headers={"If-Match": 'W/"1"'})
    assert ok.status_code == 200 and ok.headers["etag"] == 'W/"2"'
    outcome(fhir.put(url, json=obs, headers={"If-Match": 'W/"1"'}), 412)
    outcome(fhir.delete(url, headers={"If-Match": 'W/"1"'}), 412)
    assert fhir.get(url).status_code == 200
    assert fhir.delete(url, headers={"If-Match": 'W/"2"'}).status_code == 204


def test_conditional_create(live: RunningStack, fhir: httpx.Client) -> None:
    system, value = "urn:mindchart:mrn", uuid.uuid4().hex
    body = patient(identifier=[{"system": system, "value": value}])
    header = {"If-None-Exist": f"identifier={system}|{value}"}
    first = fhir.post("/Patient", json=body, headers=header)
    assert first.status_code == 201
    again = fhir.post("/Patient", json=body, headers=header)
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert live.db("records").Patient.count_documents({"sp.identifier": f"{system}|{value}"}) == 1
    assert fhir.post("/Patient", json=body).status_code == 201  # a duplicate, made on purpose
    outcome(fhir.post("/Patient", json=body, headers=header), 412)
    outcome(fhir.post("/Patient", json=body, headers={"If-None-Exist": "bogus=1"}), 400)


def test_conditional_update(live: RunningStack, fhir: httpx.Client) -> None:
    value = uuid.uuid4().hex
    criteria = {"identifier": f"urn:mindchart:mrn|{value}"}
    body = patient("Okafor", identifier=[{"system": "urn:mindchart:mrn", "value": value}])
    created = fhir.put("/Patient", params=criteria, json=body)
    assert created.status_code == 201, created.text
    new_id = created.json()["id"]
    updated = fhir.put("/Patient", params=criteria, json={**body, "gender": "female"})
    assert updated.status_code == 200 and updated.json()["id"] == new_id
    assert updated.json()["meta"]["versionId"] == "2"
    assert fhir.post("/Patient", json=body).status_code == 201
    outcome(fhir.put("/Patient", params=criteria, json=body), 412)


def test_post_to_the_exact_base_is_not_redirected(live: RunningStack, fhir: httpx.Client) -> None:
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "metadata"}}]}
    response = httpx.post(live.fhir, json=bundle, headers=dict(fhir.headers), auth=fhir.auth,
                          follow_redirects=False, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["type"] == "batch-response"


def test_update_as_create_with_a_client_id(fhir: httpx.Client, live: RunningStack) -> None:
    client_id = f"pract-{uuid.uuid4().hex[:8]}"
    body = {"resourceType": "Practitioner", "id": client_id, "name": [{"family": "Chen"}]}
    created = fhir.put(f"/Practitioner/{client_id}", json=body)
    assert created.status_code == 201
    assert created.headers["location"] == f"{live.fhir}/Practitioner/{client_id}/_history/1"
    assert fhir.put(f"/Practitioner/{client_id}", json=body).status_code == 200
    outcome(fhir.put(f"/Practitioner/{client_id}", json={**body, "id": "other"}), 400)


def test_json_patch(live: RunningStack, fhir: httpx.Client, pid: str) -> None:
    note = fhir.post("/DocumentReference", json=progress_note(pid)).json()
    url = f"/DocumentReference/{note['id']}"
    headers = {"Content-Type": "application/json-patch+json"}
    patched = fhir.patch(url, headers={**headers, "If-Match": 'W/"1"'}, json=[
        {"op": "test", "path": "/status", "value": "current"},
        {"op": "replace", "path": "/status", "value": "superseded"},
        {"op": "add", "path": "/description", "value": "Session 4"}])
    assert patched.status_code == 200, patched.text
    assert patched.json()["status"] == "superseded" and patched.json()["meta"]["versionId"] == "2"
    assert fhir.get(url).json()["description"] == "Session 4"
    outcome(fhir.patch(url, headers=headers, json=[{"op": "replace", "path": "/id", "value": "x"}]), 422)
    outcome(fhir.patch(url, headers=headers,
                       json=[{"op": "replace", "path": "/meta/versionId", "value": "9"}]), 422)
    outcome(fhir.patch(url, headers=headers,
                       json=[{"op": "replace", "path": "/status", "value": "bogus"}]), 422)
    outcome(fhir.patch(url, headers=headers,
                       json=[{"op": "test", "path": "/status", "value": "current"}]), 422)
    outcome(fhir.patch(url, headers={**headers, "If-Match": 'W/"1"'},
                       json=[{"op": "remove", "path": "/description"}]), 412)
    outcome(fhir.patch(url, json=[{"op": "remove", "path": "/description"}]), 415)
    outcome(fhir.patch(url, headers=headers, content=b'{"op": "remove"}'), 400)
    assert fhir.get(url).json()["meta"]["versionId"] == "2"  # refused patches stored nothing


@pytest.mark.parametrize(("prefer", "expect"), [
    ("return=minimal", None), ("return=representation", "Patient"),
    ("return=OperationOutcome", "OperationOutcome"), (None, "Patient")])
def test_prefer_return(fhir: httpx.Client, prefer: str | None, expect: str | None) -> None:
    headers = {"Prefer": prefer} if prefer else {}
    created = fhir.post("/Patient", json=patient(), headers=headers)
    assert created.status_code == 201 and created.headers["location"]
    if expect is None:
        assert created.content == b""
    else:
        assert created.json()["resourceType"] == expect


def test_validate_operation_stores_nothing(live: RunningStack, fhir: httpx.Client, pid: str) -> None:
    before = live.db("records").DocumentReference.count_documents({})
    good = fhir.post("/DocumentReference/$validate", json=progress_note(pid))
    assert good.status_code == 200
    assert good.json()["issue"][0]["severity"] == "information"
    bad = fhir.post("/DocumentReference/$validate", json=progress_note(pid, status="bogus")).json()
    assert bad["issue"][0]["severity"] == "error" and "status" in bad["issue"][0]["diagnostics"]
    wrapped = fhir.post("/DocumentReference/$validate", json={
        "resourceType": "Parameters", "parameter": [{"name": "resource", "resource": progress_note(pid)}]})
    assert wrapped.json()["issue"][0]["severity"] == "information"
    assert live.db("records").DocumentReference.count_documents({}) == before
    note = fhir.post("/DocumentReference", json=progress_note(pid)).json()
    instance = fhir.post(f"/DocumentReference/{note['id']}/$validate", json=note).json()
    assert instance["issue"][0]["severity"] == "information"
    outcome(fhir.post("/DocumentReference/nope/$validate", json=note), 404)


def test_transaction_rewrites_urn_uuid_references(live: RunningStack, fhir: httpx.Client) -> None:
    p, n = f"urn:uuid:{uuid.uuid4()}", f"urn:uuid:{uuid.uuid4()}"
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": n, "resource": progress_note("placeholder", subject={"reference": p}),
         "request": {"method": "POST", "url": "DocumentReference"}},
        {"resource": {"resourceType": "Provenance", "target": [{"reference": n}],
                      "recorded": "2026-11-20T10:05:00Z",
                      "agent": [{"who": {"display": "Dr Chen"}}]},
         "request": {"method": "POST", "url": "Provenance"}},
        {"fullUrl": p, "resource": patient("Transact"), "request": {"method": "POST", "url": "Patient"}},
        {"resource": phq9_total("x", subject={"reference": p}, derivedFrom=[{"reference": n}]),
         "request": {"method": "POST", "url": "Observation"}},
    ]}
    response = fhir.post("/", json=bundle)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["type"] == "transaction-response"
    assert [e["response"]["status"] for e in result["entry"]] == ["201 Created"] * 4
    note, provenance, person, obs = (e["resource"] for e in result["entry"])
    assert note["subject"]["reference"] == f"Patient/{person['id']}"
    assert provenance["target"][0]["reference"] == f"DocumentReference/{note['id']}"
    assert obs["derivedFrom"][0]["reference"] == f"DocumentReference/{note['id']}"
    assert result["entry"][0]["response"]["location"].startswith(f"DocumentReference/{note['id']}/_history/1")
    stored = fhir.get(f"/DocumentReference/{note['id']}").json()
    assert stored["subject"]["reference"] == f"Patient/{person['id']}"
    # The Provenance joined the note's patient compartment at write time.
    assert live.db("records").Provenance.find_one({"_id": provenance["id"]})["c"] == [person["id"]]


def test_transaction_is_all_or_nothing(live: RunningStack, fhir: httpx.Client, pid: str) -> None:
    db = live.db("records")
    before = (db.Patient.count_documents({}), db.DocumentReference.count_documents({}))
    existing = fhir.post("/Observation", json=phq9_total(pid)).json()
    obs_before = db.Observation.count_documents({})
    p = f"urn:uuid:{uuid.uuid4()}"
    bad_entry = {"resource": progress_note("x", subject={"reference": p}, status="bogus"),
                 "request": {"method": "POST", "url": "DocumentReference"}}
    stale = {"resource": {**existing, "status": "amended"},
             "request": {"method": "PUT", "url": f"Observation/{existing['id']}", "ifMatch": 'W/"5"'}}
    for failing, status in ((bad_entry, 400), (stale, 412)):
        response = fhir.post("/", json={"resourceType": "Bundle", "type": "transaction", "entry": [
            {"fullUrl": p, "resource": patient("Never"), "request": {"method": "POST", "url": "Patient"}},
            {"resource": phq9_total("x", subject={"reference": p}),
             "request": {"method": "POST", "url": "Observation"}},
            failing]})
        outcome(response, status)
    assert (db.Patient.count_documents({}), db.DocumentReference.count_documents({})) == before
    assert db.Observation.count_documents({}) == obs_before
    assert fhir.get(f"/Observation/{existing['id']}").json()["meta"]["versionId"] == "1"
    unresolved = fhir.post("/", json={"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": phq9_total("x", subject={"reference": f"urn:uuid:{uuid.uuid4()}"}),
         "request": {"method": "POST", "url": "Observation"}}]})
    outcome(unresolved, 400)


def test_batch_entries_are_independent(live: RunningStack, fhir: httpx.Client, pid: str) -> None:
    response = fhir.post("/", json={"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": phq9_total(pid, 7), "request": {"method": "POST", "url": "Observation"}},
        {"resource": phq9_total(pid, status="bogus"), "request": {"method": "POST", "url": "Observation"}},
        {"request": {"method": "GET", "url": f"Patient/{pid}"}},
        {"request": {"method": "GET", "url": "Patient/does-not-exist"}},
        {"request": {"method": "GET", "url": f"Observation?patient={pid}&_count=1"}},
    ]})
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["type"] == "batch-response"
    statuses = [e["response"]["status"] for e in result["entry"]]
    assert statuses[0] == "201 Created" and statuses[1] == "400" and statuses[2] == "200 OK"
    assert statuses[3] == "404" and result["entry"][3]["response"]["outcome"]["issue"][0]["code"] == "not-found"
    assert result["entry"][4]["resource"]["type"] == "searchset"
    created = result["entry"][0]["resource"]["id"]
    assert fhir.get(f"/Observation/{created}").json()["valueQuantity"]["value"] == 7


def test_formats_and_media_types(fhir: httpx.Client, pid: str) -> None:
    assert fhir.get(f"/Patient/{pid}", params={"_format": "json"}).status_code == 200
    assert fhir.get(f"/Patient/{pid}", params={"_format": "application/fhir+json"}).status_code == 200
    outcome(fhir.get(f"/Patient/{pid}", params={"_format": "xml"}), 406)
    outcome(fhir.get(f"/Patient/{pid}", headers={"Accept": "application/fhir+xml"}), 406)
    plain = fhir.post("/Patient", json=patient(), headers={"Content-Type": "application/json"})
    assert plain.status_code == 201
    assert plain.headers["content-type"].startswith("application/fhir+json")
    outcome(fhir.post("/Patient", content=b"<Patient/>", headers={"Content-Type": "application/fhir+xml"}), 415)


def test_summary_and_elements_on_read(fhir: httpx.Client, pid: str) -> None:
    summary = fhir.get(f"/Patient/{pid}", params={"_summary": "true"}).json()
    assert summary["meta"]["tag"][0]["code"] == "SUBSETTED"
    assert summary["name"] and summary["gender"]
    elements = fhir.get(f"/Patient/{pid}", params={"_elements": "gender"}).json()
    assert set(elements) == {"resourceType", "id", "meta", "gender"}


def test_transaction_conditional_create_reuses_the_match(fhir: httpx.Client) -> None:
    value = uuid.uuid4().hex
    existing = fhir.post("/Patient", json=patient(identifier=[{"system": "urn:mindchart:mrn", "value": value}]))
    p = f"urn:uuid:{uuid.uuid4()}"
    response = fhir.post("/", headers={"Prefer": "return=minimal"}, json={
        "resourceType": "Bundle", "type": "transaction", "entry": [
            {"fullUrl": p, "resource": patient(identifier=[{"system": "urn:mindchart:mrn", "value": value}]),
             "request": {"method": "POST", "url": "Patient", "ifNoneExist": f"identifier=urn:mindchart:mrn|{value}"}},
            {"resource": phq9_total("x", subject={"reference": p}),
             "request": {"method": "POST", "url": "Observation"}}]})
    assert response.status_code == 200, response.text
    first, second = response.json()["entry"]
    assert first["response"]["status"] == "200 OK" and "resource" not in first  # return=minimal
    assert first["response"]["location"].startswith(f"Patient/{existing.json()['id']}/")
    obs_id = second["response"]["location"].split("/")[1]
    assert fhir.get(f"/Observation/{obs_id}").json()["subject"]["reference"] == f"Patient/{existing.json()['id']}"


def test_summary_text_keeps_the_narrative(fhir: httpx.Client) -> None:
    created = fhir.post("/Patient", json=patient(
        text={"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">Alex Rivera</div>'})).json()
    text = fhir.get(f"/Patient/{created['id']}", params={"_summary": "text"}).json()
    assert text["text"]["div"].endswith("Alex Rivera</div>") and "name" not in text
    assert text["meta"]["tag"][-1]["code"] == "SUBSETTED"


def test_transaction_resolves_conditional_references(live: RunningStack, fhir: httpx.Client) -> None:
    value = uuid.uuid4().hex
    person = fhir.post("/Patient", json=patient(identifier=[{"system": "urn:mindchart:mrn", "value": value}])).json()
    ref = f"Patient?identifier=urn:mindchart:mrn|{value}"
    response = fhir.post("/", json={"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": progress_note("x", subject={"reference": ref}),
         "request": {"method": "POST", "url": "DocumentReference"}}]})
    assert response.status_code == 200, response.text
    assert response.json()["entry"][0]["resource"]["subject"]["reference"] == f"Patient/{person['id']}"
    before = live.db("records").DocumentReference.count_documents({})
    nobody = fhir.post("/", json={"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": progress_note("x", subject={"reference": "Patient?identifier=urn:mindchart:mrn|nobody"}),
         "request": {"method": "POST", "url": "DocumentReference"}}]})
    outcome(nobody, 412)
    assert live.db("records").DocumentReference.count_documents({}) == before
