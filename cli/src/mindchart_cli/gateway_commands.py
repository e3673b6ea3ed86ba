"""`mindchart client|user|key|launch|audit ...`: what the gateway owns: registrations, keys, EHR
launches and the audit chain."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from gateway import admin, chain_verify, checkpoints, keys, launches
from gateway.keys import Keyring
from gateway.settings import GatewaySettings
from mindchart_cli import kek_files, stack
from mindchart_cli.datastores import CommandError, emit, on_db

client_app = typer.Typer(help="OAuth clients (apps, EHRs, insurers)", no_args_is_help=True)
user_app = typer.Typer(help="People who sign in", no_args_is_help=True)
key_app = typer.Typer(help="Gateway token-signing keys", no_args_is_help=True)
launch_app = typer.Typer(help="EHR launches (SMART launch-ehr)", no_args_is_help=True)
audit_app = typer.Typer(help="The tamper-evident audit trail", no_args_is_help=True)


def on_gateway_db(work: Any) -> Any:
    return on_db("gateway", GatewaySettings().db_name, work)


@client_app.command("create")
def client_create(
    id: Annotated[str, typer.Option("--id", help="client_id")],
    auth: Annotated[str, typer.Option(help="private_key_jwt | client_secret | none (public app)")],
    scope: Annotated[str, typer.Option(help="the client's allowed maximum, e.g. 'system/*.rs'")],
    audience: Annotated[list[str], typer.Option(help="records and/or psychnotes")] = ["records"],  # noqa: B006
    jwks: Annotated[Path | None, typer.Option(help="JWK Set file with the client's public keys")] = None,
    jwks_url: Annotated[str | None, typer.Option(help="allow-listed jku for this client")] = None,
    secret: Annotated[str | None, typer.Option(help="client secret (client_secret auth)")] = None,
    redirect_uri: Annotated[list[str], typer.Option(help="registered redirect URIs")] = [],  # noqa: B006
    role: Annotated[list[str], typer.Option(help="roles, e.g. compliance")] = [],  # noqa: B006
    name: Annotated[str | None, typer.Option(help="name shown to users on the sign-in pages")] = None,
    rate_limit: Annotated[int | None, typer.Option(
        help="requests per rate-limit window for this client (default: the gateway's)")] = None,
    payer_endpoint: Annotated[list[str], typer.Option(
        help="(role payer) a $submit-attachment URL records may deliver CDex attachments to")] = [],  # noqa: B006
    payer_token_url: Annotated[str | None, typer.Option(
        help="(with --payer-endpoint) the payer's token endpoint records authenticates at")] = None,
    payer_client_id: Annotated[str | None, typer.Option(
        help="(with --payer-endpoint) the client id the payer registered records under")] = None,
    subscription_endpoint: Annotated[list[str], typer.Option(
        help="a URL records may deliver this client's Subscription notifications to")] = [],  # noqa: B006
) -> None:
    """Register (or replace) an OAuth client."""
    keyset = json.loads(jwks.read_text()) if jwks else None
    emit(on_gateway_db(lambda db: admin.create_client(
        db, client_id=id, auth=auth, scope=scope, audiences=audience, jwks=keyset,
        jwks_url=jwks_url, secret=secret, redirect_uris=redirect_uri, roles=role, name=name,
        rate_limit=rate_limit, payer_endpoints=payer_endpoint, payer_token_url=payer_token_url,
        payer_client_id=payer_client_id, subscription_endpoints=subscription_endpoint)))


@user_app.command("create")
def user_create(
    username: Annotated[str, typer.Option()],
    password: Annotated[str, typer.Option()],
    role: Annotated[str, typer.Option(help="practitioner | patient | admin | compliance")],
    fhir_user: Annotated[str | None, typer.Option(help="Practitioner/ID or Patient/ID")] = None,
    supervisor: Annotated[str | None, typer.Option(
        help="Practitioner/ID who must co-sign this practitioner's notes")] = None,
) -> None:
    """Create (or replace) a user who signs in at the gateway."""
    emit(on_gateway_db(lambda db: admin.create_user(
        db, username=username, password=password, role=role, fhir_user=fhir_user,
        supervisor=supervisor)))


@key_app.command("rotate")
def key_rotate() -> None:
    """Add a new signing key, sealed under the gateway's KEK (MINDCHART_GATEWAY_SIGNING_KEK_FILE);
    it signs from now on, the old ones still verify."""
    with kek_files.key_file_errors():
        kek = keys.load_kek(GatewaySettings())
    emit(on_gateway_db(lambda db: admin.rotate_signing_key(db, kek)))


@key_app.command("new-kek")
def key_new_kek(out: Annotated[Path, typer.Option(help="file to create (mode 0600)")]) -> None:
    """Create a new key-encryption key file for the signing keys: base64 of 32 random bytes on
    one line. Restart the gateways with it as MINDCHART_GATEWAY_SIGNING_KEK_FILE and the old one
    in MINDCHART_GATEWAY_SIGNING_PREVIOUS_KEK_FILES: they seal every key again under it."""
    kek_files.new_kek(out, keys.kek_id)


@key_app.command("kek-status")
def key_kek_status() -> None:
    """Which KEK seals each signing key. Exit 0 when every key is under the current KEK (the
    files in MINDCHART_GATEWAY_SIGNING_PREVIOUS_KEK_FILES can go), 1 while a key is still sealed
    under another (a gateway with both KEKs seals them again when it starts)."""
    with kek_files.key_file_errors():
        keks = keys.load_keks(GatewaySettings())
    status = on_gateway_db(lambda db: keys.kek_status(db, keks))
    emit(status)
    if status["not_under_current_kek"]:
        for kek, kids in status["previous_keks_still_needed"].items():
            typer.echo(f"KEK {kek} still seals signing keys {', '.join(kids)}: keep its file in "
                       f"{keys.PREVIOUS_KEK_SETTING} and start a gateway with both", err=True)
        others = [k["kid"] for k in status["keys"] if k["sealed_under"] in ("unknown", "clear")]
        if others:
            typer.echo(f"signing keys {', '.join(others)} are in clear or under a KEK not "
                       "configured here", err=True)
        raise typer.Exit(1)


@launch_app.command("create")
def launch_create(
    patient: Annotated[str, typer.Option(help="Patient/ID (or ID) in context")],
    encounter: Annotated[str | None, typer.Option(help="Encounter/ID in context")] = None,
    client: Annotated[str | None, typer.Option(help="only this client_id may use the launch")] = None,
    user: Annotated[str | None, typer.Option(help="only this username may sign in with it")] = None,
    audience: Annotated[str, typer.Option(help="records | psychnotes: the iss given to the app")] = "records",
    launch_url: Annotated[str | None, typer.Option(
        help="the app's launch URL, to print the full link")] = None,
) -> None:
    """Mint an opaque `launch` value carrying patient/encounter context, as an EHR does."""
    settings = GatewaySettings(public_url=stack.StackConfig.from_env().public_gateway_url)

    async def work(db: Any) -> Any:
        try:
            return await launches.create_launch(
                db, settings, patient=patient, encounter=encounter, client_id=client, username=user,
                audience=audience, launch_url=launch_url)
        except launches.LaunchError as exc:
            raise CommandError(str(exc)) from None

    emit(on_gateway_db(work))


@audit_app.command("verify")
def audit_verify(
    witness: Annotated[list[Path], typer.Option(
        help="a checkpoint exported earlier (`audit checkpoint --export`), checked as well")] = [],  # noqa: B006
) -> None:
    """Walk every audit partition, check every signed checkpoint, and check that each partition
    still extends them; name each partition's first problem with its position (exit 1)."""
    key = GatewaySettings().audit_chain_key()
    witnesses = [json.loads(path.read_text()) for path in witness]

    async def work(db: Any) -> dict[str, Any]:
        keyset = await Keyring(db).keyset(refresh=True)  # verifies only: no KEK
        return await chain_verify.verify(db, keyset=keyset, key=key, witnesses=witnesses)

    result = on_gateway_db(work)
    emit(result)
    if not result["ok"]:
        for problem in result["problems"]:
            typer.echo(f"audit trail broken: {problem['kind']}: {problem['detail']}", err=True)
        raise typer.Exit(1)


@audit_app.command("checkpoint")
def audit_checkpoint(
    export: Annotated[Path, typer.Option(
        help="write the newest signed checkpoint here, for an outside witness to keep")],
) -> None:
    """Hand the newest signed checkpoint of every partition's head to an outside witness: the JWS,
    its claims and the gateway's public keys. Give it back later as `audit verify --witness`."""

    async def work(db: Any) -> dict[str, Any]:
        exported = await checkpoints.export(db, Keyring(db))  # public keys only: no KEK
        if exported is None:
            raise CommandError("no checkpoint has been written yet (the gateway writes one every "
                               "few seconds while it audits requests)")
        return exported

    exported = on_gateway_db(work)
    export.write_text(json.dumps(exported, indent=2) + "\n")
    emit({"exported": str(export), "checkpoint": exported["checkpoint"],
          "heads": exported["claims"]["heads"]})
