"""$meta, $meta-add and $meta-delete on records through the gateway (real HTTP): tags, profiles
and security labels change as sets, each effective change a new version (a signed note stays
signed: the version its JWS covers is kept as written), who may add or remove a security label
(records/meta/labels.py: default deny), the summaries at type and system level, the audit record
of every change, and bad input answered 4xx with nothing stored."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from mindchart_core.note_lifecycle import AWAITING_COSIGNATURE
from tests.actors import BackendAuth, BackendClient, mint_token
from tests.conftest import RunningStack
from tests.fhir_schema import assert_valid
from tests.records_resources import outcome, patient, progress_note

AUTHOR = "Practitioner/meta-author"
USER_SCOPE = "user/DocumentReference.cruds user/Provenance.cruds user/Patient.rs"
CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
WORKFLOW = "https://clinic.example/tags"
PROFILE = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-documentreference"


def meta_parameters(**meta: Any) -> dict[str, Any]:
    return {"resourceType": "Parameters", "parameter": [{"name": "meta", "valueMeta": meta}]}


def returned(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["resourceType"] == "Parameters" and body["parameter"][0]["name"] == "return"
    return dict(body["parameter"][0]["valueMeta"])


def codes(meta: dict[str, Any], element: str) -> set[tuple[str | None, str]]:
    return {(c.get("system"), c["code"]) for c in meta.get(element, [])}


def meta_checked(response: httpx.Response) -> None:
    """Every answer validated against HL7's R4 JSON schema, as records_client does, except that
    a `return` Meta is validated as the meta of a resource: R4 defines the operations' OUT
    parameter as type Meta (valueMeta, the spec's own $meta-add example), while R4's JSON schema
    leaves Meta out of Parameters.parameter.value[x] (an inconsistency of R4; R5 lists it)."""
    if not response.headers.get("content-type", "").startswith("application/fhir+json"):
        return
    response.read()
    if not response.content:
        return
    body = response.json()
    metas = [p["valueMeta"] for p in body.get("parameter", []) if isinstance(p, dict) and "valueMeta" in p] \
        if isinstance(body, dict) and body.get("resourceType") == "Parameters" else []
    if metas:
        for meta in metas:
            assert_valid({"resourceType": "Basic", "code": {"text": "meta"}, "meta": meta})
    else:
        assert_valid(body)


def records_client(live: RunningStack, *, token: str | None = None,
                   auth: httpx.Auth | None = None) -> httpx.Client:
    headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.Client(base_url=live.fhir, timeout=30, auth=auth, headers=headers,
                        event_hooks={"response": [meta_checked]})


@pytest.fixture(scope="module")
def fhir(live: RunningStack, writer: BackendClient) -> Iterator[httpx.Client]:
    """A backend client with every records scope (system/*.cruds)."""
    with records_client(live, auth=BackendAuth(writer, "system/*.cruds")) as client:
        yield client


@pytest.fixture(scope="module")
def author(live: RunningStack, writer: BackendClient) -> Iterator[httpx.Client]:
    token = mint_token(live, sub="meta-author", fhirUser=f"{live.fhir}/{AUTHOR}", scope=USER_SCOPE)
    with records_client(live, token=token) as client:
        yield client


@pytest.fixture(scope="module")
def steward(live: RunningStack, writer: BackendClient) -> Iterator[httpx.Client]:
    """A compliance officer signed in (user/ scopes, the gateway's `compliance` role)."""
    token = mint_token(live, sub="meta-privacy", scope=USER_SCOPE, roles=["compliance"],
                       fhirUser=f"{live.fhir}/Practitioner/meta-privacy")
    with records_client(live, token=token) as client:
        yield client


@pytest.fixture(scope="module")
def pid(fhir: httpx.Client) -> str:
    created = fhir.post("/Patient", json=patient("Metadata"))
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


def signed_note(author: httpx.Client, pid: str) -> dict[str, Any]:
    created = author.post("/DocumentReference", json=progress_note(
        pid, docStatus="preliminary", author=[{"reference": AUTHOR}],
        identifier=[{"system": "urn:test:meta", "value": uuid.uuid4().hex}]))
    assert created.status_code == 201, created.text
    signed = author.post(f"/DocumentReference/{created.json()['id']}/$sign")
    assert signed.status_code == 200, signed.text
    return dict(signed.json())


def test_tags_profiles_and_labels_change_as_sets_in_new_versions_of_a_signed_note(
        live: RunningStack, author: httpx.Client, fhir: httpx.Client, pid: str) -> None:
    note = signed_note(author, pid)
    url, version = f"/DocumentReference/{note['id']}", int(note["meta"]["versionId"])
    tag = {"system": WORKFLOW, "code": f"review-{uuid.uuid4().hex[:6]}", "display": "Needs review"}
    added = author.post(f"{url}/$meta-add", json=meta_parameters(
        tag=[tag], profile=[PROFILE], security=[{"system": CONFIDENTIALITY, "code": "R"}]))
    meta = returned(added)
    assert (WORKFLOW, tag["code"]) in codes(meta, "tag") and PROFILE in meta["profile"]
    assert (CONFIDENTIALITY, "R") in codes(meta, "security")
    assert meta["versionId"] == str(version + 1)
    audit = live.db("gateway").audit_events.find_one({"request_id": added.headers["x-request-id"]})
    assert audit is not None  # audited like every request

    current = author.get(url).json()
    assert current["meta"]["versionId"] == str(version + 1)
    assert {k: v for k, v in current.items() if k != "meta"} == {k: v for k, v in note.items() if k != "meta"}
    verified = author.get(f"{url}/$verify-signature").json()
    assert next(p for p in verified["parameter"] if p["name"] == "result")["valueBoolean"] is True

    # A set: the same tag again (another display) is no change, so no new version either.
    again = returned(author.post(f"{url}/$meta-add", json=meta_parameters(
        tag=[{**tag, "display": "other words"}], profile=[PROFILE])))
    assert again["versionId"] == str(version + 1)
    assert [t["code"] for t in again["tag"]].count(tag["code"]) == 1

    # The version before keeps its meta; $meta reads either.
    old = returned(author.get(f"{url}/_history/{version}/$meta"))
    assert (WORKFLOW, tag["code"]) not in codes(old, "tag") and old["versionId"] == str(version)
    assert returned(author.post(f"{url}/$meta"))["versionId"] == str(version + 1)

    searched = fhir.get(f"/DocumentReference?_tag={WORKFLOW}|{tag['code']}").json()
    assert [e["resource"]["id"] for e in searched.get("entry", [])] == [note["id"]]
    in_use = returned(fhir.get("/DocumentReference/$meta"))
    assert (WORKFLOW, tag["code"]) in codes(in_use, "tag") and PROFILE in in_use["profile"]
    assert (WORKFLOW, tag["code"]) in codes(returned(fhir.get("/$meta")), "tag")

    deleted = returned(author.post(f"{url}/$meta-delete", json=meta_parameters(
        tag=[{"system": WORKFLOW, "code": tag["code"]}], profile=[PROFILE])))
    assert (WORKFLOW, tag["code"]) not in codes(deleted, "tag") and PROFILE not in deleted.get("profile", [])
    assert deleted["versionId"] == str(version + 2)
    absent = returned(author.post(f"{url}/$meta-delete", json=meta_parameters(
        tag=[{"system": WORKFLOW, "code": "never-there"}])))
    assert absent["versionId"] == str(version + 2)  # "not an error", and nothing stored
    assert fhir.get(f"/DocumentReference?_tag={WORKFLOW}|{tag['code']}").json().get("entry") is None
    assert (WORKFLOW, tag["code"]) not in codes(returned(fhir.get("/DocumentReference/$meta")), "tag")


def test_who_may_add_and_remove_security_labels(
        author: httpx.Client, steward: httpx.Client, fhir: httpx.Client, pid: str) -> None:
    note = signed_note(author, pid)
    url = f"/DocumentReference/{note['id']}"
    restricted = meta_parameters(security=[{"system": CONFIDENTIALITY, "code": "R"}])
    # A backend client (system/*.cruds) changes tags but never security labels.
    outcome(fhir.post(f"{url}/$meta-add", json=restricted), 403, "forbidden")
    returned(fhir.post(f"{url}/$meta-add", json=meta_parameters(tag=[{"system": WORKFLOW, "code": "b"}])))
    # The practitioner may restrict; only a compliance officer (or admin) may loosen.
    assert (CONFIDENTIALITY, "R") in codes(returned(author.post(f"{url}/$meta-add", json=restricted)),
                                           "security")
    before = author.get(url).json()["meta"]["versionId"]
    outcome(author.post(f"{url}/$meta-delete", json=restricted), 403, "forbidden")
    outcome(author.post(f"{url}/$meta-add", json=meta_parameters(
        security=[{"system": CONFIDENTIALITY, "code": "N"}])), 422)  # one confidentiality code
    outcome(author.post(f"{url}/$meta-add", json=meta_parameters(
        tag=[{"system": AWAITING_COSIGNATURE, "code": "Practitioner/x"}])), 422)  # records' own tag
    assert author.get(url).json()["meta"]["versionId"] == before  # nothing stored
    loosened = returned(steward.post(f"{url}/$meta-delete", json=restricted))
    assert (CONFIDENTIALITY, "R") not in codes(loosened, "security")


def test_bad_input_is_4xx_and_stores_nothing(live: RunningStack, author: httpx.Client,
                                             fhir: httpx.Client, pid: str) -> None:
    note = signed_note(author, pid)
    url = f"/DocumentReference/{note['id']}"
    version = note["meta"]["versionId"]
    tag = [{"system": WORKFLOW, "code": "x"}]
    for body in ({"resourceType": "Patient"}, [1, 2], {"resourceType": "Parameters"},
                 {"resourceType": "Parameters", "parameter": [
                     {"name": "meta", "valueMeta": {"tag": tag}}, {"name": "meta", "valueMeta": {"tag": tag}}]},
                 meta_parameters(), meta_parameters(source="urn:x", tag=tag),
                 meta_parameters(security=[{"code": "R"}]), meta_parameters(tag=[{"system": WORKFLOW}]),
                 meta_parameters(tag="x"), meta_parameters(profile=[7])):
        outcome(author.post(f"{url}/$meta-add", json=body), 400)
        outcome(author.post(f"{url}/$meta-delete", json=body), 400)
    outcome(author.post(f"{url}/_history/{version}/$meta-add", json=meta_parameters(tag=tag)), 400,
            "not-supported")
    outcome(author.post(f"/DocumentReference/{uuid.uuid4()}/$meta-add", json=meta_parameters(tag=tag)), 404)
    outcome(author.post("/NoSuchType/x/$meta-add", json=meta_parameters(tag=tag)), 404)
    outcome(author.post(f"{url}/$meta", json={"resourceType": "Patient"}), 400)
    # Outside the caller's view it does not exist: another patient's note for a patient token.
    other_patient = mint_token(live, scope="patient/DocumentReference.cruds", patient="someone-else")
    with records_client(live, token=other_patient) as stranger:
        outcome(stranger.post(f"{url}/$meta-add", json=meta_parameters(tag=tag)), 404)
        outcome(stranger.get(f"{url}/$meta"), 404)
    assert author.get(url).json()["meta"]["versionId"] == version
    assert len(fhir.get(f"{url}/_history").json()["entry"]) == int(version)


def test_the_capability_statement_lists_the_meta_operations(fhir: httpx.Client) -> None:
    statement = fhir.get("/metadata").json()
    rest = statement["rest"][0]
    notes = next(r for r in rest["resource"] if r["type"] == "DocumentReference")
    declared = {o["name"]: o["definition"] for o in notes["operation"]}
    assert declared["meta-add"] == "http://hl7.org/fhir/OperationDefinition/Resource-meta-add"
    assert declared["meta-delete"] == "http://hl7.org/fhir/OperationDefinition/Resource-meta-delete"
    assert declared["meta"] == "http://hl7.org/fhir/OperationDefinition/Resource-meta"
    assert any(o["name"] == "meta" for o in rest["operation"])
