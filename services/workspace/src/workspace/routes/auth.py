"""Sign-in and sign-out: SMART standalone launch (the gateway's patient picker), EHR launch
(`?iss=&launch=`), the redirect back with the code, and sign-out with token revocation.

SMART App Launch 2.2 §app-launch: `state` is unguessable and bound to this browser's session;
the EHR's `iss` must be the records base this app is configured for (an app never follows an
issuer a request merely names). The vault (psychnotes) is a second grant, asked for when the
therapist first opens the private-note pane: the gateway issues one audience per token.
"""

from __future__ import annotations

import secrets
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import RedirectResponse, Response

from workspace import pages, sessions, store
from workspace.gateway_api import ApiError, Gateway, pkce_pair
from workspace.settings import WorkspaceSettings

router = APIRouter()


def _settings(request: Request) -> WorkspaceSettings:
    settings: WorkspaceSettings = request.app.state.settings
    return settings


def _local_path(value: str | None, default: str = "/patients") -> str:
    """Only a path on this app (never `//host` or a URL) is a place to return to."""
    if value and value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    return default


@router.get("/")
async def home(request: Request) -> Response:
    found = await sessions.load(request)
    if found and "records" in found[1].get("grants", {}):
        return RedirectResponse("/patients", status_code=303)
    return pages.render(request, "home.html")


async def _start(request: Request, audience: str, launch: str | None, return_to: str) -> Response:
    new_cookie: list[str] = []
    cookie, _ = await sessions.load_or_start(request, new_cookie)
    gateway: Gateway = request.app.state.gateway
    state = secrets.token_urlsafe(32)  # 256 bits, SMART: at least 122
    verifier, challenge = pkce_pair()
    pending: dict[str, Any] = {"verifier": verifier, "audience": audience, "return_to": return_to,
                               "launch": launch}
    await store.update_session(request.app.state.db, cookie, {f"pending.{state}": pending})
    response = RedirectResponse(gateway.authorize_url(audience, state, challenge, launch), status_code=303)
    if new_cookie:
        sessions.set_cookie(response, _settings(request), new_cookie[0])
    return response


@router.get("/login")
async def login(request: Request, vault: str = "", return_to: str = "") -> Response:
    if vault:
        await sessions.current(request)  # the vault needs a signed-in therapist
        return await _start(request, "psychnotes", None, _local_path(return_to))
    return await _start(request, "records", None, "/patients")


@router.get("/launch")
async def ehr_launch(request: Request, iss: str = "", launch: str = "") -> Response:
    settings = _settings(request)
    if iss.rstrip("/") != settings.records_base or not launch or len(launch) > 200:
        return pages.message(request, "Launch refused",
                             "This launch does not come from the Mindchart records server this "
                             "workspace is set up for.", status=400)
    return await _start(request, "records", launch, "/patients")


@router.get("/callback")
async def callback(request: Request, state: str = "", code: str = "", error: str = "",
                   error_description: str = "") -> Response:
    settings = _settings(request)
    found = await sessions.load(request)
    pending = found[1].get("pending", {}).get(state) if found and state else None
    if found is None or pending is None:
        return pages.message(request, "Sign-in expired",
                             "This sign-in was not started here or has expired. Start again.",
                             status=400)
    cookie, session = found
    db = request.app.state.db
    await store.unset_in_session(db, cookie, f"pending.{state}")  # single use
    if error:
        return pages.message(request, "Sign-in did not finish",
                             error_description or "The sign-in was cancelled.", status=400)
    gateway: Gateway = request.app.state.gateway
    try:
        tokens = await gateway.exchange_code(code, pending["verifier"])
        claims = await gateway.verify_id_token(str(tokens.get("id_token", "")))
    except ApiError as exc:
        return pages.message(request, "Sign-in failed", exc.message, status=400)
    fhir_user = str(claims.get("fhirUser", ""))
    practitioner = fhir_user.removeprefix(settings.records_base + "/")
    grant = {"access_token": tokens["access_token"], "refresh_token": tokens.get("refresh_token"),
             "expires_at": tokens["expires_at"], "scope": tokens.get("scope", "")}
    if pending["audience"] == "psychnotes":
        if session.get("user", {}).get("fhir_user") != practitioner:
            await gateway.revoke(tokens.get("refresh_token") or tokens["access_token"])
            return pages.message(request, "Wrong person",
                                 "The vault was opened by a different user than the one signed in "
                                 "to the workspace. Sign out and start again.", status=403)
        await store.update_session(db, cookie, {"grants.psychnotes": grant})
        return RedirectResponse(_local_path(pending["return_to"]), status_code=303)
    if not practitioner.startswith("Practitioner/"):
        await gateway.revoke(tokens.get("refresh_token") or tokens["access_token"])
        return pages.message(request, "For therapists only",
                             "The workspace is for practitioners; sign in with a practitioner "
                             "account.", status=403)
    # Sign-in: a fresh session under a fresh cookie (the pre-sign-in one is dropped).
    doc = sessions.new_session_doc(settings)
    doc.update({"user": {"fhir_user": practitioner, "username": str(claims.get("sub", ""))},
                "grants": {"records": grant}, "patient": tokens.get("patient")})
    value = secrets.token_urlsafe(32)
    await store.put_session(db, value, doc)
    await store.delete_session(db, cookie)
    target = f"/patients/{tokens['patient']}" if tokens.get("patient") else "/patients"
    response = RedirectResponse(target, status_code=303)
    sessions.set_cookie(response, settings, value)
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    found = await sessions.load(request)
    settings = _settings(request)
    if found is not None:
        cookie, session = found
        sessions.check_csrf(session, {k: str(v) for k, v in (await request.form()).items()})
        gateway: Gateway = request.app.state.gateway
        for grant in session.get("grants", {}).values():
            # Revoking the refresh token ends the grant (its access tokens too); the access token
            # is revoked as well so it is refused at once even without a refresh token.
            if grant.get("refresh_token"):
                await gateway.revoke(grant["refresh_token"])
            await gateway.revoke(grant["access_token"])
        await store.delete_session(request.app.state.db, cookie)
    response = pages.message(request, "Signed out",
                             "You are signed out of the workspace and its access to Mindchart has "
                             "been revoked.")
    sessions.clear_cookie(response, settings)
    return response
