"""Amendment requests (45 CFR 164.526, issue 14), through the gateway: the patient files a Task
about one of their progress notes; the note's author accepts (a signed correction completes it)
or denies in writing; after a denial the patient files a statement of disagreement, which then
travels with every disclosure of the note (read, search, $everything, bulk $export, a CDex
release); one 30-day
extension; overdue requests found with one search; refusals that reveal nothing."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.actors import auditor_token, mint_token, records_client, sensitive
from tests.conftest import RunningStack
from tests.e2e import test_cdex
from tests.e2e.test_cdex import Cdex, data_request, params, release
from tests.e2e.test_cdex import file as cdex_file
from tests.e2e.test_export import download, export
from tests.records_resources import outcome, patient, progress_note

payer_world = test_cdex.cdex  # test_cdex's fixture (a payer, a reviewer, a member), by this name

AUTHOR = "Practitioner/amend-author"
OTHER = "Practitioner/amend-other"
AMENDMENT = "https://mindchart.dev/fhir/CodeSystem/amendment"
PRACTITIONER_SCOPE = ("user/DocumentReference.cruds user/Provenance.cruds user/Task.rus "
                      "user/Patient.rs user/Encounter.rs")
PATIENT_SCOPE = "patient/Task.crs patient/DocumentReference.rs patient/Patient.rs"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"


def practitioner(live: RunningStack, who: str) -> httpx.Client:
    token = mint_token(live, sub=who.split("/")[1], fhirUser=f"{live.fhir}/{who}",
                       scope=PRACTITIONER_SCOPE)
    return records_client(live, token=token)


def patient_app(live: RunningStack, pid: str) -> httpx.Client:
    """A patient-context SMART token, as the gateway issues one to a patient's app."""
    return records_client(live, token=mint_token(live, sub=f"patient-{pid}", patient=pid,
                                                 fhirUser=f"{live.fhir}/Patient/{pid}",
                                                 scope=PATIENT_SCOPE))


@pytest.fixture(scope="module")
def world(live: RunningStack, writer_http: httpx.Client) -> Iterator[dict[str, Any]]:
    ids = {}
    for name in ("a", "b"):
        created = writer_http.post("/Patient", json=patient(f"Amend{name}{uuid.uuid4().hex[:4]}"))
        assert created.status_code == 201, created.text
        ids[name] = created.json()["id"]
    with practitioner(live, AUTHOR) as author, practitioner(live, OTHER) as other, \
            patient_app(live, ids["a"]) as pa, patient_app(live, ids["b"]) as pb:
        yield {"author": author, "other": other, "a": pa, "b": pb, "pid": ids["a"], "pid_b": ids["b"]}


def signed_note(author: httpx.Client, pid: str, **changes: Any) -> dict[str, Any]:
    created = author.post("/DocumentReference", json=progress_note(
        pid, docStatus="preliminary", author=[{"reference": AUTHOR}], **changes))
    assert created.status_code == 201, created.text
    signed = author.post(f"/DocumentReference/{created.json()['id']}/$sign")
    assert signed.status_code == 200, signed.text
    return dict(signed.json())


def request(pid: str, focus: str, change: str = "The note says I missed two sessions; I attended "
            "both (October 3 and 10).") -> dict[str, Any]:
    return {"resourceType": "Task", "status": "requested", "intent": "order",
            "code": {"coding": [{"system": AMENDMENT, "code": "amendment-request"}]},
            "focus": {"reference": focus}, "for": {"reference": f"Patient/{pid}"},
            "description": change}


def file(client: httpx.Client, pid: str, note_id: str) -> dict[str, Any]:
    filed = client.post("/Task", json=request(pid, f"DocumentReference/{note_id}"))
    assert filed.status_code == 201, filed.text
    return dict(filed.json())


def parameters(**values: str) -> dict[str, Any]:
    return {"resourceType": "Parameters", "parameter": [
        {"name": k, "valueCode" if k == "basis" else "valueString": v} for k, v in values.items()]}


def when(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def stamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def overdue_ids(client: httpx.Client, at: datetime) -> list[str]:
    """The one documented search for requests still open after their deadline (at `at`)."""
    found = client.get("/Task", params={"code": f"{AMENDMENT}|amendment-request",
                                        "status": "requested,accepted,in-progress",
                                        "restriction-period": f"eb{stamp(at)}", "_count": "200"})
    assert found.status_code == 200, found.text
    return [e["resource"]["id"] for e in found.json().get("entry", [])]


def test_asking_about_anything_but_ones_own_progress_note_is_refused_alike(
        live: RunningStack, world: dict[str, Any], writer_http: httpx.Client) -> None:
    pid = world["pid"]
    others = signed_note(world["author"], world["pid_b"])
    psychotherapy = writer_http.post("/DocumentReference", json=progress_note(
        pid, docStatus="final", author=[{"reference": AUTHOR}], meta={"security": [
            {"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "V"},
            {"system": ACT_CODE, "code": "PSYTHPN"}]}))
    assert psychotherapy.status_code == 201, psychotherapy.text
    answers = []
    for focus in (f"DocumentReference/{others['id']}",  # another patient's note
                  f"DocumentReference/{uuid.uuid4()}",  # no such note
                  f"DocumentReference/{psychotherapy.json()['id']}",  # a psychotherapy note
                  f"{live.gateway_url}/psychnotes/fhir/DocumentReference/{uuid.uuid4()}"):
        refused = world["a"].post("/Task", json=request(pid, focus))
        answers.append((refused.status_code, refused.json()))
    assert all(a == answers[0] for a in answers), answers
    status, body = answers[0]
    assert status == 422 and body["resourceType"] == "OperationOutcome"
    assert "your progress notes" in body["issue"][0]["diagnostics"]
    # Nothing was stored; a practitioner does not file on a patient's behalf; Task.for is the caller.
    assert world["author"].get("/Task", params={"patient": f"Patient/{pid}"}).json().get("entry") is None
    own = signed_note(world["author"], pid)
    outcome(world["author"].post("/Task", json=request(pid, f"DocumentReference/{own['id']}")), 403)
    outcome(world["a"].post("/Task", json=request(world["pid_b"], f"DocumentReference/{own['id']}")), 422)


def test_denial_disagreement_and_rebuttal_travel_with_every_disclosure(
        live: RunningStack, world: dict[str, Any], writer_http: httpx.Client) -> None:
    author, other, pa, pb, pid = world["author"], world["other"], world["a"], world["b"], world["pid"]
    note = signed_note(author, pid)
    task = file(pa, pid, note["id"])
    url = f"/Task/{task['id']}"
    # Records fills the owner, the dates and the 60-day deadline (164.526(b)(2)(i)).
    assert task["owner"] == {"reference": AUTHOR} and task["status"] == "requested"
    assert task["for"] == {"reference": f"Patient/{pid}"}
    assert task["focus"] == {"reference": f"DocumentReference/{note['id']}"}
    filed = when(task["authoredOn"])
    assert abs(filed - datetime.now(UTC)) < timedelta(minutes=5)
    assert when(task["restriction"]["period"]["end"]) == filed + timedelta(days=60)
    assert pa.get(url).status_code == 200
    outcome(pb.get(url), 404)  # another patient never sees it
    assert task["id"] in [e["resource"]["id"] for e in author.get("/Task", params={
        "owner": AUTHOR, "code": f"{AMENDMENT}|amendment-request"}).json()["entry"]]

    # Overdue: not now; it would be a day after the 60 days.
    assert task["id"] not in overdue_ids(author, datetime.now(UTC))
    assert task["id"] in overdue_ids(author, filed + timedelta(days=61))

    # One extension of 30 days, with a reason, by the owner only (164.526(b)(2)(ii)).
    outcome(pa.post(f"{url}/$extend", json=parameters(reason="I want more time")), 403)
    outcome(other.post(f"{url}/$extend", json=parameters(reason="Someone else's call")), 403)
    extended = author.post(f"{url}/$extend", json=parameters(reason="Waiting for the session recording"))
    assert extended.status_code == 200, extended.text
    assert when(extended.json()["restriction"]["period"]["end"]) == filed + timedelta(days=90)
    statement = next(o["valueString"] for o in extended.json()["output"]
                     if o["type"]["coding"][0]["code"] == "extension")
    assert "Waiting for the session recording" in statement
    again = author.post(f"{url}/$extend", json=parameters(reason="Still waiting for it"))
    assert "only one extension" in outcome(again, 409)["issue"][0]["diagnostics"]
    assert task["id"] not in overdue_ids(author, filed + timedelta(days=61))
    assert task["id"] in overdue_ids(author, filed + timedelta(days=91))

    # A statement of disagreement answers a denial, not an open request.
    outcome(pa.post(f"{url}/$disagree", json=parameters(statement="I disagree already")), 409)
    # The written denial (164.526(d)(1)): the owner only, on a 164.526(a)(2) ground.
    outcome(other.post(f"{url}/$deny", json=parameters(basis="accurate-and-complete", reason="No.")), 403)
    outcome(pa.post(f"{url}/$deny", json=parameters(basis="accurate-and-complete", reason="Nope")), 403)
    outcome(author.post(f"{url}/$deny", json=parameters(basis="i-do-not-like-it", reason="Because.")), 422)
    denied = author.post(f"{url}/$deny", json=parameters(
        basis="accurate-and-complete", reason="The attendance log shows no visit on October 10."))
    assert denied.status_code == 200, denied.text
    body = denied.json()
    assert body["status"] == "rejected"
    assert body["statusReason"]["text"] == "The attendance log shows no visit on October 10."
    assert body["statusReason"]["coding"][0]["code"] == "accurate-and-complete"
    letter = next(o["valueString"] for o in body["output"] if o["type"]["coding"][0]["code"] == "denial")
    assert "statement" in letter and "$disagree" in letter and "Secretary" in letter
    outcome(author.post(f"{url}/$deny", json=parameters(basis="accurate-and-complete",
                                                        reason="Denied twice?")), 409)

    # The statement of disagreement: the patient's token only, for their denied request.
    outcome(author.post(f"{url}/$disagree", json=parameters(statement="Not mine to file")), 403)
    outcome(pb.post(f"{url}/$disagree", json=parameters(statement="Not my request")), 404)
    words = sensitive("I was there on October 10; my bus ticket shows it.")  # never in a log
    filed_statement = pa.post(f"{url}/$disagree", json=parameters(statement=words))
    assert filed_statement.status_code == 201, filed_statement.text
    disagreement = filed_statement.json()
    assert disagreement["relatesTo"] == [{"code": "appends",
                                          "target": {"reference": f"DocumentReference/{note['id']}"}}]
    assert disagreement["author"] == [{"reference": f"Patient/{pid}"}]
    assert disagreement["context"]["related"] == [{"reference": f"Task/{task['id']}"}]
    assert {"system": AMENDMENT, "code": "statement-of-disagreement"} in [
        {k: c[k] for k in ("system", "code")} for cat in disagreement["category"] for c in cat["coding"]]
    text = base64.b64decode(disagreement["content"][0]["attachment"]["data"]).decode()
    # It carries the request and the denial too (164.526(d)(4)).
    assert words in text and "attended both" in text and "attendance log" in text
    outcome(pa.post(f"{url}/$disagree", json=parameters(statement="A second statement")), 409)
    # Nobody files or alters one directly.
    forged = {k: v for k, v in disagreement.items() if k not in ("id", "meta")}
    outcome(writer_http.post("/DocumentReference", json=forged), 422)
    outcome(writer_http.put(f"/DocumentReference/{disagreement['id']}",
                            json={**disagreement, "description": "softened"}), 409)

    # The optional rebuttal (164.526(d)(3)), which the patient can read.
    outcome(pa.post(f"{url}/$rebut", json=parameters(rebuttal="I rebut myself")), 403)
    rebutted = author.post(f"{url}/$rebut", json=parameters(
        rebuttal="The bus ticket is for October 11, the day after."))
    assert rebutted.status_code == 201, rebutted.text
    rebuttal = rebutted.json()
    assert pa.get(f"/DocumentReference/{rebuttal['id']}").status_code == 200
    outputs = {o["type"]["coding"][0]["code"]: o for o in pa.get(url).json()["output"]}
    assert outputs["statement-of-disagreement"]["valueReference"] == {
        "reference": f"DocumentReference/{disagreement['id']}"}
    assert outputs["rebuttal"]["valueReference"] == {"reference": f"DocumentReference/{rebuttal['id']}"}

    # 164.526(d)(5): every later disclosure of the note includes them.
    appended = {disagreement["id"], rebuttal["id"]}
    read = writer_http.get(f"/DocumentReference/{note['id']}")
    assert read.status_code == 200 and read.json() == {**note}
    for ident in appended:
        assert f"<{live.fhir}/DocumentReference/{ident}>; rel=\"related\"" in read.headers["link"]
    assert "statement-of-disagreement" in read.headers["link"]
    searched = writer_http.get("/DocumentReference", params={"_id": note["id"]}).json()
    assert {e["resource"]["id"] for e in searched["entry"] if e["search"]["mode"] == "include"} == appended
    everything = writer_http.get(f"/Patient/{pid}/$everything", params={"_type": "DocumentReference"})
    assert everything.status_code == 200, everything.text
    assert appended | {note["id"]} <= {e["resource"]["id"] for e in everything.json()["entry"]}
    # Filed later than the note's date, they still follow it into a date-bounded $everything.
    bounded = writer_http.get(f"/Patient/{pid}/$everything", params={
        "_type": "DocumentReference", "end": note["date"][:10]}).json()
    assert appended | {note["id"]} <= {e["resource"]["id"] for e in bounded["entry"]}
    group = writer_http.post("/Group", json={"resourceType": "Group", "type": "person", "actual": True,
                                             "member": [{"entity": {"reference": f"Patient/{pid}"}}]})
    assert group.status_code == 201, group.text
    manifest = export(writer_http, f"/Group/{group.json()['id']}/$export?_type=DocumentReference")
    exported = {r["id"] for item in manifest["output"] for r in download(writer_http, item["url"])}
    assert appended | {note["id"]} <= exported

    # Each step went through the gateway's audit trail, naming the request.
    events = httpx.get(f"{live.gateway_url}/audit/AuditEvent", params={"entity": f"Task/{task['id']}"},
                       headers={"Authorization": f"Bearer {auditor_token(live)}"}, timeout=30)
    assert events.status_code == 200, events.text
    steps = [e["resource"] for e in events.json()["entry"]
             if e["resource"]["subtype"][0]["code"] == "operation"]
    done = [e for e in steps if "outcomeDesc" not in e]
    refused = [e for e in steps if "outcomeDesc" in e]
    assert len(done) == 4, done  # $extend, $deny, $disagree, $rebut
    assert len(refused) >= 10, refused  # every refusal above is audited too
    patients_own = [e for e in done if any(a.get("who") == {"reference": f"{live.fhir}/Patient/{pid}"}
                                           for a in e["agent"])]
    assert len(patients_own) == 1  # the statement of disagreement, by the patient


def test_the_author_accepts_with_a_signed_correction_that_completes_the_request(
        world: dict[str, Any]) -> None:
    author, pa, pid = world["author"], world["a"], world["pid"]
    note = signed_note(author, pid)
    task = file(pa, pid, note["id"])
    correction = author.post("/DocumentReference", json=progress_note(
        pid, docStatus="preliminary", author=[{"reference": AUTHOR}],
        text="S: attended October 3 and 10 (corrected at the patient's request).",
        relatesTo=[{"code": "replaces", "target": {"reference": f"DocumentReference/{note['id']}"}}],
        context={"related": [{"reference": f"Task/{task['id']}"}]}))
    assert correction.status_code == 201, correction.text
    assert pa.get(f"/Task/{task['id']}").json()["status"] == "requested"  # a draft decides nothing
    signed = author.post(f"/DocumentReference/{correction.json()['id']}/$sign")
    assert signed.status_code == 200, signed.text
    assert signed.json()["docStatus"] == "amended"
    done = pa.get(f"/Task/{task['id']}").json()
    assert done["status"] == "completed"
    assert {"type": {"coding": [{"system": AMENDMENT, "code": "correction"}]},
            "valueReference": {"reference": f"DocumentReference/{correction.json()['id']}"}} in done["output"]
    assert author.get(f"/DocumentReference/{note['id']}").json()["status"] == "superseded"
    # A correction cannot complete someone else's request about another note.
    unrelated = signed_note(author, pid)
    stray = author.post("/DocumentReference", json=progress_note(
        pid, docStatus="preliminary", author=[{"reference": AUTHOR}],
        relatesTo=[{"code": "replaces", "target": {"reference": f"DocumentReference/{unrelated['id']}"}}],
        context={"related": [{"reference": f"Task/{file(pa, pid, signed_note(author, pid)['id'])['id']}"}]}))
    assert stray.status_code == 201, stray.text
    outcome(author.post(f"/DocumentReference/{stray.json()['id']}/$sign"), 422)
    assert author.get(f"/DocumentReference/{unrelated['id']}").json()["status"] == "current"


def test_the_capability_statement_declares_amendment_requests(live: RunningStack) -> None:
    with records_client(live) as anonymous:
        statement = anonymous.get("/metadata").json()
    task = next(r for r in statement["rest"][0]["resource"] if r["type"] == "Task")
    declared = {o["name"] for o in task["operation"]}
    assert {"deny", "extend", "disagree", "rebut"} <= declared
    assert "restriction-period" in {p["name"] for p in task["searchParam"]}
    assert "amendment-request" in task["documentation"]
    definition = httpx.get(f"{live.fhir}/OperationDefinition/Task-deny", timeout=30)
    assert definition.status_code == 200 and definition.json()["code"] == "deny"


def test_a_cdex_release_of_the_note_carries_the_statement_of_disagreement(
        live: RunningStack, world: dict[str, Any], payer_world: Cdex) -> None:
    """Da Vinci CDex: a payer's reviewed request that releases the note gets the statement too."""
    author, cdex = world["author"], payer_world
    note = signed_note(author, cdex.patient)
    with patient_app(live, cdex.patient) as member:
        task = file(member, cdex.patient, note["id"])
        denied = author.post(f"/Task/{task['id']}/$deny", json=parameters(
            basis="accurate-and-complete", reason="The note matches the session recording."))
        assert denied.status_code == 200, denied.text
        statement = member.post(f"/Task/{task['id']}/$disagree",
                                json=parameters(statement="The recording starts late."))
        assert statement.status_code == 201, statement.text
    request_id = cdex_file(cdex, data_request(cdex.member_id))
    approved = cdex.reviewer.post(f"/Task/{request_id}/$approve",
                                  json=params(release(f"DocumentReference/{note['id']}")))
    assert approved.status_code == 200, approved.text
    answer = next(r for r in cdex.payer.get(f"/Task/{request_id}").json()["contained"]
                  if r["resourceType"] == "Bundle")
    assert [e["resource"]["id"] for e in answer["entry"]] == [note["id"], statement.json()["id"]]
