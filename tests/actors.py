"""The parties tests act as: SMART backend clients that sign their own assertions, and the admin
who registers them with the real `mindchart` CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from joserfc import jwt
from joserfc.jwk import ECKey

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


@dataclass
class BackendClient:
    """A SMART Backend Services client with an ES384 key pair of its own."""

    client_id: str
    gateway_url: str
    key: ECKey = field(default_factory=lambda: ECKey.generate_key(
        "P-384", parameters={"kid": uuid.uuid4().hex[:8], "alg": "ES384"}))

    def public_jwks(self) -> dict[str, Any]:
        return {"keys": [self.key.as_dict(private=False)]}

    def assertion(self, **overrides: Any) -> str:
        now = int(time.time())
        claims = {"iss": self.client_id, "sub": self.client_id,
                  "aud": f"{self.gateway_url}/oauth/token", "exp": now + 240, "iat": now,
                  "jti": uuid.uuid4().hex}
        claims.update(overrides)
        return jwt.encode({"alg": "ES384", "kid": self.key.kid, "typ": "JWT"}, claims, self.key,
                          algorithms=["ES384"])

    def token_request(self, scope: str, *, assertion: str | None = None, **extra: str) -> httpx.Response:
        form = {"grant_type": "client_credentials", "scope": scope,
                "client_assertion_type": JWT_BEARER,
                "client_assertion": assertion or self.assertion(), **extra}
        return httpx.post(f"{self.gateway_url}/oauth/token", data=form, timeout=30)

    def token(self, scope: str, **extra: str) -> str:
        response = self.token_request(scope, **extra)
        assert response.status_code == 200, response.text
        return str(response.json()["access_token"])


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The real `mindchart` console script, against the test stack's datastores."""
    exe = Path(sys.executable).parent / "mindchart"
    return subprocess.run(
        [str(exe), *args], env={**os.environ, **env}, capture_output=True, text=True,
        timeout=120, check=False,
    )


def register_backend(env: dict[str, str], client: BackendClient, scope: str,
                     audiences: tuple[str, ...] = ("records",), tmp: Path | None = None,
                     roles: tuple[str, ...] = (), extra: tuple[str, ...] = ()) -> dict[str, Any]:
    folder = tmp or Path(env["MINDCHART_DATA_DIR"])
    jwks_file = folder / f"{client.client_id}.jwks.json"
    jwks_file.write_text(json.dumps(client.public_jwks()))
    args = ["client", "create", "--id", client.client_id, "--auth", "private_key_jwt",
            "--jwks", str(jwks_file), "--scope", scope]
    for audience in audiences:
        args += ["--audience", audience]
    for role in roles:
        args += ["--role", role]
    result = run_cli(env, *args, *extra)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


class BackendAuth(httpx.Auth):
    """Bearer auth that fetches a fresh backend token before the old one (5 min) runs out."""

    def __init__(self, client: BackendClient, scope: str, **extra: str) -> None:
        self.client, self.scope, self.extra = client, scope, extra
        self._token, self._fetched = "", 0.0

    def auth_flow(self, request: httpx.Request):  # type: ignore[no-untyped-def]
        if time.monotonic() - self._fetched > 200:
            self._token, self._fetched = self.client.token(self.scope, **self.extra), time.monotonic()
        request.headers["Authorization"] = f"Bearer {self._token}"
        yield request


def gateway_kek(live: Any) -> bytes:
    """The development KEK the stack's gateway generated (gateway/keys.py): what an insider with
    the secret mount holds, and what tests need to sign as the gateway."""
    from gateway import keys
    from mindchart_core import keyfiles

    return keyfiles.read_kek(live.config.data_dir / "keys" / keys.DEV_KEK_NAME)


def gateway_signing_key(db: Any, kek: bytes) -> Any:
    """The gateway's newest signing key, opened from its sealed form in the datastore."""
    from joserfc.jwk import RSAKey

    from gateway import keys

    return RSAKey.import_key(keys.open_private_jwk(kek, db.signing_keys.find_one(sort=[("created", -1)])))


def mint_token(live: Any, *, audience: str | None = None, **claims: Any) -> str:
    """An access token signed with the gateway's real current key (read from its datastore).

    Stands in for what the gateway issues to a signed-in user (fhirUser, patient context) in tests
    that exercise a backend, not the sign-in itself; the SMART launch has its own tests.
    """
    key = gateway_signing_key(live.db("gateway"), gateway_kek(live))
    now = int(time.time())
    body = {"iss": live.gateway_url, "aud": audience or live.fhir, "sub": "test-writer",
            "client_id": "test-writer", "scope": "system/*.rs", "iat": now, "exp": now + 300,
            "jti": uuid.uuid4().hex, **claims}
    return jwt.encode({"alg": "RS256", "kid": key.kid, "typ": "JWT"}, body, key)


_AUDITORS: set[tuple[str, str]] = set()


def auditor_token(live: Any, client_id: str = "privacy-office") -> str:
    """A token of a backend registered with `system/AuditEvent.rs` and the compliance role: the
    audit routes read the caller's registration on every request, a scope string is not enough."""
    import secrets

    if (live.gateway_url, client_id) not in _AUDITORS:
        result = run_cli(live.cli_env, "client", "create", "--id", client_id, "--auth",
                         "client_secret", "--secret", secrets.token_urlsafe(24), "--scope",
                         "system/AuditEvent.rs", "--role", "compliance")
        assert result.returncode == 0, result.stderr
        _AUDITORS.add((live.gateway_url, client_id))
    return mint_token(live, scope="system/AuditEvent.rs", sub=client_id, client_id=client_id)


# Strings that must never appear in any service log (note text, secrets, passwords). Tests register
# what they send with `sensitive(...)`; tests/e2e/test_zz_observability.py greps the logs for them
# after every other end-to-end test has run.
SENSITIVE_MARKERS: set[str] = set()


def sensitive(text: str) -> str:
    SENSITIVE_MARKERS.add(text)
    return text


# -- records: FHIR clients whose every answer is checked against the official R4 JSON schema --------

def schema_checked_response(response: httpx.Response) -> None:
    """httpx response hook: every FHIR JSON body must validate against HL7's R4 JSON schema."""
    from tests.fhir_schema import assert_valid

    if response.headers.get("content-type", "").startswith("application/fhir+json"):
        response.read()
        if response.content:
            assert_valid(response.json())


def records_client(live: Any, *, token: str | None = None, auth: httpx.Auth | None = None,
                   direct: bool = False) -> httpx.Client:
    """An httpx client for records (through the gateway unless `direct`), schema-checking answers."""
    base = f"{live.direct_url('records')}/fhir" if direct else live.fhir
    headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.Client(base_url=base, timeout=30, auth=auth, headers=headers,
                        event_hooks={"response": [schema_checked_response]})


# -- SMART App Launch (authorization code + PKCE) over plain HTTP --------------------------------
# The gateway's sign-in, patient-picker and approval pages are plain HTML forms, so a test can
# walk them with form posts. `smart_login` returns the token response a real app would get.

APP_REDIRECT = "https://app.example/callback"
JS_DIR = Path(__file__).resolve().parent / "js"


def js_modules(package: str) -> Path:
    """An npm package of tests/js (fhir-kit-client, fhirclient), installed from its lock file on
    first use with `npm ci`; skips where node/npm are missing or the registry cannot be reached."""
    import shutil

    import pytest

    wanted = JS_DIR / "node_modules" / package
    if wanted.exists():
        return wanted
    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        pytest.skip("node/npm are not installed")
    installed = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=JS_DIR, capture_output=True,
                               text=True, timeout=300, check=False)
    if installed.returncode != 0 or not wanted.exists():
        pytest.skip(f"npm ci failed (registry unreachable?): {installed.stderr[-300:]}")
    return wanted


def pkce_pair() -> tuple[str, str]:
    """(code_verifier, S256 code_challenge) per RFC 7636 §4.1-4.2."""
    import base64
    import hashlib
    import secrets

    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def register_app(env: dict[str, str], client_id: str, scope: str, *,
                 redirect_uris: tuple[str, ...] = (APP_REDIRECT,), secret: str | None = None,
                 audiences: tuple[str, ...] = ("records",)) -> dict[str, Any]:
    """A SMART app: public (PKCE only) unless a secret is given (confidential symmetric)."""
    args = ["client", "create", "--id", client_id, "--scope", scope,
            "--auth", "client_secret" if secret else "none"]
    if secret:
        args += ["--secret", secret]
    for uri in redirect_uris:
        args += ["--redirect-uri", uri]
    for audience in audiences:
        args += ["--audience", audience]
    result = run_cli(env, *args)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def create_user(env: dict[str, str], username: str, password: str, role: str,
                fhir_user: str | None = None) -> None:
    args = ["user", "create", "--username", username, "--password", password, "--role", role]
    if fhir_user:
        args += ["--fhir-user", fhir_user]
    result = run_cli(env, *args)
    assert result.returncode == 0, result.stderr


def _hidden(html: str, name: str) -> str:
    import re

    match = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert match, f"no {name} field in page: {html[:500]}"
    return match.group(1)


@dataclass
class AuthorizationResult:
    """Where the gateway sent the browser after the approval page, plus what the app kept."""

    location: str
    verifier: str
    redirect_uri: str
    state: str

    @property
    def params(self) -> dict[str, str]:
        from urllib.parse import parse_qsl, urlsplit

        return dict(parse_qsl(urlsplit(self.location).query))

    @property
    def code(self) -> str:
        return self.params["code"]


def smart_authorize(gateway_url: str, *, client_id: str, username: str, password: str, scope: str,
                    aud: str, redirect_uri: str = APP_REDIRECT, patient: str | None = None,
                    launch: str | None = None, approve: list[str] | None = None,
                    decision: str = "approve") -> AuthorizationResult:
    """Authorize request → sign in → (patient picker) → approve; returns the redirect."""
    import re
    import secrets

    verifier, challenge = pkce_pair()
    state = secrets.token_urlsafe(16)
    params = {"response_type": "code", "client_id": client_id, "redirect_uri": redirect_uri,
              "scope": scope, "state": state, "aud": aud, "code_challenge": challenge,
              "code_challenge_method": "S256"}
    if launch:
        params["launch"] = launch
    with httpx.Client(base_url=gateway_url, timeout=30, follow_redirects=False) as http:
        page = http.get("/oauth/authorize", params=params)
        assert page.status_code == 200, page.text
        session = _hidden(page.text, "session")
        page = http.post("/oauth/authorize/login", data={"session": session, "username": username,
                                                         "password": password})
        assert page.status_code == 200, page.text
        if 'action="/oauth/authorize/patient"' in page.text:
            choice = patient or re.findall(r'name="patient" id="[^"]+" value="([^"]+)"', page.text)[0]
            page = http.post("/oauth/authorize/patient",
                             data={"session": _hidden(page.text, "session"), "choose": "1",
                                   "patient": choice})
            assert page.status_code == 200, page.text
        offered = re.findall(r'name="scope" id="[^"]+" value="([^"]+)"', page.text)
        chosen = offered if approve is None else [w for w in offered if w in approve]
        # Each page carries the flow's current CSRF token (renewed at sign-in); the session id
        # itself travels only in the cookie this client keeps.
        done = http.post("/oauth/authorize/approve",
                         data={"session": _hidden(page.text, "session"), "decision": decision,
                               "scope": chosen})
        assert done.status_code == 303, done.text
        return AuthorizationResult(done.headers["location"], verifier, redirect_uri, state)


def exchange_code(gateway_url: str, result: AuthorizationResult, client_id: str,
                  secret: str | None = None, **overrides: str) -> httpx.Response:
    form = {"grant_type": "authorization_code", "code": result.code, "redirect_uri": result.redirect_uri,
            "code_verifier": result.verifier}
    auth = None
    if secret:
        auth = (client_id, secret)
    else:
        form["client_id"] = client_id
    form.update(overrides)
    return httpx.post(f"{gateway_url}/oauth/token", data=form, auth=auth, timeout=30)


def smart_login(gateway_url: str, *, client_id: str, username: str, password: str, scope: str,
                aud: str, redirect_uri: str = APP_REDIRECT, patient: str | None = None,
                launch: str | None = None, secret: str | None = None) -> dict[str, Any]:
    """The whole SMART authorization-code + PKCE flow; returns the token response (JSON).

    Register the app with `register_app` and the user with `create_user` first.
    """
    result = smart_authorize(gateway_url, client_id=client_id, username=username, password=password,
                             scope=scope, aud=aud, redirect_uri=redirect_uri, patient=patient,
                             launch=launch)
    assert result.params.get("state") == result.state
    response = exchange_code(gateway_url, result, client_id, secret)
    assert response.status_code == 200, response.text
    return dict(response.json())
