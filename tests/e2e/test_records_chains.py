"""Chained parameters, reverse chaining (`_has`) and member resolution through the gateway
(R4 search.html §2.1.1.4.5-6), always through records' one access policy: a patient-scoped token
and granular `?category=` scopes narrow the inner search too, so a chain answers exactly as if
what the caller may not see did not exist (no existence oracle)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests import records_resources as res
from tests.actors import mint_token, records_client
from tests.conftest import RunningStack

MRN = "urn:mindchart:mrn"
LAB = [{"coding": [{"system": res.OBS_CATEGORY, "code": "laboratory"}]}]
SURVEY_ONLY = f"Observation.rs?category={res.OBS_CATEGORY}|survey"


@dataclass
class Family:
    tag: str
    a: str
    b: str
    c: str
    note_a: str
    note_b: str
    provenance_a: str
    provenance_b: str


@pytest.fixture(scope="module")
def family(fhir: httpx.Client) -> Family:
    tag = uuid.uuid4().hex[:8]
    a = res.created_id(fhir.post("/Patient", json=res.patient(f"Chainfam{tag}", birthDate="1984-03-09",
                                                identifier=[{"system": MRN, "value": f"a-{tag}"}])))
    b = res.created_id(fhir.post("/Patient", json=res.patient(f"Otherfam{tag}", birthDate="1984-03-09",
                                                identifier=[{"system": MRN, "value": f"b-{tag}"}])))
    c = res.created_id(fhir.post("/Patient", json=res.patient(f"Labfam{tag}", identifier=[{"system": MRN, "value": f"c-{tag}"}])))
    note_a = res.created_id(fhir.post("/DocumentReference", json=res.progress_note(a)))
    note_b = res.created_id(fhir.post("/DocumentReference", json=res.progress_note(b)))
    provenance_a = res.created_id(fhir.post("/Provenance", json=res.provenance_of(note_a)))
    provenance_b = res.created_id(fhir.post("/Provenance", json=res.provenance_of(note_b)))
    res.created_id(fhir.post("/Observation", json=res.phq9_total(a)))
    res.created_id(fhir.post("/Observation", json=res.phq9_total(b)))
    # C's only PHQ-9-coded Observation is filed as laboratory: invisible to a survey-only scope.
    res.created_id(fhir.post("/Observation", json=res.phq9_total(c, category=LAB)))
    return Family(tag, a, b, c, note_a, note_b, provenance_a, provenance_b)


def ids(client: httpx.Client, path: str, **params: str) -> set[str]:
    response = client.get(path, params=params)
    assert response.status_code == 200, response.text
    return set(res.ids_of(response.json()))


def test_chained_reference_parameters(fhir: httpx.Client, family: Family) -> None:
    t = family.tag
    assert ids(fhir, "/DocumentReference", **{"patient.identifier": f"{MRN}|a-{t}"}) == {family.note_a}
    assert ids(fhir, "/DocumentReference", **{"subject:Patient.name": f"Chainfam{t}"}) == {family.note_a}
    assert ids(fhir, "/DocumentReference", **{"patient.identifier": f"a-{t},b-{t}"}) == {
        family.note_a, family.note_b}
    assert ids(fhir, "/DocumentReference", **{"patient.identifier": f"{MRN}|nobody-{t}"}) == set()
    # Differential: the chain answers what the two searches it stands for answer.
    patients = ids(fhir, "/Patient", birthdate="1984-03-09", name=f"Chainfam{t}")
    two_step = ids(fhir, "/DocumentReference", patient=",".join(f"Patient/{p}" for p in patients))
    chained = ids(fhir, "/DocumentReference", **{"patient.birthdate": "1984-03-09", "patient.name": f"Chainfam{t}"})
    assert chained == two_step == {family.note_a}
    # Combined with ordinary parameters, and in the Bundle's self link.
    bundle = fhir.get("/DocumentReference", params={"patient.identifier": f"a-{t}", "status": "current"}).json()
    assert res.ids_of(bundle) == [family.note_a]
    assert "patient.identifier=" in bundle["link"][0]["url"]


def test_reverse_chaining_has(fhir: httpx.Client, family: Family) -> None:
    everyone = f"{family.a},{family.b},{family.c}"
    assert ids(fhir, "/Patient", _id=everyone, **{"_has:Observation:patient:code": "44261-6"}) == {
        family.a, family.b, family.c}
    assert ids(fhir, "/Patient", _id=everyone, **{"_has:Observation:patient:category": "laboratory"}) == {family.c}
    assert ids(fhir, "/Patient", _id=everyone, **{"_has:DocumentReference:subject:type": "11506-3"}) == {
        family.a, family.b}
    assert ids(fhir, "/Patient", _id=everyone, **{"_has:Observation:patient:code": "0000-0"}) == set()


def test_revinclude_iterate_and_provenance_target(live: RunningStack, fhir: httpx.Client, family: Family) -> None:
    """R4 search.html §3.3 (`:iterate` one level) and US Core's `_revinclude=Provenance:target`:
    a patient's notes, then the Provenance of those notes, through the policy."""
    params = {"_id": f"{family.a},{family.b}", "_revinclude": "DocumentReference:subject",
              "_revinclude:iterate": "Provenance:target"}
    bundle = fhir.get("/Patient", params=params).json()
    included = {(e["resource"]["resourceType"], e["resource"]["id"]) for e in bundle["entry"]
                if e["search"]["mode"] == "include"}
    assert {("DocumentReference", family.note_a), ("Provenance", family.provenance_a),
            ("DocumentReference", family.note_b), ("Provenance", family.provenance_b)} <= included
    notes = fhir.get("/DocumentReference", params={"_id": family.note_a, "_revinclude": "Provenance:target"}).json()
    assert set(res.ids_of(notes, "include")) == {family.provenance_a}
    token = mint_token(live, scope="patient/*.rs", patient=family.a, sub="ri-app", client_id="ri-app")
    with records_client(live, token=token) as mine:
        own = mine.get("/Patient", params=params).json()
    ids_seen = {e["resource"]["id"] for e in own["entry"]}
    assert family.provenance_a in ids_seen and family.provenance_b not in ids_seen and family.note_b not in ids_seen


def test_member_resolution_by_identifier_birthdate_and_name(fhir: httpx.Client, family: Family) -> None:
    """What a payer's member match sends: identifier + birthdate + name must all hold."""
    t = family.tag
    assert ids(fhir, "/Patient", identifier=f"{MRN}|a-{t}", birthdate="1984-03-09", name=f"Chainfam{t}") == {family.a}
    assert ids(fhir, "/Patient", identifier=f"{MRN}|a-{t}", birthdate="1984-03-10", name=f"Chainfam{t}") == set()
    assert ids(fhir, "/Patient", identifier=f"{MRN}|a-{t}", birthdate="1984-03-09", name=f"Otherfam{t}") == set()


def test_a_chain_is_no_existence_oracle_for_a_patient_token(live: RunningStack, family: Family) -> None:
    """Patient A's app asks about patient B through chains: the answers are those for a patient
    that does not exist (200, empty), never an error or a count that tells B is there."""
    t = family.tag
    token = mint_token(live, scope="patient/*.rs", patient=family.a, sub="chain-app", client_id="chain-app")
    with records_client(live, token=token) as mine:
        assert ids(mine, "/DocumentReference", **{"patient.identifier": f"a-{t}"}) == {family.note_a}
        probe = mine.get("/DocumentReference", params={"patient.identifier": f"b-{t}", "_total": "accurate"})
        absent = mine.get("/DocumentReference", params={"patient.identifier": f"never-{t}", "_total": "accurate"})
        assert probe.status_code == absent.status_code == 200
        assert probe.json()["total"] == absent.json()["total"] == 0
        assert ids(mine, "/Patient", **{"_has:Observation:patient:code": "44261-6"}) == {family.a}
        assert ids(mine, "/Patient", _id=family.b, **{"_has:Observation:patient:code": "44261-6"}) == set()
        # B's note does not leak through a reverse chain from B's Provenance or Observation either.
        assert ids(mine, "/Observation", **{"patient.name": f"Otherfam{t}"}) == set()


def test_granular_category_scopes_narrow_the_inner_search(live: RunningStack, family: Family) -> None:
    """The oracle a chain could open: the outer resource is visible (C's Patient) but the inner one
    is not (C's laboratory Observation, outside a survey-only grant). The inner search runs under
    the caller's policy, so C does not match: it answers as if that Observation did not exist."""
    everyone = f"{family.a},{family.b},{family.c}"
    has_phq9 = {"_has:Observation:patient:code": "44261-6", "_id": everyone}
    survey = mint_token(live, scope=f"system/Patient.rs system/{SURVEY_ONLY}", sub="survey-only",
                        client_id="survey-only")
    with records_client(live, token=survey) as narrow:
        assert ids(narrow, "/Patient", **has_phq9) == {family.a, family.b}  # C's is laboratory
    # The same for a patient-scoped token of C: its own lab Observation is outside the grant.
    for scope, expected in ((f"patient/Patient.rs patient/{SURVEY_ONLY}", set()),
                            ("patient/Patient.rs patient/Observation.rs", {family.c})):
        token = mint_token(live, scope=scope, patient=family.c, sub="c-app", client_id="c-app")
        with records_client(live, token=token) as c_app:
            assert ids(c_app, "/Patient", **{"_has:Observation:patient:code": "44261-6"}) == expected, scope
    # No scope on the chained type at all: refused for the scope, saying nothing about the data.
    only_notes = mint_token(live, scope="system/DocumentReference.rs", sub="notes-only", client_id="notes-only")
    with records_client(live, token=only_notes) as notes:
        refused = notes.get("/DocumentReference", params={"patient.identifier": f"a-{family.tag}"})
        res.outcome(refused, 403, "forbidden")
        assert 'error="insufficient_scope"' in refused.headers["www-authenticate"]


@pytest.mark.parametrize("params", [
    {"patient.general-practitioner.name": "x"},  # two levels
    {"patient.nonsense": "x"},
    {"status.code": "x"},  # not a reference
    {"_has:Nope:patient:code": "x"},
    {"_has:Observation:code:code": "x"},  # code is no reference
    {"_has:Observation:patient": "x"},
    {"patient.identifier": ""},
    {"patient.identifier": '{"$ne": 1}'},
])
def test_bad_chains_are_400(fhir: httpx.Client, params: dict[str, Any]) -> None:
    res.outcome(fhir.get("/DocumentReference" if "_has" not in next(iter(params)) else "/Patient", params=params), 400)


def test_capability_statement_lists_chaining_and_has(live: RunningStack) -> None:
    statement = httpx.get(f"{live.fhir}/metadata").json()
    resources = {r["type"]: r for r in statement["rest"][0]["resource"]}
    patient_params = {p["name"]: p for p in resources["Patient"]["searchParam"]}
    assert patient_params["_has"]["type"] == "special"
    notes = {p["name"]: p for p in resources["DocumentReference"]["searchParam"]}
    assert "chain" in notes["patient"]["documentation"].lower()
