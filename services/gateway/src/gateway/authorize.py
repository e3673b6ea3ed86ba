"""The authorization endpoint: SMART App Launch 2.2 §authorization-code (standalone and EHR launch).

Steps, each a plain form post. The flow's session is bound to the browser that started it: its id
travels only in an HttpOnly, SameSite=Strict cookie (`COOKIE`, path /oauth/authorize), and every
form carries a CSRF token of that session (hidden field `session`), compared in constant time.
A step without the cookie, or whose token is not the session's, is refused ("sign-in expired").
Signing in rotates both (a new session id and a new token): whatever id or token anyone saw
before the sign-in is dead after it. This closes session fixation (OWASP Session Management
Cheat Sheet: "renew the session ID after any privilege level change", and bind it to a cookie
with HttpOnly and SameSite): an attacker who starts a flow cannot make a victim sign in to it,
nor approve a victim's from their own browser.

Steps:
  1. `GET|POST /oauth/authorize` checks the request. An unknown client or an unregistered
     `redirect_uri` gets an error page and is never redirected to (RFC 6749 §4.1.2.1); every other
     problem is redirected to the registered URI with `error` and `state`.
  2. `POST /oauth/authorize/login`: username + password (argon2), with lockout after repeated
     failures.
  3. `POST /oauth/authorize/patient`: the patient picker, for a clinician who asked for
     `launch/patient` (or patient/ scopes) without an EHR launch; a patient user gets their own
     record.
  4. `POST /oauth/authorize/approve`: the user approves (may untick scopes) or denies; the app
     gets `?code=...&state=...` (code single-use, `authorization_code_seconds` long).
"""

from __future__ import annotations

import re
import secrets
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import httpx
import structlog
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from gateway import grants, oauth, pages, store
from gateway.settings import GatewaySettings
from mindchart_core import scopes

log = structlog.get_logger(__name__)

LOGIN = "/oauth/authorize/login"
PICK = "/oauth/authorize/patient"
APPROVE = "/oauth/authorize/approve"
PICKER_PAGE = 50  # patients the picker lists at once; beyond that it asks for a name
_CHALLENGE = re.compile(r"^[A-Za-z0-9\-_]{43}$")  # base64url(SHA-256), unpadded
_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
# argon2 verification of a fixed hash for unknown usernames, so timing does not reveal them.
_DUMMY_HASH = oauth.hash_secret("no such user, constant work")
# Expired sessions, codes, launches and revocations go once a minute, from an authorize request
# that finds the sweep due (was four deletes per session stored and one per code).
EXPIRED_SWEEP = oauth.Sweep(store.forget_expired)


def _redirect(uri: str, **params: str | None) -> RedirectResponse:
    query = urlencode({k: v for k, v in params.items() if v is not None})
    return RedirectResponse(f"{uri}{'&' if '?' in uri else '?'}{query}", status_code=303,
                            headers=pages.PAGE_HEADERS)


COOKIE = "mindchart_authorize"


def _with_cookie(request: Request, response: Response, session_id: str | None) -> Response:
    """Bind (or with None, unbind) the flow's session to this browser."""
    secure = _settings(request).issuer.startswith("https://")
    if session_id is None:
        response.delete_cookie(COOKIE, path="/oauth/authorize", secure=secure, httponly=True,
                               samesite="strict")
    else:
        response.set_cookie(COOKIE, session_id, max_age=_settings(request).authorization_session_seconds,
                            path="/oauth/authorize", secure=secure, httponly=True, samesite="strict")
    return response


def _settings(request: Request) -> GatewaySettings:
    settings: GatewaySettings = request.app.state.settings
    return settings


async def start(request: Request, params: dict[str, str]) -> Response:
    db = request.app.state.db
    settings = _settings(request)
    client = await store.get_client(db, params["client_id"]) if params.get("client_id") else None
    if client is None:
        request.state.refusal = "unknown client_id"
        return pages.error_page("Unknown app", "This app is not registered with Mindchart.")
    request.state.oauth_client_id = client["_id"]
    redirect_uri = params.get("redirect_uri", "")
    if redirect_uri not in client.get("redirect_uris", []):
        request.state.refusal = "unregistered redirect_uri"
        return pages.error_page("Invalid redirect", "The app's redirect address is not registered.")
    state = params.get("state")

    def refuse(error: str, description: str) -> Response:
        request.state.refusal = f"{error}: {description}"
        return _redirect(redirect_uri, error=error, error_description=description, state=state)

    if params.get("response_type") != "code":
        return refuse("unsupported_response_type", "response_type must be code")
    if params.get("code_challenge_method") != "S256":
        return refuse("invalid_request",
                      "PKCE with code_challenge_method=S256 is required (plain is refused)")
    challenge = params.get("code_challenge", "")
    if not _CHALLENGE.match(challenge):
        return refuse("invalid_request", "code_challenge must be a base64url SHA-256 digest")
    aud = params.get("aud") or params.get("resource")
    if not aud:
        return refuse("invalid_request", "aud (the FHIR server's base URL) is required")
    audience = audience_name(settings, aud)
    if audience is None:
        return refuse("invalid_request", "aud is not a FHIR server of this authorization server")
    if audience not in client.get("audiences", []):
        return refuse("unauthorized_client", "This app is not registered for that FHIR server")
    launch_context: dict[str, Any] = {}
    if params.get("launch"):
        launch = await store.get_launch(db, params["launch"])
        if launch is None or (launch.get("client_id") and launch["client_id"] != client["_id"]):
            return refuse("invalid_request", "The launch is unknown or has expired")
        launch_context = {"patient": launch.get("patient"), "encounter": launch.get("encounter"),
                          "launch_user": launch.get("username")}
    requested = scopes.parse(params.get("scope"))
    granted = grants.user_scope_cap(requested, client)
    if not granted.clinical:
        return refuse("invalid_scope", "None of the requested scopes is allowed for this app")
    now = datetime.now(UTC)
    session = {
        "_id": secrets.token_urlsafe(32), "csrf": secrets.token_urlsafe(32),
        "client_id": client["_id"], "redirect_uri": redirect_uri,
        "state": state, "audience": audience, "code_challenge": challenge, "scope": str(granted),
        "nonce": params.get("nonce"), "launch": launch_context, "created": now,
        "expires": now + timedelta(seconds=settings.authorization_session_seconds),
    }
    await EXPIRED_SWEEP(db)
    await store.put_session(db, session)
    return _with_cookie(request, pages.sign_in(session["csrf"], client_label(client), action=LOGIN),
                        session["_id"])


def client_label(client: dict[str, Any]) -> str:
    return str(client.get("name") or client["_id"])


def audience_name(settings: GatewaySettings, aud: str) -> str | None:
    for name in ("records", "psychnotes"):
        if aud.rstrip("/") == settings.audience_for(name):
            return name
    return None


async def _session(request: Request, form: dict[str, str]) -> dict[str, Any] | None:
    """This browser's flow (cookie) if the form's CSRF token is that flow's; else None."""
    session_id = request.cookies.get(COOKIE, "")
    token = form.get("session", "")
    if not session_id or not token:
        request.state.refusal = "authorization step without the flow's cookie or CSRF token"
        return None
    session = await store.get_session(request.app.state.db, session_id)
    # bytes: compare_digest refuses str with non-ASCII characters (TypeError, a 500 before)
    if session is None or not secrets.compare_digest(str(session.get("csrf", "")).encode(), token.encode()):
        request.state.refusal = "authorization step with a foreign or stale session"
        return None
    request.state.oauth_client_id = session["client_id"]
    return session


def _expired() -> Response:
    return pages.error_page("Sign-in expired", "This sign-in has expired or was already used.")


async def login(request: Request, form: dict[str, str]) -> Response:
    db = request.app.state.db
    settings = _settings(request)
    session = await _session(request, form)
    if session is None:
        return _expired()
    client = await store.get_client(db, session["client_id"])
    if client is None:
        return _expired()
    username = form.get("username", "")
    user = await store.get_user(db, username) if username else None
    attempt = None
    if user is not None:
        attempt = await store.claim_login_attempt(db, username, max_failures=settings.login_max_failures)
    if user is not None and attempt is None:
        until = user.get("locked_until")
        wait = (int((until - datetime.now(UTC)).total_seconds()) + 1
                if until and until > datetime.now(UTC) else settings.login_lockout_seconds)
        request.state.refusal = "account locked after repeated failed sign-ins"
        return pages.sign_in(session["csrf"], client_label(client), action=LOGIN, username=username,
                             error="Too many failed sign-ins. Try again in a few minutes.",
                             status=429, headers={"Retry-After": str(wait)})
    valid = oauth.verify_secret(user["password_hash"] if user else _DUMMY_HASH, form.get("password", ""))
    if not valid or user is None or user.get("disabled"):
        if user is not None and attempt is not None:
            await store.record_login_failure(db, username, attempt=attempt,
                                             max_failures=settings.login_max_failures,
                                             lockout_seconds=settings.login_lockout_seconds)
        request.state.refusal = "sign-in failed"
        log.info("login_failed")
        return pages.sign_in(session["csrf"], client_label(client), action=LOGIN, username=username,
                             error="The username or password is not correct.", status=401)
    await store.record_login_success(db, username)
    launch_user = session["launch"].get("launch_user")
    if launch_user and launch_user != username:
        return pages.error_page("Wrong user", "This launch was made for another user.", 403)
    changes: dict[str, Any] = {"username": username, "role": user["role"],
                               "fhir_user": user.get("fhir_user"), "supervisor": user.get("supervisor"),
                               "auth_time": int(time.time())}
    patient = session["launch"].get("patient")
    if user["role"] == "patient":
        own = (user.get("fhir_user") or "").removeprefix("Patient/")
        if patient and patient != own:
            return pages.error_page("Wrong patient", "This launch is for another patient's record.", 403)
        patient = own
    changes["patient"] = patient
    changes["need_patient_banner"] = not session["launch"]  # an EHR already shows its banner
    # Signed in: a new session id and CSRF token; the ones seen before are void from now on.
    rotated = {**session, **changes, "_id": secrets.token_urlsafe(32),
               "csrf": secrets.token_urlsafe(32)}
    if not await store.end_session(db, session["_id"]):
        return _expired()  # signed in twice at once: the other one won
    await store.put_session(db, rotated)
    return _with_cookie(request, await _next_page(request, rotated, client), rotated["_id"])


def _needs_patient(session: dict[str, Any]) -> bool:
    granted = scopes.parse(session["scope"])
    return not session.get("patient") and (
        granted.has("launch/patient") or "patient" in granted.contexts())


async def _next_page(request: Request, session: dict[str, Any], client: dict[str, Any],
                     query: str = "", error: str | None = None) -> Response:
    if _needs_patient(session):
        patients, more = await find_patients(request, session, query)
        return pages.patient_picker(session["csrf"], client_label(client), patients, action=PICK,
                                    query=query, error=error, more=more)
    words = session["scope"].split()
    user_label = session["username"] + (f" ({session['fhir_user']})" if session.get("fhir_user") else "")
    patient = f"Patient/{session['patient']}" if session.get("patient") else None
    return pages.approve(session["csrf"], client_label(client), words, action=APPROVE,
                         user_label=user_label, patient_label=patient)


async def _records_token(request: Request, session: dict[str, Any]) -> str:
    """A one-minute token with the signed-in user's own identity, so the picker lists only the
    patients this user may see (records applies its policy as for any other request)."""
    settings = _settings(request)
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": settings.issuer, "aud": settings.records_base, "sub": session["username"],
        "client_id": "mindchart-gateway", "scope": "user/Patient.rs", "iat": now, "exp": now + 60,
        "jti": uuid.uuid4().hex, "roles": [session["role"]],
    }
    if session.get("fhir_user"):
        claims["fhirUser"] = grants.absolute_fhir_user(settings, session["fhir_user"])
    return str(await request.app.state.keys.sign(claims))


async def find_patients(request: Request, session: dict[str, Any],
                        query: str) -> tuple[list[dict[str, str]], bool]:
    """The first page of patients this user may see (matching `query` by name), and whether
    there are more than that page: records orders a search without `_sort` by id, so beyond
    one page the list is arbitrary and the picker asks for a name instead."""
    settings = _settings(request)
    params = {"_count": str(PICKER_PAGE)}
    if query.strip():
        params["name"] = query.strip()
    try:
        response = await request.app.state.http.get(
            f"{settings.records_url}/fhir/Patient", params=params,
            headers={"Authorization": f"Bearer {await _records_token(request, session)}",
                     "Accept": "application/fhir+json"})
        response.raise_for_status()
        bundle = response.json()
    except (httpx.HTTPError, ValueError):
        log.warning("patient_picker_unavailable")
        return [], False
    patients = [{"id": str(e["resource"]["id"]), "label": pages.patient_label(e["resource"])}
                for e in bundle.get("entry", []) if e.get("resource", {}).get("id")]
    more = any(link.get("relation") == "next" for link in bundle.get("link", []))
    return patients, more


async def pick_patient(request: Request, form: dict[str, str]) -> Response:
    db = request.app.state.db
    session = await _session(request, form)
    if session is None or not session.get("username"):
        return _expired()
    client = await store.get_client(db, session["client_id"])
    if client is None:
        return _expired()
    if not form.get("choose"):
        return await _next_page(request, session, client, query=form.get("name", ""))
    chosen = form.get("patient", "")
    # Records decides whether this user may see the patient, as for any other read.
    if not (_ID.match(chosen) and await _patient_visible(request, session, chosen)):
        return await _next_page(request, session, client, error="Choose a patient from the list.")
    await store.update_session(db, session["_id"], {"patient": chosen})
    session["patient"] = chosen
    return await _next_page(request, session, client)


async def _patient_visible(request: Request, session: dict[str, Any], patient_id: str) -> bool:
    settings = _settings(request)
    try:
        response = await request.app.state.http.get(
            f"{settings.records_url}/fhir/Patient/{patient_id}",
            headers={"Authorization": f"Bearer {await _records_token(request, session)}",
                     "Accept": "application/fhir+json"})
    except httpx.HTTPError:
        return False
    return bool(response.status_code == 200)


async def decide(request: Request, form: dict[str, str], approved_words: list[str]) -> Response:
    db = request.app.state.db
    settings = _settings(request)
    session = await _session(request, form)
    if session is None or not session.get("username") or _needs_patient(session):
        return _expired()
    if not await store.end_session(db, session["_id"]):
        return _expired()
    redirect_uri, state = session["redirect_uri"], session.get("state")
    if form.get("decision") != "approve":
        request.state.refusal = "access_denied: the user denied the request"
        return _with_cookie(request, _redirect(
            redirect_uri, error="access_denied", error_description="The user denied access",
            state=state), None)
    offered = session["scope"].split()
    chosen = [w for w in offered if w in set(approved_words)]
    granted = scopes.parse(" ".join(chosen))
    if not granted.clinical:
        request.state.refusal = "access_denied: no data access approved"
        return _redirect(redirect_uri, error="access_denied",
                         error_description="No access to data was approved", state=state)
    launch = session["launch"]
    grant = {
        "family": uuid.uuid4().hex, "client_id": session["client_id"], "audience": session["audience"],
        "username": session["username"], "role": session["role"], "fhir_user": session.get("fhir_user"),
        "supervisor": session.get("supervisor"), "scope": str(granted), "patient": session.get("patient"),
        "encounter": launch.get("encounter") if granted.has("launch/encounter") or granted.has("launch")
        else None,
        "need_patient_banner": session.get("need_patient_banner", True),
        "ehr_launch": bool(launch),
        "nonce": session.get("nonce"), "auth_time": session.get("auth_time"),
    }
    code = secrets.token_urlsafe(32)
    now = datetime.now(UTC)
    await store.put_code(db, {
        "_id": grants.secret_hash(code), "grant": grant, "redirect_uri": redirect_uri,
        "code_challenge": session["code_challenge"], "used": False, "created": now,
        "expires": now + timedelta(seconds=settings.authorization_code_seconds)})
    log.info("authorization_code_issued", client_id=session["client_id"])
    return _with_cookie(request, _redirect(redirect_uri, code=code, state=state), None)
