"""Sign-in lockout under a burst: 32 wrong passwords at once on a fresh account get exactly
MINDCHART_GATEWAY_LOGIN_MAX_FAILURES (5) passwords checked (401); every other attempt is refused
as locked (429 + Retry-After) without its password being looked at."""

from __future__ import annotations

import re
import secrets
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from threading import Barrier

import httpx

from tests.actors import APP_REDIRECT, create_user, pkce_pair, register_app
from tests.resilience.conftest import ResilientStack, report

BURST = 32
LIMIT = 5  # the gateway's default login_max_failures


def _sign_in_form(http: httpx.Client, client_id: str, aud: str) -> dict[str, str]:
    """Open the authorize page as a browser would; every hidden field of its sign-in form."""
    _, challenge = pkce_pair()
    page = http.get("/oauth/authorize", params={
        "response_type": "code", "client_id": client_id, "redirect_uri": APP_REDIRECT,
        "scope": "openid fhirUser patient/*.rs", "state": secrets.token_urlsafe(16), "aud": aud,
        "code_challenge": challenge, "code_challenge_method": "S256"})
    assert page.status_code == 200, page.text
    return dict(re.findall(r'type="hidden" name="([^"]+)" value="([^"]*)"', page.text)) or dict(
        re.findall(r'name="([^"]+)" value="([^"]*)"', page.text))


def test_parallel_wrong_passwords_check_exactly_the_limit(resilient: ResilientStack) -> None:
    env = resilient.cli_env
    client_id = f"lockout-app-{secrets.token_hex(4)}"
    register_app(env, client_id, "openid fhirUser patient/*.rs")
    username = f"burst-{secrets.token_hex(4)}"
    create_user(env, username, secrets.token_urlsafe(16), "patient", "Patient/burst")
    clients = [httpx.Client(base_url=resilient.gateway_url, timeout=60) for _ in range(BURST)]
    forms = [_sign_in_form(c, client_id, resilient.fhir) for c in clients]
    start = Barrier(BURST)

    def guess(n: int) -> int:
        start.wait()
        data = {**forms[n], "username": username, "password": f"wrong-{n}"}
        return clients[n].post("/oauth/authorize/login", data=data).status_code

    try:
        with ThreadPoolExecutor(max_workers=BURST) as pool:
            statuses = Counter(pool.map(guess, range(BURST)))
    finally:
        for c in clients:
            c.close()
    report("32 parallel wrong passwords", requests=BURST, checked=statuses[401],
           locked_out=statuses[429], **{"5xx": sum(n for s, n in statuses.items() if s >= 500)})
    assert statuses == Counter({401: LIMIT, 429: BURST - LIMIT}), statuses
