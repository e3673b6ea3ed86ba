"""One export job attempt: every resource type it asks for, streamed into NDJSON files.

Checkpoints per resource type: a type whose files are complete is committed in the job document
by the attempt holding the lease (store.commit_type). A worker that claims an abandoned job keeps
the committed types, discards everything else the dead attempt wrote, and exports the remaining
types from their start, so every resource lands in the manifest exactly once. The same holds when
the datastore fails an attempt and its own worker resumes it as a new attempt (worker.py): files,
commits and disclosure counts all carry the attempt number, so a failed attempt's writes, even ones
the datastore applies after the worker gave up on them, never count.

Each type's query is the caller's access filter (AccessPolicy.filter_for, rebuilt from the
kick-off token's claims) AND the export's own narrowing: compartment (Patient/Group level),
`_since` .. `transactionTime` (Bulk Data 2.0 §transactionTime: nothing modified after it),
`_typeFilter` (ORed), and the withholding of R/V-labelled resources unless the token carries the
opt-in scope. Withheld resources are counted, never listed, and reported in `error[]`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import orjson

from mindchart_core import errors, tokens
from records.export import kickoff, ndjson, store
from records.export.settings import ExportSettings
from records.policy import AccessPolicy
from records.resources import RESOURCES, ResourceDef


class LeaseLost(Exception):
    """The job was cancelled or reclaimed by another worker: stop without writing more."""


Check = Callable[[str], Awaitable[None]]


def policy_of(job: dict[str, Any], base_url: str) -> AccessPolicy:
    return AccessPolicy(token=tokens.claims_to_token(job["claims"]), base_url=base_url)


def type_clauses(job: dict[str, Any], definition: ResourceDef, policy: AccessPolicy,
                 patients: list[str] | None, base_url: str) -> dict[str, Any]:
    """Everything but the R/V withholding: what the client asked for and may see."""
    clauses: list[dict[str, Any]] = [policy.filter_for(definition, "search-type")]
    if job["level"] != "system":
        clauses.append({"c": {"$in": patients}} if patients is not None else {"c": {"$gt": ""}})
    window: dict[str, datetime] = {"$lte": job["transaction_time"]}
    if job.get("since") is not None:
        window["$gt"] = job["since"]
    clauses.append({"sp.lastUpdated_lo": window})
    filters = [kickoff.type_filter(definition, text, base_url).filter
               for text in job.get("type_filters", {}).get(definition.type, [])]
    if filters:
        clauses.append(filters[0] if len(filters) == 1 else {"$or": filters})
    return store.and_(*clauses)


def withheld_outcome(counts: dict[str, int]) -> bytes:
    issues = [{
        "severity": "warning", "code": "suppressed",
        "diagnostics": f"{n} {kind} resource{'s' if n != 1 else ''} withheld by policy "
                       f"(confidentiality R or V; minimum necessary, 45 CFR 164.502(b))",
    } for kind, n in counts.items() if n]
    return orjson.dumps({"resourceType": "OperationOutcome", "issue": issues})


async def export_type(db: store.Db, job: dict[str, Any], attempt: int, definition: ResourceDef,
                      patients: list[str] | None, settings: ExportSettings, base_url: str,
                      check: Check) -> dict[str, Any]:
    policy = policy_of(job, base_url)
    kind = definition.type
    base = type_clauses(job, definition, policy, patients, base_url)
    withheld = 0
    restricted = frozenset() if job.get("include_restricted") else frozenset(store.RESTRICTED_LABELS)
    keep = ndjson.elements_for(kind, job.get("elements"))
    files = ndjson.FileSeries(db, job["_id"], attempt, kind="output", line_type=kind,
                              source_type=kind, per_file=settings.resources_per_file)
    per_patient: dict[str, int] = {}
    in_batch = 0
    try:
        window = store.Window("sp.lastUpdated_lo", job.get("since"), job["transaction_time"])
        async for doc in store.stream(db, kind, base, window, settings.batch_size,
                                      settings.gather_seconds):
            in_batch += 1
            # Withheld here rather than by the query, so they are counted in the same pass.
            if restricted and not restricted.isdisjoint((doc.get("sp") or {}).get("_security") or ()):
                withheld += 1
            else:
                compartment = list(doc.get("c") or [])
                await files.add(ndjson.subset(bytes(doc["raw"]), keep), compartment)
                for patient in compartment:
                    per_patient[patient] = per_patient.get(patient, 0) + 1
            if in_batch >= settings.batch_size:
                await check(f"{kind}: {files.total} resources")
                in_batch = 0
                # Counts per patient stay in memory up to a bound, so a patient's many resources
                # cost one upsert, not one per batch (ExportSettings.pending_patients).
                if len(per_patient) >= settings.pending_patients:
                    await store.add_pending_disclosures(db, job, kind, attempt, per_patient)
                    per_patient = {}
        await check(f"{kind}: {files.total} resources")
        await store.add_pending_disclosures(db, job, kind, attempt, per_patient)
        await files.close()
        deleted = 0
        if job.get("since") is not None:
            deleted = await export_deletions(db, job, attempt, definition, policy, patients,
                                             settings, check)
    except BaseException:
        await files.abort()
        raise
    return {"count": files.total, "withheld": withheld, "deleted": deleted}


async def export_deletions(db: store.Db, job: dict[str, Any], attempt: int,
                           definition: ResourceDef, policy: AccessPolicy,
                           patients: list[str] | None, settings: ExportSettings,
                           check: Check) -> int:
    """Bulk Data 2.0 §deleted: one `transaction` Bundle per resource deleted since `_since` (and
    still deleted now), with `request.method` DELETE and `request.url` Type/id."""
    kind = definition.type
    clauses: list[dict[str, Any]] = [policy.filter_for(definition, "search-type"),
                                     {"ts": {"$gt": job["since"], "$lte": job["transaction_time"]}}]
    if job["level"] != "system":
        clauses.append({"c": {"$in": patients}} if patients is not None else {"c": {"$gt": ""}})
    if not job.get("include_restricted"):
        clauses.append({"sp._security": {"$nin": store.RESTRICTED_LABELS}})
    files = ndjson.FileSeries(db, job["_id"], attempt, kind="deleted", line_type="Bundle",
                              source_type=kind, per_file=settings.resources_per_file)
    reported: set[str] = set()
    batch: list[str] = []

    async def flush() -> None:
        gone = await store.still_deleted(db, kind, batch) if batch else set()
        for ident in batch:
            if ident in gone and ident not in reported:
                reported.add(ident)
                await files.add(orjson.dumps({
                    "resourceType": "Bundle", "type": "transaction",
                    "entry": [{"request": {"method": "DELETE", "url": f"{kind}/{ident}"}}],
                }))
        batch.clear()
        await check(f"{kind}: deletions")

    try:
        window = store.Window("ts", job["since"], job["transaction_time"])
        async for doc in store.deletions(db, kind, store.and_(*clauses), window, settings.batch_size,
                                         settings.gather_seconds):
            batch.append(doc["id"])
            if len(batch) >= settings.batch_size:
                await flush()
        await flush()
        await files.close()
    except BaseException:
        await files.abort()
        raise
    return files.total


async def run(db: store.Db, job: dict[str, Any], settings: ExportSettings, base_url: str,
              check: Check) -> None:
    """Export every type not yet committed, then the error file, then complete the job."""
    attempt = int(job["attempt"])
    done: dict[str, Any] = dict(job.get("done") or {})
    await store.discard_files(db, job["_id"], keep={(t, d["attempt"]) for t, d in done.items()})
    if attempt > 1:
        kinds = [(t, k) for t in job["types"] if t not in done for k in ("output", "deleted")]
        await store.discard_unclosed_uploads(db, job["_id"], [*kinds, ("OperationOutcome", "error")],
                                             range(1, attempt))
    patients = await store.job_patients(db, job["_id"]) if job["level"] != "system" else None
    remaining = [t for t in job["types"] if t not in done and t in RESOURCES]
    for index, kind in enumerate(remaining):
        try:
            summary = await export_type(db, job, attempt, RESOURCES[kind], patients, settings,
                                        base_url, check)
        except errors.Forbidden:
            summary = {"count": 0, "withheld": 0, "deleted": 0}  # scope no longer covers the type
        committed = await store.commit_type(db, job["_id"], attempt, kind, summary)
        if committed is None:
            raise LeaseLost
        done[kind] = committed
        await check(f"{len(done)} of {len(job['types'])} types done"
                    + (f"; next {remaining[index + 1]}" if index + 1 < len(remaining) else ""))
    withheld = {t: int(d.get("withheld", 0)) for t, d in done.items()}
    if any(withheld.values()):
        files = ndjson.FileSeries(db, job["_id"], attempt, kind="error", line_type="OperationOutcome",
                                  source_type="OperationOutcome", per_file=settings.resources_per_file)
        await files.add(withheld_outcome(withheld))
        await files.close()
    await check("recording disclosures")
    await store.record_export_disclosures(db, job["_id"], {t: int(d["attempt"]) for t, d in done.items()})
    if not await store.complete(db, job["_id"], attempt, settings.file_ttl_seconds):
        raise LeaseLost


__all__ = ["LeaseLost", "run", "type_clauses", "withheld_outcome"]
