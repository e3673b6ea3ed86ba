"""Progress notes as the legal record (issue 14), through the gateway: drafts change by their
author only; `$sign` makes a note final with a Provenance carrying records' detached JWS over the
JCS form of that version; a signed note is locked on every write path; `$verify-signature` proves
a version unchanged and fails once its stored bytes are altered in the datastore."""

from __future__ import annotations

import base64
import copy
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
import rfc8785
from joserfc import jws
from joserfc.jwk import KeySet

from tests.actors import BackendClient, mint_token, records_client
from tests.conftest import RunningStack
from tests.records_resources import outcome, patient, progress_note

AUTHOR = "Practitioner/lifecycle-author"
OTHER = "Practitioner/lifecycle-other"
USER_SCOPE = "user/DocumentReference.cruds user/Provenance.cruds user/Patient.rs"


def practitioner(live: RunningStack, who: str) -> httpx.Client:
    token = mint_token(live, sub=who.split("/")[1], fhirUser=f"{live.fhir}/{who}", scope=USER_SCOPE)
    return records_client(live, token=token)


@pytest.fixture(scope="module")
def author(live: RunningStack, writer: BackendClient) -> Iterator[httpx.Client]:
    with practitioner(live, AUTHOR) as client:
        yield client


@pytest.fixture(scope="module")
def other(live: RunningStack, writer: BackendClient) -> Iterator[httpx.Client]:
    with practitioner(live, OTHER) as client:
        yield client


@pytest.fixture(scope="module")
def pid(fhir: httpx.Client) -> str:
    created = fhir.post("/Patient", json=patient("Lifecycle"))
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


def draft(pid: str, **changes: Any) -> dict[str, Any]:
    return progress_note(pid, docStatus="preliminary", author=[{"reference": AUTHOR}],
                         identifier=[{"system": "urn:test:lifecycle", "value": uuid.uuid4().hex}],
                         **changes)


def create(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    created = client.post("/DocumentReference", json=body)
    assert created.status_code == 201, created.text
    return dict(created.json())


def signed_note(author: httpx.Client, pid: str) -> dict[str, Any]:
    note = create(author, draft(pid))
    signed = author.post(f"/DocumentReference/{note['id']}/$sign")
    assert signed.status_code == 200, signed.text
    return dict(signed.json())


def test_a_draft_changes_and_is_deleted_by_its_author_only(
        author: httpx.Client, other: httpx.Client, fhir: httpx.Client, pid: str) -> None:
    note = create(author, draft(pid))
    changed = {**note, "description": "first draft, revised"}
    assert author.put(f"/DocumentReference/{note['id']}", json=changed).status_code == 200
    for stranger in (other, fhir):  # another practitioner; a backend client with every scope
        refused = stranger.put(f"/DocumentReference/{note['id']}", json={**changed, "description": "x"})
        assert "author" in outcome(refused, 403, "forbidden")["issue"][0]["diagnostics"]
        outcome(stranger.delete(f"/DocumentReference/{note['id']}"), 403)
        outcome(stranger.patch(f"/DocumentReference/{note['id']}", content=orjson.dumps(
            [{"op": "replace", "path": "/description", "value": "y"}]),
            headers={"Content-Type": "application/json-patch+json"}), 403)
    # A draft becomes final only through $sign, and stays its author's.
    finalised = author.put(f"/DocumentReference/{note['id']}", json={**changed, "docStatus": "final"})
    assert "$sign" in outcome(finalised, 422)["issue"][0]["diagnostics"]
    handed = author.put(f"/DocumentReference/{note['id']}", json={**changed, "author": [{"reference": OTHER}]})
    outcome(handed, 422)
    current = author.get(f"/DocumentReference/{note['id']}").json()
    assert current["description"] == "first draft, revised" and current["docStatus"] == "preliminary"
    assert author.delete(f"/DocumentReference/{note['id']}").status_code == 204


def test_only_the_author_signs_and_signing_writes_a_provenance(
        author: httpx.Client, other: httpx.Client, fhir: httpx.Client, pid: str) -> None:
    note = create(author, draft(pid))
    outcome(other.post(f"/DocumentReference/{note['id']}/$sign"), 403)
    outcome(fhir.post(f"/DocumentReference/{note['id']}/$sign"), 403)  # no fhirUser: no signer
    outcome(author.post(f"/DocumentReference/{note['id']}/$sign",
                        json={"resourceType": "Parameters", "parameter": [{"name": "x", "valueString": "y"}]}),
            400)
    signed = author.post(f"/DocumentReference/{note['id']}/$sign",
                         json={"resourceType": "Parameters"})
    assert signed.status_code == 200, signed.text
    body = signed.json()
    assert body["docStatus"] == "final" and body["authenticator"] == {"reference": AUTHOR}
    assert signed.headers["ETag"] == f'W/"{body["meta"]["versionId"]}"'
    provenances = fhir.get("/Provenance", params={"target": f"DocumentReference/{note['id']}"}).json()
    (record,) = [e["resource"] for e in provenances["entry"]]
    assert record["target"] == [{"reference": f"DocumentReference/{note['id']}/_history/{body['meta']['versionId']}"}]
    assert record["activity"]["coding"][0]["code"] == "LA"
    assert record["agent"][0]["who"] == {"reference": AUTHOR}
    assert record["agent"][0]["type"]["coding"][0]["code"] == "author"
    (signature,) = record["signature"]
    assert signature["sigFormat"] == "application/jose" and signature["who"] == {"reference": AUTHOR}
    assert "canonicalization" in signature["targetFormat"]
    # Signing twice is refused: the note is final.
    assert "addendum" in outcome(author.post(f"/DocumentReference/{note['id']}/$sign"), 409)[
        "issue"][0]["diagnostics"]


def test_a_signed_note_is_locked_on_every_write_path(
        author: httpx.Client, fhir: httpx.Client, pid: str) -> None:
    note = signed_note(author, pid)
    url = f"/DocumentReference/{note['id']}"
    edited = {**note, "description": "edited after signing"}
    version = note["meta"]["versionId"]

    def locked(response: httpx.Response) -> None:
        diagnostics = outcome(response, 409, "business-rule")["issue"][0]["diagnostics"]
        assert "addendum" in diagnostics and "correction" in diagnostics

    for client in (author, fhir):
        locked(client.put(url, json=edited))
        locked(client.put(url, json=edited, headers={"If-Match": f'W/"{version}"'}))
        locked(client.patch(url, content=orjson.dumps([{"op": "add", "path": "/description",
                                                         "value": "patched"}]),
                            headers={"Content-Type": "application/json-patch+json"}))
        locked(client.delete(url))
        identifier = note["identifier"][0]
        locked(client.put("/DocumentReference", json={k: v for k, v in edited.items() if k != "id"},
                          params={"identifier": f"{identifier['system']}|{identifier['value']}"}))
        transaction = client.post("/", json={"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": edited, "request": {"method": "PUT", "url": url.lstrip("/")}}]})
        locked(transaction)
        batch = client.post("/", json={"resourceType": "Bundle", "type": "batch", "entry": [
            {"request": {"method": "DELETE", "url": url.lstrip("/")}},
            {"resource": edited, "request": {"method": "PUT", "url": url.lstrip("/")}}]})
        assert batch.status_code == 200, batch.text
        for entry in batch.json()["entry"]:
            assert entry["response"]["status"].startswith("409"), entry
    # A stale version condition is a failed precondition, before the lock is even reached.
    outcome(author.put(url, json=edited, headers={"If-Match": 'W/"1"'}), 412)
    after = author.get(url)
    assert after.json() == note and after.headers["ETag"] == f'W/"{version}"'


def test_the_signature_provenance_cannot_be_forged_or_altered(
        author: httpx.Client, fhir: httpx.Client, pid: str) -> None:
    note = signed_note(author, pid)
    record = fhir.get("/Provenance", params={"target": f"DocumentReference/{note['id']}"}).json()[
        "entry"][0]["resource"]
    locked = outcome(fhir.put(f"/Provenance/{record['id']}", json={**record, "recorded": "2020-01-01T00:00:00Z"}),
                     409)
    assert "signature" in locked["issue"][0]["diagnostics"]
    outcome(fhir.delete(f"/Provenance/{record['id']}"), 409)
    forged = {k: v for k, v in copy.deepcopy(record).items() if k not in ("id", "meta")}
    outcome(fhir.post("/Provenance", json=forged), 422)


def test_a_note_arriving_final_is_locked_and_one_without_doc_status_is_not(
        fhir: httpx.Client, pid: str) -> None:
    arrived = create(fhir, progress_note(pid, docStatus="final", author=[{"reference": AUTHOR}]))
    outcome(fhir.put(f"/DocumentReference/{arrived['id']}", json={**arrived, "description": "x"}), 409)
    outcome(fhir.delete(f"/DocumentReference/{arrived['id']}"), 409)
    plain = create(fhir, progress_note(pid))  # no docStatus: today's behaviour
    assert fhir.put(f"/DocumentReference/{plain['id']}", json={**plain, "description": "x"}).status_code == 200
    assert fhir.delete(f"/DocumentReference/{plain['id']}").status_code == 204


def test_capability_statement_declares_the_operations(live: RunningStack) -> None:
    with records_client(live) as anonymous:
        statement = anonymous.get("/metadata").json()
    notes = next(r for r in statement["rest"][0]["resource"] if r["type"] == "DocumentReference")
    declared = {o["name"]: o["definition"] for o in notes["operation"]}
    assert declared["sign"] == f"{live.fhir}/OperationDefinition/DocumentReference-sign"
    definition = httpx.get(declared["sign"], timeout=30)  # public, like /metadata
    assert definition.status_code == 200, definition.text
    assert definition.json()["code"] == "sign" and definition.json()["instance"] is True
    assert "verify-signature" in declared


def _verify(client: httpx.Client, note_id: str) -> dict[str, Any]:
    response = client.get(f"/DocumentReference/{note_id}/$verify-signature")
    assert response.status_code == 200, response.text
    parameters = {p["name"]: p for p in response.json()["parameter"]}
    return {"result": parameters["result"]["valueBoolean"], "message": parameters["message"]["valueString"]}


def test_signature_verifies_independently_and_fails_after_tampering(
        live: RunningStack, author: httpx.Client, fhir: httpx.Client, pid: str) -> None:
    note = signed_note(author, pid)
    assert _verify(fhir, note["id"])["result"] is True
    # Anyone can check it with the published keys: JCS of the version as served, detached JWS.
    keys = httpx.get(f"{live.fhir}/.well-known/jwks.json", timeout=30)  # no token needed
    assert keys.status_code == 200 and all("d" not in k for k in keys.json()["keys"])
    version = fhir.get(f"/DocumentReference/{note['id']}/_history/{note['meta']['versionId']}")
    record = fhir.get("/Provenance", params={"target": f"DocumentReference/{note['id']}"}).json()[
        "entry"][0]["resource"]
    compact = base64.b64decode(record["signature"][0]["data"]).decode()
    assert compact.split(".")[1] == ""  # detached payload
    keyset = KeySet.import_key_set(keys.json())
    jws.deserialize_compact(compact, keyset, payload=rfc8785.dumps(version.json()))
    with pytest.raises(Exception):  # noqa: B017 - any joserfc failure
        jws.deserialize_compact(compact, keyset, payload=rfc8785.dumps({**version.json(), "description": "x"}))

    # Alter the stored bytes of the current version behind records' back.
    notes = live.db("records").DocumentReference
    stored = notes.find_one({"_id": note["id"]})
    tampered = stored["raw"].replace(b'"docStatus":"final"', b'"docStatus":"final","description":"added later"')
    assert tampered != stored["raw"]
    notes.update_one({"_id": note["id"]}, {"$set": {"raw": tampered}})
    try:
        failed = _verify(fhir, note["id"])
        assert failed["result"] is False and "does not match" in failed["message"]
    finally:
        notes.update_one({"_id": note["id"]}, {"$set": {"raw": stored["raw"]}})
    assert _verify(fhir, note["id"])["result"] is True
    # ... and the history copy of the signed version.
    history = live.db("records").DocumentReference_history
    entry = history.find_one({"id": note["id"], "vid": int(note["meta"]["versionId"])})
    assert b'"status":"current"' in entry["raw"]
    history.update_one({"_id": entry["_id"]}, {"$set": {"raw": entry["raw"].replace(
        b'"status":"current"', b'"status":"superseded"')}})
    assert _verify(fhir, note["id"])["result"] is False


def test_an_unsigned_note_does_not_verify(author: httpx.Client, pid: str) -> None:
    note = create(author, draft(pid))
    result = _verify(author, note["id"])
    assert result["result"] is False and "no signature" in result["message"]
    outcome(author.get(f"/DocumentReference/{uuid.uuid4()}/$verify-signature"), 404)


def amending(pid: str, original: dict[str, Any], code: str, text: str) -> dict[str, Any]:
    return draft(pid, text=text, relatesTo=[{"code": code, "target": {
        "reference": f"DocumentReference/{original['id']}"}}])


def test_an_addendum_is_a_signed_note_that_appends(author: httpx.Client, fhir: httpx.Client,
                                                   pid: str) -> None:
    original = signed_note(author, pid)
    addendum = create(author, amending(pid, original, "appends", "Addendum: client called back."))
    assert author.post(f"/DocumentReference/{addendum['id']}/$sign").json()["docStatus"] == "final"
    # The original is untouched and still current; both come back with one search.
    assert author.get(f"/DocumentReference/{original['id']}").json() == original
    found = fhir.get("/DocumentReference", params={
        "_id": original["id"], "_revinclude": "DocumentReference:relatesto"}).json()
    assert {(e["resource"]["id"], e["search"]["mode"]) for e in found["entry"]} == {
        (original["id"], "match"), (addendum["id"], "include")}
    related = fhir.get("/DocumentReference", params={"relatesto": f"DocumentReference/{original['id']}"})
    assert [e["resource"]["id"] for e in related.json()["entry"]] == [addendum["id"]]
    by_signer = fhir.get("/DocumentReference", params={"authenticator": AUTHOR, "docstatus": "final",
                                                       "_id": addendum["id"]}).json()
    assert by_signer["total"] == 1
    # An addendum amends a signed note: not a draft, not an unknown one.
    unsigned = create(author, draft(pid))
    outcome(author.post("/DocumentReference", json=amending(pid, unsigned, "appends", "x")), 422)
    outcome(author.post("/DocumentReference", json=amending(pid, {"id": str(uuid.uuid4())}, "appends", "x")), 422)


def test_a_correction_supersedes_the_original_when_signed(author: httpx.Client, fhir: httpx.Client,
                                                          pid: str) -> None:
    original = signed_note(author, pid)
    correction = create(author, amending(pid, original, "replaces", "S: low mood. P: CBT fortnightly."))
    assert author.get(f"/DocumentReference/{original['id']}").json()["status"] == "current"
    signed = author.post(f"/DocumentReference/{correction['id']}/$sign")
    assert signed.status_code == 200, signed.text
    assert signed.json()["docStatus"] == "amended"
    after = author.get(f"/DocumentReference/{original['id']}").json()
    assert after["status"] == "superseded" and after["docStatus"] == "final"
    assert after["content"] == original["content"] and after["authenticator"] == original["authenticator"]
    history = author.get(f"/DocumentReference/{original['id']}/_history").json()
    assert [e["resource"]["status"] for e in history["entry"]][:2] == ["superseded", "current"]
    assert _verify(fhir, original["id"])["result"] is True  # the signed version is intact
    outcome(author.put(f"/DocumentReference/{original['id']}", json={**after, "status": "current"}), 409)
    # A second correction of a superseded note is refused.
    outcome(author.post("/DocumentReference", json=amending(pid, original, "replaces", "again")), 422)


def test_entered_in_error_by_the_author_or_an_admin_with_a_reason(
        live: RunningStack, author: httpx.Client, other: httpx.Client, fhir: httpx.Client, pid: str) -> None:
    note = signed_note(author, pid)
    url = f"/DocumentReference/{note['id']}/$entered-in-error"
    reason = {"resourceType": "Parameters", "parameter": [
        {"name": "reason", "valueString": "Written in the wrong patient's chart"}]}
    outcome(other.post(url, json=reason), 403)
    outcome(author.post(url, json={"resourceType": "Parameters"}), 400)
    marked = author.post(url, json=reason)
    assert marked.status_code == 200, marked.text
    assert marked.json()["docStatus"] == "entered-in-error" and marked.json()["status"] == "entered-in-error"
    outcome(author.post(url, json=reason), 409)
    assert author.get(f"/DocumentReference/{note['id']}").status_code == 200  # readable by id
    plain = fhir.get("/DocumentReference", params={"patient": pid, "_count": "200"}).json()
    assert note["id"] not in [e["resource"]["id"] for e in plain.get("entry", [])]
    asked = fhir.get("/DocumentReference", params={"patient": pid, "status": "entered-in-error"}).json()
    assert note["id"] in [e["resource"]["id"] for e in asked["entry"]]
    why = fhir.get("/Provenance", params={"target": f"DocumentReference/{note['id']}"}).json()
    assert "Written in the wrong patient's chart" in [
        r["text"] for e in why["entry"] for r in e["resource"].get("reason", [])]
    # An administrator may too.
    admin = mint_token(live, sub="records-admin", scope=USER_SCOPE, roles=["admin"])
    with records_client(live, token=admin) as client:
        other_note = signed_note(author, pid)
        assert client.post(f"/DocumentReference/{other_note['id']}/$entered-in-error",
                           json=reason).status_code == 200
