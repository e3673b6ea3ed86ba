"""What the psychnotes datastore holds: no plaintext note text in any byte of any document, every
note version sealed with its own data key under a recorded KEK, and ciphertexts bound to their
note, version and patient (a swapped ciphertext fails instead of leaking another note)."""

from __future__ import annotations

import base64
from typing import Any

import httpx
from bson.raw_bson import RawBSONDocument
from pymongo import MongoClient

from tests.conftest import RunningStack
from tests.e2e.test_psychnotes import (
    assert_refused,
    authorization,
    headers,
    marker,
    mint_consent_token,
    patient_token,
    psy_note,
    record_consent,
    user_token,
    write_note,
)


def forms_of(text: str) -> list[bytes]:
    """The text as it could appear in stored bytes: raw, UTF-16, and base64 at any alignment."""
    raw = text.encode()
    forms = [raw, text.encode("utf-16-le"), base64.b64encode(raw)]
    for pad in (1, 2):
        encoded = base64.b64encode(b"\0" * pad + raw)
        forms.append(encoded[4:-4])  # the stretch that depends only on the text itself
    return forms


def raw_documents(live: RunningStack) -> list[tuple[str, bytes]]:
    client: MongoClient[RawBSONDocument] = MongoClient(
        live.config.mongo_url("psychnotes"), document_class=RawBSONDocument)
    try:
        db = client["mindchart_psychnotes"]
        return [(name, doc.raw) for name in db.list_collection_names() for doc in db[name].find()]
    finally:
        client.close()


def test_the_datastore_holds_no_plaintext_note_text(live: RunningStack) -> None:
    therapist = user_token(live, "Practitioner/th-raw")
    patient = "raw-patient-1"
    text = marker("at-rest")
    note_id = write_note(live, therapist, patient, text)
    revised = marker("at-rest-v2")
    assert httpx.put(f"{live.psychnotes}/DocumentReference/{note_id}", headers=headers(therapist),
                     json={**psy_note(patient, revised), "id": note_id}).status_code == 200
    consent_id = record_consent(live, therapist, authorization(
        patient, recipient={"reference": "Practitioner/dr-raw"}, notes=[note_id]))
    reader = user_token(live, "Practitioner/dr-raw", client_id="raw-app",
                        scope="user/DocumentReference.rs")
    token = mint_consent_token(live, reader, consent_id, purpose="TREAT")
    read = httpx.get(f"{live.psychnotes}/DocumentReference/{note_id}", headers=headers(reader, token))
    assert read.status_code == 200 and read.json()["description"] == revised
    history = httpx.get(f"{live.psychnotes}/DocumentReference/{note_id}/_history",
                        headers=headers(reader, token))
    assert [e["resource"]["description"] for e in history.json()["entry"]] == [revised, text]

    documents = raw_documents(live)
    collections = {name for name, _ in documents}
    assert {"notes", "notes_history", "consents", "decisions", "disclosures"} <= collections
    for secret in (text, revised):
        for name, raw in documents:
            for form in forms_of(secret):
                assert form not in raw, f"note text found in {name}"
    # The signed authorization form is sealed too.
    form_bytes = b"%PDF-1.4 signed form"
    assert not any(form_bytes in raw or base64.b64encode(form_bytes) in raw for _, raw in documents)


def test_every_version_is_sealed_with_its_own_data_key(live: RunningStack) -> None:
    therapist = user_token(live, "Practitioner/th-raw")
    note_id = write_note(live, therapist, "raw-patient-2", marker("keys"))
    httpx.put(f"{live.psychnotes}/DocumentReference/{note_id}", headers=headers(therapist),
              json={**psy_note("raw-patient-2", marker("keys-v2")), "id": note_id})
    db = live.db("psychnotes")
    current = db.notes.find_one({"_id": note_id})
    versions = list(db.notes_history.find({"id": note_id}))
    assert [v["vid"] for v in sorted(versions, key=lambda v: v["vid"])] == [1, 2]
    sealed = [v["sealed"] for v in versions]
    assert all(s["alg"] == "A256GCM" and len(s["dek"]["kek"]) == 16 for s in sealed)
    assert len({bytes(s["dek"]["key"]) for s in sealed}) == 2
    assert len({bytes(s["nonce"]) for s in sealed}) == 2
    # Only what the gate and search need is in clear: patient, author, date, status, labels.
    stub: dict[str, Any] = current["resource"]
    assert set(stub) == {"resourceType", "id", "meta", "status", "subject", "author", "date"}
    assert current["patient"] == "Patient/raw-patient-2" and current["author"] == "Practitioner/th-raw"


def test_a_swapped_ciphertext_fails_instead_of_leaking(live: RunningStack) -> None:
    therapist = user_token(live, "Practitioner/th-swap")
    victim_text, bait_text = marker("swap-victim"), marker("swap-bait")
    victim = write_note(live, therapist, "swap-victim", victim_text)
    bait = write_note(live, therapist, "swap-bait", bait_text)
    db = live.db("psychnotes")
    # An insider with write access to the datastore copies the victim's sealed body onto a note
    # the attacker is authorized for (another patient's).
    victim_sealed = db.notes.find_one({"_id": victim})["sealed"]
    db.notes.update_one({"_id": bait}, {"$set": {"sealed": victim_sealed}})
    consent_id = record_consent(live, patient_token(live, "swap-bait"), authorization(
        "swap-bait", recipient={"reference": "Practitioner/dr-swap"}, notes=[bait]))
    reader = user_token(live, "Practitioner/dr-swap", client_id="swap-app",
                        scope="user/DocumentReference.rs")
    token = mint_consent_token(live, reader, consent_id, purpose="TREAT")
    response = httpx.get(f"{live.psychnotes}/DocumentReference/{bait}", headers=headers(reader, token))
    assert_refused(response, 500, victim_text, bait_text)
    assert response.json()["issue"][0]["code"] == "exception"
