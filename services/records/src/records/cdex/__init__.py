"""Da Vinci CDex 2.1 data source for records: payers' data and attachment requests (`Task`),
their review by a person, the release and its disclosure, and delivery of approved attachments
with `$submit-attachment`. Wired from records/app.py like records/export: `install(app)` before
the generic routes, `start`/`stop` in the lifespan, `declare(statement)` for the
CapabilityStatement.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from records.cdex import routes, store

CDEX = "http://hl7.org/fhir/us/davinci-cdex"


def install(app: FastAPI) -> None:
    app.include_router(routes.router)


async def start(app: FastAPI) -> None:
    await store.ensure_indexes(app.state.db)


async def stop(app: FastAPI) -> None:
    return None


def declare(statement: dict[str, Any]) -> dict[str, Any]:
    """What CDex parts records supports, stated in the CapabilityStatement."""
    for rest in statement.get("rest", []):
        for resource in rest.get("resource", []):
            if resource.get("type") == "Patient":
                resource.setdefault("operation", []).append(
                    {"name": "match", "definition": "http://hl7.org/fhir/OperationDefinition/Patient-match"})
    return statement
