"""`make run`'s demo psychotherapy notes (cli seed.seed_psychnotes), written through the gateway
as their authors: a signed note with an addendum, a note corrected (superseded), one entered in
error, and the trainee's awaiting co-signature. Each is readable with a consent token, and a
second seed changes nothing."""

from __future__ import annotations

import json
from typing import Any

import httpx

from mindchart_cli import seed
from tests.actors import mint_token
from tests.conftest import RunningStack
from tests.e2e.test_psychnotes import headers, mint_consent_token, note_text


def practitioner(live: RunningStack, who: str, **claims: Any) -> str:
    return mint_token(live, audience=live.psychnotes, sub=f"seed-{who}", client_id="demo-seed",
                      scope="user/DocumentReference.cruds", fhirUser=f"{live.fhir}/Practitioner/{who}",
                      **claims)


def own_notes(live: RunningStack, access: str, **params: str) -> dict[str, dict[str, Any]]:
    """The caller's demo notes by key, read with an originator-treatment consent token."""
    consent = mint_consent_token(live, access, basis="originator-treatment",
                                 patient={"reference": f"Patient/{seed.DEMO_PATIENT}"})
    found = httpx.get(f"{live.psychnotes}/DocumentReference", headers=headers(access, consent),
                      params={"patient": f"Patient/{seed.DEMO_PATIENT}", **params})
    assert found.status_code == 200, found.text
    return {i["value"]: e["resource"] for e in found.json().get("entry", [])
            for i in e["resource"].get("identifier", []) if i["system"] == seed.DEMO_NOTE_SYSTEM}


def seed_demo(live: RunningStack) -> tuple[str, str]:
    """The demo records resources as seed_records writes them, then the demo psychotherapy notes,
    seeded twice (the second time must change nothing). Returns the therapist's and the
    trainee's psychnotes tokens. Another module may have seeded this stack already."""
    if live.gateway_url in _SEEDED:
        return practitioner(live, seed.DEMO_THERAPIST), practitioner(
            live, seed.DEMO_TRAINEE, supervisor=f"Practitioner/{seed.DEMO_THERAPIST}")
    writer = mint_token(live, scope="system/*.cruds")
    for resource in seed.demo_resources():
        put = httpx.put(f"{live.fhir}/{resource['resourceType']}/{resource['id']}",
                        headers=headers(writer), content=json.dumps(resource))
        assert put.status_code in (200, 201), put.text
    therapist = practitioner(live, seed.DEMO_THERAPIST)
    trainee = practitioner(live, seed.DEMO_TRAINEE, supervisor=f"Practitioner/{seed.DEMO_THERAPIST}")
    tokens = {seed.PSYCHNOTES_TOKEN.format(seed.DEMO_THERAPIST): therapist,
              seed.PSYCHNOTES_TOKEN.format(seed.DEMO_TRAINEE): trainee}
    assert seed.seed_psychnotes(live.gateway_url, tokens) == 6
    _SEEDED.add(live.gateway_url)
    assert seed.seed_psychnotes(live.gateway_url, tokens) == 0  # idempotent
    return therapist, trainee


_SEEDED: set[str] = set()  # the stacks (by gateway URL) seed_demo has seeded in this session


def test_the_demo_psychotherapy_notes_show_the_lifecycle(live: RunningStack) -> None:
    therapist, trainee = seed_demo(live)

    notes = own_notes(live, therapist, status=seed.KEPT_STATES)
    assert set(notes) == {"demo-psy-1", "demo-psy-2", "demo-psy-3", "demo-psy-4", "demo-psy-5"}
    ref = {key: f"DocumentReference/{note['id']}" for key, note in notes.items()}
    state = {key: (note.get("docStatus"), note["status"]) for key, note in notes.items()}
    assert state == {"demo-psy-1": ("final", "current"), "demo-psy-2": ("final", "current"),
                     "demo-psy-3": ("final", "superseded"), "demo-psy-4": ("amended", "current"),
                     "demo-psy-5": ("entered-in-error", "entered-in-error")}
    assert notes["demo-psy-2"]["relatesTo"] == [{"code": "appends", "target": {"reference": ref["demo-psy-1"]}}]
    assert notes["demo-psy-4"]["relatesTo"] == [{"code": "replaces", "target": {"reference": ref["demo-psy-3"]}}]
    assert "brother" in note_text(notes["demo-psy-3"])  # superseded, its words untouched
    assert all(n["authenticator"] == {"reference": f"Practitioner/{seed.DEMO_THERAPIST}"}
               for n in notes.values())
    assert set(own_notes(live, therapist)) == set(notes) - {"demo-psy-5"}  # a plain search

    consent = mint_consent_token(live, therapist, basis="originator-treatment",
                                 patient={"reference": f"Patient/{seed.DEMO_PATIENT}"})
    verified = httpx.get(f"{live.psychnotes}/{ref['demo-psy-1']}/$verify-signature",
                         headers=headers(therapist, consent))
    assert verified.status_code == 200, verified.text
    assert {p["name"]: p.get("valueBoolean") for p in verified.json()["parameter"]}["result"] is True

    (awaiting,) = own_notes(live, trainee).values()
    assert awaiting["docStatus"] == "preliminary" and "authenticator" not in awaiting
    assert {"system": seed.AWAITING_COSIGNATURE, "code": f"Practitioner/{seed.DEMO_THERAPIST}"} in [
        {k: t[k] for k in ("system", "code")} for t in awaiting["meta"]["tag"]]
