"""Fuzzing: schemathesis against each service's routes (tests/resilience/fuzz_schemas.py says how
each OpenAPI document is built) over real HTTP on the session's `live` stack, with valid tokens
(a patient, a practitioner, a backend client) and with none.

Whatever arrives: no 5xx; every error on a FHIR path (records, psychnotes, audit) is an
OperationOutcome with issue[] severity and code; on the OAuth endpoints an RFC 6749 §5.2 error
JSON; no stack trace and no psychotherapy-note text in any body. The counts per target are in the
"resilience counts" summary. `MINDCHART_FUZZ_EXAMPLES` (or `make soak`) raises the budget.
"""

from __future__ import annotations

import os
from typing import Any

import httpx
import pytest
from schemathesis import GenerationMode

from tests.actors import (
    APP_REDIRECT,
    BackendClient,
    auditor_token,
    mint_token,
    register_app,
    register_backend,
)
from tests.conftest import RunningStack
from tests.e2e.test_psychnotes import marker, mint_consent_token, user_token, write_note
from tests.resilience import fuzz_schemas
from tests.resilience.conftest import SOAK, report
from tests.resilience.fuzzing import EXAMPLES, Identity, Tally, fuzz

pytestmark = pytest.mark.timeout(900)

# psychnotes serves no CapabilityStatement: what its routes accept, in the same shape
# (psychnotes/notes_service.py and consents.py).
PSYCHNOTES_CAPABILITY = {"rest": [{"resource": [
    {"type": "DocumentReference", "searchParam": [
        {"name": "patient", "type": "reference"}, {"name": "subject", "type": "reference"},
        {"name": "date", "type": "date"}, {"name": "_id", "type": "token"}]},
    {"type": "Consent", "searchParam": [{"name": "patient", "type": "reference"}]},
]}]}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_clean(tally: Tally) -> None:
    report(f"fuzz {tally.target}", **tally.counts())
    assert tally.cases >= tally.operations, "fewer cases than operations: nothing was generated"
    assert not tally.server_errors, f"{len(tally.server_errors)} 5xx:\n" + "\n\n".join(tally.server_errors[:5])
    assert not tally.malformed, f"{len(tally.malformed)} malformed errors:\n" + "\n\n".join(tally.malformed[:5])


@pytest.fixture(scope="module")
def skeletons(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    return fuzz_schemas.route_skeletons(("records", "psychnotes", "gateway", "workspace"),
                                        tmp_path_factory.mktemp("fuzz-skeletons"))


@pytest.fixture(scope="module")
def world(live: RunningStack, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Resources the fuzzer may hit by id, the identities it sends, and a psychotherapy note whose
    text must never come back (no fuzz request carries a consent token)."""
    backend = BackendClient("fuzz-backend", live.gateway_url)
    register_backend(live.cli_env, backend, "system/*.cruds", tmp=tmp_path_factory.mktemp("fuzz-keys"))
    fhir = httpx.Client(base_url=live.fhir, headers={**bearer(backend.token("system/*.cruds")),
                                                     "Content-Type": "application/fhir+json"},
                        timeout=30)
    created: dict[str, str] = {}
    for resource in ({"resourceType": "Patient", "name": [{"family": "Fuzz"}]},
                     {"resourceType": "Practitioner", "name": [{"family": "Fuzzer"}]}):
        response = fhir.post(f"/{resource['resourceType']}", json=resource)
        assert response.status_code == 201, response.text
        created[resource["resourceType"]] = response.json()["id"]
    patient, practitioner = created["Patient"], created["Practitioner"]
    for resource in (
        {"resourceType": "Encounter", "status": "finished", "class": {"code": "AMB"},
         "subject": {"reference": f"Patient/{patient}"}},
        {"resourceType": "Observation", "status": "final", "code": {"text": "PHQ-9"},
         "subject": {"reference": f"Patient/{patient}"}, "valueQuantity": {"value": 7}},
        {"resourceType": "DocumentReference", "status": "current", "docStatus": "preliminary",
         "subject": {"reference": f"Patient/{patient}"},
         "author": [{"reference": f"Practitioner/{practitioner}"}],
         "content": [{"attachment": {"contentType": "text/plain", "data": "ZnV6eg=="}}]},
    ):
        response = fhir.post(f"/{resource['resourceType']}", json=resource)
        assert response.status_code == 201, response.text
        created[resource["resourceType"]] = response.json()["id"]
    fhir.close()

    def psy_author() -> str:
        return user_token(live, f"Practitioner/{practitioner}", client_id="fuzz-app")

    secret = marker("fuzz")
    note = write_note(live, psy_author(), patient, secret)
    fhir_user = f"{live.fhir}/Practitioner/{practitioner}"
    as_patient = {"sub": f"fuzz-patient-{patient}", "client_id": "fuzz-patient-app", "patient": patient,
                  "fhirUser": f"{live.fhir}/Patient/{patient}"}
    records = [
        Identity("patient", lambda: mint_token(live, scope="launch/patient patient/*.cruds", **as_patient)),
        Identity("practitioner", lambda: mint_token(live, sub="fuzz-therapist", client_id="fuzz-app",
                                                    scope="openid fhirUser user/*.cruds", fhirUser=fhir_user)),
        Identity("backend", lambda: backend.token("system/*.cruds")),
    ]
    psychnotes = [
        Identity("patient", lambda: mint_token(live, audience=live.psychnotes, scope="patient/Consent.crus",
                                               **as_patient)),
        Identity("practitioner", psy_author),
        Identity("backend", lambda: mint_token(live, audience=live.psychnotes, sub="fuzz-backend",
                                               client_id="fuzz-backend",
                                               scope="system/DocumentReference.rs system/Consent.rs")),
    ]
    return {"ids": [*created.values(), note], "patient": patient, "practitioner": practitioner,
            "note": note, "secret": secret, "author": psy_author, "records": records,
            "psychnotes": psychnotes}


NO_TOKEN = [Identity("none")]
# Every request shape per type is the same code for each type, so `make test` expands the
# `{resource_type}` routes for the three types a behavioral-health chart lives on; `make soak`
# (or MINDCHART_FUZZ_EXAMPLES) expands them for every type records serves.
CORE_TYPES = None if SOAK or os.environ.get("MINDCHART_FUZZ_EXAMPLES") else (
    "Patient", "Observation", "DocumentReference")


def test_fuzz_records(live: RunningStack, skeletons: dict[str, Any], world: dict[str, Any]) -> None:
    capability = httpx.get(f"{live.fhir}/metadata", timeout=30).json()
    document = fuzz_schemas.fhir_openapi(skeletons["records"], capability, known_ids=world["ids"],
                                         types=CORE_TYPES)
    assert_clean(fuzz("records (tokens)", document, live.gateway_url, world["records"],
                      secrets=[world["secret"]]))
    # Without a token the gateway refuses before records, the same way for every type: one
    # conforming case per operation of one type.
    anonymous = fuzz_schemas.fhir_openapi(skeletons["records"], capability, known_ids=world["ids"],
                                          types=("Patient",))
    assert_clean(fuzz("records (no token)", anonymous, live.gateway_url, NO_TOKEN, examples=1,
                      modes=[GenerationMode.POSITIVE], secrets=[world["secret"]]))


def test_fuzz_psychnotes(live: RunningStack, skeletons: dict[str, Any], world: dict[str, Any]) -> None:
    document = fuzz_schemas.fhir_openapi(skeletons["psychnotes"], PSYCHNOTES_CAPABILITY,
                                         known_ids=world["ids"])
    for who in ("tokens", "no token"):
        identities = world["psychnotes"] if who == "tokens" else NO_TOKEN
        assert_clean(fuzz(f"psychnotes ({who})", document, live.gateway_url, identities,
                          secrets=[world["secret"]]))
    # The note is still there, unchanged, for its author (under the originator exception).
    author = world["author"]()
    consent = mint_consent_token(live, author, basis="originator-treatment",
                                 patient={"reference": f"Patient/{world['patient']}"})
    note = httpx.get(f"{live.psychnotes}/DocumentReference/{world['note']}",
                     headers={**bearer(author), "Consent-Token": consent}, timeout=30)
    assert note.status_code == 200, note.text
    assert world["secret"] in note.text


def test_fuzz_gateway(live: RunningStack, skeletons: dict[str, Any], world: dict[str, Any]) -> None:
    """The gateway's own endpoints (OAuth, SMART discovery, audit); the proxied /fhir and
    /psychnotes/fhir paths are fuzzed through records' and psychnotes' documents above."""
    register_app(live.cli_env, "fuzz-public-app", "openid fhirUser launch/patient patient/*.rs")
    document = fuzz_schemas.oauth_openapi(
        skeletons["gateway"], client_ids=["fuzz-public-app", "fuzz-backend", "workspace"],
        redirect_uris=[APP_REDIRECT], audiences=[live.fhir, live.psychnotes])
    auditor = Identity("auditor", lambda: auditor_token(live, "fuzz-auditor"))
    identities = [*world["records"], auditor]
    for who, ids in (("tokens", identities), ("no token", NO_TOKEN)):
        assert_clean(fuzz(f"gateway ({who})", document, live.gateway_url, ids, secrets=[world["secret"]],
                          examples=max(2, EXAMPLES)))


def test_fuzz_workspace(live: RunningStack, skeletons: dict[str, Any], world: dict[str, Any]) -> None:
    """The therapists' app without a session: every page refuses or redirects to sign-in, never
    a 5xx or a trace (its errors are HTML pages, so only those two are judged)."""
    document = fuzz_schemas.workspace_openapi(skeletons["workspace"], patient_ids=[world["patient"]])
    assert_clean(fuzz("workspace (no session)", document, live.config.workspace_url, NO_TOKEN,
                      secrets=[world["secret"]], html_errors=True, examples=max(2, EXAMPLES)))
