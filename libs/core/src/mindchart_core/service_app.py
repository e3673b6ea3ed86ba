"""The shell every Mindchart service shares, so all three behave alike: structured logs, refusal to
start unsafe in production, OperationOutcome errors, /healthz /readyz /metrics, optional tracing,
and the request context (request id, access log, HTTP metrics) as the outermost layer.

    app = service_app.create("records", "Mindchart records", settings, lifespan)
    ...routers and service-specific middleware...
    return service_app.finish(app, "records")
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar

from fastapi import FastAPI
from pymongo import AsyncMongoClient

from mindchart_core import asgi, errors, health, http_limits, logs, metrics, tracing
from mindchart_core.keyfiles import KeyFileError
from mindchart_core.settings import ServiceSettings, UnsafeConfiguration

# A lifespan may yield ASGI lifespan state (a mapping uvicorn hands to every connection and
# Starlette copies into every request's state), e.g. the gateway's http_limits refusal listener.
Lifespan = (Callable[[FastAPI], AbstractAsyncContextManager[None]]
            | Callable[[FastAPI], AbstractAsyncContextManager[Mapping[str, Any]]])
S = TypeVar("S", bound=ServiceSettings)


def from_environment(settings_class: Callable[[], S], build: Callable[[S], FastAPI]) -> FastAPI:
    """What a service's `create_app()` does when called without settings, as `uvicorn --factory
    <service>.app:create_app` (the images, `mindchart run`, the tests' processes) calls it: the
    settings from the environment, and a configuration refusal (a key file missing, unreadable
    or malformed, an unsafe production setting) ends the process with that one line on stderr
    and exit status 1, never a traceback. uvicorn lets any exception of an app factory but a
    TypeError escape as a traceback; SystemExit is the one way out it leaves alone. Called with
    settings (in-process, the tests), create_app raises the KeyFileError itself.
    Refusals during start-up proper (the lifespan: a KEK that opens no stored key) are said the
    same way by asgi.StartupRefusalMiddleware."""
    try:
        return build(settings_class())
    except (KeyFileError, UnsafeConfiguration) as exc:
        raise SystemExit(asgi.refusal(exc)) from None


def create(service: str, title: str, settings: ServiceSettings, lifespan: Lifespan,
           app_class: type[FastAPI] = FastAPI) -> FastAPI:
    logs.configure(service, settings.log_level)
    settings.refuse_unsafe_production()
    # No trailing-slash redirects: behind the gateway (which does not forward Host) Starlette's 307
    # pointed at the backend's own address, sending clients and their tokens past the gateway. A
    # path that does not match is a 404 OperationOutcome like any other.
    app = app_class(title=title, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  redirect_slashes=False)
    app.state.settings = settings

    async def ready() -> bool:
        """Ready while the service's datastore answers (the lifespan sets app.state.mongo)."""
        await app.state.mongo.admin.command("ping")
        return True

    errors.install_error_handlers(app)
    app.include_router(health.health_router(ready))
    return app


def datastore_client(settings: ServiceSettings, service: str) -> AsyncMongoClient[dict[str, Any]]:
    """The service's MongoDB client, configured alike everywhere: UTC-aware dates, command timing
    for /metrics, and every wait on the datastore bounded by `mongo_timeout_seconds`: server
    selection, connecting, each socket read (one command or one cursor batch, so a long export
    is not cut off) and waiting for a pooled connection. A frozen or unreachable datastore turns
    into a 503 (errors.py) instead of a request that hangs as long as the datastore does; not
    within one timeout, though: a read or write that fails on a network error (a socket timeout
    is one) is retried once (retryable reads, https://www.mongodb.com/docs/manual/core/retryable-reads/,
    and writes), after a new connection's handshake, so a frozen datastore is reported after about
    3x the timeout (measured, PyMongo 4.20: 2.5 s set, 7.6 s; 2.5 s with retryReads off). The
    retry is kept (it rides over a dropped pooled connection); `timeoutMS` would bound the whole
    operation but, by default, also a non-tailable cursor's whole life (the client-side operations
    timeout specification's timeoutMode default, cursorLifetime, as drivers document it, e.g.
    https://mongodb.github.io/node-mongodb-native/7.0/variables/CursorTimeoutMode-1.html),
    cutting off a long export.
    Pooled connections idle longer than `mongo_max_idle_seconds` are closed before reuse
    (maxIdleTimeMS, PyMongo's pool options), before the datastore's own idle cut-off can leave a
    dead one in the pool (settings.py says why).
    It opens no connection until first used; every query stays in the service's own store."""
    timeout_ms = max(1, int(settings.mongo_timeout_seconds * 1000))
    return AsyncMongoClient(settings.mongo_url, tz_aware=True, serverSelectionTimeoutMS=timeout_ms,
                            connectTimeoutMS=timeout_ms, socketTimeoutMS=timeout_ms,
                            waitQueueTimeoutMS=timeout_ms,
                            maxIdleTimeMS=max(1, int(settings.mongo_max_idle_seconds * 1000)),
                            event_listeners=[metrics.CommandTimer(service)])


def finish(app: FastAPI, service: str) -> FastAPI:
    """Add the outermost layers last (Starlette: the last middleware added runs first)."""
    tracing.instrument(app, service)
    app.add_middleware(http_limits.BodyDeadlineMiddleware)
    app.add_middleware(asgi.RequestContextMiddleware, service=service)
    app.add_middleware(asgi.StartupRefusalMiddleware)
    return app


__all__ = ["Lifespan", "create", "finish", "from_environment"]
