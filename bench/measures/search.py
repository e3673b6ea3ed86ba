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

from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
from pymongo import ASCENDING, AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from bench import cost, dataset, load
from bench.measures import export
from bench.measures.context import Context
from bench.plan import Plan
from bench.report import Result, Row
from records.resources import RESOURCES
from records.search import query

KEY = "3-search-growth"
TITLE = "3 search as data grows"
TARGET = 1.5
CATEGORY = "http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category|clinical-note"
DATE_FROM = "2025-06-01"  # the later notes of each patient (monthly from 2025-01-01)
READ = "read by id"
PATIENT_READ = "read by id, patient-scoped token"


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


def _leaves(clause: dict[str, Any]) -> Iterator[dict[str, Any]]:
    if set(clause) == {"$and"}:
        for part in clause["$and"]:
            yield from _leaves(part)
    elif clause:
        yield clause


def flat_filter(url: str, base_url: str) -> tuple[str, dict[str, Any]]:
    """(collection, filter) for a search URL: records' own parse of the parameters, with the
    clauses merged into one document instead of nested under `$and` (the diagnostic row)."""
    parts = urlsplit(url)
    resource_type = parts.path.rstrip("/").split("/")[-1]
    request = query.parse(RESOURCES[resource_type], parse_qsl(parts.query), base_url=base_url)
    merged: dict[str, Any] = {}
    rest: list[dict[str, Any]] = []
    for clause in [*_leaves(request.filter), {"deleted": {"$ne": True}}]:
        if len(clause) == 1 and not next(iter(clause)).startswith("$") and not set(clause) & set(merged):
            merged.update(clause)
        else:
            rest.append(clause)
    return resource_type, ({**merged, "$and": rest} if rest else merged)


async def flat_latency(ctx: Context, db: AsyncDatabase[dict[str, Any]]) -> dict[str, load.LoadResult]:
    """The three searches as flat filter documents, PyMongo straight to the datastore, one page
    each (same projection, sort and limit as records' search)."""
    per, out = ctx.plan.notes_per_patient, {}
    for name, url_for in url_makers(ctx.plan).items():
        if name == READ:
            continue
        expected = searches(per)[name][1]

        async def find(n: int, url_for: Callable[[int], str] = url_for, expected: int = expected) -> int:
            kind, filt = flat_filter(url_for(n), ctx.stack.fhir)
            docs = await db[kind].find(filt, {"raw": 1, "vid": 1, "ts": 1, "sp": 1}).sort(
                "_id", ASCENDING).limit(query.DEFAULT_COUNT + 1).to_list()
            return 200 if len(docs) == expected else 500
        out[name] = await load.drive(find, load.Bounds(1, ctx.plan.search_requests, ctx.plan.search_seconds,
                                                       warmup=3))
    return out


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
    timings = {name: await latency(http, url_for, ctx.plan) for name, url_for in url_makers(ctx.plan).items()}
    # A SMART patient app's read: the access policy adds the patient compartment to the lookup.
    token = ctx.stack.user_token(audience=ctx.stack.fhir, fhir_user=f"Patient/{first_patient}",
                                 scope="patient/DocumentReference.rs", patient=first_patient)
    async with load.loopback_client(ctx.stack.direct_url("records"), concurrency=1,
                                    headers={"Authorization": f"Bearer {token}"}) as patient_http:
        if (await patient_http.get("/fhir/DocumentReference/bench-note-0")).status_code == 200:
            timings[PATIENT_READ] = await latency(
                patient_http, lambda n: f"/fhir/DocumentReference/bench-note-{n % per}", ctx.plan)
    return timings


async def run(ctx: Context) -> Result:
    plan, stack = ctx.plan, ctx.stack
    result = Result(KEY, f"{TITLE} ({size(plan.notes_small)} vs {size(plan.notes_large)} notes)")
    mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(stack.mongo_url("records"), tz_aware=True)
    db = mongo[stack.db_name("records")]
    http = load.loopback_client(stack.direct_url("records"), concurrency=1)
    sizes: dict[str, dict[str, Any]] = {}
    timings: dict[str, dict[str, load.LoadResult]] = {}
    costs: dict[str, cost.Cost] = {}
    flat: dict[str, dict[str, load.LoadResult]] = {}
    try:
        loaded = 0
        # (label, notes): search is measured at "small" and "large"; measurement 7 exports at
        # export_small and at large, while each size is there.
        stages = [("small", plan.notes_small), ("export", plan.export_small), ("large", plan.notes_large)]
        for label, wanted in stages:
            if wanted <= loaded:
                continue
            budget = float("inf") if label == "small" else plan.load_budget_s
            stored = await dataset.load_notes(db, loaded, wanted, plan.notes_per_patient, stack.fhir, budget)
            sizes[label] = {"notes": stored.notes, "wanted": wanted, "stopped": stored.stopped,
                            "load_seconds": round(stored.load_seconds, 1),
                            "index_seconds": round(stored.index_seconds, 1),
                            "load_notes_per_s": round((stored.notes - loaded) / stored.load_seconds, 1)
                            if stored.load_seconds else 0.0,
                            "documentreference_count": await db["DocumentReference"].count_documents({}),
                            "observation_count": await db["Observation"].count_documents({})}
            loaded = stored.notes
            if label != "export":
                measured = await measure_size(ctx, http)
                if isinstance(measured, str):
                    return result.failed(f"at {size(loaded)} notes, {measured}")
                timings[label] = measured
                sizes[label]["latency"] = {name: r.summary() for name, r in measured.items()}
                costs[label] = await search_cost(ctx, http)
                flat[label] = await flat_latency(ctx, db)
                sizes[label]["flat filter latency"] = {name: r.summary() for name, r in flat[label].items()}
                sizes[label]["patient+category cost"] = costs[label].to_json()
            if label != "small":
                exported = await export.export_once(ctx)
                if isinstance(exported, dict):
                    exported["notes"] = loaded
                ctx.shared.setdefault("export", {})["small" if label == "export" else "large"] = exported
    finally:
        await http.aclose()
        await mongo.close()

    result.parameters = {"notes_per_patient": plan.notes_per_patient, "category": CATEGORY,
                         "date_from": DATE_FROM, "concurrency": 1, **plan.as_dict()}
    result.figures = sizes
    n_small, n_large = size(sizes["small"]["notes"]), size(sizes["large"]["notes"])
    stopped = sizes["large"]["stopped"] or next((s["stopped"] for s in sizes.values() if s["stopped"]), None)
    if stopped:
        result.title = f"{TITLE} ({n_small} vs {n_large} notes: {stopped} before {size(plan.notes_large)})"
    for name in [n for n in timings["small"] if n in timings["large"]]:
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
    flat_ratios = {name: flat["large"][name].histogram.percentile_ms(50)
                   / flat["small"][name].histogram.percentile_ms(50) for name in flat["small"]}
    result.rows.append(Row(
        "3 diagnostic: the three searches as one flat filter, PyMongo straight to the datastore",
        "; ".join(f"{name} {flat['small'][name].histogram.percentile_ms(50):.1f} → "
                  f"{flat['large'][name].histogram.percentile_ms(50):.1f} ms ({flat_ratios[name]:.2f})"
                  for name in flat["small"]),
        max(flat_ratios.values()), "— (worst of three; no target)", None,
        ["The same clauses records' search evaluates (parsed by records.search.query, plus "
         "`deleted`), merged into one filter document that the datastore evaluates alone; records "
         "instead sends only the index-matched driving clause and evaluates the rest itself "
         "(records.store's two-phase query)."]))
    loads = [s for s in sizes.values() if s["load_seconds"]]
    notes_loaded = sizes["large"]["notes"] - sizes["small"]["notes"]
    load_s = sum(s["load_seconds"] for s in loads[1:])
    index_s = sum(s["index_seconds"] for s in loads[1:])
    result.rows.append(Row(
        "3 bulk load (not a target)",
        f"{notes_loaded / load_s if load_s else 0:.0f} notes/s from {n_small} to {n_large} (note + score, "
        f"straight into the datastore with records' indexes dropped), then {index_s:.0f} s rebuilding "
        f"them with records' ensure_indexes" + (f"; stopped short: {stopped}" if stopped else "")))
    return result
