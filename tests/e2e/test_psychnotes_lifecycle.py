"""Psychotherapy notes follow the same lifecycle as progress notes (issue 14, minus 45 CFR
164.526), through the gateway: a draft changes by its author until `$sign`; a signed note, or one
that arrives signed, refuses every write; one without docStatus behaves as before. Addenda and
corrections point at a signed note (a signed correction supersedes it, content untouched);
entered-in-error keeps it readable by id; a supervisee's signature awaits their supervisor's; every
`$sign` stores a JWS over the plaintext that `$verify-signature` checks after decryption. The
consent gate holds for all of it."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import httpx
import rfc8785
from bson.binary import Binary
from joserfc import jws as jws_module
from joserfc.jwk import KeySet

from psychnotes import keys, vault
from psychnotes.settings import PsychnotesSettings
from tests.conftest import RunningStack
from tests.e2e.test_psychnotes import (
    assert_refused,
    authorization,
    care_team,
    headers,
    marker,
    mint_consent_token,
    psy_note,
    record_consent,
    user_token,
    write_note,
)

AWAITING = "https://mindchart.dev/fhir/CodeSystem/awaiting-cosignature"


def test_a_signed_psychotherapy_note_is_locked(live: RunningStack) -> None:
    therapist = user_token(live, "Practitioner/th-sign")
    colleague = user_token(live, "Practitioner/th-sign-other")
    patient = f"w-sign-{uuid.uuid4().hex[:6]}"
    draft_text, later = marker("sign-draft"), marker("sign-later")
    note_id = write_note(live, therapist, patient, draft_text, docStatus="preliminary")
    url = f"{live.psychnotes}/DocumentReference/{note_id}"
    body = {**psy_note(patient, draft_text, docStatus="preliminary"), "id": note_id}
    assert httpx.put(url, headers=headers(therapist), json=body).status_code == 200
    finalised = httpx.put(url, headers=headers(therapist), json={**body, "docStatus": "final"})
    assert finalised.status_code == 422 and "$sign" in finalised.text
    assert httpx.post(f"{url}/$sign", headers=headers(colleague)).status_code == 404  # not theirs

    signed = httpx.post(f"{url}/$sign", headers=headers(therapist))
    assert signed.status_code == 200, signed.text
    own = mint_consent_token(live, therapist, basis="originator-treatment",
                             patient={"reference": f"Patient/{patient}"})
    read = httpx.get(url, headers=headers(therapist, own)).json()
    assert read["docStatus"] == "final" and read["authenticator"]["reference"].endswith("Practitioner/th-sign")
    for response in (httpx.put(url, headers=headers(therapist), json={**body, "description": later}),
                     httpx.delete(url, headers=headers(therapist)),
                     httpx.post(f"{url}/$sign", headers=headers(therapist))):
        assert response.status_code == 409, response.text
        assert response.json()["issue"][0]["code"] == "business-rule"
    assert httpx.get(url, headers=headers(therapist, own)).json()["meta"]["versionId"] == "3"

    arrived = write_note(live, therapist, patient, marker("arrived-final"), docStatus="final")
    assert httpx.delete(f"{live.psychnotes}/DocumentReference/{arrived}",
                        headers=headers(therapist)).status_code == 409
    plain = write_note(live, therapist, patient, marker("plain"))  # no docStatus: as before
    assert httpx.delete(f"{live.psychnotes}/DocumentReference/{plain}",
                        headers=headers(therapist)).status_code == 204


# -- addenda, corrections, entered-in-error, co-signature, the system signature -------------------

def _sign(live: RunningStack, access: str, note_id: str) -> httpx.Response:
    return httpx.post(f"{live.psychnotes}/DocumentReference/{note_id}/$sign", headers=headers(access))


def _read(live: RunningStack, access: str, consent: str, note_id: str) -> dict[str, Any]:
    response = httpx.get(f"{live.psychnotes}/DocumentReference/{note_id}", headers=headers(access, consent))
    assert response.status_code == 200, response.text
    return dict(response.json())


def _amending(live: RunningStack, access: str, patient: str, text: str, code: str, target: str,
              **changes: Any) -> httpx.Response:
    body = psy_note(patient, text, docStatus="preliminary",
                    relatesTo=[{"code": code, "target": {"reference": f"DocumentReference/{target}"}}])
    body.update(changes)
    return httpx.post(f"{live.psychnotes}/DocumentReference", headers=headers(access), json=body)


def _created(response: httpx.Response) -> str:
    assert response.status_code == 201, response.text
    return response.headers["location"].split("/")[-3]


def _verify(live: RunningStack, access: str, consent: str | None, note_id: str) -> httpx.Response:
    return httpx.get(f"{live.psychnotes}/DocumentReference/{note_id}/$verify-signature",
                     headers=headers(access, consent))


def _result(response: httpx.Response) -> tuple[bool, str, list[dict[str, Any]]]:
    assert response.status_code == 200, response.text
    found = response.json()["parameter"]
    result = next(p["valueBoolean"] for p in found if p["name"] == "result")
    message = next(p["valueString"] for p in found if p["name"] == "message")
    return result, message, [{q["name"]: q for q in p["part"]} for p in found if p["name"] == "signature"]


def test_addenda_and_corrections_amend_a_signed_note_without_changing_it(live: RunningStack) -> None:
    therapist = user_token(live, "Practitioner/th-amend")
    colleague = user_token(live, "Practitioner/th-amend-other")
    patient = f"w-amend-{uuid.uuid4().hex[:6]}"
    original_text, addendum_text, correction_text = marker("orig"), marker("addendum"), marker("fix")
    original = write_note(live, therapist, patient, original_text, docStatus="preliminary")
    draft = write_note(live, therapist, patient, marker("other-draft"), docStatus="preliminary")
    assert _sign(live, therapist, original).status_code == 200
    care_team(live, patient, "Practitioner/th-amend-other")
    care_team(live, f"{patient}-else", "Practitioner/th-amend")

    # What an addendum may point at: a signed, current note of the same patient, one's own;
    # anything else is the same 422, so it tells nothing about notes the writer cannot see.
    refusals = [_amending(live, therapist, patient, marker("x"), "appends", draft),
                _amending(live, therapist, patient, marker("x"), "appends", str(uuid.uuid4())),
                _amending(live, colleague, patient, marker("x"), "appends", original),
                _amending(live, therapist, f"{patient}-else", marker("x"), "appends", original),
                _amending(live, therapist, patient, marker("x"), "appends", original, docStatus="final")]
    for refused in refusals:
        assert_refused(refused, 422, original_text)
    assert len({r.json()["issue"][0]["diagnostics"].split(" ", 2)[2] for r in refusals[:4]}) == 1

    addendum = _created(_amending(live, therapist, patient, addendum_text, "appends", original))
    assert _sign(live, therapist, addendum).status_code == 200
    correction = _created(_amending(live, therapist, patient, correction_text, "replaces", original))
    own = mint_consent_token(live, therapist, basis="originator-treatment",
                             patient={"reference": f"Patient/{patient}"})
    assert _read(live, therapist, own, original)["status"] == "current"  # until the correction is signed
    assert _sign(live, therapist, correction).status_code == 200

    fixed, superseded = _read(live, therapist, own, correction), _read(live, therapist, own, original)
    assert fixed["docStatus"] == "amended" and fixed["status"] == "current"
    assert superseded["status"] == "superseded" and superseded["docStatus"] == "final"
    assert superseded["description"] == original_text  # the content untouched, still readable
    history = httpx.get(f"{live.psychnotes}/DocumentReference/{original}/_history",
                        headers=headers(therapist, own)).json()
    assert [e["resource"]["status"] for e in history["entry"]] == ["superseded", "current", "current"]
    # A superseded note is not corrected again, and a signed addendum is locked like any note.
    assert_refused(_amending(live, therapist, patient, marker("x"), "replaces", original), 422)
    assert httpx.put(f"{live.psychnotes}/DocumentReference/{addendum}", headers=headers(therapist),
                     json={**psy_note(patient, marker("x")), "id": addendum}).status_code == 409

    related = httpx.get(f"{live.psychnotes}/DocumentReference",
                        params={"patient": patient, "relatesto": f"DocumentReference/{original}"},
                        headers=headers(therapist, own)).json()
    assert sorted(e["resource"]["id"] for e in related["entry"]) == sorted([addendum, correction])

    # The consent gate holds for addenda: an authorization for the original alone releases the
    # original, never what was appended to it later (45 CFR 164.508(c)(1)(i): a specific description).
    consent_id = record_consent(live, therapist, authorization(
        patient, recipient={"reference": "Practitioner/dr-amend"}, notes=[original]))
    reader = user_token(live, "Practitioner/dr-amend", client_id="amend-app", scope="user/DocumentReference.rs")
    granted = mint_consent_token(live, reader, consent_id, purpose="TREAT")
    assert _read(live, reader, granted, original)["description"] == original_text
    for note_id in (addendum, correction):
        assert_refused(httpx.get(f"{live.psychnotes}/DocumentReference/{note_id}",
                                 headers=headers(reader, granted)), 403, addendum_text, correction_text)
        assert_refused(httpx.get(f"{live.psychnotes}/DocumentReference/{note_id}", headers=headers(reader)),
                       403, addendum_text, correction_text)
    scoped = httpx.get(f"{live.psychnotes}/DocumentReference", headers=headers(reader, granted),
                       params={"patient": patient, "relatesto": original})
    assert scoped.status_code == 200 and scoped.json().get("entry", []) == []
    assert addendum_text.encode() not in scoped.content


def test_entered_in_error_keeps_the_note_readable_by_id_and_out_of_plain_searches(live: RunningStack) -> None:
    therapist = user_token(live, "Practitioner/th-eie")
    colleague = user_token(live, "Practitioner/th-eie-other")
    patient = f"w-eie-{uuid.uuid4().hex[:6]}"
    text = marker("eie")
    note_id = write_note(live, therapist, patient, text, docStatus="preliminary")
    kept = write_note(live, therapist, patient, marker("kept"), docStatus="final")
    url = f"{live.psychnotes}/DocumentReference/{note_id}/$entered-in-error"
    reason = {"resourceType": "Parameters", "parameter": [{"name": "reason", "valueString": "wrong patient chart"}]}
    assert_refused(httpx.post(url, headers=headers(therapist), json=reason), 422)  # a draft: delete it instead
    assert _sign(live, therapist, note_id).status_code == 200
    assert_refused(httpx.post(url, headers=headers(therapist), json={"resourceType": "Parameters"}), 400)
    assert_refused(httpx.post(url, headers=headers(colleague), json=reason), 404, text)
    marked = httpx.post(url, headers=headers(therapist), json=reason)
    assert marked.status_code == 200, marked.text
    assert httpx.post(url, headers=headers(therapist), json=reason).status_code == 409

    own = mint_consent_token(live, therapist, basis="originator-treatment",
                             patient={"reference": f"Patient/{patient}"})
    read = _read(live, therapist, own, note_id)
    assert read["docStatus"] == read["status"] == "entered-in-error" and read["description"] == text
    plain = httpx.get(f"{live.psychnotes}/DocumentReference", params={"patient": patient},
                      headers=headers(therapist, own)).json()
    assert [e["resource"]["id"] for e in plain["entry"]] == [kept]
    asked = httpx.get(f"{live.psychnotes}/DocumentReference", headers=headers(therapist, own),
                      params={"patient": patient, "status": "entered-in-error"}).json()
    assert [e["resource"]["id"] for e in asked["entry"]] == [note_id]
    # The reason is kept, sealed like the note: no byte of it in clear in the datastore.
    stored = live.db("psychnotes").provenances.find({"note": note_id})
    assert sorted(p["note_vid"] for p in stored) == [2, 3]
    assert all(b"wrong patient chart" not in bytes(p["sealed"]["ct"]) for p in
               live.db("psychnotes").provenances.find({"note": note_id}))


def test_a_supervisee_cannot_make_a_note_final_alone(live: RunningStack) -> None:
    suffix = uuid.uuid4().hex[:6]
    supervisor_ref = f"Practitioner/sup-{suffix}"
    trainee = user_token(live, f"Practitioner/trainee-{suffix}", supervisor=supervisor_ref)
    supervisor = user_token(live, supervisor_ref)
    accomplice = user_token(live, f"Practitioner/friend-{suffix}")
    patient = f"w-cosign-{suffix}"
    text = marker("cosign")
    # Only $sign puts a note in wait for a co-signer: a write naming one is refused.
    care_team(live, patient, f"Practitioner/trainee-{suffix}")
    tagged = psy_note(patient, text, docStatus="preliminary", meta={"tag": [{
        "system": AWAITING, "code": f"Practitioner/friend-{suffix}"}]})
    assert_refused(httpx.post(f"{live.psychnotes}/DocumentReference", headers=headers(trainee), json=tagged),
                   422, text)

    note_id = write_note(live, trainee, patient, text, docStatus="preliminary")
    assert _sign(live, trainee, note_id).status_code == 200
    own = mint_consent_token(live, trainee, basis="originator-treatment",
                             patient={"reference": f"Patient/{patient}"})
    waiting = _read(live, trainee, own, note_id)
    assert waiting["docStatus"] == "preliminary" and "authenticator" not in waiting
    assert {"system": AWAITING, "code": supervisor_ref,
            "display": f"awaiting co-signature by {supervisor_ref}"} in waiting["meta"]["tag"]
    url = f"{live.psychnotes}/DocumentReference/{note_id}"
    body = {**psy_note(patient, marker("x"), docStatus="preliminary"), "id": note_id}
    assert httpx.put(url, headers=headers(trainee), json=body).status_code == 409
    assert httpx.delete(url, headers=headers(trainee)).status_code == 409
    assert_refused(_sign(live, trainee, note_id), 403, text)  # not final by a second signature of theirs
    assert_refused(_sign(live, accomplice, note_id), 404, text)

    assert _sign(live, supervisor, note_id).status_code == 200  # not on the care team: 164.508(a)(2)(i)(B)
    final = _read(live, trainee, own, note_id)
    assert final["docStatus"] == "final" and final["authenticator"]["reference"] == supervisor_ref
    assert not [t for t in final["meta"].get("tag", []) if t["system"] == AWAITING]
    assert final["description"] == text
    assert _sign(live, supervisor, note_id).status_code == 404  # final: nothing awaits them
    result, _, signatures = _result(_verify(live, trainee, own, note_id))
    assert result
    assert [(s["role"]["valueCode"], s["signer"]["valueReference"]["reference"], s["version"]["valueString"])
            for s in signatures] == [("author", f"Practitioner/trainee-{suffix}", "2"),
                                     ("verifier", supervisor_ref, "3")]


def _keyring(live: RunningStack) -> Any:
    settings = PsychnotesSettings(data_dir=live.config.data_dir)
    return keys.load_keyring(settings, create=False)


def test_the_system_signature_proves_a_note_unchanged_since_signing(live: RunningStack) -> None:
    therapist = user_token(live, "Practitioner/th-jws")
    stranger = user_token(live, "Practitioner/th-jws-stranger", client_id="jws-app",
                          scope="user/DocumentReference.rs")
    patient = f"w-jws-{uuid.uuid4().hex[:6]}"
    text, forged = marker("jws"), marker("jws-forged")
    note_id = write_note(live, therapist, patient, text, docStatus="preliminary")
    own = mint_consent_token(live, therapist, basis="originator-treatment",
                             patient={"reference": f"Patient/{patient}"})
    result, message, _ = _result(_verify(live, therapist, own, note_id))
    assert not result and "no signature" in message
    assert _sign(live, therapist, note_id).status_code == 200

    # No consent token, or one that does not cover the note: refused, and nothing of the note.
    assert_refused(_verify(live, therapist, None, note_id), 403, text)
    assert_refused(_verify(live, stranger, None, note_id), 403, text)
    result, message, signatures = _result(_verify(live, therapist, own, note_id))
    assert result, message
    provenance = signatures[0]["provenance"]["resource"]
    assert provenance["target"] == [{"reference": f"DocumentReference/{note_id}/_history/2"}]
    assert provenance["agent"][0]["who"]["reference"] == "Practitioner/th-jws"
    signature = provenance["signature"][0]
    assert signature["sigFormat"] == "application/jose"
    jws = base64.b64decode(signature["data"]).decode()
    protected, payload, _ = jws.split(".")
    assert payload == ""  # detached: the signature carries no word of the note
    assert text.encode() not in base64.b64decode(signature["data"])

    # Anyone with psychnotes' published JWK Set checks it over the note as read (RFC 8785 form),
    # and the key is psychnotes' own: not records', not the consent-token key.
    published = httpx.get(f"{live.psychnotes}/.well-known/jwks.json")
    assert published.status_code == 200 and all("d" not in k for k in published.json()["keys"])
    records_keys = httpx.get(f"{live.fhir}/.well-known/jwks.json").json()["keys"]
    assert {k["kid"] for k in published.json()["keys"]}.isdisjoint(k["kid"] for k in records_keys)
    signed_version = httpx.get(f"{live.psychnotes}/DocumentReference/{note_id}/_history/2",
                               headers=headers(therapist, own))
    keyset = KeySet.import_key_set(published.json())
    header = json.loads(base64.urlsafe_b64decode(protected + "=" * (-len(protected) % 4)))
    key = next(k for k in keyset.keys if k.kid == header["kid"])
    jws_module.deserialize_compact(jws, key, payload=rfc8785.dumps(signed_version.json()))

    # Someone holding the KEK re-seals the note with other words: reads would serve them, the
    # signature does not match them.
    notes = live.db("psychnotes").notes
    doc = notes.find_one({"_id": note_id})
    altered = {**signed_version.json(), "description": forged}
    binding = vault.Binding("DocumentReference", note_id, int(doc["vid"]), doc["patient"])
    notes.update_one({"_id": note_id}, {"$set": {"sealed": vault.seal(_keyring(live), altered, binding)}})
    assert _read(live, therapist, own, note_id)["description"] == forged
    result, message, signatures = _result(_verify(live, therapist, own, note_id))
    assert not result and "does not match" in message and not signatures[0]["valid"]["valueBoolean"]
    assert text.encode() not in _verify(live, therapist, own, note_id).content
    notes.update_one({"_id": note_id}, {"$set": {"sealed": doc["sealed"]}})
    assert _result(_verify(live, therapist, own, note_id))[0]

    # Flipped bytes in the signed version's history entry: it no longer opens, verification fails,
    # and the service stays healthy.
    history = live.db("psychnotes").notes_history
    entry = history.find_one({"id": note_id, "vid": 2})
    ciphertext = bytearray(entry["sealed"]["ct"])
    ciphertext[5] ^= 0x01
    history.update_one({"_id": entry["_id"]}, {"$set": {"sealed.ct": Binary(bytes(ciphertext))}})
    result, message, _ = _result(_verify(live, therapist, own, note_id))
    assert not result and "cannot be decrypted" in message
    assert httpx.get(f"{live.gateway_url}/healthz").status_code == 200


def test_every_write_path_refuses_a_signed_note(live: RunningStack) -> None:
    therapist = user_token(live, "Practitioner/th-paths")
    patient = f"w-paths-{uuid.uuid4().hex[:6]}"
    text = marker("paths")
    note_id = write_note(live, therapist, patient, text, docStatus="final")
    url = f"{live.psychnotes}/DocumentReference/{note_id}"
    body = {**psy_note(patient, marker("x")), "id": note_id}
    patched = httpx.patch(url, headers={**headers(therapist), "Content-Type": "application/json-patch+json"},
                          content=b'[{"op":"replace","path":"/description","value":"changed"}]')
    batch = httpx.post(f"{live.psychnotes}/", headers=headers(therapist), json={
        "resourceType": "Bundle", "type": "batch",
        "entry": [{"resource": body, "request": {"method": "PUT", "url": f"DocumentReference/{note_id}"}},
                  {"request": {"method": "DELETE", "url": f"DocumentReference/{note_id}"}}]})
    for response in (httpx.put(url, headers=headers(therapist), json=body),
                     httpx.put(url, headers={**headers(therapist), "If-Match": 'W/"1"'}, json=body),
                     httpx.delete(url, headers=headers(therapist)), patched, batch):
        assert response.status_code in (404, 405, 409), response.text
        assert response.json()["resourceType"] == "OperationOutcome"
    own = mint_consent_token(live, therapist, basis="originator-treatment",
                             patient={"reference": f"Patient/{patient}"})
    read = _read(live, therapist, own, note_id)
    assert read["meta"]["versionId"] == "1" and read["description"] == text


def test_bad_input_to_the_lifecycle_operations_is_a_clear_4xx_and_stores_nothing(live: RunningStack) -> None:
    therapist = user_token(live, "Practitioner/th-bad")
    patient = f"w-bad-{uuid.uuid4().hex[:6]}"
    text = marker("bad")
    note_id = write_note(live, therapist, patient, text, docStatus="preliminary")
    base = f"{live.psychnotes}/DocumentReference/{note_id}"
    json_headers = headers(therapist)
    attempts = [
        (httpx.post(f"{base}/$sign", headers=json_headers, content=b'{"resourceType":"Patient"}'), 400),
        (httpx.post(f"{base}/$sign", headers=json_headers, content=b"not json"), 400),
        (httpx.post(f"{base}/$sign", headers=json_headers, json={
            "resourceType": "Parameters", "parameter": [{"name": "x", "valueString": "y"}]}), 400),
        (httpx.post(f"{live.psychnotes}/DocumentReference/{'x' * 200}/$sign", headers=json_headers), 404),
        (httpx.post(f"{base}/$entered-in-error", headers=json_headers, content=b"[1,2"), 400),
        (httpx.post(f"{base}/$entered-in-error", headers=json_headers, json={
            "resourceType": "Parameters", "parameter": [{"name": "reason", "valueString": " "}]}), 400),
        (httpx.post(f"{base}/$entered-in-error", headers=json_headers, json={
            "resourceType": "Parameters", "parameter": [{"name": "reason", "valueBoolean": True}]}), 400),
        (httpx.post(f"{base}/$entered-in-error", headers={**json_headers, "Content-Type": "text/plain"},
                    content=b"reason"), 415),
        (_amending(live, therapist, patient, marker("x"), "appends", "../../Patient/x"), 422),
        (_verify(live, therapist, None, "x" * 200), 403),
    ]
    for response, status in attempts:
        assert_refused(response, status, text)
    own = mint_consent_token(live, therapist, basis="originator-treatment",
                             patient={"reference": f"Patient/{patient}"})
    note = _read(live, therapist, own, note_id)
    assert note["meta"]["versionId"] == "1" and note["docStatus"] == "preliminary"
    assert live.db("psychnotes").provenances.count_documents({"note": note_id}) == 0
    assert _sign(live, therapist, note_id).status_code == 200  # and the service is healthy
