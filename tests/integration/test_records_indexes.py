"""Every US Core search of records selects through an index on the embedded datastore (issue 3
§Search: "searches must stay fast as data grows"), checked with explain() rather than timing.

SecantusDB never uses an index for sort() and scans for ranges on _id (DESIGN.md), so what keeps
a search flat from 1k to 100k notes is that its filter — the policy's compartment clause AND the
parameters, over values extracted at write time — is answered by an index scan (IXSCAN), for a
system caller and for a patient-scoped one alike. Data goes in through the real ResourceStore.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from pymongo import AsyncMongoClient

from mindchart_cli import stack
from mindchart_core import scopes
from mindchart_core.tokens import AccessToken
from records import store
from records.policy import AccessPolicy
from records.resources import RESOURCES
from records.search import query
from tests.e2e.test_records_rest import phq9_total, progress_note

BASE = "http://127.0.0.1:8000/fhir"
NOTES = 120


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def mongo_url() -> Iterator[str]:
    port = _free_port()
    process = subprocess.Popen([stack.secantusd(), "--host", "127.0.0.1", "--port", str(port),
                                "--storage-path", ":memory:", "--log-level", "WARNING"])
    url = f"mongodb://127.0.0.1:{port}/?directConnection=true"
    try:
        stack.wait_for_mongo(url, 60, process)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def token(scope: str, patient: str | None = None) -> AccessToken:
    return AccessToken(subject="t", client_id="t", scope=scopes.parse(scope), audience=BASE, jti="j",
                       expires_at=int(time.time()) + 300, patient=patient)


@pytest.fixture(scope="module")
async def db(mongo_url: str) -> AsyncIterator[Any]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_url, tz_aware=True)
    database = client[f"records_idx_{int(time.time())}"]
    await store.ensure_indexes(database)
    writer = store.ResourceStore(client, database, AccessPolicy(token("system/*.cruds"), BASE))
    notes = RESOURCES["DocumentReference"]
    observations = RESOURCES["Observation"]
    for i in range(NOTES):
        pid = f"p{i % 10}"
        await writer.create(notes, progress_note(pid, code=("11506-3", "11510-5")[i % 2],
                                                 date=f"2026-{1 + i % 12:02d}-10T10:00:00Z"))
        await writer.create(observations, phq9_total(pid, i % 27, when=f"2026-{1 + i % 12:02d}-10"))
    yield database
    await client.drop_database(database.name)
    await client.close()


def stages(plan: Any) -> list[str]:
    """Every stage name in a (possibly nested) explain plan."""
    found: list[str] = []
    if isinstance(plan, dict):
        if isinstance(plan.get("stage"), str):
            found.append(plan["stage"])
        for value in plan.values():
            found += stages(value)
    elif isinstance(plan, list):
        for value in plan:
            found += stages(value)
    return found


US_CORE = {
    "DocumentReference": [
        [("_id", "x")],
        [("patient", "p1")],
        [("patient", "p1"), ("category", "clinical-note")],
        [("patient", "p1"), ("category", "clinical-note"), ("date", "ge2026-03-01")],
        [("patient", "p1"), ("type", "http://loinc.org|11506-3")],
        [("patient", "p1"), ("status", "current")],
        [("patient", "p1"), ("type", "11506-3"), ("period", "ge2026-01-01")],
    ],
    "Observation": [
        [("patient", "p1"), ("category", "survey")],
        [("patient", "p1"), ("code", "http://loinc.org|44261-6")],
        [("patient", "p1"), ("category", "survey"), ("date", "ge2026-03-01")],
        [("patient", "p1"), ("code", "44261-6"), ("date", "le2026-06")],
        [("patient", "p1"), ("category", "survey"), ("status", "final")],
        [("patient", "p1"), ("category", "survey"), ("_lastUpdated", "gt2020-01-01")],
    ],
    "Patient": [[("identifier", "urn:x|1")], [("family", "riv")], [("name", "alex")],
                [("birthdate", "1990")], [("gender", "female")], [("given", "al")]],
    "Encounter": [[("patient", "p1")], [("patient", "p1"), ("date", "ge2026-01-01")]],
    "Condition": [[("patient", "p1")], [("patient", "p1"), ("code", "35489007")],
                  [("patient", "p1"), ("category", "problem-list-item")]],
}


@pytest.mark.parametrize("caller", ["system", "patient"])
async def test_every_us_core_search_uses_an_index(db: Any, caller: str) -> None:
    policy = AccessPolicy(token("system/*.rs") if caller == "system" else token("patient/*.rs", "p1"), BASE)
    reader = store.ResourceStore(db.client, db, policy)
    problems = []
    for kind, searches in US_CORE.items():
        definition = RESOURCES[kind]
        for items in searches:
            request = query.parse(definition, items, base_url=BASE, resources=RESOURCES)
            plan = await reader.explain_search(definition, request)
            found = stages(plan.get("queryPlanner", {}).get("winningPlan", plan))
            if "IXSCAN" not in found or "COLLSCAN" in found:
                problems.append(f"{kind}?{items}: {found}")
    assert not problems, "\n".join(problems)


async def test_searches_return_what_the_index_selects(db: Any) -> None:
    """The indexed plan is also the right answer (a guard against an index on the wrong field)."""
    reader = store.ResourceStore(db.client, db, AccessPolicy(token("patient/*.rs", "p1"), BASE))
    definition = RESOURCES["DocumentReference"]
    request = query.parse(definition, [("category", "clinical-note"), ("date", "ge2026-06-01")],
                          base_url=BASE, resources=RESOURCES)
    request.count = 100
    page = await reader.search(definition, request)
    expected = sum(1 for i in range(NOTES) if i % 10 == 1 and 1 + i % 12 >= 6)
    assert len(page.resources) == expected > 0
    assert await reader.count(definition, request) == expected
