"""FHIR Bulk Data 2.0 `$export` end to end (issue 6): kick-off → poll → download through the gateway,
as an insurer's backend client would, plus cancel, refusals, the concurrency cap, R/V withholding,
disclosures (in the gateway's accounting) and `Patient/$everything`. The last test kills records
mid-export.

Records is restarted for this module with small export files and short leases (EXPORT_ENV), so
splitting, progress and reclaiming are visible with little data; it is restored afterwards.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
import pytest

from mindchart_core import audit
from tests import actors
from tests.actors import BackendAuth, BackendClient, mint_token, register_backend
from tests.conftest import RunningStack
from tests.fhir_schema import assert_valid  # the official R4 JSON schema

EXPORT_ENV = {
    "MINDCHART_RECORDS_EXPORT_RESOURCES_PER_FILE": "40",
    "MINDCHART_RECORDS_EXPORT_BATCH_SIZE": "6",
    # Two patients' counts at a time: a Group export of A and B writes its counts in several
    # flushes, and the accounting must still show each patient's total once.
    "MINDCHART_RECORDS_EXPORT_PENDING_PATIENTS": "2",
    "MINDCHART_RECORDS_EXPORT_LEASE_SECONDS": "2",
    "MINDCHART_RECORDS_EXPORT_HEARTBEAT_SECONDS": "0.4",
    "MINDCHART_RECORDS_EXPORT_POLL_SECONDS": "0.2",
    "MINDCHART_RECORDS_EXPORT_RETRY_AFTER_SECONDS": "1",
    "MINDCHART_RECORDS_EXPORT_SWEEP_SECONDS": "0.5",
    # Paced, so the crash test can kill records while an export is surely half done.
    "MINDCHART_RECORDS_EXPORT_BATCH_PAUSE_SECONDS": "0.04",
}
CRASH_SIZE = 240
ASYNC = {"Prefer": "respond-async", "Accept": "application/fhir+json"}
CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
PHQ9_TOTAL = {"system": "http://loinc.org", "code": "44261-6"}
GAD7_TOTAL = {"system": "http://loinc.org", "code": "70274-6"}


@pytest.fixture(scope="module")
def bulk(live: RunningStack) -> Iterator[RunningStack]:
    restart_records(live, EXPORT_ENV)
    yield live
    for name in EXPORT_ENV:
        live.runner.config.extra_env.pop(name, None)
    restart_records(live, {})


def restart_records(live: RunningStack, env: dict[str, str]) -> None:
    live.runner.config.extra_env.update(env)
    live.runner.stop(only=("records",))
    live.runner.restart_service("records")


def backend(live: RunningStack, name: str, scope: str, tmp: Any) -> BackendClient:
    client = BackendClient(f"{name}-{uuid.uuid4().hex[:6]}", live.gateway_url)
    register_backend(live.cli_env, client, scope, tmp=tmp)
    return client


def http_for(live: RunningStack, client: BackendClient, scope: str) -> httpx.Client:
    return httpx.Client(base_url=live.fhir, timeout=30, auth=BackendAuth(client, scope))


@pytest.fixture(scope="module")
def payer(bulk: RunningStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    client = backend(bulk, "payer", "system/*.rs", tmp_path_factory.mktemp("payer"))
    with http_for(bulk, client, "system/*.rs") as http:
        yield http


def observation(patient: str, code: dict[str, str], value: int, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation", "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                  "code": "survey"}]}],
        "code": {"coding": [code]}, "subject": {"reference": f"Patient/{patient}"},
        "effectiveDateTime": "2026-11-20T10:00:00Z",
        "valueQuantity": {"value": value, "system": "http://unitsofmeasure.org", "code": "{score}"},
        **extra,
    }


def create(http: httpx.Client, resource: dict[str, Any]) -> str:
    response = http.post(f"/{resource['resourceType']}", json=resource)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def create_many(http: httpx.Client, resources: list[dict[str, Any]], per_bundle: int = 200) -> list[str]:
    """Seed through transaction Bundles (R4 http.html §transaction): one request per 200."""
    ids: list[str] = []
    for start in range(0, len(resources), per_bundle):
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": r,
             "request": {"method": "POST", "url": r["resourceType"]}}
            for r in resources[start:start + per_bundle]]}
        response = http.post("", json=bundle)
        assert response.status_code == 200, response.text
        ids += [e["response"]["location"].split("/")[1] for e in response.json()["entry"]]
    return ids


@pytest.fixture(scope="module")
def cohort(bulk: RunningStack, writer_http: httpx.Client) -> dict[str, Any]:
    """Three members; A and B in an insurer's Group; one R-labelled score of A's."""
    tag = uuid.uuid4().hex[:8]
    ids: dict[str, Any] = {}
    for name in ("a", "b", "c"):
        ids[name] = create(writer_http, {"resourceType": "Patient", "gender": "unknown",
                                         "name": [{"family": f"Export{tag}", "given": [name.upper()]}]})
    ids["obs"] = {name: [create(writer_http, observation(ids[name], PHQ9_TOTAL, 5 + i)) for i in range(3)]
                  for name in ("a", "b", "c")}
    ids["gad"] = create(writer_http, observation(ids["a"], GAD7_TOTAL, 9))
    ids["restricted"] = create(writer_http, observation(
        ids["a"], PHQ9_TOTAL, 22, meta={"security": [{"system": CONFIDENTIALITY, "code": "R"}]}))
    ids["group"] = create(writer_http, {
        "resourceType": "Group", "type": "person", "actual": True, "name": f"Plan members {tag}",
        "member": [{"entity": {"reference": f"Patient/{ids['a']}"}},
                   {"entity": {"reference": f"Patient/{ids['b']}"}}]})
    return ids


def kick_off(http: httpx.Client, path: str, method: str = "GET", **kwargs: Any) -> httpx.Response:
    headers = {**ASYNC, **kwargs.pop("headers", {})}
    return http.request(method, path, headers=headers, **kwargs)


def wait_for_manifest(http: httpx.Client, status_url: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = http.get(status_url, headers={"Accept": "application/json"})
        if response.status_code == 200:
            assert response.headers["content-type"].startswith("application/json")
            assert "expires" in response.headers
            return dict(response.json())
        assert response.status_code == 202, response.text
        assert len(response.headers["x-progress"]) < 100
        assert int(response.headers["retry-after"]) >= 1
        time.sleep(0.2)
    raise AssertionError("the export did not finish in time")


def export(http: httpx.Client, path: str, method: str = "GET", **kwargs: Any) -> dict[str, Any]:
    response = kick_off(http, path, method, **kwargs)
    assert response.status_code == 202, response.text
    location = response.headers["content-location"]
    assert location.startswith("http") and "/$export-status/" in location
    return wait_for_manifest(http, location)


def download(http: httpx.Client, url: str) -> list[dict[str, Any]]:
    response = http.get(url, headers={"Accept": "application/fhir+ndjson"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/fhir+ndjson")
    return [assert_valid(orjson.loads(line)) for line in response.content.splitlines() if line]


def contents(http: httpx.Client, manifest: dict[str, Any], key: str = "output") -> dict[str, list[dict[str, Any]]]:
    """Every file of a manifest section, each checked: one type per file, `count` lines."""
    by_type: dict[str, list[dict[str, Any]]] = {}
    for item in manifest[key]:
        assert item["url"].startswith("http")
        lines = download(http, item["url"])
        assert len(lines) == item["count"]
        assert {r["resourceType"] for r in lines} <= {item["type"]}
        by_type.setdefault(item["type"], []).extend(lines)
    return by_type


def ids_of(resources: list[dict[str, Any]]) -> list[str]:
    return [r["id"] for r in resources]


def test_system_export_gives_every_visible_resource_once_and_withholds_restricted(
    payer: httpx.Client, cohort: dict[str, Any]
) -> None:
    manifest = export(payer, "/$export")
    assert set(manifest) >= {"transactionTime", "request", "requiresAccessToken", "output", "error"}
    assert manifest["requiresAccessToken"] is True
    assert manifest["request"].endswith("/fhir/$export")
    files = contents(payer, manifest)
    for kind, resources in files.items():
        assert len(ids_of(resources)) == len(set(ids_of(resources))), f"duplicate {kind}"
    observations = set(ids_of(files["Observation"]))
    assert {*cohort["obs"]["a"], *cohort["obs"]["b"], *cohort["obs"]["c"], cohort["gad"]} <= observations
    assert cohort["restricted"] not in observations
    assert {cohort["a"], cohort["b"], cohort["c"]} <= set(ids_of(files["Patient"]))
    assert cohort["group"] in ids_of(files["Group"])
    # Small files (EXPORT_ENV): a type with more resources is split, never mixed.
    assert all(item["count"] <= 40 for item in manifest["output"])
    # The R-labelled score is reported as withheld, without its id.
    errors = contents(payer, manifest, "error")["OperationOutcome"]
    text = orjson.dumps(errors).decode()
    assert "withheld by policy" in text and "Observation" in text
    assert cohort["restricted"] not in text


def test_restricted_data_is_exported_to_a_client_registered_for_it(
    bulk: RunningStack, cohort: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> None:
    scope = "system/Observation.rs __export-restricted"
    client = backend(bulk, "auditor", scope, tmp_path_factory.mktemp("auditor"))
    with http_for(bulk, client, scope) as http:
        manifest = export(http, "/$export?_type=Observation")
        files = contents(http, manifest)
        refused = kick_off(http, "/$export?_type=Observation,Patient")  # Patient: not in its scopes
        assert refused.status_code == 403, refused.text
    assert set(files) == {"Observation"}
    assert cohort["restricted"] in ids_of(files["Observation"])
    assert manifest["error"] == []


def test_patient_export_holds_compartment_types_only(payer: httpx.Client, cohort: dict[str, Any]) -> None:
    manifest = export(payer, "/Patient/$export?_type=Patient,Observation&_outputFormat=ndjson")
    files = contents(payer, manifest)
    assert set(files) <= {"Patient", "Observation"}
    assert cohort["gad"] in ids_of(files["Observation"])
    refused = kick_off(payer, "/Patient/$export?_type=Practitioner")
    assert refused.status_code == 400
    assert refused.json()["resourceType"] == "OperationOutcome"


def test_group_export_holds_the_members_data_only(payer: httpx.Client, cohort: dict[str, Any]) -> None:
    manifest = export(payer, f"/Group/{cohort['group']}/$export?_outputFormat=application/fhir%2Bndjson")
    files = contents(payer, manifest)
    assert sorted(ids_of(files["Patient"])) == sorted([cohort["a"], cohort["b"]])
    assert sorted(ids_of(files["Observation"])) == sorted([*cohort["obs"]["a"], *cohort["obs"]["b"],
                                                           cohort["gad"]])
    assert {r["subject"]["reference"] for r in files["Observation"]} == {
        f"Patient/{cohort['a']}", f"Patient/{cohort['b']}"}
    unknown = kick_off(payer, "/Group/no-such-group/$export")
    assert unknown.status_code == 404
    found = payer.get("/Group", params={"member": f"Patient/{cohort['b']}"}).json()
    assert [e["resource"]["id"] for e in found["entry"]] == [cohort["group"]]
    assert payer.get(f"/Group/{cohort['group']}").json()["type"] == "person"


def test_post_kick_off_takes_parameters_with_patient_type_filter_and_elements(
    payer: httpx.Client, cohort: dict[str, Any]
) -> None:
    body = {"resourceType": "Parameters", "parameter": [
        {"name": "_outputFormat", "valueString": "application/ndjson"},
        {"name": "_type", "valueString": "Observation"},
        {"name": "_typeFilter", "valueString": "Observation?code=http://loinc.org|70274-6"},
        {"name": "_elements", "valueString": "Observation.code"},
        {"name": "patient", "valueReference": {"reference": f"Patient/{cohort['a']}"}},
        {"name": "patient", "valueReference": {"reference": f"Patient/{cohort['b']}"}},
    ]}
    manifest = export(payer, "/Patient/$export", "POST", json=body,
                      headers={"Content-Type": "application/fhir+json"})
    observations = contents(payer, manifest)["Observation"]
    assert ids_of(observations) == [cohort["gad"]]
    only = observations[0]
    assert "valueQuantity" not in only and "effectiveDateTime" not in only
    assert only["code"]["coding"][0]["code"] == "70274-6" and only["status"] == "final"
    assert any(t["code"] == "SUBSETTED" for t in only["meta"]["tag"])


def test_since_exports_changes_and_deletions_only(
    payer: httpx.Client, writer_http: httpx.Client, cohort: dict[str, Any]
) -> None:
    time.sleep(0.01)
    since = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    time.sleep(0.01)
    fresh = create(writer_http, observation(cohort["c"], PHQ9_TOTAL, 3))
    gone = create(writer_http, observation(cohort["c"], PHQ9_TOTAL, 4))
    assert writer_http.delete(f"/Observation/{gone}").status_code in (200, 204)
    manifest = export(payer, "/$export", params={"_since": since, "_type": "Observation,Patient"})
    files = contents(payer, manifest)
    assert ids_of(files["Observation"]) == [fresh]
    assert "Patient" not in files
    deleted = contents(payer, manifest, "deleted")["Bundle"]
    assert [(b["type"], b["entry"][0]["request"]) for b in deleted] == [
        ("transaction", {"method": "DELETE", "url": f"Observation/{gone}"})]


def test_kick_off_refuses_what_it_does_not_support(payer: httpx.Client, bulk: RunningStack) -> None:
    for params in ({"_outputFormat": "text/csv"}, {"includeAssociatedData": "LatestProvenanceResources"},
                   {"_type": "NotAType"}, {"_since": "yesterday"},
                   {"_typeFilter": "Observation?_sort=date"}):
        response = kick_off(payer, "/$export", params=params)
        assert response.status_code == 400, params
        assert response.json()["resourceType"] == "OperationOutcome"
    assert kick_off(payer, "/$export", headers={"Prefer": ""}).status_code == 400
    lenient = kick_off(payer, "/$export", params={"includeAssociatedData": "LatestProvenanceResources",
                                                  "_type": "Patient"},
                       headers={"Prefer": "respond-async, handling=lenient"})
    assert lenient.status_code == 202, lenient.text
    assert payer.delete(lenient.headers["content-location"]).status_code == 202
    tokenless = httpx.get(f"{bulk.fhir}/$export", headers=ASYNC)
    assert tokenless.status_code == 401


def test_cancel_then_polls_answer_404(payer: httpx.Client, cohort: dict[str, Any]) -> None:
    response = kick_off(payer, "/$export")
    assert response.status_code == 202
    location = response.headers["content-location"]
    cancelled = payer.delete(location)
    assert cancelled.status_code == 202
    poll = payer.get(location)
    assert poll.status_code == 404
    assert poll.json()["resourceType"] == "OperationOutcome"
    assert payer.delete(location).status_code == 404


def test_files_need_the_kick_off_clients_token(
    bulk: RunningStack, payer: httpx.Client, cohort: dict[str, Any]
) -> None:
    response = kick_off(payer, f"/Group/{cohort['group']}/$export?_type=Patient")
    location = response.headers["content-location"]
    manifest = wait_for_manifest(payer, location)
    url = manifest["output"][0]["url"]
    tokenless = httpx.get(url)
    assert tokenless.status_code == 401
    other = mint_token(bulk, sub="other-payer", client_id="other-payer", scope="system/*.rs")
    with httpx.Client(headers={"Authorization": f"Bearer {other}"}) as stranger:
        assert stranger.get(url).status_code == 403
        assert stranger.get(location).status_code == 403
        assert stranger.delete(location).status_code == 403
    assert payer.get(url).status_code == 200


def test_expired_exports_answer_404_and_their_files_are_swept(
    bulk: RunningStack, payer: httpx.Client, cohort: dict[str, Any]
) -> None:
    response = kick_off(payer, f"/Group/{cohort['group']}/$export?_type=Patient")
    location = response.headers["content-location"]
    manifest = wait_for_manifest(payer, location)
    job = location.rsplit("/", 1)[1]
    db = bulk.db("records")
    assert db["export.files"].count_documents({"metadata.job": job}) == len(manifest["output"])
    # As if the configured time to live had passed:
    db.export_jobs.update_one({"_id": job}, {"$set": {"expires_at": datetime(2000, 1, 1, tzinfo=UTC)}})
    assert payer.get(location).status_code == 404
    assert payer.get(manifest["output"][0]["url"]).status_code == 404
    deadline = time.monotonic() + 30
    while db.export_jobs.count_documents({"_id": job}) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert db.export_jobs.count_documents({"_id": job}) == 0
    assert db["export.files"].count_documents({"metadata.job": job}) == 0
    assert db.export_files.count_documents({"job": job}) == 0


def accounting(live: RunningStack, patient: str, token: str, **params: Any) -> httpx.Response:
    """The gateway's 45 CFR 164.528 accounting of disclosures for a patient."""
    return httpx.get(f"{live.gateway_url}/audit/Patient/{patient}/$disclosures", params=params,
                     headers={"Authorization": f"Bearer {token}"}, timeout=30)


def auditor_token(live: RunningStack) -> str:
    return actors.auditor_token(live, "auditor")


def test_accounting_lists_each_export_and_download_for_the_patient(
    bulk: RunningStack, payer: httpx.Client, cohort: dict[str, Any]
) -> None:
    """Issue 6: a payer's Group export and a file download appear in the gateway's accounting of
    each member (purpose HPAYMT, recipient the payer's client); a non-member's shows neither."""
    manifest = export(payer, f"/Group/{cohort['group']}/$export?_type=Observation")
    [item] = manifest["output"]
    download(payer, item["url"])
    job, file_id = item["url"].split("/$export-file/")[1].split("/")
    token = auditor_token(bulk)
    assert accounting(bulk, cohort["a"], mint_token(bulk, scope="system/*.rs")).status_code == 403
    response = accounting(bulk, cohort["a"], token)
    assert response.status_code == 200, response.text
    bundle = assert_valid(response.json())
    events = [e["resource"] for e in bundle["entry"] if job in e["resource"].get("outcomeDesc", "")]
    # Newest first: the download, then the export. A: three PHQ-9 and the GAD-7.
    assert [e["outcomeDesc"] for e in events] == [
        f"bulk export file download {job} (file {file_id}): 4 Observation",
        f"bulk export {job}: 4 Observation"]
    for event in events:
        assert event["type"]["code"] == "110106"
        assert event["subtype"][0]["code"] == "disclose"
        assert event["recorded"].startswith(str(datetime.now(UTC).date()))
        assert event["purposeOfEvent"][0]["coding"][0]["code"] == "HPAYMT"
        assert {"reference": f"Patient/{cohort['a']}"} in [e.get("what") for e in event["entity"]]
        recipient = next(a for a in event["agent"] if a["type"]["coding"][0]["code"] == "110152")
        assert recipient["who"] == {"identifier": {"value": payer_client_id(payer)}}
    b_text = orjson.dumps(accounting(bulk, cohort["b"], token).json()).decode()
    assert f"bulk export {job}: 3 Observation" in b_text
    c_text = orjson.dumps(accounting(bulk, cohort["c"], token).json()).decode()
    assert job not in c_text  # C is not a member: neither the export nor the download


def test_accounting_pages_through_records_entries(
    bulk: RunningStack, payer: httpx.Client, cohort: dict[str, Any]
) -> None:
    for _ in range(2):
        contents(payer, export(payer, f"/Group/{cohort['group']}/$export?_type=Patient"))
    token = auditor_token(bulk)
    whole = accounting(bulk, cohort["b"], token).json()["entry"]
    assert len(whole) >= 4
    assert not any(link["relation"] == "next" for link in accounting(bulk, cohort["b"], token).json()["link"])
    paged: list[dict[str, Any]] = []
    url: str | None = f"{bulk.gateway_url}/audit/Patient/{cohort['b']}/$disclosures?_count=3"
    while url:
        page = httpx.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert page.status_code == 200, page.text
        entries = page.json().get("entry", [])
        assert len(entries) <= 3
        paged += entries
        url = next((link["url"] for link in page.json()["link"] if link["relation"] == "next"), None)
    assert [e["resource"]["id"] for e in paged] == [e["resource"]["id"] for e in whole]
    recorded = [e["resource"]["recorded"] for e in whole]
    assert recorded == sorted(recorded, reverse=True)
    tomorrow = datetime.now(UTC).date().toordinal() + 1
    later = accounting(bulk, cohort["b"], token, date=f"ge{datetime.fromordinal(tomorrow).date()}")
    assert later.json()["entry"] == []


def test_records_disclosure_log_is_internal_to_the_gateways_accounting(
    bulk: RunningStack, payer: httpx.Client, cohort: dict[str, Any], tmp_path: Any
) -> None:
    """Records answers its `$disclosures` to the gateway's own accounting token only."""
    path = f"/Patient/{cohort['a']}/$disclosures"
    assert payer.get(path).status_code == 403
    for claims in ({"scope": "system/AuditEvent.rs", "sub": "auditor", "client_id": "auditor"},
                   {"scope": "user/AuditEvent.rs", "sub": "root", "client_id": "app", "roles": ["admin"]},
                   {"scope": audit.ACCOUNTING_SCOPE, "sub": "auditor", "client_id": "auditor"},
                   {"scope": "system/*.rs", "sub": audit.ACCOUNTING_CLIENT,
                    "client_id": audit.ACCOUNTING_CLIENT}):
        token = mint_token(bulk, **claims)
        for base in (bulk.fhir, f"{bulk.direct_url('records')}/fhir"):
            refused = httpx.get(f"{base}{path}", headers={"Authorization": f"Bearer {token}"}, timeout=30)
            assert refused.status_code == 403, (claims, refused.text)
            assert refused.json()["issue"][0]["code"] == "forbidden"
    # A client registered with the accounting scope still cannot use it: the client id is the
    # gateway's own, which no registration can take.
    sneaky = backend(bulk, "sneaky", f"system/*.rs {audit.ACCOUNTING_SCOPE}", tmp_path)
    with http_for(bulk, sneaky, f"system/*.rs {audit.ACCOUNTING_SCOPE}") as http:
        assert http.get(path).status_code == 403
    gateway_own = mint_token(bulk, scope=audit.ACCOUNTING_SCOPE, sub=audit.ACCOUNTING_CLIENT,
                             client_id=audit.ACCOUNTING_CLIENT)
    direct = httpx.get(f"{bulk.direct_url('records')}/fhir{path}",
                       headers={"Authorization": f"Bearer {gateway_own}"}, timeout=30)
    assert direct.status_code == 200, direct.text
    # ... and that token reads nothing clinical.
    clinical = httpx.get(f"{bulk.direct_url('records')}/fhir/Patient/{cohort['a']}",
                         headers={"Authorization": f"Bearer {gateway_own}"}, timeout=30)
    assert clinical.status_code in (403, 404)


def test_accounting_is_503_not_partial_while_records_is_down(
    bulk: RunningStack, cohort: dict[str, Any]
) -> None:
    token = auditor_token(bulk)
    assert accounting(bulk, cohort["a"], token).status_code == 200
    bulk.runner.stop(only=("records",))
    try:
        response = accounting(bulk, cohort["a"], token)
        assert response.status_code == 503, response.text
        assert response.headers["content-type"].startswith("application/fhir+json")
        assert int(response.headers["retry-after"]) > 0
        outcome = response.json()
        assert outcome["resourceType"] == "OperationOutcome"
        assert outcome["issue"][0]["code"] == "transient"
        assert "records" in outcome["issue"][0]["diagnostics"]
    finally:
        bulk.runner.restart_service("records")
    assert accounting(bulk, cohort["a"], token).status_code == 200


def payer_client_id(http: httpx.Client) -> str:
    auth = http.auth
    assert isinstance(auth, BackendAuth)
    return auth.client.client_id


def test_everything_pages_through_the_patients_compartment(payer: httpx.Client, cohort: dict[str, Any]) -> None:
    expected = {cohort["a"], *cohort["obs"]["a"], cohort["gad"], cohort["restricted"], cohort["group"]}
    seen: list[str] = []
    url: str | None = f"/Patient/{cohort['a']}/$everything?_count=2"
    pages = 0
    while url:
        response = payer.get(url)
        assert response.status_code == 200, response.text
        bundle = assert_valid(response.json())
        assert len(bundle.get("entry", [])) <= 2
        seen += [e["resource"]["id"] for e in bundle.get("entry", [])]
        url = next((link["url"] for link in bundle["link"] if link["relation"] == "next"), None)
        pages += 1
    assert pages >= 3
    assert len(seen) == len(set(seen))
    assert set(seen) == expected
    only = payer.get(f"/Patient/{cohort['a']}/$everything", params={"_type": "Observation"}).json()
    assert {e["resource"]["resourceType"] for e in only["entry"]} == {"Observation"}
    assert payer.get("/Patient/no-such-patient/$everything").status_code == 404
    later = payer.get(f"/Patient/{cohort['a']}/$everything", params={"start": "2030-01-01"}).json()
    assert {e["resource"]["resourceType"] for e in later["entry"]} == {"Patient", "Group"}


def test_capability_statement_declares_bulk_export(bulk: RunningStack) -> None:
    statement = httpx.get(f"{bulk.fhir}/metadata").json()
    assert "http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data" in statement["instantiates"]
    rest = statement["rest"][0]
    assert "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export" in [
        o["definition"] for o in rest["operation"]]
    group = next(r for r in rest["resource"] if r["type"] == "Group")
    assert "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export" in [
        o["definition"] for o in group["operation"]]


def test_a_second_export_waits_and_a_crash_mid_export_loses_and_duplicates_nothing(
    bulk: RunningStack, payer: httpx.Client, writer_http: httpx.Client
) -> None:
    """Kill -9 of records while it writes a patient's files; after a restart, another worker
    reclaims the job once its lease lapses, and the manifest holds every resource exactly once."""
    patient = create(writer_http, {"resourceType": "Patient", "gender": "unknown",
                                   "name": [{"family": "Crashtest"}]})
    seeded = set(create_many(writer_http, [observation(patient, PHQ9_TOTAL, i % 27)
                                            for i in range(CRASH_SIZE)]))
    assert len(seeded) == CRASH_SIZE
    body = {"resourceType": "Parameters", "parameter": [
        {"name": "_type", "valueString": "Observation"},
        {"name": "patient", "valueReference": {"reference": f"Patient/{patient}"}}]}
    response = kick_off(payer, "/Patient/$export", "POST", json=body,
                        headers={"Content-Type": "application/fhir+json"})
    assert response.status_code == 202, response.text
    location = response.headers["content-location"]

    second = kick_off(payer, "/$export")
    assert second.status_code == 429, second.text
    assert int(second.headers["retry-after"]) > 0
    assert second.json()["issue"][0]["code"] == "throttled"

    deadline = time.monotonic() + 60
    progress = ""
    while time.monotonic() < deadline:
        poll = payer.get(location)
        assert poll.status_code == 202, "the export finished before the crash: raise CRASH_SIZE"
        progress = poll.headers["x-progress"]
        if progress.startswith("Observation: ") and int(progress.split()[1]) >= CRASH_SIZE // 4:
            break
        time.sleep(0.1)
    written = int(progress.split()[1])
    assert 0 < written < CRASH_SIZE, progress
    bulk.runner.kill("records")
    job = location.rsplit("/", 1)[1]
    db = bulk.db("records")
    first_attempt = {"files_id": {"$regex": f"^{job}\\..*\\.1\\.[0-9]+$"}}
    assert db["export.chunks"].count_documents(first_attempt) > 0
    bulk.runner.restart_service("records")

    manifest = wait_for_manifest(payer, location, timeout=90)
    exported = ids_of(contents(payer, manifest)["Observation"])
    assert len(exported) == len(set(exported)), "a resource was exported twice"
    assert set(exported) == seeded
    assert sum(item["count"] for item in manifest["output"]) == CRASH_SIZE
    # It was a reclaim, and nothing the killed attempt wrote is left behind, not even chunks of
    # the file it was writing when it died.
    assert db.export_jobs.find_one({"_id": job})["attempt"] >= 2
    assert db["export.files"].count_documents({"metadata.job": job}) == len(manifest["output"])
    assert db["export.chunks"].count_documents(first_attempt) == 0
    # The disclosure log counts what was released once, not what the dead attempt had counted.
    events = accounting(bulk, patient, auditor_token(bulk)).json()["entry"]
    exports = [e["resource"]["outcomeDesc"] for e in events if "bulk export " + job in e["resource"]["outcomeDesc"]]
    assert exports == [f"bulk export {job}: {CRASH_SIZE} Observation"]
