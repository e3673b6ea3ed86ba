"""The therapists' workspace: create_app(settings) builds everything; nothing runs at import.

A SMART App Launch 2.2 confidential client and backend for frontend: server-rendered pages
(Jinja2, autoescaping on) that work without JavaScript, a strict Content-Security-Policy (no
inline script or style: `static/app.js` and `static/app.css` only), and every page `no-store`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mindchart_core import service_app
from workspace import pages, sessions, store
from workspace.gateway_api import ApiError, Gateway
from workspace.routes import auth, notes, patients
from workspace.settings import WorkspaceSettings

HERE = Path(__file__).parent


def content_security_policy(settings: WorkspaceSettings) -> str:
    # form-action names the gateway too: Chromium applies it to redirects that follow a form post.
    return ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
            "connect-src 'self'; font-src 'self'; base-uri 'none'; frame-ancestors 'none'; "
            f"form-action 'self' {settings.gateway_url}")


class SecurityHeaders:
    """Pure ASGI: the same headers on every answer, static files and errors included."""

    def __init__(self, app: ASGIApp, settings: WorkspaceSettings) -> None:
        self.app = app
        self.headers = [
            (b"content-security-policy", content_security_policy(settings).encode()),
            (b"x-frame-options", b"DENY"), (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer"), (b"cache-control", b"no-store"),
            (b"cross-origin-opener-policy", b"same-origin"),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [
                    (k, v) for k, v in self.headers if k not in names]
            await send(message)

        await self.app(scope, receive, with_headers)


def create_app(settings: WorkspaceSettings | None = None) -> FastAPI:
    if settings is None:  # the process entry: a refusal is one line (service_app)
        return service_app.from_environment(WorkspaceSettings, create_app)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = service_app.datastore_client(settings, "workspace")
        app.state.mongo = client
        app.state.db = client[settings.db_name]
        await store.ensure_indexes(app.state.db)
        async with httpx.AsyncClient(timeout=30) as http:
            app.state.gateway = Gateway(settings, http)
            yield
        await client.close()

    app = service_app.create("workspace", "Mindchart workspace", settings, lifespan)
    app.state.templates = pages.environment(HERE / "templates")

    @app.exception_handler(sessions.NotSignedIn)
    async def not_signed_in(request: Request, exc: sessions.NotSignedIn) -> Response:
        return RedirectResponse("/", status_code=303)

    @app.exception_handler(sessions.CsrfRefused)
    async def csrf_refused(request: Request, exc: sessions.CsrfRefused) -> Response:
        return pages.message(request, "Form refused",
                             "This form was not sent from your workspace session (its security "
                             "token is missing or wrong). Go back, reload the page and try again.",
                             status=403)

    @app.exception_handler(pages.TooLarge)
    async def too_large(request: Request, exc: pages.TooLarge) -> Response:
        return pages.message(request, "Too much text", "This form is larger than the workspace "
                             "accepts in one save. Shorten it and try again.", status=413)

    @app.exception_handler(pages.NotFoundPage)
    async def not_found(request: Request, exc: pages.NotFoundPage) -> Response:
        return pages.message(request, "Not found", "There is no such page, or it is not yours to "
                             "open.", status=404)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return pages.message(request, "Mindchart did not accept that", exc.message,
                             status=502 if exc.status >= 500 else 400)

    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.include_router(auth.router)
    app.include_router(patients.router)
    app.include_router(notes.router)
    app.add_middleware(SecurityHeaders, settings=settings)
    return service_app.finish(app, "workspace")
