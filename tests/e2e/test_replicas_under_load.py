"""Two gateway replicas and two records replicas on the same datastores, under concurrent load:
every request audited exactly once (none lost, none twice), each gateway writing its own audit
partition without a single chain conflict, every partition verifying, and a bulk export kicked
off through one pair and polled through the other run exactly once. (Revocation and rate limits
across replicas: tests/e2e/test_gateway_replicas.py.)"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.actors import BackendClient, register_backend, run_cli
from tests.conftest import RunningStack
from tests.replicas import Replica, running


@pytest.fixture(scope="module")
def second_pair(live: RunningStack) -> Iterator[str]:
    """A second records replica and a second gateway replica routing to it: same datastores, same
    public URLs (so the same issuer and token audience)."""
    records = Replica("records", "records-second-replica")
    gateway = Replica("gateway", "gateway-second-replica", {"MINDCHART_GATEWAY_RECORDS_URL": records.url})
    with running(live, records, gateway):
        yield gateway.url


@pytest.fixture(scope="module")
def backend_token(live: RunningStack, tmp_path_factory: pytest.TempPathFactory) -> str:
    client = BackendClient(f"load-{uuid.uuid4().hex[:6]}", live.gateway_url)
    register_backend(live.cli_env, client, "system/*.rs", tmp=tmp_path_factory.mktemp("load"))
    return client.token("system/*.rs")


def _conflicts(base: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    found = re.search(r"^mindchart_gateway_audit_chain_conflicts_total (\S+)$", text, re.M)
    assert found, "the gateway does not expose its audit chain conflicts"
    return float(found[1])


def test_every_request_is_audited_once_in_its_replicas_partition(
        live: RunningStack, second_pair: str, backend_token: str) -> None:
    gateways = (live.gateway_url, second_pair)
    before = [_conflicts(g) for g in gateways]
    tag = uuid.uuid4().hex[:8]

    def call(i: int) -> int:
        base = gateways[i % 2]
        path = "/fhir/Patient" if i % 3 else "/fhir/metadata"
        return httpx.get(f"{base}{path}", params={"_count": "2"} if i % 3 else None, timeout=60,
                         headers={"Authorization": f"Bearer {backend_token}",
                                  "X-Request-ID": f"load-{tag}-{i}"}).status_code

    with ThreadPoolExecutor(max_workers=16) as pool:
        statuses = list(pool.map(call, range(120)))
    assert statuses == [200] * 120
    stored = list(live.db("gateway").audit_events.find(
        {"request_id": {"$regex": f"^load-{tag}-"}, "kind": "rest"}))
    per_request = Counter(r["request_id"] for r in stored)
    assert len(per_request) == 120 and set(per_request.values()) == {1}  # none lost, none twice
    links = {(r["partition"], r["seq"]) for r in stored}
    assert len(links) == 120
    # Each replica appends to its own partition: the load's records are in exactly two.
    assert len({r["partition"] for r in stored}) == 2
    assert [_conflicts(g) for g in gateways] == before  # no batch ever retried for its position
    result = run_cli(live.cli_env, "audit", "verify")
    assert result.returncode == 0, result.stdout + result.stderr
    verified = json.loads(result.stdout)
    assert len([p for p in verified["partitions"] if p["checked"]]) >= 2


def test_an_export_kicked_off_at_one_pair_runs_once(
        live: RunningStack, second_pair: str, backend_token: str, writer_http: httpx.Client) -> None:
    for i in range(5):
        created = writer_http.post("/Patient", json={"resourceType": "Patient", "name": [{"family": f"Load{i}"}]})
        assert created.status_code == 201, created.text
    auth = {"Authorization": f"Bearer {backend_token}"}
    kick = httpx.get(f"{second_pair}/fhir/$export", params={"_type": "Patient"}, timeout=30,
                     headers={**auth, "Accept": "application/fhir+json", "Prefer": "respond-async"})
    assert kick.status_code == 202, kick.text
    status_url = kick.headers["content-location"]
    assert status_url.startswith(live.gateway_url)  # the public URL: any replica answers it
    deadline = time.monotonic() + 90
    while True:
        # Polled through the first pair: the job lives in the shared datastore, not in a replica.
        polled = httpx.get(status_url, headers={**auth, "Accept": "application/json"}, timeout=30)
        if polled.status_code == 200:
            break
        assert polled.status_code == 202, polled.text
        assert time.monotonic() < deadline, "the export did not finish"
        time.sleep(0.3)
    manifest = polled.json()
    job_id = status_url.rstrip("/").split("/")[-1]
    job = live.db("records").export_jobs.find_one({"_id": job_id})
    assert job is not None and job["state"] == "complete" and job["attempt"] == 1  # claimed once
    ids: list[str] = []
    for item in manifest["output"]:
        lines = httpx.get(item["url"], headers={**auth, "Accept": "application/fhir+ndjson"}, timeout=30)
        assert lines.status_code == 200
        ids += [json.loads(line)["id"] for line in lines.content.splitlines() if line]
    assert ids and len(ids) == len(set(ids))  # every Patient once
    # Every Patient as of the export's transactionTime (Bulk Data 2.0: nothing modified after it
    # is included), less those withheld by policy and counted in the manifest's error file.
    withheld = 0
    for item in manifest.get("error", []):
        body = httpx.get(item["url"], headers={**auth, "Accept": "application/fhir+ndjson"}, timeout=30)
        for line in body.content.splitlines():
            for issue in json.loads(line).get("issue", []) if line else []:
                found = re.match(r"(\d+) Patient resources? withheld", issue.get("diagnostics", ""))
                withheld += int(found.group(1)) if found else 0
    stored = httpx.get(f"{live.fhir}/Patient", headers=auth, timeout=30, params={
        "_summary": "count", "_lastUpdated": f"le{manifest['transactionTime']}"}).json()["total"]
    assert len(ids) == stored - withheld


def test_logs_of_the_second_pair_are_clean(live: RunningStack, second_pair: str) -> None:
    for name in ("gateway", "records"):
        log = Path(live.runner.log_dir / f"{name}-second-replica.log").read_text(errors="replace")
        assert "Traceback" not in log, log[-2000:]
