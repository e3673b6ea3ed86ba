"""SMART Backend Services at the gateway beyond the skeleton: a client registered by JWKS URL
(the `jku` allow-list), scopes capped by registration, and replayed or foreign assertions."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest

from tests.actors import BackendClient, run_cli
from tests.conftest import RunningStack


class JwksHost:
    """A client's JWKS URL: serves whatever keys the test puts here, and counts fetches."""

    def __init__(self) -> None:
        self.jwks: dict[str, Any] = {"keys": []}
        self.fetches = 0
        host = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                host.fetches += 1
                body = json.dumps(host.jwks).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/jwks.json"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def jwks_host() -> Iterator[JwksHost]:
    host = JwksHost()
    yield host
    host.server.shutdown()


def assertion_with_jku(client: BackendClient, jku: str) -> str:
    import time

    from joserfc import jwt

    now = int(time.time())
    claims = {"iss": client.client_id, "sub": client.client_id, "aud": f"{client.gateway_url}/oauth/token",
              "exp": now + 240, "iat": now, "jti": uuid.uuid4().hex}
    return jwt.encode({"alg": "ES384", "kid": client.key.kid, "typ": "JWT", "jku": jku}, claims, client.key,
                      algorithms=["ES384"])


def test_client_registered_by_jwks_url(live: RunningStack, jwks_host: JwksHost) -> None:
    client = BackendClient(f"jku-{uuid.uuid4().hex[:6]}", live.gateway_url)
    jwks_host.jwks = client.public_jwks()
    created = run_cli(live.cli_env, "client", "create", "--id", client.client_id, "--auth", "private_key_jwt",
                      "--jwks-url", jwks_host.url, "--scope", "system/Patient.rs")
    assert created.returncode == 0, created.stderr
    before = jwks_host.fetches
    with_jku = client.token_request("system/Patient.rs", assertion=assertion_with_jku(client, jwks_host.url))
    assert with_jku.status_code == 200, with_jku.text
    without_jku = client.token_request("system/Patient.rs")  # registered URL used all the same
    assert without_jku.status_code == 200, without_jku.text
    assert jwks_host.fetches >= before + 2
    # A jku that is not the registered URL: refused without fetching it.
    elsewhere = client.token_request("system/Patient.rs",
                                     assertion=assertion_with_jku(client, "http://127.0.0.1:9/evil.json"))
    assert elsewhere.status_code in (400, 401) and elsewhere.json()["error"] == "invalid_client"
    # The key is withdrawn from the URL: refused at once (no stale cache).
    jwks_host.jwks = {"keys": []}
    withdrawn = client.token_request("system/Patient.rs")
    assert withdrawn.status_code in (400, 401) and withdrawn.json()["error"] == "invalid_client"
    jwks_host.jwks = client.public_jwks()


def test_scopes_beyond_registration_and_user_scopes_are_refused(live: RunningStack, jwks_host: JwksHost) -> None:
    client = BackendClient(f"cap-{uuid.uuid4().hex[:6]}", live.gateway_url)
    jwks_host.jwks = client.public_jwks()
    assert run_cli(live.cli_env, "client", "create", "--id", client.client_id, "--auth", "private_key_jwt",
                   "--jwks-url", jwks_host.url, "--scope", "system/Observation.rs").returncode == 0
    assert client.token_request("system/Patient.rs").json()["error"] == "invalid_scope"
    assert client.token_request("user/Observation.rs").json()["error"] == "invalid_scope"
    assert client.token_request("system/Observation.rs").json()["scope"] == "system/Observation.rs"
    assertion = client.assertion()
    assert client.token_request("system/Observation.rs", assertion=assertion).status_code == 200
    replay = client.token_request("system/Observation.rs", assertion=assertion)
    assert replay.status_code in (400, 401) and replay.json()["error"] == "invalid_client"
    wrong_type = client.token_request("system/Observation.rs", client_assertion_type="urn:example:other")
    assert wrong_type.status_code in (400, 401) and wrong_type.json()["error"] == "invalid_client"
    bad_grant = client.token_request("system/Observation.rs", grant_type="password")
    assert bad_grant.status_code == 400 and bad_grant.json()["error"] == "unsupported_grant_type"


def test_oauth_error_descriptions_stay_in_rfc6749_characters(live: RunningStack) -> None:
    """RFC 6749 §5.2: error_description MUST NOT include characters outside %x20-21 / %x23-5B /
    %x5D-7E. A repeated parameter whose name is non-ASCII, a quote, a backslash or a control
    character (found by tests/resilience/test_fuzz.py) was echoed into it as sent."""
    import re

    import httpx

    name = 'p\u00e9"\\\x1e\u2028'
    body = httpx.QueryParams([(name, "1"), (name, "2"), ("grant_type", "client_credentials")])
    response = httpx.post(f"{live.gateway_url}/oauth/token", content=str(body),
                          headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["error"] == "invalid_request"
    assert re.fullmatch(r"[\x20\x21\x23-\x5b\x5d-\x7e]+", error["error_description"]), error
    assert "repeated" in error["error_description"]
