"""RFC 6750 §3 at every service that answers bearer errors (gateway FHIR proxy, audit, launch API;
records and psychnotes called directly), and RFC 8707's optional `resource` for backend clients.

§3.1: a request with no authentication information gets a challenge with no error code; an invalid
token gets `error="invalid_token"`; a valid token without the needed scope gets 403 with
`error="insufficient_scope"` in `WWW-Authenticate`.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import pytest

from tests.actors import BackendClient, register_backend
from tests.conftest import RunningStack


def challenge(response: httpx.Response) -> dict[str, str]:
    """The auth-params of a Bearer challenge (RFC 6750 §3), e.g. {"realm": ..., "error": ...}."""
    scheme, _, rest = response.headers["www-authenticate"].partition(" ")
    assert scheme == "Bearer", response.headers["www-authenticate"]
    params = {}
    for part in rest.split(","):
        name, _, value = part.strip().partition("=")
        params[name] = value.strip('"')
    return params


@pytest.fixture(scope="module")
def patient_reader(live: RunningStack, tmp_path_factory: pytest.TempPathFactory) -> BackendClient:
    """A backend client that may read Patient and nothing else, for records and psychnotes."""
    client = BackendClient(f"narrow-{uuid.uuid4().hex[:6]}", live.gateway_url)
    register_backend(live.cli_env, client, "system/Patient.rs", audiences=("records", "psychnotes"),
                     tmp=tmp_path_factory.mktemp("narrow"))
    return client


def urls(live: RunningStack) -> dict[str, str]:
    return {
        "gateway /fhir": f"{live.fhir}/Observation",
        "gateway /psychnotes/fhir": f"{live.psychnotes}/DocumentReference",
        "gateway /audit": f"{live.gateway_url}/audit/AuditEvent",
        "records direct": f"{live.direct_url('records')}/fhir/Observation",
        "psychnotes direct": f"{live.direct_url('psychnotes')}/psychnotes/fhir/DocumentReference",
    }


def test_no_credentials_get_a_challenge_without_an_error_code(live: RunningStack) -> None:
    for where, url in urls(live).items():
        for headers in ({}, {"Authorization": "Basic dXNlcjpwYXNz"}):  # none, or another scheme
            response = httpx.get(url, headers=headers)
            assert response.status_code == 401, (where, response.text)
            assert "error" not in challenge(response), (where, response.headers["www-authenticate"])
            assert response.json()["resourceType"] == "OperationOutcome"
    launch = httpx.post(f"{live.gateway_url}/oauth/launch", json={"patient": "Patient/x"})
    assert launch.status_code == 401 and "error" not in challenge(launch)


def test_an_invalid_token_gets_invalid_token(live: RunningStack) -> None:
    for where, url in urls(live).items():
        response = httpx.get(url, headers={"Authorization": "Bearer not-a-token"})
        assert response.status_code == 401, where
        assert challenge(response)["error"] == "invalid_token", where


def test_a_token_without_the_scope_gets_403_insufficient_scope(live: RunningStack,
                                                                patient_reader: BackendClient) -> None:
    records = patient_reader.token("system/Patient.rs")
    psychnotes = patient_reader.token("system/Patient.rs", aud=live.psychnotes)
    for where, url in urls(live).items():
        token = psychnotes if "psychnotes" in where else records
        response = httpx.get(url, headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 403, (where, response.status_code, response.text)
        assert challenge(response)["error"] == "insufficient_scope", where
        assert response.json()["issue"][0]["code"] == "forbidden"
    # The scope it has still works, and carries no challenge.
    ok = httpx.get(f"{live.fhir}/Patient", headers={"Authorization": f"Bearer {records}"})
    assert ok.status_code == 200 and "www-authenticate" not in ok.headers


# -- RFC 8707: `resource` is optional ------------------------------------------------------------

def test_a_client_of_one_audience_gets_it_without_resource_or_aud(live: RunningStack, tmp_path: Path) -> None:
    """RFC 8707 §2 ("the client MAY indicate the protected resource"): a backend client registered
    only for psychnotes gets a psychnotes token when it names no audience."""
    only_psychnotes = BackendClient(f"vault-only-{uuid.uuid4().hex[:6]}", live.gateway_url)
    register_backend(live.cli_env, only_psychnotes, "system/Consent.rs", audiences=("psychnotes",), tmp=tmp_path)
    response = only_psychnotes.token_request("system/Consent.rs")
    assert response.status_code == 200, response.text
    token = response.json()["access_token"]
    consents = httpx.get(f"{live.psychnotes}/Consent", headers={"Authorization": f"Bearer {token}"})
    assert consents.status_code != 401, consents.text  # a psychnotes token
    assert httpx.get(f"{live.fhir}/Patient", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    # Naming another server is still refused, and a client of two servers still defaults to records.
    refused = only_psychnotes.token_request("system/Consent.rs", resource=live.fhir)
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_request"
    both = BackendClient(f"both-{uuid.uuid4().hex[:6]}", live.gateway_url)
    register_backend(live.cli_env, both, "system/Patient.rs", audiences=("records", "psychnotes"), tmp=tmp_path)
    default = both.token("system/Patient.rs")
    assert httpx.get(f"{live.fhir}/Patient", headers={"Authorization": f"Bearer {default}"}).status_code == 200
