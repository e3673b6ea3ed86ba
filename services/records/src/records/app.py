"""The records FHIR server: create_app(settings) builds everything; nothing runs at import."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from pymongo import AsyncMongoClient

from mindchart_core import asgi, errors, health, logs, metrics, tokens
from records import export, routes, store
from records.settings import RecordsSettings


def create_app(settings: RecordsSettings | None = None) -> FastAPI:
    settings = settings or RecordsSettings()
    logs.configure("records", settings.log_level)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            settings.mongo_url, tz_aware=True, serverSelectionTimeoutMS=5000,
            event_listeners=[metrics.CommandTimer("records")],
        )
        app.state.mongo = client
        app.state.db = client[settings.db_name]
        await store.ensure_indexes(app.state.db)
        await export.start(app)
        yield
        await export.stop(app)
        await client.close()

    app = FastAPI(title="Mindchart records", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.settings = settings
    app.state.verifier = tokens.TokenVerifier(
        issuer=settings.issuer, audience=settings.public_base_url,
        keys=tokens.RemoteJwks(settings.jwks_url),
    )

    async def ready() -> bool:
        await app.state.mongo.admin.command("ping")
        return True

    errors.install_error_handlers(app)
    app.include_router(health.health_router(ready))
    export.install(app)  # before routes.router: its /{type}/{id} would match $export URLs
    app.include_router(routes.router)
    app.add_middleware(asgi.RequestContextMiddleware, service="records")
    return app
