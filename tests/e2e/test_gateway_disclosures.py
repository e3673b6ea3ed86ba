"""Disclosures reported by a backend (DISCLOSURE_HEADER) become PrivacyDisclosure AuditEvents in the
gateway's hash chain, the header never leaves the gateway (also when malformed), and
`GET /audit/Patient/{id}/$disclosures` gives the 45 CFR 164.528 accounting.

The gateway app runs in-process on the test stack's gateway datastore (its own database), with a
fake upstream in place of records, so this does not depend on psychnotes or bulk export. That fake also answers as records' internal
`$disclosures`, to check how the accounting merges, pages and fails; the real records is in
tests/e2e/test_export.py."""

from __future__ import annotations

import base64
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from joserfc import jwt
from pymongo import MongoClient

from gateway import chain_verify
from gateway.app import create_app
from gateway.settings import GatewaySettings
from mindchart_core import sealing
from mindchart_core.audit import (
    ACCOUNTING_CLIENT,
    ACCOUNTING_SCOPE,
    DISCLOSURE_HEADER,
    Disclosure,
    disclosure_audit_event,
    encode_disclosures,
)
from tests.actors import gateway_signing_key
from tests.conftest import RunningStack

BASE = "http://testserver"
KEK = sealing.new_key()  # this module's gateway seals its signing keys under it


class Upstream:
    """Stands in for a FHIR backend: answers 200 and reports what the test tells it to. As records'
    internal `$disclosures` it answers `records_events` (or fails as `records_failure` says) and
    keeps the requests it got."""

    def __init__(self) -> None:
        self.report: str | None = None
        self.records_events: list[dict[str, Any]] = []
        self.records_failure: str | None = None  # "down" | "error" | "garbage"
        self.accounting_requests: list[httpx.Request] = []

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/$disclosures"):
            return self.records_disclosures(request)
        headers = {"content-type": "application/fhir+json"}
        if self.report is not None:
            headers[DISCLOSURE_HEADER] = self.report
        return httpx.Response(200, headers=headers, stream=OneChunk(b'{"resourceType":"DocumentReference","id":"n1"}'))


    def records_disclosures(self, request: httpx.Request) -> httpx.Response:
        self.accounting_requests.append(request)
        if self.records_failure == "down":
            raise httpx.ConnectError("connection refused", request=request)
        if self.records_failure == "error":
            return httpx.Response(500, json={"resourceType": "OperationOutcome", "issue": []})
        if self.records_failure == "garbage":
            return httpx.Response(200, json={"resourceType": "Patient"})
        entries = [{"fullUrl": f"urn:uuid:{e['id']}", "resource": e, "search": {"mode": "match"}}
                   for e in self.records_events]
        return httpx.Response(200, json={"resourceType": "Bundle", "type": "searchset",
                                         "link": [{"relation": "self", "url": str(request.url)}],
                                         "entry": entries})


class OneChunk(httpx.AsyncByteStream):
    """A streamed body, as a real backend sends (the gateway relays upstream bodies as streams)."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    async def __aiter__(self):  # type: ignore[no-untyped-def]
        yield self.body


def serve_backend(upstream: Upstream) -> ThreadingHTTPServer:
    """A real HTTP server standing in for the FHIR backend behind the proxy (the proxy relays with
    its own connection pool, not `app.state.http`): 200, reporting what `upstream.report` says."""

    class Backend(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            body = b'{"resourceType":"DocumentReference","id":"n1"}'
            self.send_response(200)
            self.send_header("Content-Type", "application/fhir+json")
            if upstream.report is not None:
                self.send_header(DISCLOSURE_HEADER, upstream.report)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Backend)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def gateway(live: RunningStack, tmp_path_factory: pytest.TempPathFactory,
            ) -> Iterator[tuple[TestClient, Upstream, Any]]:
    db_name = f"gw_disclosures_{uuid.uuid4().hex[:8]}"
    kek_file = tmp_path_factory.mktemp("gw-kek") / "signing-kek"
    kek_file.write_bytes(base64.b64encode(KEK))
    upstream = Upstream()
    backend = serve_backend(upstream)
    settings = GatewaySettings(mongo_url=live.config.mongo_url("gateway"), db_name=db_name, public_url=BASE,
                               records_url=f"http://127.0.0.1:{backend.server_address[1]}",
                               signing_kek_file=kek_file)
    app = create_app(settings)
    mongo: MongoClient[dict[str, Any]] = MongoClient(live.config.mongo_url("gateway"), tz_aware=True)
    # The audit routes read the caller's registration: an auditor backend with the compliance role.
    mongo[db_name].clients.replace_one({"_id": "auditor"}, {
        "_id": "auditor", "auth": "client_secret", "scope": "system/AuditEvent.rs",
        "audiences": ["records"], "roles": ["compliance"]}, upsert=True)
    with TestClient(app, base_url=BASE) as client:
        app.state.http = httpx.AsyncClient(transport=httpx.MockTransport(upstream.handle))
        yield client, upstream, mongo[db_name]
    mongo.drop_database(db_name)
    mongo.close()
    backend.shutdown()


def token(db: Any, **claims: Any) -> str:
    key = gateway_signing_key(db, KEK)
    now = int(time.time())
    body = {"iss": BASE, "aud": f"{BASE}/fhir", "sub": "app", "client_id": "app", "scope": "system/*.rs",
            "iat": now, "exp": now + 300, "jti": uuid.uuid4().hex, **claims}
    return jwt.encode({"alg": "RS256", "kid": key.kid, "typ": "JWT"}, body, key)


def released(patient: str, recipient: str) -> Disclosure:
    return Disclosure(patient=f"Patient/{patient}", entities=["DocumentReference/n1"],
                      purpose_of_use=["TREAT"], basis="Consent/c1", recipient_client_id=recipient,
                      recipient_user="https://example.org/fhir/Practitioner/dr1",
                      description="psychotherapy note released under the patient's authorization")


def test_disclosures_are_stripped_chained_and_accounted(gateway: tuple[TestClient, Upstream, Any]) -> None:
    client, upstream, db = gateway
    reader = {"Authorization": f"Bearer {token(db)}"}
    upstream.report = encode_disclosures([released("p1", "app"), released("p2", "app")])
    response = client.get("/fhir/DocumentReference/n1", headers=reader)
    assert response.status_code == 200
    assert DISCLOSURE_HEADER not in response.headers
    request_id = response.headers["x-request-id"]
    stored = list(db.audit_events.find({"request_id": request_id}))
    assert sorted(r["kind"] for r in stored) == ["disclosure", "disclosure", "rest"]
    disclosure = next(r for r in stored if r["kind"] == "disclosure" and r["patient"] == "Patient/p1")
    event = disclosure["event"]
    assert event["type"]["code"] == "110106" and event["subtype"][0]["code"] == "disclose"
    assert event["purposeOfEvent"][0]["coding"][0]["code"] == "TREAT"
    # The request and its disclosures are consecutive links of one partition (one append).
    assert len({r["partition"] for r in stored}) == 1
    assert {r["seq"] for r in stored} == set(range(min(r["seq"] for r in stored), min(r["seq"] for r in stored) + 3))

    admin = {"Authorization": f"Bearer {token(db, scope='system/AuditEvent.rs', sub='auditor', client_id='auditor')}"}
    assert client.get("/audit/Patient/p1/$disclosures", headers=reader).status_code == 403
    accounting = client.get("/audit/Patient/p1/$disclosures", headers=admin)
    assert accounting.status_code == 200
    bundle = accounting.json()
    assert bundle["resourceType"] == "Bundle" and len(bundle["entry"]) == 1
    account = bundle["entry"][0]["resource"]
    recipient = next(a for a in account["agent"] if a["type"]["coding"][0]["code"] == "110152")
    assert recipient["who"]["reference"].endswith("Practitioner/dr1")  # who received it
    assert account["recorded"].startswith(str(datetime.now(UTC).date()))  # when
    assert account["outcomeDesc"].startswith("psychotherapy note")  # what
    assert account["purposeOfEvent"][0]["coding"][0]["code"] == "TREAT"  # why
    assert {"what": {"identifier": {"value": "Consent/c1"}}}.items() <= next(
        e for e in account["entity"] if e.get("role", {}).get("code") == "13").items()  # basis
    tomorrow = datetime.now(UTC).date() + timedelta(days=1)
    later = client.get("/audit/Patient/p1/$disclosures", params={"date": f"ge{tomorrow}"}, headers=admin)
    assert later.json()["entry"] == []
    until_today = client.get("/audit/Patient/p1/$disclosures",
                             params={"date": f"le{datetime.now(UTC).date()}"}, headers=admin)
    assert len(until_today.json()["entry"]) == 1
    assert client.get("/audit/Patient/p3/$disclosures", headers=admin).json()["entry"] == []
    assert asyncio_verify(db)["ok"]


def test_malformed_report_is_stripped_and_noted(gateway: tuple[TestClient, Upstream, Any]) -> None:
    client, upstream, db = gateway
    upstream.report = "%%% not base64 json %%%"
    response = client.get("/fhir/DocumentReference/n1", headers={"Authorization": f"Bearer {token(db)}"})
    assert response.status_code == 200
    assert DISCLOSURE_HEADER not in response.headers
    record = db.audit_events.find_one({"request_id": response.headers["x-request-id"]})
    assert "disclosure" in record["event"]["outcomeDesc"]
    upstream.report = None
    plain = client.get("/fhir/DocumentReference/n1", headers={"Authorization": f"Bearer {token(db)}"})
    assert db.audit_events.count_documents({"request_id": plain.headers["x-request-id"]}) == 1


def asyncio_verify(db: Any) -> dict[str, Any]:
    import asyncio

    from pymongo import AsyncMongoClient

    async def run() -> dict[str, Any]:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            db.client.address and f"mongodb://{db.client.address[0]}:{db.client.address[1]}/?directConnection=true",
            tz_aware=True)
        try:
            return await chain_verify.verify(client[db.name])
        finally:
            await client.close()

    return asyncio.run(run())


def records_export_event(patient: str, recorded: datetime, ident: str) -> dict[str, Any]:
    event = disclosure_audit_event(
        Disclosure(patient=f"Patient/{patient}", entities=[], purpose_of_use=["HPAYMT"],
                   basis="scope:payer", recipient_client_id="payer",
                   description=f"bulk export job-{ident}: 2 Observation"),
        custodian=f"{BASE}/fhir", request_id=f"job-{ident}", recorded=recorded)
    event["id"] = ident
    return event


def test_accounting_merges_records_export_disclosures_newest_first(
    gateway: tuple[TestClient, Upstream, Any]
) -> None:
    client, upstream, db = gateway
    patient = f"m{uuid.uuid4().hex[:8]}"
    upstream.report = encode_disclosures([released(patient, "app")])
    assert client.get("/fhir/DocumentReference/n1", headers={"Authorization": f"Bearer {token(db)}"}
                      ).status_code == 200
    upstream.report = None
    now = datetime.now(UTC)
    upstream.records_events = [records_export_event(patient, now + timedelta(hours=1), "later"),
                               records_export_event(patient, now - timedelta(hours=1), "earlier")]
    upstream.accounting_requests.clear()
    admin = {"Authorization": f"Bearer {token(db, scope='system/AuditEvent.rs', sub='auditor', client_id='auditor')}"}
    response = client.get(f"/audit/Patient/{patient}/$disclosures", headers=admin,
                          params={"date": f"ge{(now - timedelta(days=1)).date()}"})
    assert response.status_code == 200, response.text
    entries = response.json()["entry"]
    descriptions = [e["resource"]["outcomeDesc"] for e in entries]
    assert descriptions == ["bulk export job-later: 2 Observation",
                            "psychotherapy note released under the patient's authorization",
                            "bulk export job-earlier: 2 Observation"]
    assert entries[0]["fullUrl"] == "urn:uuid:later"
    assert entries[1]["fullUrl"].startswith(f"{BASE}/audit/AuditEvent/")
    assert entries[0]["resource"]["purposeOfEvent"][0]["coding"][0]["code"] == "HPAYMT"
    # What the gateway asked records, and with which credentials: a token of its own, for the
    # records audience, short-lived, with the one accounting scope and nothing clinical.
    [asked] = upstream.accounting_requests
    assert asked.url.path == f"/fhir/Patient/{patient}/$disclosures"
    assert asked.url.params.get_list("date") == [f"ge{(now - timedelta(days=1)).date()}"]
    key = gateway_signing_key(db, KEK)
    claims = jwt.decode(asked.headers["authorization"].removeprefix("Bearer "), key).claims
    assert claims["client_id"] == claims["sub"] == ACCOUNTING_CLIENT
    assert claims["scope"] == ACCOUNTING_SCOPE
    assert claims["aud"] == f"{BASE}/fhir" and claims["iss"] == BASE
    assert 0 < claims["exp"] - claims["iat"] <= 60
    # Paged: one entry at a time, in the same order, through both logs.
    seen: list[str] = []
    url: str | None = f"/audit/Patient/{patient}/$disclosures?_count=1"
    while url:
        page = client.get(url, headers=admin).json()
        seen += [e["resource"]["outcomeDesc"] for e in page["entry"]]
        url = next((link["url"].removeprefix(BASE) for link in page["link"] if link["relation"] == "next"),
                   None)
        upstream.records_events = [e for e in upstream.records_events
                                   if url is None or e["outcomeDesc"] not in seen]
    assert seen == descriptions
    upstream.records_events = []


@pytest.mark.parametrize("failure", ["down", "error", "garbage"])
def test_accounting_is_503_when_records_cannot_answer(
    gateway: tuple[TestClient, Upstream, Any], failure: str
) -> None:
    client, upstream, db = gateway
    admin = {"Authorization": f"Bearer {token(db, scope='system/AuditEvent.rs', sub='auditor', client_id='auditor')}"}
    upstream.records_failure = failure
    try:
        response = client.get("/audit/Patient/p1/$disclosures", headers=admin)
    finally:
        upstream.records_failure = None
    assert response.status_code == 503
    assert response.headers["content-type"].startswith("application/fhir+json")
    assert int(response.headers["retry-after"]) > 0
    issue = response.json()["issue"][0]
    assert issue["code"] == "transient" and "records" in issue["diagnostics"]
    assert client.get("/audit/Patient/p1/$disclosures", headers=admin).status_code == 200
