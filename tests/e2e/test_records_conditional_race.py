"""Conditional interactions under concurrency (R4 http.html §cond-create, §cond-update): many
clients sending the same If-None-Exist create, conditional update or transaction Bundle with
ifNoneExist at the same moment, through the gateway, end with exactly one resource."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest

from tests.actors import BackendClient
from tests.conftest import RunningStack
from tests.records_resources import patient

CLIENTS = 10
SYSTEM = "urn:mindchart:test:mrn"


@pytest.fixture(scope="module")
def bearer(writer: BackendClient) -> str:
    return writer.token("system/*.cruds")


async def at_once(live: RunningStack, bearer: str, send: Any) -> list[httpx.Response]:
    """CLIENTS requests released together, each on its own connection."""
    headers = {"Authorization": f"Bearer {bearer}", "Content-Type": "application/fhir+json",
               "Accept": "application/fhir+json"}
    clients = [httpx.AsyncClient(base_url=live.fhir, headers=headers, timeout=60) for _ in range(CLIENTS)]
    try:
        start = asyncio.Event()

        async def one(client: httpx.AsyncClient) -> httpx.Response:
            await start.wait()
            return await send(client)
        tasks = [asyncio.create_task(one(c)) for c in clients]
        await asyncio.sleep(0.05)
        start.set()
        return list(await asyncio.gather(*tasks))
    finally:
        for client in clients:
            await client.aclose()


def stored_with(live: RunningStack, bearer: str, mrn: str) -> list[str]:
    found = httpx.get(f"{live.fhir}/Patient", params={"identifier": f"{SYSTEM}|{mrn}"},
                      headers={"Authorization": f"Bearer {bearer}"}, timeout=30).json()
    return [e["resource"]["id"] for e in found.get("entry", [])]


def test_concurrent_if_none_exist_creates_one(live: RunningStack, bearer: str) -> None:
    mrn = uuid.uuid4().hex
    body = patient("Concurrent", identifier=[{"system": SYSTEM, "value": mrn}])
    answers = asyncio.run(at_once(live, bearer, lambda c: c.post(
        "/Patient", json=body, headers={"If-None-Exist": f"identifier={SYSTEM}|{mrn}"})))
    assert sorted(r.status_code for r in answers) == [200] * (CLIENTS - 1) + [201], [r.text for r in answers]
    ids = {r.headers["location"].split("/Patient/")[1].split("/")[0] for r in answers}
    assert len(ids) == 1
    assert stored_with(live, bearer, mrn) == list(ids)


def test_concurrent_conditional_updates_create_one(live: RunningStack, bearer: str) -> None:
    mrn = uuid.uuid4().hex
    body = patient("Racing", identifier=[{"system": SYSTEM, "value": mrn}])
    answers = asyncio.run(at_once(live, bearer, lambda c: c.put(
        f"/Patient?identifier={SYSTEM}|{mrn}", json=body)))
    assert sorted(r.status_code for r in answers) == [200] * (CLIENTS - 1) + [201], [r.text for r in answers]
    stored = stored_with(live, bearer, mrn)
    assert len(stored) == 1
    assert {r.json()["id"] for r in answers} == set(stored)


def test_concurrent_transactions_with_if_none_exist_create_one(live: RunningStack, bearer: str) -> None:
    mrn = uuid.uuid4().hex
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [{
        "fullUrl": f"urn:uuid:{uuid.uuid4()}",
        "resource": patient("Bundled", identifier=[{"system": SYSTEM, "value": mrn}]),
        "request": {"method": "POST", "url": "Patient", "ifNoneExist": f"identifier={SYSTEM}|{mrn}"}}]}
    answers = asyncio.run(at_once(live, bearer, lambda c: c.post("", json=bundle)))
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
    statuses = sorted(r.json()["entry"][0]["response"]["status"] for r in answers)
    assert statuses == ["200 OK"] * (CLIENTS - 1) + ["201 Created"], statuses
    assert len(stored_with(live, bearer, mrn)) == 1
