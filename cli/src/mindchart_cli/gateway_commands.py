"""`mindchart client|user|key ...`: registrations and keys the gateway owns."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from gateway import admin
from gateway.settings import GatewaySettings
from mindchart_cli.datastores import emit, on_db

client_app = typer.Typer(help="OAuth clients (apps, EHRs, insurers)", no_args_is_help=True)
user_app = typer.Typer(help="People who sign in", no_args_is_help=True)
key_app = typer.Typer(help="Gateway token-signing keys", no_args_is_help=True)


def on_gateway_db(work: Any) -> Any:
    return on_db("gateway", GatewaySettings().db_name, work)


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
