"""`mindchart`: the admin CLI. Each area mounts its own commands (gateway_commands,
psychnotes_commands); they work on the same datastores as the running services and print what
they created as JSON. `mindchart run` starts the whole stack (the README's `make run`).
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import signal
import sys
import time
import uuid
from typing import Any
from urllib.parse import urlencode

import typer

from gateway import admin
from gateway import keys as gateway_keys
from gateway.keys import Keyring
from gateway.settings import GatewaySettings
from mindchart_cli import gateway_commands, psychnotes_commands, seed, stack, supervisor
from mindchart_cli.datastores import on_db

app = typer.Typer(help="Mindchart administration", no_args_is_help=True, add_completion=False)
app.add_typer(gateway_commands.client_app, name="client")
app.add_typer(gateway_commands.user_app, name="user")
app.add_typer(gateway_commands.key_app, name="key")
app.add_typer(gateway_commands.launch_app, name="launch")
app.add_typer(gateway_commands.audit_app, name="audit")
app.add_typer(psychnotes_commands.psychnotes_app, name="psychnotes")


# A public SMART app (PKCE, no secret) to try the sign-in and approval pages with `make run`.
DEMO_APP = "demo-smart-app"
DEMO_APP_SCOPE = "openid fhirUser launch/patient patient/*.rs patient/Task.c"  # + amendment requests
DEMO_APP_REDIRECT = "http://localhost:8765/callback"  # nothing listens: the code is read off the URL


async def register_demo(db: Any, creds: dict[str, Any]) -> None:
    if await db.clients.find_one({"_id": creds["backend_client_id"]}) is None:
        await admin.create_client(
            db, client_id=creds["backend_client_id"], auth="private_key_jwt",
            scope="system/*.rs", audiences=["records"],
            jwks=seed.public_jwks(creds["backend_private_jwk"]))
    if await db.clients.find_one({"_id": creds["secret_client_id"]}) is None:
        await admin.create_client(
            db, client_id=creds["secret_client_id"], auth="client_secret",
            scope="system/*.cruds", audiences=["records"], secret=creds["secret_client_secret"])
    if await db.clients.find_one({"_id": DEMO_APP}) is None:
        await admin.create_client(
            db, client_id=DEMO_APP, auth="none", scope=DEMO_APP_SCOPE, audiences=["records"],
            redirect_uris=[DEMO_APP_REDIRECT], name="Mindchart demo SMART app")
    users = (("therapist", "practitioner", f"Practitioner/{seed.DEMO_THERAPIST}", None),
             ("patient", "patient", f"Patient/{seed.DEMO_PATIENT}", None), ("admin", "admin", None, None),
             ("trainee", "practitioner", f"Practitioner/{seed.DEMO_TRAINEE}",
              f"Practitioner/{seed.DEMO_THERAPIST}"))
    for username, role, fhir_user, supervised_by in users:
        if await db.users.find_one({"_id": username}) is None:
            await admin.create_user(db, username=username, password=creds["users"][username],
                                    role=role, fhir_user=fhir_user, supervisor=supervised_by)


async def demo_practitioner_tokens(db: Any, public_url: str, client_id: str) -> dict[str, str]:
    """Five-minute access tokens for the demo therapist and trainee (for records, and for
    psychnotes under seed.PSYCHNOTES_TOKEN), signed with the gateway's own key as its sign-in
    would issue them (the admin CLI holds the gateway datastore anyway), so the demo notes are
    written, signed and co-signed by practitioners through the public API."""
    keys = Keyring(db, gateway_keys.load_kek(GatewaySettings()))  # signs: needs the KEK
    await keys.load(force=True)
    now = int(time.time())
    tokens = {}
    for who, supervised_by in ((seed.DEMO_THERAPIST, None), (seed.DEMO_TRAINEE, seed.DEMO_THERAPIST)):
        claims: dict[str, Any] = {
            "iss": public_url, "aud": f"{public_url}/fhir", "sub": f"demo-seed-{who}",
            "client_id": client_id, "scope": "user/DocumentReference.cruds user/Encounter.rs",
            "iat": now, "exp": now + 300, "jti": uuid.uuid4().hex, "roles": ["practitioner"],
            "fhirUser": f"{public_url}/fhir/Practitioner/{who}"}
        if supervised_by:
            claims["supervisor"] = f"Practitioner/{supervised_by}"
        tokens[who] = await keys.sign(claims)
        # The same practitioner at psychnotes, which takes only tokens of its own audience.
        tokens[seed.PSYCHNOTES_TOKEN.format(who)] = await keys.sign({
            **claims, "aud": f"{public_url}/psychnotes/fhir", "jti": uuid.uuid4().hex,
            "scope": "user/DocumentReference.cruds"})
    # The demo patient, as a patient-context SMART token, files the demo amendment request.
    tokens[seed.DEMO_PATIENT] = await keys.sign({
        "iss": public_url, "aud": f"{public_url}/fhir", "sub": "demo-seed-patient",
        "client_id": client_id, "scope": "patient/Task.crs patient/DocumentReference.rs",
        "patient": seed.DEMO_PATIENT, "fhirUser": f"{public_url}/fhir/Patient/{seed.DEMO_PATIENT}",
        "iat": now, "exp": now + 300, "jti": uuid.uuid4().hex, "roles": ["patient"]})
    return tokens


@app.command()
def run() -> None:
    """Start the embedded datastores and the three services; seed demo data once; wait."""
    config = stack.StackConfig.from_env()
    runner = stack.Stack(config)

    def shutdown(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    try:
        runner.start()
        creds, _ = seed.load_or_make_credentials(config.data_dir)
        on_db("gateway", GatewaySettings().db_name, lambda db: register_demo(db, creds))
        created = seed.seed_records(config.gateway_url, creds)
        tokens = on_db("gateway", GatewaySettings().db_name, lambda db: demo_practitioner_tokens(
            db, config.public_gateway_url, creds["secret_client_id"]))
        created += seed.seed_lifecycle(config.gateway_url, tokens)
        created += seed.seed_amendment(config.gateway_url, tokens)
        created += seed.seed_psychnotes(config.gateway_url, tokens)
        print_welcome(config, creds, created)
        watcher = supervisor.Supervisor(runner, log=lambda line: typer.echo(line, err=True))
        while True:
            time.sleep(1)
            watcher.check()
    except KeyboardInterrupt:
        typer.echo("\nstopping…", err=True)
    except stack.StackError as exc:  # could not start, or something kept dying
        typer.echo(f"error: {exc}", err=True)
        runner.stop()
        raise typer.Exit(1) from None
    finally:
        runner.stop()


def demo_app_authorize_url(config: stack.StackConfig, challenge: str) -> str:
    return f"{config.public_gateway_url}/oauth/authorize?" + urlencode({
        "response_type": "code", "client_id": DEMO_APP, "redirect_uri": DEMO_APP_REDIRECT,
        "scope": DEMO_APP_SCOPE, "state": "demo", "aud": f"{config.public_gateway_url}/fhir",
        "code_challenge": challenge, "code_challenge_method": "S256"})


def print_welcome(config: stack.StackConfig, creds: dict[str, Any], created: int) -> None:
    gw = config.public_gateway_url
    secret_client, secret = creds["secret_client_id"], creds["secret_client_secret"]
    verifier = secrets.token_urlsafe(48)  # RFC 7636: a fresh PKCE pair for this run
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    typer.echo(f"""
Mindchart is running.  Gateway: {gw}   (demo resources created now: {created})
  therapist workspace   {config.workspace_url}   (sign in as "therapist", password in the credentials file)
  FHIR records base     {gw}/fhir
  psychnotes base       {gw}/psychnotes/fhir
  credentials           {seed.credentials_path(config.data_dir)}

Open the workspace from an EHR (SMART EHR launch with the demo patient in context):

  uv run mindchart launch create --client workspace --patient Patient/{seed.DEMO_PATIENT} \\
    --user therapist --launch-url {config.workspace_url}/launch

Get a token and read a progress note:

  TOKEN=$(curl -s -u '{secret_client}:{secret}' -d grant_type=client_credentials \\
    -d scope=system/DocumentReference.rs {gw}/oauth/token \\
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
  curl -s -H "Authorization: Bearer $TOKEN" {gw}/fhir/DocumentReference/demo-note-1

Sign in to a SMART app ({DEMO_APP}, a public client using PKCE):

  1. open {demo_app_authorize_url(config, challenge)}
  2. sign in as "patient" (password in the credentials file) and allow; the browser then goes to
     {DEMO_APP_REDIRECT}?code=...&state=demo, where nothing listens: copy the code
  3. CODE=<the code>; curl -s -d grant_type=authorization_code -d client_id={DEMO_APP} \\
       -d redirect_uri={DEMO_APP_REDIRECT} -d code_verifier={verifier} -d "code=$CODE" {gw}/oauth/token

Ctrl-C stops everything.
""")


def main() -> None:  # pragma: no cover - console entry
    sys.exit(app())
