"""50 concurrent `If-Match` updates of one resource: exactly one winner per version, every other
request 412 (R4 http.html, version-aware updates), never a 500 from a write conflict."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from threading import Barrier

import httpx

from tests.resilience.conftest import ResilientStack, patient, report

CONTENDERS = 50
ROUNDS = 3  # each round contends for the next version


def test_50_concurrent_if_match_updates_one_winner(resilient: ResilientStack, fhir: httpx.Client) -> None:
    created = fhir.post("/Patient", json=patient("contended"))
    assert created.status_code == 201, created.text
    rid = created.json()["id"]

    statuses: Counter[int] = Counter()
    for round_ in range(1, ROUNDS + 1):
        start = Barrier(CONTENDERS)

        def update(n: int, version: int = round_, start: Barrier = start) -> int:
            body = {**patient(f"contender-{version}-{n}"), "id": rid}
            start.wait()  # all fifty leave together
            return fhir.put(f"/Patient/{rid}", json=body,
                            headers={"If-Match": f'W/"{version}"'}).status_code

        with ThreadPoolExecutor(max_workers=CONTENDERS) as pool:
            this_round = Counter(pool.map(update, range(CONTENDERS)))
        statuses += this_round
        assert this_round == Counter({200: 1, 412: CONTENDERS - 1}), (round_, this_round)
    history = fhir.get(f"/Patient/{rid}/_history").json()
    versions = sorted(int(e["resource"]["meta"]["versionId"]) for e in history["entry"])
    report("50 concurrent If-Match updates", requests=CONTENDERS * ROUNDS, winners=statuses[200],
           precondition_failed=statuses[412], **{"5xx": sum(n for s, n in statuses.items() if s >= 500)})
    assert versions == list(range(1, ROUNDS + 2))
