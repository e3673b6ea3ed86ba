"""Malformed, oversized and hostile input to records (issue 3 §Done when): 4xx with an
OperationOutcome, nothing stored, nothing leaked, the service still healthy."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.actors import mint_token, records_client
from tests.conftest import RunningStack
from tests.records_resources import outcome, patient, phq9_total

TYPES = ("Patient", "Observation", "DocumentReference", "Provenance")


@pytest.fixture(scope="module")
def pid(fhir: httpx.Client) -> str:
    return str(fhir.post("/Patient", json=patient("Hostile")).json()["id"])


def counts(live: RunningStack) -> dict[str, int]:
    db = live.db("records")
    return {t: db[t].count_documents({}) + db[f"{t}_history"].count_documents({}) for t in TYPES}


def healthy(live: RunningStack) -> bool:
    return httpx.get(f"{live.direct_url('records')}/readyz").status_code == 200


@pytest.mark.parametrize("query", [
    "patient[$ne]=x", "patient%5B%24ne%5D=x", "_id[$gt]=", "code={\"$where\":\"sleep(5000)\"}",
    "patient={\"$ne\":null}", "status=$ne", "code[$regex]=.*", "date=$gt2020",
    "subject=Patient/%7B%22%24gt%22%3A%22%22%7D", "_sort=$natural", "_cursor=garbage!",
    "_count=100000000", "_count=-1", "_count=abc", "_include=Observation:%24where",
    "value-quantity=NaN", "patient=" + "x" * 5000, "code=" + ",".join(["a"] * 100),
])
def test_injection_in_search_is_refused(live: RunningStack, fhir: httpx.Client, pid: str, query: str) -> None:
    response = fhir.get(f"/Observation?{query}")
    body = outcome(response, 400)
    assert "Traceback" not in json.dumps(body) and "pymongo" not in json.dumps(body).lower()
    assert healthy(live)


@pytest.mark.parametrize("cursor", ["WzAsW10sIngiXQ", "WzAsWyJub3QgYSBkYXRlIl0sIngiXQ", "eyJ4IjoxfQ"])
def test_forged_history_cursors_are_refused(live: RunningStack, fhir: httpx.Client, cursor: str) -> None:
    outcome(fhir.get("/Observation/_history", params={"_cursor": cursor}), 400)
    assert healthy(live)


def test_operator_injection_cannot_widen_a_patient_scope(live: RunningStack, fhir: httpx.Client, pid: str) -> None:
    fhir.post("/Observation", json=phq9_total(pid))
    token = mint_token(live, scope="patient/*.rs", patient=pid)
    with records_client(live, token=token) as me:
        for query in ("patient=x&patient:missing=true", "_id:not=x", "subject:missing=false"):
            found = me.get(f"/Observation?{query}").json()
            assert all(e["resource"]["subject"]["reference"] == f"Patient/{pid}"
                       for e in found.get("entry", [])), query


@pytest.mark.parametrize("body", [
    {"resourceType": "Patient", "$where": "1"},
    {"resourceType": "Patient", "name": [{"family": {"$ne": None}}]},
    {"resourceType": "Patient", "name": [{"family": "x", "$set": {"gender": "male"}}]},
    {"resourceType": {"$ne": None}},
])
def test_operator_shaped_bodies_are_refused(live: RunningStack, fhir: httpx.Client, body: object) -> None:
    before = counts(live)
    outcome(fhir.post("/Patient", json=body), 400)
    assert counts(live) == before


def test_deep_nesting_is_refused(live: RunningStack, fhir: httpx.Client, pid: str) -> None:
    before = counts(live)
    extension: dict[str, object] = {"url": "http://example.org/x", "valueString": "leaf"}
    for _ in range(60):
        extension = {"url": "http://example.org/x", "extension": [extension]}
    outcome(fhir.post("/Patient", json={**patient(), "extension": [extension]}), 400)
    outcome(fhir.post("/Patient", content=b"[" * 100_000 + b"]" * 100_000), 400)
    deep_bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {**patient(), "extension": [extension]}, "request": {"method": "POST", "url": "Patient"}}]}
    outcome(fhir.post("/", json=deep_bundle), 400)
    outcome(fhir.patch(f"/Patient/{pid}", json=[{"op": "add", "path": "/extension", "value": [extension]}],
                       headers={"Content-Type": "application/json-patch+json"}), 422)
    assert counts(live) == before
    assert healthy(live)


def test_oversized_bodies_are_refused(live: RunningStack, fhir: httpx.Client, pid: str) -> None:
    before = counts(live)
    big = "x" * (2 * 1024 * 1024)
    outcome(fhir.post("/Patient", json={**patient(), "text": {"status": "generated", "div": big}}), 413)
    outcome(fhir.post("/", json={"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": {**patient(), "id": big}, "request": {"method": "POST", "url": "Patient"}}]}), 413)
    many = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": f"Patient/{pid}"}}] * 1000}
    outcome(fhir.post("/", json=many), 413)
    outcome(fhir.patch(f"/Patient/{pid}", content=b"[" + b" " * (2 * 1024 * 1024) + b"]",
                       headers={"Content-Type": "application/json-patch+json"}), 413)
    assert counts(live) == before
    assert healthy(live)


@pytest.mark.parametrize("bundle", [
    {"resourceType": "Bundle", "type": "collection", "entry": []},
    {"resourceType": "Bundle", "type": "transaction", "entry": [{"request": {"method": "POST", "url": "Patient"}}]},
    {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient"}, "request": {"method": "POST", "url": "http://evil.example/Patient"}}]},
    {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient"}, "request": {"method": "POST", "url": "Spaceship"}}]},
    {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient"}, "request": {"method": "HEAD", "url": "Patient"}}]},
    {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Observation"}, "request": {"method": "POST", "url": "Patient"}}]},
    {"resourceType": "Patient"},
])
def test_malformed_bundles_are_refused(live: RunningStack, fhir: httpx.Client, bundle: dict[str, object]) -> None:
    before = counts(live)
    response = fhir.post("/", json=bundle)
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["resourceType"] == "OperationOutcome"
    assert counts(live) == before


def test_conditional_headers_are_parsed_safely(live: RunningStack, fhir: httpx.Client) -> None:
    before = counts(live)
    outcome(fhir.post("/Patient", json=patient(), headers={"If-None-Exist": "identifier[$ne]=x"}), 400)
    outcome(fhir.post("/Patient", json=patient(), headers={"If-None-Exist": 'identifier={"$gt":""}'}), 400)
    outcome(fhir.put("/Patient/abc", json={**patient(), "id": "abc"}, headers={"If-Match": "*"}), 400)
    assert counts(live) == before


def test_dates_at_the_edges_of_time_never_break_the_server(live: RunningStack, fhir: httpx.Client, pid: str) -> None:
    assert fhir.post("/Patient", json=patient(birthDate="9999-12-31")).status_code == 201
    assert fhir.post("/Patient", json=patient(birthDate="0001")).status_code == 201
    edge = fhir.post("/Observation", json=phq9_total(pid, when="0001-01-01T00:00:00+14:00"))
    assert edge.status_code in (201, 422), edge.text
    found = fhir.get("/Patient", params={"birthdate": "ge9999-12-31"})
    assert found.status_code == 200 and found.json()["total"] >= 1
    assert healthy(live)
