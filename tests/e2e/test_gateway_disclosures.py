"""Disclosures reported by a backend (DISCLOSURE_HEADER) become PrivacyDisclosure AuditEvents in the
gateway's hash chain, the header never leaves the gateway (also when malformed), and
`GET /audit/Patient/{id}/$disclosures` gives the 45 CFR 164.528 accounting.

The gateway app runs in-process on the test stack's gateway datastore (its own database), with a
fake upstream in place of records, so this does not depend on psychnotes or bulk export."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from joserfc import jwt
from joserfc.jwk import RSAKey
from pymongo import MongoClient

from gateway import chain
from gateway.app import create_app
from gateway.settings import GatewaySettings
from mindchart_core.audit import DISCLOSURE_HEADER, Disclosure, encode_disclosures
from tests.conftest import RunningStack

BASE = "http://testserver"


class Upstream:
    """Stands in for a FHIR backend: answers 200 and reports what the test tells it to."""

    def __init__(self) -> None:
        self.report: str | None = None

    async def handle(self, request: httpx.Request) -> httpx.Response:
        headers = {"content-type": "application/fhir+json"}
        if self.report is not None:
            headers[DISCLOSURE_HEADER] = self.report
        return httpx.Response(200, headers=headers, stream=OneChunk(b'{"resourceType":"DocumentReference","id":"n1"}'))


class OneChunk(httpx.AsyncByteStream):
    """A streamed body, as a real backend sends (the gateway relays upstream bodies as streams)."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    async def __aiter__(self):  # type: ignore[no-untyped-def]
        yield self.body


@pytest.fixture(scope="module")
def gateway(live: RunningStack) -> Iterator[tuple[TestClient, Upstream, Any]]:
    db_name = f"gw_disclosures_{uuid.uuid4().hex[:8]}"
    settings = GatewaySettings(mongo_url=live.config.mongo_url("gateway"), db_name=db_name, public_url=BASE)
    app = create_app(settings)
    upstream = Upstream()
    mongo: MongoClient[dict[str, Any]] = MongoClient(live.config.mongo_url("gateway"), tz_aware=True)
    with TestClient(app, base_url=BASE) as client:
        app.state.http = httpx.AsyncClient(transport=httpx.MockTransport(upstream.handle))
        yield client, upstream, mongo[db_name]
    mongo.drop_database(db_name)
    mongo.close()


def token(db: Any, **claims: Any) -> str:
    doc = db.signing_keys.find_one(sort=[("created", -1)])
    key = RSAKey.import_key(doc["jwk"])
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
    assert {r["seq"] for r in stored} == set(range(min(r["seq"] for r in stored), min(r["seq"] for r in stored) + 3))

    admin = {"Authorization": f"Bearer {token(db, scope='system/AuditEvent.rs')}"}
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
            return await chain.verify(client[db.name])
        finally:
            await client.close()

    return asyncio.run(run())
