"""`mindchart`: the admin CLI. It works on the same datastores as the running services and prints
what it created as JSON. With no MongoDB URL configured and no stack running, it starts the
embedded datastore it needs for the duration of the command.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from pymongo import AsyncMongoClient

from gateway import admin
from gateway.settings import GatewaySettings
from mindchart_cli import seed, stack

app = typer.Typer(help="Mindchart administration", no_args_is_help=True, add_completion=False)
client_app = typer.Typer(help="OAuth clients (apps, EHRs, insurers)", no_args_is_help=True)
user_app = typer.Typer(help="People who sign in", no_args_is_help=True)
key_app = typer.Typer(help="Gateway token-signing keys", no_args_is_help=True)
app.add_typer(client_app, name="client")
app.add_typer(user_app, name="user")
app.add_typer(key_app, name="key")


def emit(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, default=str))


@contextlib.contextmanager
def datastore(name: str) -> Iterator[str]:
    """The MongoDB URL for one datastore, starting the embedded one if nothing answers."""
    config = stack.StackConfig.from_env()
    url = config.mongo_url(name)
    if name in config.mongo_urls or stack.mongo_answers(url):
        yield url
        return
    only = stack.StackConfig(data_dir=config.data_dir, mongo_urls={
        other: "configured" for other in stack.SERVICES if other != name})
    runner = stack.Stack(only)
    runner.start_datastores()
    try:
        yield url
    finally:
        runner.stop()


def on_gateway_db(work: Callable[[Any], Awaitable[Any]]) -> Any:
    settings = GatewaySettings()
    with datastore("gateway") as url:
        async def main() -> Any:
            client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(url, tz_aware=True)
            try:
                return await work(client[settings.db_name])
            finally:
                await client.close()
        try:
            return asyncio.run(main())
        except admin.RegistrationError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None


@client_app.command("create")
def client_create(
    id: Annotated[str, typer.Option("--id", help="client_id")],
    auth: Annotated[str, typer.Option(help="private_key_jwt | client_secret")],
    scope: Annotated[str, typer.Option(help="the client's allowed maximum, e.g. 'system/*.rs'")],
    audience: Annotated[list[str], typer.Option(help="records and/or psychnotes")] = ["records"],  # noqa: B006
    jwks: Annotated[Path | None, typer.Option(help="JWK Set file with the client's public keys")] = None,
    jwks_url: Annotated[str | None, typer.Option(help="allow-listed jku for this client")] = None,
    secret: Annotated[str | None, typer.Option(help="client secret (client_secret auth)")] = None,
    redirect_uri: Annotated[list[str], typer.Option(help="registered redirect URIs")] = [],  # noqa: B006
    role: Annotated[list[str], typer.Option(help="roles, e.g. compliance")] = [],  # noqa: B006
) -> None:
    """Register (or replace) an OAuth client."""
    keyset = json.loads(jwks.read_text()) if jwks else None
    emit(on_gateway_db(lambda db: admin.create_client(
        db, client_id=id, auth=auth, scope=scope, audiences=audience, jwks=keyset,
        jwks_url=jwks_url, secret=secret, redirect_uris=redirect_uri, roles=role)))


@user_app.command("create")
def user_create(
    username: Annotated[str, typer.Option()],
    password: Annotated[str, typer.Option()],
    role: Annotated[str, typer.Option(help="practitioner | patient | admin | compliance")],
    fhir_user: Annotated[str | None, typer.Option(help="Practitioner/ID or Patient/ID")] = None,
) -> None:
    """Create (or replace) a user who signs in at the gateway."""
    emit(on_gateway_db(lambda db: admin.create_user(
        db, username=username, password=password, role=role, fhir_user=fhir_user)))


@key_app.command("rotate")
def key_rotate() -> None:
    """Add a new signing key; it signs from now on, the old ones still verify."""
    emit(on_gateway_db(admin.rotate_signing_key))


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
    users = (("therapist", "practitioner", f"Practitioner/{seed.DEMO_THERAPIST}"),
             ("patient", "patient", f"Patient/{seed.DEMO_PATIENT}"), ("admin", "admin", None))
    for username, role, fhir_user in users:
        if await db.users.find_one({"_id": username}) is None:
            await admin.create_user(db, username=username, password=creds["users"][username],
                                    role=role, fhir_user=fhir_user)


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
        settings = GatewaySettings(mongo_url=config.mongo_url("gateway"))

        async def register() -> None:
            client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(config.mongo_url("gateway"))
            try:
                await register_demo(client[settings.db_name], creds)
            finally:
                await client.close()

        asyncio.run(register())
        created = seed.seed_records(config.gateway_url, creds)
        print_welcome(config, creds, created)
        while all(p.poll() is None for p in runner.processes.values()):
            time.sleep(1)
        dead = [k for k, p in runner.processes.items() if p.poll() is not None]
        typer.echo(f"stopping: {', '.join(dead)} exited", err=True)
    except KeyboardInterrupt:
        typer.echo("\nstopping…", err=True)
    except stack.StackError as exc:
        typer.echo(f"error: {exc}", err=True)
        runner.stop()
        raise typer.Exit(1) from None
    finally:
        runner.stop()


def print_welcome(config: stack.StackConfig, creds: dict[str, Any], created: int) -> None:
    gw = config.gateway_url
    secret_client, secret = creds["secret_client_id"], creds["secret_client_secret"]
    typer.echo(f"""
Mindchart is running.  Gateway: {gw}   (demo resources created now: {created})
  FHIR records base     {gw}/fhir
  psychnotes base       {gw}/psychnotes/fhir
  credentials           {seed.credentials_path(config.data_dir)}

Get a token and read a progress note:

  TOKEN=$(curl -s -u '{secret_client}:{secret}' -d grant_type=client_credentials \\
    -d scope=system/DocumentReference.rs {gw}/oauth/token \\
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
  curl -s -H "Authorization: Bearer $TOKEN" {gw}/fhir/DocumentReference/demo-note-1

Ctrl-C stops everything.
""")


def main() -> None:  # pragma: no cover - console entry
    sys.exit(app())
