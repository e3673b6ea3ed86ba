"""The whole SMART standalone launch in a real headless browser (Debian's chromium driven by
Playwright): open the authorize URL → sign in → pick a patient → approve → redirected to the app
with a code → the app exchanges it. No JavaScript is needed by the gateway's pages."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx

from tests.actors import APP_REDIRECT, create_user, js_modules, pkce_pair, register_app, sensitive
from tests.browser.conftest import needs_chromium
from tests.conftest import RunningStack

PASSWORD = sensitive("browser sign-in passphrase 3")

pytestmark = needs_chromium


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


# -- SMART's own JavaScript client (`fhirclient` from npm) in the browser ------------------------

LAUNCH_PAGE = """<!doctype html><script src="/fhir-client.js"></script>
<script>FHIR.oauth2.authorize({clientId: %s, scope: %s, redirectUri: "/callback", iss: %s})
  .catch(e => { document.title = "error: " + e.message; });</script>"""
# After sign-in: the library exchanges the code, then refreshes exactly as it would when the
# access token runs out (`client.refresh()` posts grant_type and refresh_token, nothing else).
CALLBACK_PAGE = """<!doctype html><script src="/fhir-client.js"></script>
<script>FHIR.oauth2.ready().then(async (client) => {
  const first = client.state.tokenResponse.access_token;
  const firstRefresh = client.state.tokenResponse.refresh_token;
  await client.refresh();
  const patient = await client.request("Patient/" + client.patient.id);
  window.smartResult = {first, firstRefresh, patient: patient.id,
    second: client.state.tokenResponse.access_token, secondRefresh: client.state.tokenResponse.refresh_token};
  document.title = "refreshed";
}).catch(e => { document.title = "error: " + e.message; });</script>"""


@contextmanager
def app_server(pages: dict[str, tuple[str, bytes]]) -> Iterator[str]:
    """The app's own origin: a real HTTP server on loopback (a secure context for WebCrypto, and
    in the same address space as the gateway, so Chromium's local-network checks stay on)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            content_type, body = pages.get(urlsplit(self.path).path, ("text/html", b"<h1>none</h1>"))
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_fhirclient_public_app_refreshes_in_a_browser(live: RunningStack, writer_http: httpx.Client,
                                                      browser: Any) -> None:
    """SMART App Launch 2.2 §refresh-access-token: a public app's refresh carries no client_id and
    no client authentication; `fhirclient` (SMART's JS library, from tests/js's lock file) sends
    exactly that from a browser."""
    bundle = (js_modules("fhirclient") / "build" / "fhir-client.js").read_bytes()
    patient = writer_http.post("/Patient", json={
        "resourceType": "Patient", "name": [{"family": "Refresh", "given": ["Js"]}]}).json()["id"]
    suffix = uuid.uuid4().hex[:6]
    username, app = f"js-pt-{suffix}", f"js-app-{suffix}"
    create_user(live.cli_env, username, PASSWORD, "patient", f"Patient/{patient}")
    scope = "launch/patient openid fhirUser offline_access patient/*.rs"
    pages = {"/fhir-client.js": ("text/javascript", bundle),
             "/callback": ("text/html", CALLBACK_PAGE.encode())}
    refreshes: list[dict[str, str]] = []

    def watch_token(request: Any) -> None:
        if request.url == f"{live.gateway_url}/oauth/token" and request.method == "POST":
            form = dict(parse_qsl(request.post_data or ""))
            if form.get("grant_type") == "refresh_token":
                refreshes.append(form)

    with app_server(pages) as origin:
        register_app(live.cli_env, app, scope, redirect_uris=(f"{origin}/callback",))
        pages["/launch"] = ("text/html", (LAUNCH_PAGE % (
            json.dumps(app), json.dumps(scope), json.dumps(live.fhir))).encode())
        context = browser.new_context()
        page = context.new_page()
        page.on("request", watch_token)
        page.goto(f"{origin}/launch")
        page.wait_for_url(f"{live.gateway_url}/oauth/authorize**")
        page.get_by_label("Username").fill(username)
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Sign in").click()
        page.get_by_role("heading", name="Allow access?").wait_for()
        page.get_by_role("button", name="Allow").click()
        page.wait_for_url(f"{origin}/callback**")
        page.wait_for_function("document.title !== ''", timeout=30_000)
        title = page.title()
        result = page.evaluate("window.smartResult")
        context.close()

    assert title == "refreshed", title
    assert len(refreshes) == 1 and set(refreshes[0]) == {"grant_type", "refresh_token"}  # no client_id
    assert result["patient"] == patient
    assert result["second"] != result["first"] and result["secondRefresh"] != result["firstRefresh"]
    read = httpx.get(f"{live.fhir}/Patient/{patient}", headers={"Authorization": f"Bearer {result['second']}"})
    assert read.status_code == 200
