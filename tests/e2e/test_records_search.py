"""Records search through the gateway (issue 3 §Search): US Core combinations, parameter types,
modifiers, includes, sorting, paging, result shaping. Every answer is schema-checked."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.conftest import RunningStack
from tests.records_resources import (
    LOINC,
    NOTE_CATEGORY,
    OBS_CATEGORY,
    ids_of,
    outcome,
    patient,
    phq9_total,
    progress_note,
)


@dataclass
class World:
    pid: str
    other: str
    notes: dict[str, str]
    obs: dict[str, str]
    encounter: str
    provenance: str
    practitioner: str
    family: str


def _make(fhir: httpx.Client, body: dict[str, Any]) -> str:
    response = fhir.post(f"/{body['resourceType']}", json=body)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


@pytest.fixture(scope="module")
def world(fhir: httpx.Client) -> World:
    family = f"Zoë-{uuid.uuid4().hex[:6]}"
    pid = _make(fhir, patient(family, gender="female", birthDate="1984-03-09",
                              identifier=[{"system": "urn:mindchart:mrn", "value": family}]))
    other = _make(fhir, patient(f"Other-{family}", gender="male", birthDate="1971-12-30"))
    practitioner = _make(fhir, {"resourceType": "Practitioner", "name": [{"family": "Chen"}]})
    encounter = _make(fhir, {
        "resourceType": "Encounter", "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": f"Patient/{pid}"},
        "period": {"start": "2026-10-05T09:00:00Z", "end": "2026-10-05T09:50:00Z"}})
    notes = {
        "oct": _make(fhir, progress_note(pid, date="2026-10-05T10:00:00Z",
                                         author=[{"reference": f"Practitioner/{practitioner}"}],
                                         context={"encounter": [{"reference": f"Encounter/{encounter}"}],
                                                  "period": {"start": "2026-10-05T09:00:00Z",
                                                             "end": "2026-10-05T09:50:00Z"}})),
        "nov": _make(fhir, progress_note(pid, code="11510-5", date="2026-11-12T15:30:00Z")),
        "dec": _make(fhir, progress_note(pid, code="28627-8", date="2026-12-01T12:00:00Z",
                                         status="superseded")),
        "other": _make(fhir, progress_note(other, date="2026-11-12T15:30:00Z")),
    }
    panel_item = _make(fhir, phq9_total(pid, 2, code="44260-8", when="2026-10-05"))
    obs = {
        "phq_oct": _make(fhir, phq9_total(pid, 14, when="2026-10-05",
                                          hasMember=[{"reference": f"Observation/{panel_item}"}])),
        "phq_nov": _make(fhir, phq9_total(pid, 9, when="2026-11-12T15:00:00Z")),
        "gad_nov": _make(fhir, phq9_total(pid, 11, code="70274-6", when="2026-11-12T15:05:00Z")),
        "item": panel_item,
    }
    provenance = _make(fhir, {
        "resourceType": "Provenance", "target": [{"reference": f"DocumentReference/{notes['oct']}"}],
        "recorded": "2026-10-05T10:01:00Z",
        "agent": [{"who": {"reference": f"Practitioner/{practitioner}"}}]})
    _make(fhir, {"resourceType": "Condition", "subject": {"reference": f"Patient/{pid}"},
                 "category": [{"coding": [{
                     "system": "http://terminology.hl7.org/CodeSystem/condition-category",
                     "code": "problem-list-item"}]}],
                 "code": {"coding": [{"system": "http://snomed.info/sct", "code": "35489007"}]}})
    return World(pid, other, notes, obs, encounter, provenance, practitioner, family)


def search(fhir: httpx.Client, kind: str, **params: Any) -> dict[str, Any]:
    response = fhir.get(f"/{kind}", params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert body["type"] == "searchset"
    return body


def notes_of(fhir: httpx.Client, world: World, **params: Any) -> set[str]:
    names = {v: k for k, v in world.notes.items()}
    return {names.get(i, i) for i in ids_of(search(fhir, "DocumentReference", **params))}


def obs_of(fhir: httpx.Client, world: World, **params: Any) -> set[str]:
    names = {v: k for k, v in world.obs.items()}
    return {names.get(i, i) for i in ids_of(search(fhir, "Observation", **params))}


# -- US Core DocumentReference ------------------------------------------------------------------

def test_us_core_document_reference_searches(fhir: httpx.Client, world: World) -> None:
    pid = world.pid
    clinical = f"{NOTE_CATEGORY}|clinical-note"
    assert notes_of(fhir, world, patient=pid) == {"oct", "nov", "dec"}
    assert notes_of(fhir, world, _id=world.notes["nov"]) == {"nov"}
    assert notes_of(fhir, world, patient=pid, category=clinical) == {"oct", "nov", "dec"}
    assert notes_of(fhir, world, patient=pid, category="clinical-note", date="ge2026-11-01") == {"nov", "dec"}
    assert notes_of(fhir, world, patient=pid, category=clinical, date=["gt2026-10-05", "lt2026-12"]) == {"nov"}
    assert notes_of(fhir, world, patient=pid, category=clinical, date="le2026-10-05") == {"oct"}
    assert notes_of(fhir, world, patient=pid, type=f"{LOINC}|11510-5") == {"nov"}
    assert notes_of(fhir, world, patient=pid, status="superseded") == {"dec"}
    assert notes_of(fhir, world, patient=pid, type=f"{LOINC}|11506-3",
                    period="ge2026-10-05T09:10:00Z") == {"oct"}
    assert notes_of(fhir, world, patient=pid, _lastUpdated="gt2000-01-01") == {"oct", "nov", "dec"}
    assert notes_of(fhir, world, patient=pid, _lastUpdated="lt2000-01-01") == set()


def test_us_core_observation_searches(fhir: httpx.Client, world: World) -> None:
    pid, survey = world.pid, f"{OBS_CATEGORY}|survey"
    assert obs_of(fhir, world, patient=pid, category=survey) == set(world.obs)
    assert obs_of(fhir, world, patient=pid, code=f"{LOINC}|44261-6") == {"phq_oct", "phq_nov"}
    assert obs_of(fhir, world, patient=pid, category="survey", date="2026-11") == {"phq_nov", "gad_nov"}
    assert obs_of(fhir, world, patient=pid, code="44261-6", date="ge2026-11-01") == {"phq_nov"}
    assert obs_of(fhir, world, patient=pid, category=survey, status="final") == set(world.obs)
    assert obs_of(fhir, world, patient=pid, category=survey, _lastUpdated="ge2020-01-01") == set(world.obs)
    assert obs_of(fhir, world, **{"subject:Patient": pid, "value-quantity": "ge10"}) == {"phq_oct", "gad_nov"}
    assert obs_of(fhir, world, patient=pid, **{"value-quantity": "lt10||{score}"}) == {"phq_nov", "item"}
    assert obs_of(fhir, world, patient=pid, **{"value-quantity": "ap10"}) == {"phq_nov", "gad_nov"}


def test_patient_encounter_condition_searches(fhir: httpx.Client, world: World) -> None:
    def patients(**params: Any) -> set[str]:
        return set(ids_of(search(fhir, "Patient", **params)))

    assert patients(identifier=f"urn:mindchart:mrn|{world.family}") == {world.pid}
    assert patients(identifier=world.family) == {world.pid}
    assert patients(family=world.family[:5].lower()) >= {world.pid}  # starts-with, case-insensitive
    assert patients(family="zoe-" + world.family[4:]) == {world.pid}  # accents folded
    assert patients(**{"family:exact": world.family}) == {world.pid}
    assert patients(**{"family:exact": world.family.lower()}) == set()
    assert patients(**{"name:contains": world.family[2:]}) >= {world.pid, world.other}
    assert patients(given="alex", family=world.family) == {world.pid}
    # One part of the name must start with the value: "alex" < "b" <= "zoe-..." is not a match.
    assert patients(name="b", family=world.family) == set()
    assert patients(birthdate="1984-03-09", family=world.family) == {world.pid}
    assert patients(birthdate="1984", gender="female", family=world.family) == {world.pid}
    assert patients(family=world.family, gender="male") == set()
    encounters = search(fhir, "Encounter", patient=world.pid, date="2026-10-05")
    assert ids_of(encounters) == [world.encounter]
    assert ids_of(search(fhir, "Encounter", patient=world.pid, date="ge2026-10-06")) == []
    assert len(ids_of(search(fhir, "Condition", patient=world.pid, code="http://snomed.info/sct|35489007",
                             category="problem-list-item"))) == 1


def test_date_prefixes_and_precision(fhir: httpx.Client, world: World) -> None:
    pid = world.pid
    # Notes carry instants (oct 2026-10-05T10:00, nov 2026-11-12T15:30, dec 2026-12-01T12:00);
    # the search value's precision sets the range compared (R4 search.html §3.1.1.4).
    cases = {
        "2026-11-12": {"nov"}, "2026-11-12T15:30:00Z": {"nov"}, "2026-11-12T15:30Z": {"nov"},
        "2026": {"oct", "nov", "dec"}, "ne2026-11-12": {"oct", "dec"},
        "sa2026-11-12": {"dec"}, "eb2026-11-12": {"oct"}, "gt2026-11-30": {"dec"},
        "lt2026-11-12T15:30:00Z": {"oct"}, "le2026-11-12T15:30:00Z": {"oct", "nov"},
        "ge2026-12-01T12:00:00Z": {"dec"}, "ap2026-12-01": {"dec"}, "eq2026-12-01T12:00:00Z": {"dec"},
        "2026-12-01T12:00:01Z": set(),
        "2026-11-12T16:30:00+01:00": {"nov"},
    }
    for value, expected in cases.items():
        assert notes_of(fhir, world, patient=pid, date=value) == expected, value
    # Stored values have precision too: the oct PHQ-9 is dated 2026-10-05 (a whole day).
    assert obs_of(fhir, world, patient=pid, code="44261-6", date="2026-10-05T12:00:00Z") == set()
    assert obs_of(fhir, world, patient=pid, code="44261-6", date="ap2026-10-05T12:00:00Z") == {"phq_oct"}
    assert obs_of(fhir, world, patient=pid, code="44261-6", date="ge2026-10-05T23:00:00Z") == {
        "phq_oct", "phq_nov"}
    outcome(fhir.get("/DocumentReference", params={"date": "2026-13-01"}), 400)
    outcome(fhir.get("/DocumentReference", params={"date": "yesterday"}), 400)


def test_tokens_references_or_and(fhir: httpx.Client, world: World, live: RunningStack) -> None:
    pid = world.pid
    assert notes_of(fhir, world, patient=pid, type="11506-3,28627-8") == {"oct", "dec"}
    assert notes_of(fhir, world, patient=pid, **{"type:not": f"{LOINC}|11506-3"}) == {"nov", "dec"}
    assert notes_of(fhir, world, patient=pid, type="|11506-3") == set()  # coded with a system
    assert notes_of(fhir, world, patient=pid, type=f"{LOINC}|") == {"oct", "nov", "dec"}
    assert notes_of(fhir, world, patient=pid, **{"author:missing": "false"}) == {"oct"}
    assert notes_of(fhir, world, patient=pid, **{"author:missing": "true"}) == {"nov", "dec"}
    assert notes_of(fhir, world, patient=pid, **{"period:missing": "false"}) == {"oct"}
    for form in (pid, f"Patient/{pid}", f"{live.fhir}/Patient/{pid}"):
        assert notes_of(fhir, world, patient=form) == {"oct", "nov", "dec"}
    assert notes_of(fhir, world, subject=f"Patient/{pid}", author=f"Practitioner/{world.practitioner}",
                    encounter=world.encounter) == {"oct"}
    assert notes_of(fhir, world, patient=f"{pid},{world.other}", date="2026-11-12") == {"nov", "other"}
    assert notes_of(fhir, world, patient=pid, status=["current", "superseded"]) == set()  # AND
    assert notes_of(fhir, world, patient=pid, type="11506-3", status="current,superseded") == {"oct"}


def test_include_and_revinclude(fhir: httpx.Client, world: World) -> None:
    bundle = search(fhir, "DocumentReference", _id=world.notes["oct"],
                    _include=["DocumentReference:subject", "DocumentReference:author"],
                    _revinclude="Provenance:target")
    assert ids_of(bundle) == [world.notes["oct"]]
    included = {(e["resource"]["resourceType"], e["resource"]["id"]) for e in bundle["entry"]
                if e["search"]["mode"] == "include"}
    assert included == {("Patient", world.pid), ("Practitioner", world.practitioner),
                        ("Provenance", world.provenance)}
    iterate = search(fhir, "Observation", _id=world.obs["phq_oct"], _include="Observation:has-member",
                     **{"_include:iterate": "Observation:subject"})
    kinds = {(e["resource"]["resourceType"], e["resource"]["id"]) for e in iterate["entry"]}
    assert ("Observation", world.obs["item"]) in kinds and ("Patient", world.pid) in kinds
    star = search(fhir, "DocumentReference", _id=world.notes["oct"], _include="*")
    assert {e["resource"]["resourceType"] for e in star["entry"]} >= {"Encounter", "Practitioner", "Patient"}
    outcome(fhir.get("/DocumentReference", params={"_include": "DocumentReference:status"}), 400)


def test_sort_multi_key_and_paging(fhir: httpx.Client, world: World) -> None:
    newest = ids_of(search(fhir, "DocumentReference", patient=world.pid, _sort="-date"))
    assert newest == [world.notes[k] for k in ("dec", "nov", "oct")]
    by_type = ids_of(search(fhir, "DocumentReference", patient=world.pid, _sort="-type"))
    assert by_type == [world.notes[k] for k in ("dec", "nov", "oct")]  # 28627-8 > 11510-5 > 11506-3
    two_keys = ids_of(search(fhir, "DocumentReference", patient=world.pid, _sort="status,-type"))
    assert two_keys == [world.notes[k] for k in ("nov", "oct", "dec")]  # current first, then superseded
    first = search(fhir, "Observation", patient=world.pid, _sort="-date,_id", _count=2)
    assert first["total"] == 4 and len(first["entry"]) == 2
    links = {link["relation"]: link["url"] for link in first["link"]}
    assert "previous" not in links and "_cursor" not in links["self"]
    second = fhir.get(links["next"]).json()
    seen = ids_of(first) + ids_of(second)
    assert seen[:2] == [world.obs["gad_nov"], world.obs["phq_nov"]]  # newest effective date first
    assert set(seen) == set(world.obs.values())
    back = {link["relation"]: link["url"] for link in second["link"]}["previous"]
    assert ids_of(fhir.get(back).json()) == ids_of(first)
    outcome(fhir.get("/Observation", params={"_sort": "nonsense"}), 400)


def test_paging_links_survive_concurrent_writes(fhir: httpx.Client, world: World) -> None:
    first = search(fhir, "Observation", patient=world.pid, _count=2)
    nxt = {link["relation"]: link["url"] for link in first["link"]}["next"]
    assert "_count=2" in nxt and f"patient={world.pid}" in nxt
    # A write between pages neither repeats nor drops what was already paged over.
    added = _make(fhir, phq9_total(world.pid, 3))
    second = fhir.get(nxt).json()
    back = {link["relation"]: link["url"] for link in second["link"]}["previous"]
    previous = ids_of(fhir.get(back).json())  # the rows just before page two, as they are now
    assert len(previous) == 2 and set(previous) <= set(ids_of(first)) | {added}
    seen = ids_of(first)
    url: str | None = nxt
    while url:
        page = fhir.get(url).json()
        seen += ids_of(page)
        url = {link["relation"]: link["url"] for link in page["link"]}.get("next")
    assert len(seen) == len(set(seen))
    assert set(seen) >= set(world.obs.values())
    assert fhir.delete(f"/Observation/{added}").status_code == 204


def test_summary_elements_total(fhir: httpx.Client, world: World) -> None:
    count = search(fhir, "DocumentReference", patient=world.pid, _summary="count")
    assert count["total"] == 3 and "entry" not in count
    data = search(fhir, "DocumentReference", patient=world.pid, _summary="data")
    assert all(e["resource"]["meta"]["tag"][-1]["code"] == "SUBSETTED" for e in data["entry"])
    summary = search(fhir, "DocumentReference", patient=world.pid, _summary="true")
    assert all("content" in e["resource"] and "status" in e["resource"] for e in summary["entry"])
    elements = search(fhir, "Observation", patient=world.pid, _elements="code,valueQuantity")
    for entry in elements["entry"]:
        assert set(entry["resource"]) <= {"resourceType", "id", "meta", "code", "valueQuantity", "status"}
        assert entry["resource"]["meta"]["tag"][-1]["code"] == "SUBSETTED"
    none = search(fhir, "Observation", patient=world.pid, _total="none")
    assert "total" not in none
    accurate = search(fhir, "Observation", patient=world.pid, _total="accurate", _count=1)
    assert accurate["total"] == 4
    outcome(fhir.get("/Observation", params={"_summary": "maybe"}), 400)


def test_unknown_parameters_and_strict_handling(fhir: httpx.Client, world: World) -> None:
    lenient = search(fhir, "DocumentReference", patient=world.pid, colour="blue")
    self_link = next(link["url"] for link in lenient["link"] if link["relation"] == "self")
    assert "colour" not in self_link and f"patient={world.pid}" in self_link
    assert len(ids_of(lenient)) == 3
    strict = fhir.get("/DocumentReference", params={"patient": world.pid, "colour": "blue"},
                      headers={"Prefer": "handling=strict"})
    outcome(strict, 400, "invalid")


def test_post_search(fhir: httpx.Client, world: World) -> None:
    response = fhir.post("/DocumentReference/_search", data={"patient": world.pid, "type": "11510-5"},
                         headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 200
    assert ids_of(response.json()) == [world.notes["nov"]]


def test_docref_operation(fhir: httpx.Client, world: World) -> None:
    names = {v: k for k, v in world.notes.items()}

    def docref(**params: Any) -> set[str]:
        response = fhir.get("/DocumentReference/$docref", params=params)
        assert response.status_code == 200, response.text
        return {names.get(i, i) for i in ids_of(response.json())}

    assert docref(patient=world.pid) == {"oct", "nov", "dec"}
    assert docref(patient=world.pid, start="2026-11-01") == {"nov", "dec"}
    assert docref(patient=world.pid, start="2026-11-01", end="2026-11-30") == {"nov"}
    assert docref(patient=world.pid, type=f"{LOINC}|28627-8") == {"dec"}
    posted = fhir.post("/DocumentReference/$docref", json={"resourceType": "Parameters", "parameter": [
        {"name": "patient", "valueId": world.pid},
        {"name": "type", "valueCodeableConcept": {"coding": [{"system": LOINC, "code": "11506-3"}]}}]})
    assert {names.get(i) for i in ids_of(posted.json())} == {"oct"}
    outcome(fhir.get("/DocumentReference/$docref"), 400)
    statement = fhir.get("/metadata").json()
    notes = next(r for r in statement["rest"][0]["resource"] if r["type"] == "DocumentReference")
    assert "docref" in {o["name"] for o in notes["operation"]}
