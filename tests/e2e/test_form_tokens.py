"""A CSRF token with characters outside ASCII is a refused form, not a 500.

`secrets.compare_digest` raises TypeError for str arguments with non-ASCII characters (Python
docs, hmac.compare_digest: "a and b must both be of the same type: either str (ASCII only ...)
or any bytes-like object"). Found by tests/resilience/test_fuzz.py on the workspace's
POST /logout; the gateway's sign-in pages compared their flow token the same way.
"""

from __future__ import annotations

import httpx

from tests.actors import APP_REDIRECT, pkce_pair, register_app
from tests.conftest import RunningStack

FOREIGN = "\u00e9t\u00e9-\U0001f512"


def test_gateway_sign_in_with_a_non_ascii_flow_token_is_refused(live: RunningStack) -> None:
    register_app(live.cli_env, "form-token-app", "openid fhirUser launch/patient patient/*.rs")
    _, challenge = pkce_pair()
    with httpx.Client(base_url=live.gateway_url, timeout=30) as browser:
        start = browser.get("/oauth/authorize", params={
            "response_type": "code", "client_id": "form-token-app", "redirect_uri": APP_REDIRECT,
            "scope": "openid fhirUser launch/patient patient/*.rs", "state": "s" * 24, "aud": live.fhir,
            "code_challenge": challenge, "code_challenge_method": "S256"})
        assert start.status_code == 200, start.text
        assert browser.cookies, "the authorize page starts a flow with a cookie"
        response = browser.post("/oauth/authorize/login", data={
            "session": FOREIGN, "username": "nobody", "password": "x"})
    assert 400 <= response.status_code < 500, response.text
    assert "Traceback" not in response.text


def test_workspace_form_with_a_non_ascii_csrf_token_is_refused(live: RunningStack) -> None:
    with httpx.Client(base_url=live.config.workspace_url, timeout=30) as browser:
        start = browser.get("/login")
        assert start.status_code in (302, 303, 307), start.text
        assert browser.cookies, "starting sign-in gives the browser a workspace session cookie"
        response = browser.post("/logout", data={"csrf": FOREIGN})
    assert response.status_code == 403, response.text
