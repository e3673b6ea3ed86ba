"""Two ordinary FHIR clients, used unchanged against the gateway with a bearer token (issue 3
§Done when): fhirpy (async: create, search, paging with fetch_all) and fhirclient (read, search,
paging)."""

from __future__ import annotations

import uuid

import pytest
from fhirclient.models.documentreference import DocumentReference
from fhirclient.models.observation import Observation
from fhirclient.models.patient import Patient
from fhirclient.server import FHIRServer
from fhirpy import AsyncFHIRClient

from tests.actors import BackendClient
from tests.conftest import RunningStack
from tests.records_resources import phq9_total, progress_note


@pytest.fixture(scope="module")
def bearer(writer: BackendClient) -> str:
    return writer.token("system/*.cruds")


async def test_fhirpy_async_create_search_and_fetch_all(live: RunningStack, bearer: str) -> None:
    client = AsyncFHIRClient(live.fhir, authorization=f"Bearer {bearer}")
    family = f"Fhirpy-{uuid.uuid4().hex[:6]}"
    person = client.resource("Patient", name=[{"family": family, "given": ["Ada"]}], gender="female")
    await person.create()
    assert person.id
    for score in range(5):
        await client.resource("Observation", **{k: v for k, v in phq9_total(person.id, score).items()
                                               if k != "resourceType"}).create()
    await client.resource("DocumentReference", **{
        k: v for k, v in progress_note(person.id).items() if k != "resourceType"}).create()

    found = await client.resources("Patient").search(family=family).fetch()
    assert [p.id for p in found] == [person.id]
    everything = await client.resources("Observation").search(patient=person.id).limit(2).fetch_all()
    assert len(everything) == 5 and len({o.id for o in everything}) == 5
    scores = sorted(o["valueQuantity"]["value"] for o in everything)
    assert scores == [0, 1, 2, 3, 4]
    newest = await client.resources("Observation").search(patient=person.id).sort("-date").first()
    assert newest is not None and newest["subject"]["reference"] == f"Patient/{person.id}"
    notes = await client.resources("DocumentReference").search(
        patient=person.id, category="clinical-note").fetch_all()
    assert len(notes) == 1
    fetched = await client.reference("Patient", person.id).to_resource()
    assert fetched["name"][0]["family"] == family
    assert await client.resources("Observation").search(patient=person.id).count() == 5


def test_fhirclient_read_search_and_paging(live: RunningStack, bearer: str, writer: BackendClient) -> None:
    import httpx

    headers = {"Authorization": f"Bearer {bearer}", "Content-Type": "application/fhir+json"}
    pid = httpx.post(f"{live.fhir}/Patient", headers=headers, json={
        "resourceType": "Patient", "name": [{"family": "Fhirclient"}]}).json()["id"]
    for score in range(5):
        assert httpx.post(f"{live.fhir}/Observation", headers=headers,
                          json=phq9_total(pid, score)).status_code == 201
    httpx.post(f"{live.fhir}/DocumentReference", headers=headers, json=progress_note(pid))

    server = FHIRServer(None, base_uri=live.fhir)
    server.session.headers["Authorization"] = f"Bearer {bearer}"
    person = Patient.read(pid, server)
    assert person.name[0].family == "Fhirclient"
    search = Observation.where(struct={"patient": pid, "_count": "2"})
    pages = list(search.perform_iter(server))
    assert len(pages) == 3
    observations = [entry.resource for page in pages for entry in page.entry or []]
    assert len({o.id for o in observations}) == 5
    assert all(o.subject.reference == f"Patient/{pid}" for o in observations)
    notes = list(DocumentReference.where(struct={"patient": pid}).perform_resources_iter(server))
    assert len(notes) == 1 and notes[0].type.coding[0].code == "11506-3"
