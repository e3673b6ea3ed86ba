"""Standard SMART client libraries find our endpoints: `fhirclient` (Python, discovers through
`/metadata`) runs a whole launch, and `fhir-kit-client` (JavaScript, discovers through
`.well-known/smart-configuration`) finds the authorize and token URLs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import httpx

from tests.actors import APP_REDIRECT, create_user, js_modules, register_app, sensitive
from tests.conftest import RunningStack

JS_DIR = Path(__file__).resolve().parents[1] / "js"
PASSWORD = sensitive("client library passphrase 5")


def walk_pages(authorize_url: str, username: str) -> str:
    """Sign in and approve on the gateway's pages (plain form posts); returns the redirect URL."""
    with httpx.Client(follow_redirects=False, timeout=30) as http:
        page = http.get(authorize_url)
        assert page.status_code == 200, page.text
        session = re.search(r'name="session" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
        base = authorize_url.split("/oauth/authorize")[0]
        page = http.post(f"{base}/oauth/authorize/login", data={"session": session, "username": username,
                                                                "password": PASSWORD})
        scopes = re.findall(r'name="scope" id="[^"]+" value="([^"]+)"', page.text)
        session = re.search(r'name="session" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
        done = http.post(f"{base}/oauth/authorize/approve",  # the token renewed at sign-in
                         data={"session": session, "decision": "approve", "scope": scopes})
        assert done.status_code == 303, done.text
        return str(done.headers["location"])


def test_fhirclient_discovers_through_metadata_and_launches(live: RunningStack, writer_http: httpx.Client) -> None:
    from fhirclient import client

    patient = writer_http.post("/Patient", json={"resourceType": "Patient"}).json()["id"]
    suffix = uuid.uuid4().hex[:6]
    app, username = f"py-app-{suffix}", f"py-pt-{suffix}"
    register_app(live.cli_env, app, "launch/patient openid fhirUser patient/*.rs patient/*.read")
    create_user(live.cli_env, username, PASSWORD, "patient", f"Patient/{patient}")
    smart = client.FHIRClient(settings={
        "app_id": app, "api_base": live.fhir, "redirect_uri": APP_REDIRECT,
        "scope": "launch/patient openid fhirUser patient/*.read"})
    url = smart.authorize_url  # fetches /metadata and reads the oauth-uris extension
    assert url.startswith(f"{live.gateway_url}/oauth/authorize?")
    assert "code_challenge_method=S256" in url and f"aud={httpx.URL(live.fhir)}".split("aud=")[1][:10]
    smart.handle_callback(walk_pages(url, username))
    assert smart.ready and smart.patient_id == patient
    read = httpx.get(f"{live.fhir}/Patient/{patient}", headers={"Authorization": f"Bearer {smart.server.auth.access_token}"})
    assert read.status_code == 200


def test_fhir_kit_client_discovers_through_well_known(live: RunningStack) -> None:
    js_modules("fhir-kit-client")
    node = shutil.which("node")
    assert node is not None
    events = live.db("gateway").audit_events
    asked = {"path": "/fhir/.well-known/smart-configuration", "status": 200}
    before = events.count_documents(asked)
    run = subprocess.run([node, "discover.mjs", live.fhir], cwd=JS_DIR, capture_output=True,
                         text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout)
    for how in ("wellKnown", "raced"):
        assert found[how]["authorizeUrl"] == f"{live.gateway_url}/oauth/authorize", how
        assert found[how]["tokenUrl"] == f"{live.gateway_url}/oauth/token", how
    assert events.count_documents(asked) > before  # it did ask the well-known document
