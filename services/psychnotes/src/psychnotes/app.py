"""The psychnotes vault: create_app(settings) builds everything; nothing runs at import.

Key material is loaded before the app exists (keys.py): a production process without its KEK or
consent-token signing key refuses to start.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from mindchart_core import service_app, tokens
from psychnotes import audit_log, careteam, gate_cache, keys, routes, store
from psychnotes.capability import routes as capability_routes
from psychnotes.lifecycle import keys as lifecycle_keys
from psychnotes.lifecycle import routes as lifecycle_routes
from psychnotes.settings import PsychnotesSettings


def create_app(settings: PsychnotesSettings | None = None) -> FastAPI:
    if settings is None:  # the process entry: a refusal is one line (service_app)
        return service_app.from_environment(PsychnotesSettings, create_app)
    settings.refuse_unsafe_production()  # before touching key files (service_app checks again)
    keyring = keys.load_keyring(settings)
    signing_key = keys.load_signing_key(settings)
    care_teams = careteam.CareTeams(settings, keys.load_records_client_key(settings))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = service_app.datastore_client(settings, "psychnotes")
        app.state.mongo = client
        app.state.db = client[settings.db_name]
        await store.ensure_indexes(app.state.db)
        # A KEK that wraps none of the stored data keys refuses start-up in one line
        # (mindchart_core.asgi.StartupRefusalMiddleware), not at the first read.
        await keys.check_vault_opens(app.state.db, keyring)
        app.state.audit_log = audit_log.AuditLog(app.state.db)
        revocation_task = await revocations.start()  # backends refuse revoked tokens too
        yield
        revocation_task.cancel()
        await care_teams.close()
        await client.close()

    revocations = tokens.RevocationFeed(
        settings.revocations_url, refresh_seconds=settings.revocation_refresh_seconds,
        secret=tokens.feed_secret(settings.revocations_secret, data_dir=settings.data_dir,
                                  production=settings.is_production))
    app = service_app.create("psychnotes", "Mindchart psychnotes", settings, lifespan)
    app.state.keyring = keyring
    app.state.signing_key = signing_key
    app.state.document_keys = lifecycle_keys.load(settings)
    app.state.care_teams = care_teams
    app.state.consent_tokens = gate_cache.VerifiedConsentTokens()
    app.state.bases = gate_cache.Bases(settings.gate_cache_seconds)
    app.state.verifier = tokens.TokenVerifier(
        issuer=settings.issuer, audience=settings.public_base_url,
        keys=tokens.RemoteJwks(settings.jwks_url),
        revocations=revocations,
    )

    for router in ROUTERS:
        app.include_router(router)
    capability_routes.install(app, settings, ROUTERS)  # /metadata from exactly these routes
    return service_app.finish(app, "psychnotes")


# Every route psychnotes serves, in match order: the public conformance documents and the
# lifecycle before routes.router, whose catch-all would otherwise answer their URLs.
ROUTERS = (capability_routes.router, lifecycle_routes.router, routes.router)
