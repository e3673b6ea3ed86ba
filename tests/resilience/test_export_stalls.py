"""A bulk export survives a datastore that stalls again and again (issue 16: at 10k notes the
bench's export failed on the embedded datastore, whose one long write stalls every other caller
past the 5 s datastore bound; a MongoDB primary election stalls callers the same way).

Records' datastore is killed (kill -9; the supervisor restarts it on its durable files, as a
failover would bring a datastore back) once more than `max_attempts` allows (2 here), while one
system-level `$export` runs, each time once the export is seen making progress. Each kill fails the
running attempt. Before, each failed attempt waited for its lease to lapse and counted toward
`max_attempts`, so the last kill failed the job. (A SIGSTOP freeze shows the same less reliably:
PyMongo 4.20's async client raised its NetworkTimeout only after about three socketTimeoutMS,
measured 7.7 s for 2.5 s, and a freeze that short of it costs the export nothing.) Now the worker
resumes its own job as a new attempt as soon as the datastore answers (worker.py), a read of
resources waits out a restart within its gather time (store.time_sliced), and the export completes with every resource exactly once and each patient's accounting of disclosures counting
each resource once (the failed attempts' counts are kept under their attempt numbers and dropped).
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests import actors
from tests.resilience.conftest import ResilientStack, patient, report

MAX_ATTEMPTS = 2  # MINDCHART_RECORDS_EXPORT_MAX_ATTEMPTS here (5 by default)
STALLS = MAX_ATTEMPTS + 1  # before, the last of these failed the job
EXPORT_ENV = {  # small paced batches, so an export is surely running when the freeze comes
    "MINDCHART_RECORDS_EXPORT_BATCH_SIZE": "4",
    "MINDCHART_RECORDS_EXPORT_BATCH_PAUSE_SECONDS": "0.2",
    "MINDCHART_RECORDS_EXPORT_LEASE_SECONDS": "30",
    "MINDCHART_RECORDS_EXPORT_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
    "MINDCHART_RECORDS_EXPORT_HEARTBEAT_SECONDS": "0.5",
    "MINDCHART_RECORDS_EXPORT_POLL_SECONDS": "0.2",
    "MINDCHART_RECORDS_EXPORT_RETRY_AFTER_SECONDS": "1",
}
PER_PATIENT = (30, 45, 60)
ASYNC = {"Prefer": "respond-async", "Accept": "application/fhir+json"}


def restart_records(resilient: ResilientStack, env: dict[str, str] | None) -> None:
    """kill -9 records; the supervisor starts it again with the stack's environment."""
    if env is None:
        for name in EXPORT_ENV:
            resilient.runner.config.extra_env.pop(name, None)
    else:
        resilient.runner.config.extra_env.update(env)
    resilient.kill("records")
    time.sleep(0.5)  # the supervisor notices the death before /readyz is asked again
    resilient.wait_ready()


@pytest.fixture(scope="module")
def paced(resilient: ResilientStack) -> Iterator[ResilientStack]:
    restart_records(resilient, EXPORT_ENV)
    yield resilient
    restart_records(resilient, None)


def observation(subject: str, n: int) -> dict[str, Any]:
    return {"resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "44261-6"}]},
            "subject": {"reference": f"Patient/{subject}"}, "valueInteger": n % 28}


def records_log(resilient: ResilientStack) -> list[dict[str, Any]]:
    lines = []
    for line in (Path(resilient.runner.log_dir) / "records.log").read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                lines.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                continue
    return lines


def attempts_started(resilient: ResilientStack, job: str) -> int:
    """The highest attempt of the job records' log shows started or resumed."""
    seen = [int(e.get("attempt", 0)) for e in records_log(resilient)
            if e.get("job") == job and e.get("msg") in ("export_started", "export_resumed")]
    return max(seen, default=0)


def progress_of(http: httpx.Client, status_url: str) -> tuple[int, str]:
    response = http.get(status_url, headers={"Accept": "application/json"})
    return response.status_code, response.headers.get("x-progress", "")


def wait_until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout} s: {what}")


def test_an_export_completes_exactly_once_through_repeated_datastore_stalls(
    paced: ResilientStack, fhir: httpx.Client
) -> None:
    patients = [fhir.post("/Patient", json=patient(f"stall-{i}")).json()["id"] for i in range(3)]
    entries = [{"resource": observation(p, n), "request": {"method": "POST", "url": "Observation"}}
               for p, count in zip(patients, PER_PATIENT, strict=True) for n in range(count)]
    stored = fhir.post("/", json={"resourceType": "Bundle", "type": "transaction", "entry": entries})
    assert stored.status_code == 200, stored.text[:500]
    ours = {e["response"]["location"].split("/")[1] for e in stored.json()["entry"]}

    kickoff = fhir.get("/$export?_type=Observation", headers=ASYNC)
    assert kickoff.status_code == 202, kickoff.text
    status_url = kickoff.headers["content-location"]
    job = status_url.rstrip("/").rsplit("/", 1)[1]
    moving = re.compile(r"Observation: ([1-9]\d*) resources")

    last = ""
    for stall in range(1, STALLS + 1):
        # Kill only once the export is at work again since the last kill: a new attempt resumed
        # after it, or the same attempt whose read waited out the restart (each read of
        # resources may wait `GATHER_SECONDS` for its first batch, and the driver retries a read
        # within that time), with progress past zero.
        def moved() -> bool:
            nonlocal last
            progress = progress_of(fhir, status_url)[1]
            if moving.search(progress) and progress != last:
                last = progress
                return True
            return False
        wait_until(moved, 60, f"the export at work before kill {stall}")
        paced.kill("datastore-records")  # the supervisor starts it again, on its durable files

    deadline, transient = time.monotonic() + 120, 0
    while True:
        response = fhir.get(status_url, headers={"Accept": "application/json"})
        if response.status_code == 200:
            break
        if response.status_code == 503:  # Bulk Data 2.0: a transient status error, retried
            assert any(i.get("code") == "transient" for i in response.json()["issue"]), response.text
            transient += 1
        else:
            assert response.status_code == 202, f"the export failed: {response.text}"
        assert time.monotonic() < deadline, "the export did not finish after the stalls"
        time.sleep(0.5)

    manifest = response.json()
    exported: list[str] = []
    for item in manifest["output"]:
        body = fhir.get(item["url"], headers={"Accept": "application/fhir+ndjson"})
        assert body.status_code == 200, body.text
        lines = [orjson.loads(line) for line in body.content.splitlines() if line]
        assert len(lines) == item["count"]
        exported += [r["id"] for r in lines]
    duplicated = [i for i, n in Counter(exported).items() if n > 1]
    assert not duplicated
    assert ours <= set(exported)
    # Kills that failed an attempt (one landing on a write, or the lease's renewal) resumed it;
    # before, the third of them failed the job ("Too many attempts", max_attempts 2).
    resumed = [e for e in records_log(paced) if e.get("job") == job and e.get("msg") == "export_resumed"]
    assert attempts_started(paced, job) == 1 + len(resumed)

    # The accounting of disclosures counts each patient's resources once, not once per attempt.
    token = actors.auditor_token(paced, "stall-auditor")
    for subject, count in zip(patients, PER_PATIENT, strict=True):
        accounting = httpx.get(f"{paced.gateway_url}/audit/Patient/{subject}/$disclosures",
                               headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert accounting.status_code == 200, accounting.text
        said = [e["resource"].get("outcomeDesc", "") for e in accounting.json().get("entry", [])]
        assert f"bulk export {job}: {count} Observation" in said, said
    report("export through datastore stalls", stalls=STALLS, resumed=len(resumed),
           exported=len(exported), duplicated=len(duplicated), transient_polls=transient)
