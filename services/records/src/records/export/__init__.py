"""FHIR Bulk Data Access 2.0.0 `$export` for records (shared/STANDARDS.md §3), with
`Patient/$everything` (records/everything.py) and the records disclosure log.

Wiring, all from records/app.py: `install(app)` in create_app (settings, routes: they must come
before the generic `/{type}/{id}` routes), `await start(app)` / `await stop(app)` in the lifespan
(indexes, the slot backfill, export workers). `declare(statement)` adds the operations to the
CapabilityStatement.

Group (member lists for group export) is declared with the other types in records/resources.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI

from records import everything
from records.export import routes, slots, store
from records.export.settings import ExportSettings
from records.export.worker import Workers

BULK_DATA = "http://hl7.org/fhir/uv/bulkdata"


def install(app: FastAPI, settings: ExportSettings | None = None) -> None:
    app.state.export_settings = settings or ExportSettings()
    app.include_router(routes.router)
    app.include_router(everything.router)


async def start(app: FastAPI) -> None:
    await store.ensure_indexes(app.state.db)
    # Documents stored before export slots get theirs, once per datastore (slots.py).
    app.state.export_slots = asyncio.create_task(slots.backfill_in_background(app.state.db),
                                                 name="export-slot-backfill")
    workers = Workers(app.state.db, app.state.export_settings, app.state.settings.public_base_url)
    workers.start()
    app.state.export_workers = workers


async def stop(app: FastAPI) -> None:
    backfill: asyncio.Task[None] | None = getattr(app.state, "export_slots", None)
    if backfill is not None:
        backfill.cancel()
    workers: Workers | None = getattr(app.state, "export_workers", None)
    if workers is not None:
        await workers.stop()


def declare(statement: dict[str, Any]) -> dict[str, Any]:
    """Bulk Data 2.0 §server-capability-documentation: `instantiates` and the three operations."""
    statement.setdefault("instantiates", []).append(f"{BULK_DATA}/CapabilityStatement/bulk-data")
    for rest in statement.get("rest", []):
        rest.setdefault("operation", []).append(
            {"name": "export", "definition": f"{BULK_DATA}/OperationDefinition/export"})
        for resource in rest.get("resource", []):
            extra = {
                "Patient": [
                    {"name": "export", "definition": f"{BULK_DATA}/OperationDefinition/patient-export"},
                    {"name": "everything",
                     "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything"}],
                "Group": [
                    {"name": "export", "definition": f"{BULK_DATA}/OperationDefinition/group-export"}],
            }.get(resource.get("type"), [])
            if extra:
                resource.setdefault("operation", []).extend(extra)
    return statement


__all__ = ["ExportSettings", "declare", "install", "start", "stop"]
