"""Demo data for `make run`, created once (idempotent): clients, users, a therapist, a patient,
the therapist's care team for the patient, progress notes and PHQ-9/GAD-7 scores, and
psychotherapy notes through their lifecycle (psychnotes). Credentials are
generated per machine and kept in `<data dir>/demo/credentials.json` (mode 0600), never in the
repository.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from joserfc import jwt
from joserfc.jwk import ECKey

DEMO_PATIENT = "demo-patient"
DEMO_THERAPIST = "demo-therapist"
DEMO_TRAINEE = "demo-trainee"  # a supervisee: DEMO_THERAPIST co-signs their notes
LOINC = "http://loinc.org"
SURVEY = {"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "survey"}
CLINICAL_NOTE = {"system": "http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category",
                 "code": "clinical-note"}
AWAITING_COSIGNATURE = "https://mindchart.dev/fhir/CodeSystem/awaiting-cosignature"
RESTRICTED_BH = [
    {"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"},
    {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "BH"},
]


def credentials_path(data_dir: Path) -> Path:
    return data_dir / "demo" / "credentials.json"


def load_or_make_credentials(data_dir: Path) -> tuple[dict[str, Any], bool]:
    path = credentials_path(data_dir)
    if path.exists():
        creds = json.loads(path.read_text())
        if "trainee" not in creds["users"]:  # credentials made before the lifecycle demo
            creds["users"]["trainee"] = secrets.token_urlsafe(12)
            path.write_text(json.dumps(creds, indent=2))
        return creds, False
    key = ECKey.generate_key("P-384", parameters={"kid": "demo-backend-1", "alg": "ES384"})
    creds = {
        "backend_client_id": "demo-backend",
        "backend_private_jwk": key.as_dict(private=True),
        "secret_client_id": "demo-secret",
        "secret_client_secret": secrets.token_urlsafe(24),
        "users": {
            "therapist": secrets.token_urlsafe(12),
            "patient": secrets.token_urlsafe(12),
            "admin": secrets.token_urlsafe(12),
            "trainee": secrets.token_urlsafe(12),
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(json.dumps(creds, indent=2))
    return creds, True


def backend_assertion(private_jwk: dict[str, Any], client_id: str, token_url: str) -> str:
    """A SMART Backend Services client assertion (ES384, 5-minute life, unique jti)."""
    key = ECKey.import_key(private_jwk)
    now = int(time.time())
    claims = {"iss": client_id, "sub": client_id, "aud": token_url, "exp": now + 240,
              "iat": now, "jti": uuid.uuid4().hex}
    return jwt.encode({"alg": "ES384", "kid": key.kid, "typ": "JWT"}, claims, key,
                      algorithms=["ES384"])


def public_jwks(private_jwk: dict[str, Any]) -> dict[str, Any]:
    return {"keys": [ECKey.import_key(private_jwk).as_dict(private=False)]}


def demo_resources() -> list[dict[str, Any]]:
    patient_ref = {"reference": f"Patient/{DEMO_PATIENT}"}
    therapist_ref = {"reference": f"Practitioner/{DEMO_THERAPIST}"}
    resources: list[dict[str, Any]] = [
        {"resourceType": "Practitioner", "id": DEMO_THERAPIST, "active": True,
         "name": [{"family": "Rivera", "given": ["Dana"], "prefix": ["Dr."]}],
         "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": "1234567893"}]},
        {"resourceType": "Practitioner", "id": DEMO_TRAINEE, "active": True,
         "name": [{"family": "Chen", "given": ["Sam"]}]},
        {"resourceType": "Patient", "id": DEMO_PATIENT, "active": True,
         "meta": {"security": RESTRICTED_BH},
         "identifier": [{"system": "urn:mindchart:mrn", "value": "MRN-0001"}],
         "name": [{"family": "Doe", "given": ["Alex"]}], "gender": "other", "birthDate": "1990-04-12"},
    ]
    # Who treats whom: psychnotes lets only a care-team member write psychotherapy notes.
    resources.append({
        "resourceType": "CareTeam", "id": "demo-care-team", "status": "active",
        "name": "Dr. Rivera's care of Alex Doe", "subject": patient_ref,
        "period": {"start": "2026-10-01"},
        "participant": [{"role": [{"text": "Treating psychotherapist"}], "member": therapist_ref}],
    })
    # The trainee treats the patient under the therapist's supervision (their own CareTeam, so a
    # machine seeded before it gets it too: seed_records creates what is not there yet).
    resources.append({
        "resourceType": "CareTeam", "id": "demo-training-care-team", "status": "active",
        "name": "Sam Chen's supervised care of Alex Doe", "subject": patient_ref,
        "period": {"start": "2026-11-01"},
        "participant": [{"role": [{"text": "Psychotherapist in training"}],
                         "member": {"reference": f"Practitioner/{DEMO_TRAINEE}"}}],
    })
    sessions = [("2026-10-05", 8, 12), ("2026-10-19", 12, 9), ("2026-11-02", 16, 7)]
    for n, (day, _, _) in enumerate(sessions, start=1):
        resources.append({
            "resourceType": "Encounter", "id": f"demo-session-{n}", "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "type": [{"coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": "90837",
                                  "display": "Psychotherapy, 60 minutes"}]}],
            "subject": patient_ref,
            "participant": [{"individual": therapist_ref}],
            "period": {"start": f"{day}T15:00:00Z", "end": f"{day}T15:55:00Z"},
        })
    notes = [
        "S: Reports low mood most days, poor sleep.\nO: Affect flat, PHQ-9 = 12.\n"
        "A: Moderate depressive episode (F32.1).\nP: Weekly CBT; sleep hygiene.",
        "S: Mood slightly improved; sleeping 6h.\nO: PHQ-9 = 9.\nA: Improving.\n"
        "P: Continue CBT, behavioural activation.",
        "S: Returned to work part-time.\nO: PHQ-9 = 7.\nA: Mild symptoms.\nP: Biweekly sessions.",
    ]

    for n, ((day, _, phq9), text) in enumerate(zip(sessions, notes, strict=True), start=1):
        resources.append({
            "resourceType": "DocumentReference", "id": f"demo-note-{n}", "status": "current",
            "meta": {"security": RESTRICTED_BH},
            "type": {"coding": [{"system": LOINC, "code": "11506-3", "display": "Progress note"}]},
            "category": [{"coding": [CLINICAL_NOTE]}],
            "subject": patient_ref, "date": f"{day}T16:00:00Z", "author": [therapist_ref],
            "content": [{"attachment": {"contentType": "text/plain",
                                        "data": base64.b64encode(text.encode()).decode()}}],
            "context": {"encounter": [{"reference": f"Encounter/demo-session-{n}"}],
                        "period": {"start": f"{day}T15:00:00Z", "end": f"{day}T15:55:00Z"}},
        })
        for code, display, value, obs_id in (
            ("44261-6", "PHQ-9 total score", phq9, f"demo-phq9-{n}"),
            ("70274-6", "GAD-7 total score", max(phq9 - 2, 0), f"demo-gad7-{n}"),
        ):
            resources.append({
                "resourceType": "Observation", "id": obs_id, "status": "final",
                "meta": {"security": RESTRICTED_BH},
                "category": [{"coding": [SURVEY]}],
                "code": {"coding": [{"system": LOINC, "code": code, "display": display}]},
                "subject": patient_ref, "effectiveDateTime": f"{day}T15:10:00Z",
                "performer": [therapist_ref],
                "valueQuantity": {"value": value, "system": "http://unitsofmeasure.org",
                                  "code": "{score}", "unit": "{score}"},
                "encounter": {"reference": f"Encounter/demo-session-{n}"},
            })
    return resources


def seed_records(gateway_url: str, creds: dict[str, Any]) -> int:
    """PUT (update-as-create) each demo resource that is not there yet. Returns how many."""
    token_response = httpx.post(
        f"{gateway_url}/oauth/token",
        data={"grant_type": "client_credentials", "scope": "system/*.cruds"},
        auth=(creds["secret_client_id"], creds["secret_client_secret"]), timeout=30,
    )
    token_response.raise_for_status()
    headers = {"Authorization": f"Bearer {token_response.json()['access_token']}",
               "Content-Type": "application/fhir+json"}
    created = 0
    with httpx.Client(base_url=f"{gateway_url}/fhir", headers=headers, timeout=30) as client:
        for resource in demo_resources():
            url = f"/{resource['resourceType']}/{resource['id']}"
            if client.get(url).status_code == 200:
                continue
            response = client.put(url, content=json.dumps(resource))
            response.raise_for_status()
            created += 1
    return created


def lifecycle_notes() -> list[tuple[str, str, dict[str, Any]]]:
    """The note lifecycle in the demo (README "Progress notes"): (who writes, then signs, note).
    demo-note-4 stays a draft; demo-note-5 is signed with the addendum demo-note-6; demo-note-7 is
    the trainee's, co-signed by the therapist."""
    def note(n: int, author: str, text: str, **extra: Any) -> dict[str, Any]:
        return {
            "resourceType": "DocumentReference", "id": f"demo-note-{n}", "status": "current",
            "docStatus": "preliminary", "meta": {"security": RESTRICTED_BH},
            "type": {"coding": [{"system": LOINC, "code": "11506-3", "display": "Progress note"}]},
            "category": [{"coding": [CLINICAL_NOTE]}],
            "subject": {"reference": f"Patient/{DEMO_PATIENT}"}, "date": "2026-11-16T16:00:00Z",
            "author": [{"reference": f"Practitioner/{author}"}],
            "content": [{"attachment": {"contentType": "text/plain",
                                        "data": base64.b64encode(text.encode()).decode()}}],
            **extra,
        }
    session = {"context": {"encounter": [{"reference": "Encounter/demo-session-3"}]}}
    addendum_of = {"reference": "DocumentReference/demo-note-5"}
    return [
        ("draft", DEMO_THERAPIST, note(4, DEMO_THERAPIST, "S: (draft) Follow-up call planned.")),
        ("sign", DEMO_THERAPIST, note(5, DEMO_THERAPIST, "S: Returned to work full-time.\nO: PHQ-9 = 6."
                                      "\nA: Mild symptoms.\nP: Monthly sessions.", **session)),
        ("sign", DEMO_THERAPIST, note(6, DEMO_THERAPIST, "Addendum: client called to confirm the plan.",
                                      relatesTo=[{"code": "appends", "target": addendum_of}])),
        ("cosign", DEMO_TRAINEE, note(7, DEMO_TRAINEE, "S: Intake follow-up by trainee.\nP: Review "
                                      "with supervisor.")),
    ]


def seed_lifecycle(gateway_url: str, tokens: dict[str, str]) -> int:
    """Write and sign the lifecycle demo notes as the practitioners (`tokens`: a user access
    token per Practitioner id). Idempotent: notes already there are left alone."""
    created = 0

    def client(who: str) -> httpx.Client:
        return httpx.Client(base_url=f"{gateway_url}/fhir", timeout=30, headers={
            "Authorization": f"Bearer {tokens[who]}", "Content-Type": "application/fhir+json"})

    with client(DEMO_THERAPIST) as therapist, client(DEMO_TRAINEE) as trainee:
        for step, author, body in lifecycle_notes():
            writer = trainee if author == DEMO_TRAINEE else therapist
            url = f"/DocumentReference/{body['id']}"
            if writer.get(url).status_code == 200:
                continue
            writer.put(url, content=json.dumps(body)).raise_for_status()
            if step in ("sign", "cosign"):
                writer.post(f"{url}/$sign").raise_for_status()
            if step == "cosign":
                therapist.post(f"{url}/$sign").raise_for_status()
            created += 1
    return created


AMENDMENT = "https://mindchart.dev/fhir/CodeSystem/amendment"


def seed_amendment(gateway_url: str, tokens: dict[str, str]) -> int:
    """One open amendment request (README "Progress notes"): the demo patient asks the therapist
    to amend the signed demo-note-5. Idempotent: filed once, whatever its state since."""
    with httpx.Client(base_url=f"{gateway_url}/fhir", timeout=30, headers={
            "Authorization": f"Bearer {tokens[DEMO_PATIENT]}",
            "Content-Type": "application/fhir+json"}) as patient:
        filed = patient.get("/Task", params={"code": f"{AMENDMENT}|amendment-request",
                                             "focus": "DocumentReference/demo-note-5"})
        filed.raise_for_status()
        if filed.json().get("entry"):
            return 0
        patient.post("/Task", content=json.dumps({
            "resourceType": "Task", "status": "requested", "intent": "order",
            "code": {"coding": [{"system": AMENDMENT, "code": "amendment-request"}]},
            "focus": {"reference": "DocumentReference/demo-note-5"},
            "for": {"reference": f"Patient/{DEMO_PATIENT}"},
            "description": "I returned to work part-time, not full-time; please correct the note.",
        })).raise_for_status()
    return 1


# -- psychotherapy notes (psychnotes), through its public API --------------------------------------

DEMO_NOTE_SYSTEM = "https://mindchart.dev/fhir/demo-psychotherapy-note"  # marks each demo note
PSYCHNOTES_TOKEN = "psychnotes:{}"  # key of a practitioner's psychnotes-audience token in `tokens`
KEPT_STATES = "current,superseded,entered-in-error"  # every note, retracted ones too


@dataclass(frozen=True)
class DemoPsychotherapyNote:
    key: str  # its identifier value under DEMO_NOTE_SYSTEM
    author: str  # Practitioner id
    text: str
    day: str
    relates: tuple[str, str] | None = None  # (appends | replaces, key of the note it amends)
    sign: bool = True
    retract: str | None = None  # $entered-in-error with this reason


def psychotherapy_notes() -> list[DemoPsychotherapyNote]:
    """The psychotherapy-note lifecycle in the demo (README "Lifecycle of a psychotherapy note"),
    in the order it is written: a signed note with an addendum, a signed note corrected (its
    correction signed, so the original is superseded), a signed note entered in error, and the
    trainee's note signed by them and awaiting the therapist's co-signature."""
    return [
        DemoPsychotherapyNote("demo-psy-1", DEMO_THERAPIST, "Alex spoke of the lake again, and of "
                              "the father's silence; I felt pulled to reassure.", "2026-10-05"),
        DemoPsychotherapyNote("demo-psy-2", DEMO_THERAPIST, "Addendum: the pull to reassure returned "
                              "when the lake came up; worth bringing to supervision.", "2026-10-06",
                              relates=("appends", "demo-psy-1")),
        DemoPsychotherapyNote("demo-psy-3", DEMO_THERAPIST, "Alex described the brother's visit as a "
                              "relief.", "2026-10-19"),
        DemoPsychotherapyNote("demo-psy-4", DEMO_THERAPIST, "Correction: Alex described the sister's "
                              "visit as a relief, not the brother's.", "2026-10-20",
                              relates=("replaces", "demo-psy-3")),
        DemoPsychotherapyNote("demo-psy-5", DEMO_THERAPIST, "Impressions written for another client "
                              "by mistake.", "2026-11-02",
                              retract="written in the wrong client's chart"),
        DemoPsychotherapyNote("demo-psy-6", DEMO_TRAINEE, "First session observed: Alex tested me "
                              "with silence; I filled it too quickly.", "2026-11-16"),
    ]


def _psychotherapy_note(note: DemoPsychotherapyNote, ids: dict[str, str]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "resourceType": "DocumentReference", "status": "current", "docStatus": "preliminary",
        "identifier": [{"system": DEMO_NOTE_SYSTEM, "value": note.key}],
        "type": {"text": "Psychotherapy process note"},
        "subject": {"reference": f"Patient/{DEMO_PATIENT}"}, "date": f"{note.day}T17:00:00Z",
        "content": [{"attachment": {"contentType": "text/plain",
                                    "data": base64.b64encode(note.text.encode()).decode()}}],
    }
    if note.relates:
        code, target = note.relates
        body["relatesTo"] = [{"code": code, "target": {"reference": f"DocumentReference/{ids[target]}"}}]
    return body


def _own_demo_notes(client: httpx.Client) -> dict[str, dict[str, Any]]:
    """The caller's own demo notes, by key, read under the originator-treatment exception (45 CFR
    164.508(a)(2)(i)(A)). psychnotes mints that token only to an author of the patient's notes,
    so a refusal means the caller has written none yet."""
    minted = client.post("/$consent-token", content=json.dumps({
        "resourceType": "Parameters", "parameter": [
            {"name": "basis", "valueCode": "originator-treatment"},
            {"name": "patient", "valueReference": {"reference": f"Patient/{DEMO_PATIENT}"}},
            {"name": "purpose", "valueCode": "TREAT"}]}))
    if minted.status_code in (403, 422):
        return {}
    minted.raise_for_status()
    consent = next(p["valueString"] for p in minted.json()["parameter"] if p["name"] == "token")
    found = client.get("/DocumentReference", headers={"Consent-Token": consent}, params={
        "patient": f"Patient/{DEMO_PATIENT}", "status": KEPT_STATES, "_count": "100"})
    found.raise_for_status()
    notes = {}
    for entry in found.json().get("entry", []):
        for identifier in entry["resource"].get("identifier", []):
            if identifier.get("system") == DEMO_NOTE_SYSTEM:
                notes[identifier["value"]] = entry["resource"]
    return notes


def seed_psychnotes(gateway_url: str, tokens: dict[str, str]) -> int:
    """Write the demo psychotherapy notes and take each through its lifecycle, as its author,
    through the gateway (`tokens`: a psychnotes-audience token per Practitioner id, under
    PSYCHNOTES_TOKEN). Idempotent and resumable: each note is found by its identifier and only
    the steps it still lacks are taken. Returns how many notes it created."""
    created = 0
    clients = {who: httpx.Client(base_url=f"{gateway_url}/psychnotes/fhir", timeout=30, headers={
        "Authorization": f"Bearer {tokens[PSYCHNOTES_TOKEN.format(who)]}",
        "Content-Type": "application/fhir+json", "Accept": "application/fhir+json"})
        for who in (DEMO_THERAPIST, DEMO_TRAINEE)}
    try:
        existing = {k: v for client in clients.values() for k, v in _own_demo_notes(client).items()}
        ids = {key: str(note["id"]) for key, note in existing.items()}
        for note in psychotherapy_notes():
            client = clients[note.author]
            current = existing.get(note.key)
            if current is None:
                response = client.post("/DocumentReference", content=json.dumps(
                    _psychotherapy_note(note, ids)))
                response.raise_for_status()
                ids[note.key] = response.headers["location"].split("/")[-3]
                current = {"docStatus": "preliminary"}
                created += 1
            url = f"/DocumentReference/{ids[note.key]}"
            awaiting = any(t.get("system") == AWAITING_COSIGNATURE
                           for t in current.get("meta", {}).get("tag", []))
            if note.sign and current.get("docStatus") == "preliminary" and not awaiting:
                client.post(f"{url}/$sign").raise_for_status()
                current = {"docStatus": "final"}
            if note.retract and current.get("docStatus") in ("final", "amended"):
                client.post(f"{url}/$entered-in-error", content=json.dumps({
                    "resourceType": "Parameters",
                    "parameter": [{"name": "reason", "valueString": note.retract}]})).raise_for_status()
    finally:
        for client in clients.values():
            client.close()
    return created
