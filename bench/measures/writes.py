"""4. Writes: a progress note with its two scores (PHQ-9, GAD-7) filed as three single creates
(the note first, then each score pointing at it with `derivedFrom`) vs one transaction Bundle
(`urn:uuid:` references resolved by the server), through the gateway as a client would. Figures
are note sets per second (three resources each). No target in issue 8: the ratio is reported."""

from __future__ import annotations

import uuid
from typing import Any

from bench import dataset, load, sides
from bench.measures.context import Context
from bench.report import Result, Row

KEY = "4-writes"
TITLE = "4 writes (note + 2 scores: transaction Bundle ÷ 3 single creates)"
CREATED = frozenset({200, 201})
PATIENTS = 100


def note_set(n: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    note = dataset.progress_note(n, per_patient=10)
    note["subject"] = {"reference": f"Patient/bench-w{n % PATIENTS}"}
    phq9, gad7 = dataset.score(0, 10), dataset.score(1, 10)
    for obs in (phq9, gad7):
        obs["subject"] = note["subject"]
    for resource in (note, phq9, gad7):
        resource.pop("id")
    return note, phq9, gad7


def transaction(n: int) -> dict[str, Any]:
    note, phq9, gad7 = note_set(n)
    note_url = f"urn:uuid:{uuid.uuid4()}"
    for obs in (phq9, gad7):
        obs["derivedFrom"] = [{"reference": note_url}]
    return {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": note_url, "resource": note, "request": {"method": "POST", "url": "DocumentReference"}},
        *({"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": obs,
           "request": {"method": "POST", "url": "Observation"}} for obs in (phq9, gad7)),
    ]}


async def run(ctx: Context) -> Result:
    result = Result(KEY, TITLE)
    plan = ctx.plan
    concurrency = max(1, plan.concurrency // 2)
    headers = {"Authorization": f"Bearer {ctx.stack.token()}", "Content-Type": "application/fhir+json",
               "Accept": "application/fhir+json"}
    http = load.loopback_client(ctx.stack.fhir, concurrency=concurrency, headers=headers)
    try:
        async def singles(n: int) -> int:
            note, phq9, gad7 = note_set(n)
            created = await http.post("/DocumentReference", json=note)
            if created.status_code not in CREATED:
                return created.status_code
            note_id = created.headers.get("location", "").split("/DocumentReference/")[-1].split("/")[0]
            for obs in (phq9, gad7):
                obs["derivedFrom"] = [{"reference": f"DocumentReference/{note_id}"}]
                response = await http.post("/Observation", json=obs)
                if response.status_code not in CREATED:
                    return response.status_code
            return 201

        async def bundled(n: int) -> int:
            return (await http.post("", json=transaction(n))).status_code

        single_probe = await singles(10**6)
        if single_probe not in CREATED:
            return result.failed(f"a single create answered {single_probe}")
        probe = await http.post("", json=transaction(10**6 + 1))
        try:
            available = probe.status_code == 200 and probe.json().get("type") == "transaction-response"
        except ValueError:
            available = False
        sides_run = ["single", "transaction"] if available else ["single"]

        def make(side: str) -> load.Operation:
            return singles if side == "single" else bundled

        pooled = await sides.compare(sides_run, make, plan, expect=CREATED, seconds=plan.write_seconds,
                                     concurrency=concurrency)
    finally:
        await http.aclose()
    result.parameters = {"resources_per_set": 3, "concurrency": concurrency, "via": "gateway",
                         "transaction_probe_status": probe.status_code, **plan.as_dict()}
    result.figures = {side: r.summary() for side, r in pooled.items()}
    single = pooled["single"]
    value = f"single creates {sides.describe(single)} note sets"
    if not available:
        value += f"; transaction not available (POST Bundle to /fhir answered {probe.status_code})"
        result.rows = [Row(TITLE, value)]
        return result
    bundle = pooled["transaction"]
    result.rows = [Row(TITLE, f"transaction {sides.describe(bundle)} note sets; {value}",
                       bundle.throughput / single.throughput if single.throughput else None,
                       "— (no target)", None)]
    return result
