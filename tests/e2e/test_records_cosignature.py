"""Co-signature and the CPT/time rule on signing (issue 14), through the gateway with tokens the
gateway really issues: a practitioner registered with `mindchart user create --supervisor` cannot
make a note final alone; their supervisor's `$sign` does. Signing a note whose Encounter's length
does not support its time-based CPT code is refused with a 422 naming the mismatch."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.actors import (
    mint_token,
    records_client,
    register_app,
    run_cli,
    smart_login,
)
from tests.conftest import RunningStack
from tests.records_resources import outcome, patient, progress_note

PASSWORD = "cosign-password-long-1"
SCOPE = "user/DocumentReference.cruds user/Provenance.rs user/Encounter.rs"
AWAITING = "https://mindchart.dev/fhir/CodeSystem/awaiting-cosignature"
CPT = "http://www.ama-assn.org/go/cpt"


@dataclass
class People:
    trainee: httpx.Client
    supervisor: httpx.Client
    stranger: httpx.Client
    trainee_ref: str
    supervisor_ref: str
    trainee_claims: dict[str, Any]


def _user(live: RunningStack, username: str, fhir_user: str, *extra: str) -> None:
    result = run_cli(live.cli_env, "user", "create", "--username", username, "--password", PASSWORD,
                     "--role", "practitioner", "--fhir-user", fhir_user, *extra)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def people(live: RunningStack) -> Iterator[People]:
    suffix = uuid.uuid4().hex[:6]
    app = f"cosign-app-{suffix}"
    register_app(live.cli_env, app, f"{SCOPE} openid fhirUser")
    supervisor_ref, trainee_ref = f"Practitioner/sup-{suffix}", f"Practitioner/trainee-{suffix}"
    _user(live, f"sup-{suffix}", supervisor_ref)
    _user(live, f"trainee-{suffix}", trainee_ref, "--supervisor", supervisor_ref)
    _user(live, f"other-{suffix}", f"Practitioner/other-{suffix}")

    def login(username: str) -> str:
        return str(smart_login(live.gateway_url, client_id=app, username=username, password=PASSWORD,
                               scope=SCOPE, aud=live.fhir)["access_token"])

    trainee_token = login(f"trainee-{suffix}")
    payload = trainee_token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    with records_client(live, token=trainee_token) as trainee, \
            records_client(live, token=login(f"sup-{suffix}")) as supervisor, \
            records_client(live, token=login(f"other-{suffix}")) as stranger:
        yield People(trainee, supervisor, stranger, trainee_ref, supervisor_ref, claims)


@pytest.fixture(scope="module")
def pid(fhir: httpx.Client) -> str:
    created = fhir.post("/Patient", json=patient("Cosign"))
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


def _draft(client: httpx.Client, pid: str, author: str, **changes: Any) -> dict[str, Any]:
    created = client.post("/DocumentReference", json=progress_note(
        pid, docStatus="preliminary", author=[{"reference": author}], **changes))
    assert created.status_code == 201, created.text
    return dict(created.json())


def test_the_cli_refuses_a_supervisor_for_non_practitioners(live: RunningStack) -> None:
    result = run_cli(live.cli_env, "user", "create", "--username", f"p-{uuid.uuid4().hex[:6]}",
                     "--password", PASSWORD, "--role", "patient", "--fhir-user", "Patient/x",
                     "--supervisor", "Practitioner/y")
    assert result.returncode != 0 and "supervisor" in (result.stderr + result.stdout)


def test_a_supervisees_note_is_final_only_once_the_supervisor_cosigns(
        people: People, fhir: httpx.Client, pid: str) -> None:
    assert people.trainee_claims["supervisor"] == people.supervisor_ref  # carried by the gateway
    note = _draft(people.trainee, pid, people.trainee_ref)
    url = f"/DocumentReference/{note['id']}"
    first = people.trainee.post(f"{url}/$sign")
    assert first.status_code == 200, first.text
    waiting = first.json()
    assert waiting["docStatus"] == "preliminary" and "authenticator" not in waiting
    assert {"system": AWAITING, "code": people.supervisor_ref,
            "display": f"awaiting co-signature by {people.supervisor_ref}"} in waiting["meta"]["tag"]
    # Locked meanwhile, and nobody but the supervisor completes it.
    assert "co-signature" in outcome(people.trainee.put(url, json={**waiting, "description": "x"}), 409)[
        "issue"][0]["diagnostics"]
    outcome(people.trainee.delete(url), 409)
    outcome(people.trainee.post(f"{url}/$sign"), 403)
    outcome(people.stranger.post(f"{url}/$sign"), 403)
    # One search lists what awaits the supervisor.
    queue = people.supervisor.get("/DocumentReference", params={"_tag": f"{AWAITING}|{people.supervisor_ref}"})
    assert note["id"] in [e["resource"]["id"] for e in queue.json()["entry"]]

    cosigned = people.supervisor.post(f"{url}/$sign")
    assert cosigned.status_code == 200, cosigned.text
    final = cosigned.json()
    assert final["docStatus"] == "final" and final["authenticator"] == {"reference": people.supervisor_ref}
    assert not [t for t in final.get("meta", {}).get("tag", []) if t["system"] == AWAITING]
    records = fhir.get("/Provenance", params={"target": f"DocumentReference/{note['id']}"}).json()
    roles = sorted((e["resource"]["agent"][0]["type"]["coding"][0]["code"],
                    e["resource"]["agent"][0]["who"]["reference"]) for e in records["entry"])
    assert roles == [("author", people.trainee_ref), ("verifier", people.supervisor_ref)]
    verified = fhir.get(f"{url}/$verify-signature").json()
    assert verified["parameter"][0] == {"name": "result", "valueBoolean": True}
    assert len([p for p in verified["parameter"] if p["name"] == "signature"]) == 2
    queue = people.supervisor.get("/DocumentReference", params={"_tag": f"{AWAITING}|{people.supervisor_ref}"})
    assert note["id"] not in [e["resource"]["id"] for e in queue.json().get("entry", [])]
    outcome(people.trainee.put(url, json={**final, "description": "x"}), 409)


def test_a_supervisee_cannot_name_an_accomplice_as_their_cosigner(people: People, pid: str) -> None:
    """Only $sign puts a note in wait for a co-signer: a draft written with the awaiting tag naming
    a colleague (who would then "co-sign" it final) is refused, on create and on update."""
    accomplice = {"system": AWAITING, "code": "Practitioner/accomplice"}
    created = people.trainee.post("/DocumentReference", json=progress_note(
        pid, docStatus="preliminary", author=[{"reference": people.trainee_ref}], meta={"tag": [accomplice]}))
    assert "awaiting-cosignature" in outcome(created, 422)["issue"][0]["diagnostics"]
    note = _draft(people.trainee, pid, people.trainee_ref)
    tagged = {**note, "meta": {**note.get("meta", {}), "tag": [accomplice]}}
    outcome(people.trainee.put(f"/DocumentReference/{note['id']}", json=tagged), 422)


def _encounter(fhir: httpx.Client, pid: str, codes: list[str], start: str, end: str | None) -> str:
    period = {"start": start, **({"end": end} if end else {})}
    created = fhir.post("/Encounter", json={
        "resourceType": "Encounter", "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "type": [{"coding": [{"system": CPT, "code": c}]} for c in codes],
        "subject": {"reference": f"Patient/{pid}"}, "period": period})
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


@pytest.mark.parametrize(("codes", "minutes", "refused"), [
    (["90837"], 45, "45 minutes, which does not support CPT 90837 (53 or more minutes)"),
    (["90832"], 40, "40 minutes, which does not support CPT 90832 (16-37 minutes)"),
    (["90834"], 45, None),
    (["90834", "90785"], 40, None),
    (["90839"], 80, "80 minutes: CPT 90839 takes 1 unit(s) of +90840"),
    (["90839", "90840"], 80, None),
    (["90837", "90840"], 60, "+90840 is an add-on to 90839"),
    (["90832"], None, "lacks a start and an end"),
    (["90791"], 10, None),
])
def test_signing_checks_the_session_length_against_its_cpt_code(
        live: RunningStack, fhir: httpx.Client, pid: str, codes: list[str], minutes: int | None,
        refused: str | None) -> None:
    start = "2026-11-20T10:00:00Z"
    end = None if minutes is None else f"2026-11-20T{10 + minutes // 60:02d}:{minutes % 60:02d}:00Z"
    encounter = _encounter(fhir, pid, codes, start, end)
    author = "Practitioner/cpt-author"
    token = mint_token(live, sub="cpt-author", fhirUser=f"{live.fhir}/{author}", scope=SCOPE)
    with records_client(live, token=token) as client:
        note = _draft(client, pid, author, context={"encounter": [{"reference": f"Encounter/{encounter}"}]})
        signed = client.post(f"/DocumentReference/{note['id']}/$sign")
        if refused is None:
            assert signed.status_code == 200, signed.text
            assert signed.json()["docStatus"] == "final"
        else:
            assert refused in outcome(signed, 422)["issue"][0]["diagnostics"]
            assert client.get(f"/DocumentReference/{note['id']}").json()["docStatus"] == "preliminary"
