"""The gateway: authorization server, single public entry point, audit point."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, Request
from pymongo.errors import PyMongoError
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from gateway import (
    audit,
    bodylimit,
    chain,
    checkpoints,
    cors,
    forwarded,
    front,
    keys,
    proxy,
    ratelimit,
    refusals,
    revocations,
    routes,
    store,
)
from gateway.keys import Keyring
from gateway.settings import GatewaySettings
from mindchart_core import errors, http_limits, service_app, tokens, tracing


async def _datastore_failure(request: Request, exc: Exception) -> Response:
    """The gateway datastore failing: 503 + Retry-After as RFC 6749 JSON on /oauth (§5.2 gives
    errors a JSON body; `temporarily_unavailable` is §4.1.2.1's code for exactly this), as an
    OperationOutcome everywhere else (mindchart_core.errors)."""
    assert isinstance(exc, PyMongoError)
    refusal = errors.datastore_refusal(exc)
    if refusal is None or not request.url.path.startswith("/oauth"):
        return await errors.datastore_failure(request, exc)
    return JSONResponse({"error": "temporarily_unavailable", "error_description": refusal.diagnostics},
                        status_code=503, headers={"Retry-After": str(errors.RETRY_AFTER_SECONDS),
                                                  "Cache-Control": "no-store"})


class GatewayApp(FastAPI):
    """The gateway's FastAPI app, with FHIR requests sent straight to `front.FhirFront` (which does
    for them what the middleware stack below does for every other request)."""

    fhir_front: front.FhirFront | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        fhir_front = self.fhir_front
        if fhir_front is not None:
            endpoint = fhir_front.endpoint_for(scope)
            if endpoint is not None:
                scope["app"] = self
                await fhir_front(endpoint, scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    if settings is None:  # the process entry: a refusal is one line (service_app)
        return service_app.from_environment(GatewaySettings, create_app)
    # Every key file is read before the app exists, and before any datastore is touched: a
    # missing or malformed one is a KeyConfigError naming its setting and path (one line from
    # `create_app()`, service_app.from_environment).
    settings.refuse_unsafe_production()  # every missing production setting at once, first
    keks = keys.load_keks(settings)
    pem = keys.signing_pem(settings)
    audit_chain_key = settings.audit_chain_key()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        client = service_app.datastore_client(settings, "gateway")
        app.state.mongo = client
        app.state.db = client[settings.db_name]
        await store.ensure_indexes(app.state.db)
        app.state.audit_chain = chain.AuditChain(
            app.state.db, audit_chain_key,
            lease_seconds=settings.audit_partition_lease_seconds)
        await app.state.audit_chain.start()
        # Every stored signing key opens with the current or a previous KEK, or the gateway
        # refuses to start (keys.KeyConfigError, said in one line by
        # mindchart_core.asgi.StartupRefusalMiddleware); what a previous KEK sealed is sealed
        # again under the current one (keys.reseal).
        app.state.keys = Keyring(app.state.db, keks)
        await app.state.keys.ensure_key(pem)
        app.state.verifiers = {
            name: tokens.TokenVerifier(
                issuer=settings.issuer, audience=settings.audience_for(name), keys=app.state.keys
            )
            for name in ("records", "psychnotes")
        }
        app.state.verified_tokens = {
            name: proxy.VerifiedTokens(verifier) for name, verifier in app.state.verifiers.items()}
        app.state.registrations = proxy.Registrations(app.state.db)
        app.state.revocations = revocations.RevocationList(
            app.state.db, refresh_seconds=settings.revocation_refresh_seconds,
            reader_secret=tokens.feed_secret(settings.revocations_secret, data_dir=settings.data_dir,
                                             production=settings.is_production))
        await app.state.revocations.refresh()
        app.state.rate_limiter = ratelimit.RateLimiter(
            window_seconds=settings.rate_limit_window_seconds,
            sync_seconds=settings.rate_limit_sync_seconds)
        tasks = [asyncio.create_task(app.state.revocations.run()),
                 asyncio.create_task(app.state.audit_chain.run()),
                 asyncio.create_task(checkpoints.run(
                     app.state.db, app.state.keys, settings.issuer, settings.audit_checkpoint_seconds))]
        if settings.rate_limit_sync_seconds > 0:
            tasks.append(asyncio.create_task(app.state.rate_limiter.run(app.state.db)))
        app.state.http = httpx.AsyncClient(
            timeout=settings.upstream_timeout_seconds, follow_redirects=False,
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
        )
        app.state.upstream = proxy.Upstream(settings.upstream_timeout_seconds)
        # Requests refused before they parse never reach AuditMiddleware: the HTTP protocol hands
        # them to this listener through the lifespan state (mindchart_core.http_limits).
        refused = refusals.RefusalAudit(app.state.audit_chain, settings.issuer,
                                        per_window=settings.refusal_audit_per_window,
                                        window_seconds=settings.refusal_audit_window_seconds)
        tasks.append(asyncio.create_task(refused.run()))
        yield {http_limits.REFUSALS_STATE_KEY: refused}
        await app.state.upstream.close()
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await app.state.http.aclose()
        with contextlib.suppress(Exception):
            await refused.close()
        with contextlib.suppress(Exception):  # the next replica takes the partition over at once
            await app.state.audit_chain.stop()
        await client.close()

    app = service_app.create("gateway", "Mindchart gateway", settings, lifespan, GatewayApp)
    assert isinstance(app, GatewayApp)
    app.add_exception_handler(PyMongoError, _datastore_failure)
    app.include_router(routes.router)
    # Innermost: FHIR requests skip the router (proxy.FhirDispatch); every layer below wraps them.
    app.add_middleware(proxy.FhirDispatch, routed=routes.FHIR_BASE_ROUTES,
                       datastore_failure=_datastore_failure)
    # Starlette: the last middleware added is the outermost. Request context must wrap audit,
    # and audit wraps CORS so that preflight requests are audited too.
    app.add_middleware(cors.CorsMiddleware)
    app.add_middleware(bodylimit.BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(audit.AuditMiddleware, observer=settings.issuer)
    # Outside audit and rate limiting: both see the address forwarded.py vouches for.
    trusted = forwarded.parse_networks(settings.trusted_proxies)
    app.add_middleware(forwarded.ForwardedForMiddleware, trusted=trusted)
    if not tracing.enabled():  # with tracing on, every request goes through the span's layer
        app.fhir_front = front.FhirFront(
            service="gateway", observer=settings.issuer, max_body_bytes=settings.max_body_bytes,
            trusted=trusted, routed=routes.FHIR_BASE_ROUTES, datastore_failure=_datastore_failure)
    return service_app.finish(app, "gateway")
