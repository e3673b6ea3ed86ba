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
                     roles: tuple[str, ...] = ()) -> dict[str, Any]:
    folder = tmp or Path(env["MINDCHART_DATA_DIR"])
    jwks_file = folder / f"{client.client_id}.jwks.json"
    jwks_file.write_text(json.dumps(client.public_jwks()))
    args = ["client", "create", "--id", client.client_id, "--auth", "private_key_jwt",
            "--jwks", str(jwks_file), "--scope", scope]
    for audience in audiences:
        args += ["--audience", audience]
    for role in roles:
        args += ["--role", role]
    result = run_cli(env, *args)
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


def mint_token(live: Any, *, audience: str | None = None, **claims: Any) -> str:
    """An access token signed with the gateway's real current key (read from its datastore).

    Stands in for what the gateway issues to a signed-in user (fhirUser, patient context) in tests
    that exercise a backend, not the sign-in itself; the SMART launch has its own tests.
    """
    from joserfc.jwk import RSAKey

    doc = live.db("gateway").signing_keys.find_one(sort=[("created", -1)])
    key = RSAKey.import_key(doc["jwk"])
    now = int(time.time())
    body = {"iss": live.gateway_url, "aud": audience or live.fhir, "sub": "test-writer",
            "client_id": "test-writer", "scope": "system/*.rs", "iat": now, "exp": now + 300,
            "jti": uuid.uuid4().hex, **claims}
    return jwt.encode({"alg": "RS256", "kid": key.kid, "typ": "JWT"}, body, key)


# Strings that must never appear in any service log (note text, secrets, passwords). Tests register
# what they send with `sensitive(...)`; tests/e2e/test_zz_observability.py greps the logs for them
# after every other end-to-end test has run.
SENSITIVE_MARKERS: set[str] = set()


def sensitive(text: str) -> str:
    SENSITIVE_MARKERS.add(text)
    return text
