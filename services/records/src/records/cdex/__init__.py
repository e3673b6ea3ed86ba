"""Da Vinci CDex 2.1 data source for records: payers' data and attachment requests (`Task`),
their review by a person, the release and its disclosure, and delivery of approved attachments
with `$submit-attachment`. Wired from records/app.py like records/export: `install(app)` before
the generic routes, `start`/`stop` in the lifespan, `declare(statement)` for the
CapabilityStatement.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from records.cdex import capability, delivery, keys, routes, store
from records.cdex.settings import CdexSettings


def install(app: FastAPI, settings: CdexSettings | None = None) -> None:
    app.state.cdex_settings = settings = settings or CdexSettings()
    records = app.state.settings
    # Loaded at startup so a production deployment without its key refuses to start.
    app.state.cdex_key = keys.load(settings.client_key_file, records.data_dir, records.is_production)
    app.include_router(routes.router)


async def start(app: FastAPI) -> None:
    await store.ensure_indexes(app.state.db)
    workers = delivery.Workers(app, app.state.cdex_settings, app.state.cdex_key,
                               routes.internal_store(app))
    workers.start()
    app.state.cdex_workers = workers


async def stop(app: FastAPI) -> None:
    workers: delivery.Workers | None = getattr(app.state, "cdex_workers", None)
    if workers is not None:
        await workers.stop()


def declare(statement: dict[str, Any], base_url: str) -> dict[str, Any]:
    """What CDex parts records supports, stated in the CapabilityStatement (cdex/capability.py)."""
    return capability.declare(statement, base_url)
