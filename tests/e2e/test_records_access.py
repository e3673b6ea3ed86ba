"""Records access rules through the gateway (issue 3 §Access rules): patient scopes see only their
compartment, also through _include, _revinclude, history and Bundles; another patient's data is
404, never 403; granular `?category=` scopes narrow results."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import httpx
import pytest

from tests.actors import mint_token, records_client
from tests.conftest import RunningStack
from tests.records_resources import (
    OBS_CATEGORY,
    created_id,
    ids_of,
    outcome,
    patient,
    phq9_total,
    progress_note,
    provenance_of,
)


@dataclass
class Two:
    mine: str
    theirs: str
    my_note: str
    their_note: str
    their_encounter: str
    my_provenance: str
    their_provenance: str
    vitals: str


@pytest.fixture(scope="module")
def two(fhir: httpx.Client) -> Two:
    mine = created_id(fhir.post("/Patient", json=patient("Mine")))
    theirs = created_id(fhir.post("/Patient", json=patient("Theirs")))
    their_encounter = created_id(fhir.post("/Encounter", json={
        "resourceType": "Encounter", "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": f"Patient/{theirs}"}}))
    # A (mis-filed) reference from my note to their encounter must not leak it through _include.
    my_note = created_id(fhir.post("/DocumentReference", json=progress_note(
        mine, context={"encounter": [{"reference": f"Encounter/{their_encounter}"}]})))
    their_note = created_id(fhir.post("/DocumentReference", json=progress_note(theirs)))
    my_provenance = created_id(fhir.post("/Provenance", json=provenance_of(my_note)))
    their_provenance = created_id(fhir.post("/Provenance", json=provenance_of(their_note)))
    fhir.post("/Observation", json=phq9_total(mine))
    vitals = created_id(fhir.post("/Observation", json=phq9_total(mine, code="8867-4", category=[
        {"coding": [{"system": OBS_CATEGORY, "code": "vital-signs"}]}])))
    note = fhir.get(f"/DocumentReference/{my_note}").json()
    assert fhir.put(f"/DocumentReference/{my_note}", json={**note, "description": "v2"}).status_code == 200
    return Two(mine, theirs, my_note, their_note, their_encounter, my_provenance, their_provenance, vitals)


def as_patient(live: RunningStack, pid: str, scope: str = "patient/*.rs") -> httpx.Client:
    return records_client(live, token=mint_token(live, scope=scope, patient=pid, sub="patient-app",
                                                 client_id="patient-app"))


def test_another_patients_resources_do_not_exist(live: RunningStack, two: Two) -> None:
    with as_patient(live, two.mine) as me:
        assert me.get(f"/DocumentReference/{two.my_note}").status_code == 200
        assert me.get(f"/Patient/{two.mine}").status_code == 200
        for path in (f"/DocumentReference/{two.their_note}", f"/Patient/{two.theirs}",
                     f"/DocumentReference/{two.their_note}/_history/1",
                     f"/DocumentReference/{two.their_note}/_history",
                     f"/Provenance/{two.their_provenance}"):
            body = outcome(me.get(path), 404, "not-found")
            assert two.their_note not in str(body) or "is not known" in str(body)
        assert ids_of(me.get("/DocumentReference", params={"patient": two.theirs}).json()) == []
        assert ids_of(me.get("/DocumentReference/$docref", params={"patient": two.theirs}).json()) == []
        assert ids_of(me.get("/DocumentReference/$docref", params={"patient": two.mine}).json()) == [two.my_note]
        assert ids_of(me.get("/DocumentReference").json()) == [two.my_note]
        assert ids_of(me.get("/Patient").json()) == [two.mine]


def test_includes_and_revincludes_stay_in_the_compartment(live: RunningStack, two: Two) -> None:
    with as_patient(live, two.mine) as me:
        bundle = me.get("/DocumentReference", params={
            "_include": "DocumentReference:encounter", "_revinclude": "Provenance:target",
            "_include:iterate": "DocumentReference:subject"}).json()
        found = {(e["resource"]["resourceType"], e["resource"]["id"]) for e in bundle["entry"]}
        assert ("Encounter", two.their_encounter) not in found
        assert ("Provenance", two.my_provenance) in found  # its compartment was resolved at write
        assert ("Provenance", two.their_provenance) not in found
        by_target = me.get("/Provenance", params={"target": f"DocumentReference/{two.their_note}"})
        assert ids_of(by_target.json()) == []


def test_history_stays_in_the_compartment(live: RunningStack, two: Two) -> None:
    with as_patient(live, two.mine) as me:
        history = me.get("/DocumentReference/_history", params={"_count": 100}).json()
        ids = {e["fullUrl"].rsplit("/", 1)[1] for e in history.get("entry", [])}
        assert ids == {two.my_note}
        assert len(history["entry"]) == 2
        own = me.get(f"/DocumentReference/{two.my_note}/_history").json()
        assert own["total"] == 2


def test_granular_category_scope_narrows_search_read_and_history(live: RunningStack, two: Two) -> None:
    scope = f"patient/Observation.rs?category={OBS_CATEGORY}|survey"
    with as_patient(live, two.mine, scope) as me:
        found = me.get("/Observation", params={"patient": two.mine}).json()
        assert found["total"] == 1 and two.vitals not in ids_of(found)
        outcome(me.get(f"/Observation/{two.vitals}"), 404)
        outcome(me.get(f"/Observation/{two.vitals}/_history"), 404)
        history = me.get("/Observation/_history").json()
        assert all(e["fullUrl"].rsplit("/", 1)[1] != two.vitals for e in history["entry"])
        outcome(me.get("/DocumentReference"), 403, "forbidden")  # no scope for notes at all


def test_user_scope_of_a_patient_user_is_their_compartment(live: RunningStack, two: Two) -> None:
    token = mint_token(live, scope="user/*.rs", fhirUser=f"{live.fhir}/Patient/{two.mine}",
                       sub="patient-user", client_id="portal")
    with records_client(live, token=token) as portal:
        assert ids_of(portal.get("/DocumentReference").json()) == [two.my_note]
        outcome(portal.get(f"/DocumentReference/{two.their_note}"), 404)
    clinician = mint_token(live, scope="user/*.rs", fhirUser=f"{live.fhir}/Practitioner/p1",
                           sub="clinician", client_id="ehr")
    with records_client(live, token=clinician) as ehr:
        assert ehr.get(f"/DocumentReference/{two.their_note}").status_code == 200


def test_patient_scope_cannot_write_into_another_compartment(live: RunningStack, two: Two) -> None:
    db = live.db("records")
    before = db.Observation.count_documents({})
    with as_patient(live, two.mine, "patient/*.cruds") as me:
        outcome(me.post("/Observation", json=phq9_total(two.theirs)), 403)
        p = f"urn:uuid:{uuid.uuid4()}"
        response = me.post("/", json={"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": phq9_total(two.mine), "request": {"method": "POST", "url": "Observation"}},
            {"fullUrl": p, "resource": phq9_total(two.theirs),
             "request": {"method": "POST", "url": "Observation"}}]})
        outcome(response, 403)
        outcome(me.delete(f"/DocumentReference/{two.their_note}"), 404)
        their = {"op": "replace", "path": "/status", "value": "superseded"}
        outcome(me.patch(f"/DocumentReference/{two.their_note}", json=[their],
                         headers={"Content-Type": "application/json-patch+json"}), 404)
        assert me.post("/Observation", json=phq9_total(two.mine)).status_code == 201
    assert db.Observation.count_documents({}) == before + 1

