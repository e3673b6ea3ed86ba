"""The records FHIR server: create_app(settings) builds everything; nothing runs at import."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from mindchart_core import service_app, tokens
from records import cdex, export, routes, store, subscriptions
from records.amendments import routes as amendments
from records.amendments import service as amendments_service
from records.amendments import store as marker
from records.lifecycle import routes as lifecycle
from records.meta import routes as meta
from records.settings import RecordsSettings


def create_app(settings: RecordsSettings | None = None) -> FastAPI:
    if settings is None:  # the process entry: a refusal is one line (service_app)
        return service_app.from_environment(RecordsSettings, create_app)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = service_app.datastore_client(settings, "records")
        app.state.mongo = client
        app.state.db = client[settings.db_name]
        await store.ensure_indexes(app.state.db)
        # Notes stored before the amendment marker get one, once per datastore (amendments/store.py).
        marking = asyncio.create_task(marker.backfill_in_background(amendments_service.internal_store_of(
            client, app.state.db, settings.public_base_url)), name="amendment-marker-backfill")
        revocation_task = await revocations.start()  # backends refuse revoked tokens too
        await export.start(app)
        await cdex.start(app)
        await subscriptions.start(app)
        yield
        revocation_task.cancel()
        marking.cancel()
        await subscriptions.stop(app)
        await cdex.stop(app)
        await export.stop(app)
        await client.close()

    revocations = tokens.RevocationFeed(
        settings.revocations_url, refresh_seconds=settings.revocation_refresh_seconds,
        secret=tokens.feed_secret(settings.revocations_secret, data_dir=settings.data_dir,
                                  production=settings.is_production))
    app = service_app.create("records", "Mindchart records", settings, lifespan)
    app.state.verifier = tokens.TokenVerifier(
        issuer=settings.issuer, audience=settings.public_base_url,
        keys=tokens.RemoteJwks(settings.jwks_url),
        revocations=revocations,
    )

    export.install(app)  # before routes.router: its /{type}/{id} would match $export URLs
    cdex.install(app)  # likewise: Task writes and the review operations
    lifecycle.install(app)  # $sign, $verify-signature, signing JWKS (same reason)
    app.include_router(amendments.router)  # Task/{id}/$deny ... (same reason)
    app.include_router(meta.router)  # $meta, $meta-add, $meta-delete (same reason)
    subscriptions.install(app)  # before routes.router too: Subscription and Basic are its own
    app.include_router(routes.router)
    return service_app.finish(app, "records")
