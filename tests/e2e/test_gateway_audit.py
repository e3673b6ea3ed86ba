"""The gateway's tamper-evident audit trail: one hash-chained AuditEvent per request, `mindchart
audit verify` naming the first altered/removed/inserted record, concurrent writers (requests and
replicas) that never fork the chain, the admin search at /audit/AuditEvent, and the 45 CFR 164.528
accounting built from disclosures the backends report in DISCLOSURE_HEADER."""

from __future__ import annotations

import asyncio
import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from pymongo import AsyncMongoClient

from gateway import chain, chain_verify, store
from tests.actors import (
    BackendClient,
    create_user,
    mint_token,
    register_app,
    register_backend,
    run_cli,
    sensitive,
    smart_login,
)
from tests.conftest import RunningStack

PASSWORD = sensitive("audit reviewer passphrase 9")


def verify(live: RunningStack) -> tuple[int, dict[str, Any]]:
    result = run_cli(live.cli_env, "audit", "verify")
    return result.returncode, json.loads(result.stdout)


def record_of(live: RunningStack, response: httpx.Response) -> dict[str, Any]:
    found = live.db("gateway").audit_events.find_one({"request_id": response.headers["x-request-id"],
                                                       "kind": "rest"})
    assert found is not None
    return dict(found)


def test_records_are_chained_and_verify(live: RunningStack, writer_http: httpx.Client) -> None:
    first = record_of(live, writer_http.get("/Patient"))
    second = record_of(live, writer_http.get("/Observation"))
    assert second["seq"] > first["seq"]
    assert len(first["hash"]) == 64 and first["hash"] == chain.record_hash(first)
    following = live.db("gateway").audit_events.find_one(
        {"partition": first["partition"], "seq": first["seq"] + 1})
    assert following["prev_hash"] == first["hash"]
    code, result = verify(live)
    assert code == 0 and result["ok"] is True and result["checked"] > 0
    assert first["partition"] in [p["partition"] for p in result["partitions"]]


def test_verify_names_an_altered_record(live: RunningStack, writer_http: httpx.Client) -> None:
    target = record_of(live, writer_http.get("/Patient", headers={"X-Request-ID": f"alter-{uuid.uuid4().hex}"}))
    writer_http.get("/Patient")  # so the altered record is not the last one
    events = live.db("gateway").audit_events
    events.update_one({"_id": target["_id"]}, {"$set": {"status": 200, "event.outcome": "0",
                                                         "client_id": "someone-else"}})
    try:
        code, result = verify(live)
        assert code == 1 and result["ok"] is False
        assert result["first_problem"]["kind"] == "altered"
        assert result["first_problem"]["id"] == target["_id"]
        assert result["first_problem"]["seq"] == target["seq"]
        assert result["first_problem"]["partition"] == target["partition"]
        stderr = run_cli(live.cli_env, "audit", "verify").stderr
        assert target["_id"] in stderr
    finally:
        events.replace_one({"_id": target["_id"]}, target)
    assert verify(live)[0] == 0


def test_verify_reports_a_removed_record(live: RunningStack, writer_http: httpx.Client) -> None:
    target = record_of(live, writer_http.get("/Patient"))
    writer_http.get("/Patient")
    events = live.db("gateway").audit_events
    events.delete_one({"_id": target["_id"]})
    try:
        code, result = verify(live)
        assert code == 1
        assert result["first_problem"]["kind"] == "removed"
        assert result["first_problem"]["seq"] == target["seq"]
        assert result["first_problem"]["partition"] == target["partition"]
        assert f"#{target['seq']}" in result["first_problem"]["detail"]
    finally:
        events.insert_one(target)
    assert verify(live)[0] == 0


def test_verify_reports_an_inserted_record(live: RunningStack, writer_http: httpx.Client) -> None:
    model = record_of(live, writer_http.get("/Patient"))
    forged = {k: v for k, v in model.items() if k not in ("seq", "prev_hash", "hash")}
    forged["_id"] = uuid.uuid4().hex
    events = live.db("gateway").audit_events
    events.insert_one(forged)
    try:
        code, result = verify(live)
        assert code == 1
        assert result["first_problem"]["kind"] == "inserted" and result["first_problem"]["id"] == forged["_id"]
    finally:
        events.delete_one({"_id": forged["_id"]})


def test_concurrent_requests_do_not_fork_the_chain(live: RunningStack, writer_http: httpx.Client) -> None:
    tag = uuid.uuid4().hex[:8]
    token = writer_http.auth.client.token("system/*.rs")  # type: ignore[attr-defined]

    def call(i: int) -> httpx.Response:
        return httpx.get(f"{live.fhir}/Patient", headers={"Authorization": f"Bearer {token}",
                                                          "X-Request-ID": f"conc-{tag}-{i}"}, timeout=60)

    with ThreadPoolExecutor(max_workers=24) as pool:
        responses = list(pool.map(call, range(60)))
    assert all(r.status_code == 200 for r in responses)
    links = [(d["partition"], d["seq"]) for d in live.db("gateway").audit_events.find(
        {"request_id": {"$regex": f"^conc-{tag}-"}})]
    assert len(links) == 60 and len(set(links)) == 60
    code, result = verify(live)
    assert code == 0, result


def test_two_replicas_appending_at_once_keep_their_chains(live: RunningStack) -> None:
    """Two AuditChain writers (as in two gateway replicas) on one datastore, at once: each its own
    partition, both verify."""
    db_name = f"chain_race_{uuid.uuid4().hex[:8]}"

    async def race() -> dict[str, Any]:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(live.config.mongo_url("gateway"), tz_aware=True)
        try:
            db = client[db_name]
            await store.ensure_indexes(db)
            replicas = [chain.AuditChain(db), chain.AuditChain(db)]

            async def write(i: int) -> None:
                record = {"_id": f"r{i}", "kind": "rest", "recorded": chain.truncate_to_millis(datetime.now(UTC)),
                          "request_id": f"r{i}", "event": {"resourceType": "AuditEvent", "id": f"r{i}"}}
                await replicas[i % 2].append(record)

            await asyncio.gather(*(write(i) for i in range(80)))
            result = await chain_verify.verify(db)
            await client.drop_database(db_name)
            return result
        finally:
            await client.close()

    result = asyncio.run(race())
    assert result == {"ok": True, "checked": 80, "checkpoints": 0, "partitions": [
        {"partition": "1", "checked": 40}, {"partition": "2", "checked": 40}]}


# -- the admin search ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def auditor(live: RunningStack) -> dict[str, str]:
    suffix = uuid.uuid4().hex[:6]
    app = f"audit-app-{suffix}"
    register_app(live.cli_env, app, "user/AuditEvent.rs user/*.rs openid fhirUser")
    admin, clinician = f"auditor-{suffix}", f"clin-{suffix}"
    create_user(live.cli_env, admin, PASSWORD, "admin")
    create_user(live.cli_env, clinician, PASSWORD, "practitioner", "Practitioner/p-audit")
    tokens = {}
    for who in (admin, clinician):
        tokens[who] = smart_login(live.gateway_url, client_id=app, username=who, password=PASSWORD,
                                  scope="user/AuditEvent.rs", aud=live.fhir)["access_token"]
    return {"admin": tokens[admin], "clinician": tokens[clinician], "app": app}


def audit_search(live: RunningStack, token: str | None, **params: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(f"{live.gateway_url}/audit/AuditEvent", params=params, headers=headers, timeout=30)


def test_audit_search_is_for_administrators_only(live: RunningStack, auditor: dict[str, str],
                                                  tmp_path: Any) -> None:
    assert audit_search(live, None).status_code == 401
    assert audit_search(live, auditor["clinician"]).status_code == 403
    assert audit_search(live, mint_token(live, scope="system/Patient.rs")).status_code == 403
    ok = audit_search(live, auditor["admin"], _count=3)
    assert ok.status_code == 200 and ok.headers["content-type"].startswith("application/fhir+json")
    system = BackendClient(f"siem-{uuid.uuid4().hex[:6]}", live.gateway_url)
    register_backend(live.cli_env, system, "system/AuditEvent.rs", tmp=tmp_path,
                     roles=("compliance",))
    assert audit_search(live, system.token("system/AuditEvent.rs"), _count=1).status_code == 200
    # The refusals above are themselves in the trail.
    refused = audit_search(live, auditor["admin"], outcome="4", agent=auditor["app"], _count=50).json()
    assert any(e["resource"]["outcome"] == "4" for e in refused.get("entry", []))


def test_audit_search_by_patient_agent_entity_outcome_date_and_paging(
    live: RunningStack, auditor: dict[str, str], writer_http: httpx.Client, writer: BackendClient
) -> None:
    patient = writer_http.post("/Patient", json={"resourceType": "Patient"}).json()["id"]
    for _ in range(3):
        assert writer_http.get(f"/Patient/{patient}").status_code == 200
    assert writer_http.get("/Patient/no-such-patient-here").status_code == 404
    admin = auditor["admin"]
    # (the auditor's own searches name the patient too, and are audited: filter on the writer)
    by_patient = audit_search(live, admin, patient=f"Patient/{patient}", agent=writer.client_id).json()
    assert by_patient["resourceType"] == "Bundle" and by_patient["type"] == "searchset"
    assert len(by_patient["entry"]) == 4  # the create (entity from Location) and three reads
    for entry in by_patient["entry"]:
        event = entry["resource"]
        assert event["resourceType"] == "AuditEvent"
        assert entry["fullUrl"] == f"{live.gateway_url}/audit/AuditEvent/{event['id']}"
        assert {"reference": f"Patient/{patient}"} in [e.get("what") for e in event["entity"]]
    assert audit_search(live, admin, patient=patient, entity=f"Patient/{patient}").json()["entry"]
    reads = audit_search(live, admin, patient=patient, agent=writer.client_id, outcome="0").json()["entry"]
    assert len(reads) == 4
    missing = audit_search(live, admin, entity="Patient/no-such-patient-here", outcome="4").json()["entry"]
    assert missing and missing[0]["resource"]["outcome"] == "4"
    today = datetime.now(UTC).date()
    assert len(audit_search(live, admin, patient=patient, agent=writer.client_id,
                            date=f"ge{today}").json()["entry"]) == 4
    tomorrow = today + timedelta(days=1)
    assert "entry" not in audit_search(live, admin, patient=patient, date=f"ge{tomorrow}").json() or \
        not audit_search(live, admin, patient=patient, date=f"ge{tomorrow}").json()["entry"]
    page1 = audit_search(live, admin, patient=patient, agent=writer.client_id, _count=3).json()
    assert len(page1["entry"]) == 3
    next_url = next(link["url"] for link in page1["link"] if link["relation"] == "next")
    page2 = httpx.get(next_url, headers={"Authorization": f"Bearer {admin}"}).json()
    ids = {e["resource"]["id"] for e in page1["entry"]} | {e["resource"]["id"] for e in page2["entry"]}
    assert len(ids) == 4
    one = httpx.get(page1["entry"][0]["fullUrl"], headers={"Authorization": f"Bearer {admin}"})
    assert one.status_code == 200 and one.json()["id"] == page1["entry"][0]["resource"]["id"]
    bad = audit_search(live, admin, date="yesterday")
    assert bad.status_code == 400 and bad.json()["resourceType"] == "OperationOutcome"
    assert audit_search(live, admin, colour="blue").status_code == 400


def test_balp_shape_of_a_user_read(live: RunningStack, auditor: dict[str, str]) -> None:
    response = httpx.get(f"{live.gateway_url}/audit/AuditEvent", params={"_count": 1},
                         headers={"Authorization": f"Bearer {auditor['admin']}"})
    record = record_of(live, response)
    event = record["event"]
    assert event["type"]["code"] == "rest"
    user = next(a for a in event["agent"] if a.get("requestor") is True)
    assert user["type"]["coding"][0]["code"] == "IRCP"
    assert any(p.startswith("urn:ietf:params:oauth:jti:") for p in user["policy"])
    client = event["agent"][0]
    assert client["who"]["identifier"]["value"] == auditor["app"]
    assert event["source"]["type"][0]["code"] == "4"
    request_entity = next(e for e in event["entity"] if e["type"].get("code") == "XrequestId")
    assert request_entity["what"]["identifier"]["value"] == response.headers["x-request-id"]


def test_keyed_chain_resists_recomputed_hashes(live: RunningStack) -> None:
    """With a chain key (kept outside the datastore), a writer who alters a record and recomputes
    the hashes from there on is still caught; without the key verify says it cannot check."""
    db_name = f"chain_keyed_{uuid.uuid4().hex[:8]}"
    key = b"audit chain key from a secret mount"

    async def scenario() -> list[dict[str, Any]]:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(live.config.mongo_url("gateway"), tz_aware=True)
        try:
            db = client[db_name]
            await store.ensure_indexes(db)
            writer = chain.AuditChain(db, key)
            for i in range(6):
                await writer.append({"_id": f"k{i}", "kind": "rest", "status": 200,
                                     "recorded": chain.truncate_to_millis(datetime.now(UTC))})
            results = [await chain_verify.verify(db, key=key), await chain_verify.verify(db)]
            # Forge from record #3 on, recomputing every later hash without the key.
            prev = (await db.audit_events.find_one({"partition": "1", "seq": 2}))["hash"]
            for seq in range(3, 7):
                doc = await db.audit_events.find_one({"partition": "1", "seq": seq})
                doc.update(status=403 if seq == 3 else doc["status"], prev_hash=prev, chain="sha256")
                doc["hash"] = prev = chain.record_hash(doc)
                await db.audit_events.replace_one({"_id": doc["_id"]}, doc)
            results.append(await chain_verify.verify(db, key=key))
            await client.drop_database(db_name)
            return results
        finally:
            await client.close()

    good, unkeyed, forged = asyncio.run(scenario())
    assert good["ok"] is True and good["checked"] == 6
    assert unkeyed["first_problem"]["kind"] == "unverifiable"
    assert forged["ok"] is False and forged["first_problem"]["seq"] == 3 and forged["first_problem"]["id"] == "k2"
    assert forged["first_problem"]["partition"] == "1"


def test_checkpoint_export_and_witness_verify(live: RunningStack, writer_http: httpx.Client,
                                              tmp_path: Any) -> None:
    """The running gateway signs a checkpoint of every partition's head within a few seconds;
    `mindchart audit checkpoint --export` hands it out and `audit verify --witness` checks it."""
    import base64
    import time

    writer_http.get("/Patient")
    exported = tmp_path / "checkpoint.json"
    deadline = time.monotonic() + 30
    while True:
        result = run_cli(live.cli_env, "audit", "checkpoint", "--export", str(exported))
        if result.returncode == 0:
            break
        assert time.monotonic() < deadline, result.stderr
        time.sleep(0.5)
    witness = json.loads(exported.read_text())
    header = json.loads(base64.urlsafe_b64decode(witness["jws"].split(".")[0] + "=="))
    published = httpx.get(f"{live.gateway_url}/oauth/jwks").json()
    assert header["kid"] in [k["kid"] for k in published["keys"]]
    heads = {h["partition"]: h for h in witness["claims"]["heads"]}
    for name, head in heads.items():
        link = live.db("gateway").audit_events.find_one(
            {"partition": None if name == "legacy" else name, "seq": head["seq"]})
        assert link is not None and link["hash"] == head["hash"]
    result = run_cli(live.cli_env, "audit", "verify", "--witness", str(exported))
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["checkpoints"] >= 2  # the stored ones and the witness copy
    forged = {**witness, "jws": witness["jws"][:-8] + "AAAAAAAA"}
    (tmp_path / "forged.json").write_text(json.dumps(forged))
    result = run_cli(live.cli_env, "audit", "verify", "--witness", str(tmp_path / "forged.json"))
    assert result.returncode == 1 and "forged-checkpoint" in result.stderr
