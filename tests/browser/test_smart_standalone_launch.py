"""The whole SMART standalone launch in a real headless browser (Debian's chromium driven by
Playwright): open the authorize URL → sign in → pick a patient → approve → redirected to the app
with a code → the app exchanges it. No JavaScript is needed by the gateway's pages."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
import pytest

from tests.actors import APP_REDIRECT, create_user, pkce_pair, register_app, sensitive
from tests.conftest import RunningStack

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PASSWORD = sensitive("browser sign-in passphrase 3")

pytestmark = pytest.mark.skipif(not CHROMIUM.exists() and shutil.which("chromium") is None,
                                reason="Debian's chromium (/usr/bin/chromium) is not installed")


@pytest.fixture(scope="module")
def browser() -> Any:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield launched
        launched.close()


def test_standalone_launch_in_a_browser(live: RunningStack, writer_http: httpx.Client, browser: Any) -> None:
    patient = writer_http.post("/Patient", json={
        "resourceType": "Patient", "name": [{"family": "Browning", "given": ["Iris"]}]}).json()["id"]
    suffix = uuid.uuid4().hex[:6]
    clinician, app = f"browser-dr-{suffix}", f"browser-app-{suffix}"
    create_user(live.cli_env, clinician, PASSWORD, "practitioner", "Practitioner/browser-dr")
    register_app(live.cli_env, app, "launch/patient openid fhirUser offline_access patient/*.rs")
    verifier, challenge = pkce_pair()
    state = uuid.uuid4().hex + uuid.uuid4().hex
    url = f"{live.gateway_url}/oauth/authorize?" + urlencode({
        "response_type": "code", "client_id": app, "redirect_uri": APP_REDIRECT,
        "scope": "launch/patient openid fhirUser offline_access patient/*.rs", "state": state,
        "aud": live.fhir, "code_challenge": challenge, "code_challenge_method": "S256"})

    context = browser.new_context(java_script_enabled=False)  # the pages must work without JS
    page = context.new_page()
    arrived: list[str] = []

    def app_callback(route: Any) -> None:
        arrived.append(route.request.url)
        route.fulfill(status=200, content_type="text/html", body="<h1>App received the code</h1>")

    page.route(f"{APP_REDIRECT}**", app_callback)
    page.goto(url)
    assert page.title().startswith("Sign in")
    page.get_by_label("Username").fill(clinician)
    page.get_by_label("Password").fill("wrong password, once")
    page.get_by_role("button", name="Sign in").click()
    assert page.get_by_role("alert").is_visible()
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()

    page.get_by_role("heading", name="Choose a patient").wait_for()
    page.get_by_label("Find by name").fill("Browning")
    page.get_by_role("button", name="Search").click()
    page.get_by_label("Iris Browning").check()
    page.get_by_role("button", name="Continue with this patient").click()

    page.get_by_role("heading", name="Allow access?").wait_for()
    assert page.get_by_text(f"Patient/{patient}").is_visible()
    page.get_by_role("checkbox", name="offline_access").uncheck()
    page.get_by_role("button", name="Allow").click()
    page.get_by_role("heading", name="App received the code").wait_for()
    context.close()

    assert len(arrived) == 1
    params = dict(parse_qsl(urlsplit(arrived[0]).query))
    assert params["state"] == state and "error" not in params
    token = httpx.post(f"{live.gateway_url}/oauth/token", data={
        "grant_type": "authorization_code", "code": params["code"], "redirect_uri": APP_REDIRECT,
        "code_verifier": verifier, "client_id": app})
    assert token.status_code == 200, token.text
    body = token.json()
    assert body["patient"] == patient
    assert set(body["scope"].split()) == {"launch/patient", "openid", "fhirUser", "patient/*.rs"}
    assert "refresh_token" not in body  # unticked in the browser
    read = httpx.get(f"{live.fhir}/Patient/{patient}", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert read.status_code == 200
