"""3. Search as data grows: p50 of the US Core searches (DocumentReference patient+category and
patient+category+date, Observation patient+code) with `notes_small` vs `notes_large` stored
progress notes (each with a score Observation), spread over many patients with the same number of
notes each. Requests go straight to records, one at a time, for patients of the first batch, so
both sizes return identical Bundles. Target: p50(large) / p50(small) ≤ 1.5. A read by id is
measured the same way, because a read must not slow down with data either.

Bulk loading stops at `load_budget_s` even short of `notes_large` (the embedded datastore's insert
rate falls as collections grow); the rows then name the size actually reached.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
from pymongo import AsyncMongoClient

from bench import cost, dataset, load
from bench.measures import export
from bench.measures.context import Context
from bench.plan import Plan
from bench.report import Result, Row

KEY = "3-search-growth"
TITLE = "3 search as data grows"
TARGET = 1.5
CATEGORY = "http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category|clinical-note"
DATE_FROM = "2025-06-01"  # the later notes of each patient (monthly from 2025-01-01)
READ = "read by id"


def size(n: int) -> str:
    if n < 1000:
        return str(n)
    return f"{n // 1000}k" if n % 1000 == 0 else f"{n / 1000:.1f}k"


def searches(per_patient: int) -> dict[str, tuple[Callable[[str], str], int]]:
    """name -> (URL for a patient, how many resources it must find)."""
    later = sum(1 for k in range(per_patient)
                if dataset.note_day(k, per_patient).date().isoformat() >= DATE_FROM)
    return {
        "patient+category": (
            lambda p: f"/fhir/DocumentReference?patient=Patient/{p}&category={CATEGORY}", per_patient),
        "patient+category+date": (
            lambda p: f"/fhir/DocumentReference?patient=Patient/{p}&category={CATEGORY}&date=ge{DATE_FROM}",
            later),
        "patient+code": (
            lambda p: f"/fhir/Observation?patient=Patient/{p}&code=http://loinc.org|{dataset.PHQ9}",
            (per_patient + 1) // 2),
    }


def url_makers(plan: Plan) -> dict[str, Callable[[int], str]]:
    """figure -> URL of its n-th request (patients of the first batch, in turn)."""
    per = plan.notes_per_patient
    patients = [dataset.patient_of(i, per) for i in range(0, plan.notes_small, per)]

    def for_patients(url: Callable[[str], str]) -> Callable[[int], str]:
        return lambda n: url(patients[n % len(patients)])

    makers = {name: for_patients(url) for name, (url, _) in searches(per).items()}
    makers[READ] = lambda n: f"/fhir/DocumentReference/bench-note-{(n * per) % plan.notes_small}"
    return makers


async def latency(http: httpx.AsyncClient, url_for: Callable[[int], str], plan: Plan,
                  seconds: float | None = None) -> load.LoadResult:
    async def get(n: int) -> int:
        return (await http.get(url_for(n))).status_code
    return await load.drive(get, load.Bounds(1, plan.search_requests, seconds or plan.search_seconds,
                                             warmup=3))


async def search_cost(ctx: Context, http: httpx.AsyncClient) -> cost.Cost:
    """Datastore operations and CPU per patient+category search (5 requests)."""
    url_for = url_makers(ctx.plan)["patient+category"]

    async def get(n: int) -> int:
        return (await http.get(url_for(n))).status_code
    return await cost.per_request(get, datastores=ctx.stack.datastores("records"), pids=ctx.stack.pids(),
                                  n=5, first=0)


async def measure_size(ctx: Context, http: httpx.AsyncClient) -> dict[str, load.LoadResult] | str:
    per = ctx.plan.notes_per_patient
    first_patient = dataset.patient_of(0, per)
    http.headers["Authorization"] = f"Bearer {ctx.stack.token()}"
    for name, (url, expected) in searches(per).items():
        probe = await http.get(url(first_patient))
        got = len(probe.json().get("entry", [])) if probe.status_code == 200 else None
        if got != expected:
            return (f"{name} found {got} of {expected} (status {probe.status_code}): "
                    f"has records' storage shape changed?")
    return {name: await latency(http, url_for, ctx.plan) for name, url_for in url_makers(ctx.plan).items()}


async def run(ctx: Context) -> Result:
    plan, stack = ctx.plan, ctx.stack
    result = Result(KEY, f"{TITLE} ({size(plan.notes_small)} vs {size(plan.notes_large)} notes)")
    mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(stack.mongo_url("records"), tz_aware=True)
    db = mongo[stack.db_name("records")]
    http = load.loopback_client(stack.direct_url("records"), concurrency=1)
    sizes: dict[str, dict[str, Any]] = {}
    timings: dict[str, dict[str, load.LoadResult]] = {}
    costs: dict[str, cost.Cost] = {}
    try:
        loaded = 0
        for label, wanted in (("small", plan.notes_small), ("large", plan.notes_large)):
            budget = float("inf") if label == "small" else plan.load_budget_s
            reached, seconds = await dataset.load_notes(db, loaded, wanted, plan.notes_per_patient,
                                                        stack.fhir, budget)
            sizes[label] = {"notes": reached, "wanted": wanted, "load_seconds": round(seconds, 1),
                            "load_notes_per_s": round((reached - loaded) / seconds, 1) if seconds else 0.0,
                            "documentreference_count": await db["DocumentReference"].count_documents({}),
                            "observation_count": await db["Observation"].count_documents({})}
            loaded = reached
            measured = await measure_size(ctx, http)
            if isinstance(measured, str):
                return result.failed(f"at {size(reached)} notes, {measured}")
            timings[label] = measured
            sizes[label]["latency"] = {name: r.summary() for name, r in measured.items()}
            costs[label] = await search_cost(ctx, http)
            sizes[label]["patient+category cost"] = costs[label].to_json()
            # Measurement 7 exports each size while it is there.
            ctx.shared.setdefault("export", {})[label] = await export.export_once(ctx)
    finally:
        await http.aclose()
        await mongo.close()

    result.parameters = {"notes_per_patient": plan.notes_per_patient, "category": CATEGORY,
                         "date_from": DATE_FROM, "concurrency": 1, **plan.as_dict()}
    result.figures = sizes
    n_small, n_large = size(sizes["small"]["notes"]), size(sizes["large"]["notes"])
    short = sizes["large"]["notes"] < plan.notes_large
    if short:
        result.title = (f"{TITLE} ({n_small} vs {n_large} notes: the {plan.load_budget_s:.0f} s load "
                        f"budget ran out before {size(plan.notes_large)})")
    for name in timings["small"]:
        p50_small = timings["small"][name].histogram.percentile_ms(50)
        p50_large = timings["large"][name].histogram.percentile_ms(50)
        ratio = p50_large / p50_small
        result.rows.append(Row(f"3 {name} p50, {n_small} → {n_large} notes",
                               f"{p50_small:.1f} ms → {p50_large:.1f} ms", ratio, f"≤ {TARGET}",
                               ratio <= TARGET))
    result.rows[0].notes.extend(f"Per patient+category search at {size(sizes[label]['notes'])} notes: "
                                f"{costs[label].describe()}." for label in ("small", "large"))
    missed = [row for row in result.rows if row.met is False]
    if missed:
        worst = max(timings["large"], key=lambda n: timings["large"][n].histogram.percentile_ms(50))
        targets = {"records": stack.pid("records")}
        if "datastore-records" in stack.runner.processes:  # py-spy reads the embedded server too
            targets["records-db"] = stack.pid("datastore-records")
        again_http = load.loopback_client(stack.direct_url("records"), concurrency=1,
                                          headers={"Authorization": f"Bearer {stack.token()}"})
        try:
            _, profiles = await ctx.profiled(targets, "3-search", lambda: latency(
                again_http, url_makers(plan)[worst], plan, seconds=plan.profile_seconds + 1))
        finally:
            await again_http.aclose()
        result.profiles = [p.to_json() for p in profiles]
        missed[0].notes.extend(f"Profile of {label} during '{worst}' at {n_large} notes: {p.describe()}."
                               for label, p in zip(targets, profiles, strict=True))
    rate = sizes["large"]["load_notes_per_s"]
    result.rows.append(Row(
        "3 bulk load (not a target)",
        f"{rate:.0f} notes/s from {n_small} to {n_large} (note + score, straight into the datastore, "
        f"records' indexes in place)" + (f"; the {plan.load_budget_s:.0f} s budget stopped it short of "
                                         f"{size(plan.notes_large)}" if short else "")))
    return result
