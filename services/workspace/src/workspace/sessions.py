"""Sign-in sessions, kept on the server (backend for frontend): the browser holds only an opaque,
HttpOnly, SameSite=Lax cookie; the tokens the gateway issued stay in the workspace's datastore
and never reach the page. Every form carries the session's CSRF token and every POST is refused
without it (OWASP CSRF cheat sheet: synchronizer token). The cookie is replaced at sign-in, so a
cookie planted before sign-in is worth nothing after it (session fixation).
"""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from workspace import store
from workspace.gateway_api import ApiError, Gateway
from workspace.settings import WorkspaceSettings


class NotSignedIn(Exception):
    """No valid session: the route answers with the sign-in page."""


class CsrfRefused(Exception):
    """A form arrived without this session's CSRF token."""


def cookie_name(settings: WorkspaceSettings) -> str:
    # RFC 6265bis §4.1.3.2: a __Host- cookie is Secure, host-only and Path=/.
    return "__Host-workspace" if settings.cookie_secure else "workspace_session"


def set_cookie(response: Response, settings: WorkspaceSettings, value: str) -> None:
    response.set_cookie(cookie_name(settings), value, max_age=settings.session_hours * 3600,
                        httponly=True, samesite="lax", secure=settings.cookie_secure, path="/")


def clear_cookie(response: Response, settings: WorkspaceSettings) -> None:
    response.delete_cookie(cookie_name(settings), path="/", httponly=True, samesite="lax",
                           secure=settings.cookie_secure)


def new_session_doc(settings: WorkspaceSettings) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {"created": now, "expires": now + timedelta(hours=settings.session_hours),
            "csrf": secrets.token_urlsafe(32), "pending": {}, "grants": {}}


async def load(request: Request) -> tuple[str, dict[str, Any]] | None:
    settings: WorkspaceSettings = request.app.state.settings
    value = request.cookies.get(cookie_name(settings), "")
    if not value:
        return None
    doc = await store.get_session(request.app.state.db, value)
    return (value, doc) if doc is not None else None


async def load_or_start(request: Request, response_cookie: list[str]) -> tuple[str, dict[str, Any]]:
    """The current session, or a new pre-sign-in one (its cookie value goes to response_cookie)."""
    found = await load(request)
    if found is not None:
        return found
    value = secrets.token_urlsafe(32)
    doc = new_session_doc(request.app.state.settings)
    await store.put_session(request.app.state.db, value, doc)
    response_cookie.append(value)
    return value, doc


async def current(request: Request) -> tuple[str, dict[str, Any]]:
    """The signed-in session (a records grant and a verified user), or NotSignedIn."""
    found = await load(request)
    if found is None or "records" not in found[1].get("grants", {}) or not found[1].get("user"):
        raise NotSignedIn
    return found


def check_csrf(session: dict[str, Any], form: dict[str, str]) -> None:
    # bytes: compare_digest refuses str with non-ASCII characters (TypeError, a 500 before)
    if not secrets.compare_digest(str(form.get("csrf", "")).encode(), str(session.get("csrf", "")).encode()):
        raise CsrfRefused


async def access_token(request: Request, cookie: str, session: dict[str, Any], audience: str) -> str | None:
    """A live access token for `audience`, refreshed (SMART §refresh) when it is about to expire.
    None when the session has no grant for it (or the grant has ended at the gateway)."""
    grant = session.get("grants", {}).get(audience)
    if grant is None:
        return None
    if grant["expires_at"] - 30 > time.time():
        return str(grant["access_token"])
    gateway: Gateway = request.app.state.gateway
    if not grant.get("refresh_token"):
        return None
    try:
        fresh = await gateway.refresh(grant["refresh_token"])
    except ApiError:
        await store.unset_in_session(request.app.state.db, cookie, f"grants.{audience}")
        return None
    grant = {**grant, "access_token": fresh["access_token"], "expires_at": fresh["expires_at"],
             "refresh_token": fresh.get("refresh_token", grant.get("refresh_token"))}
    session["grants"][audience] = grant
    await store.update_session(request.app.state.db, cookie, {f"grants.{audience}": grant})
    return str(grant["access_token"])
