"""The workspace's registration at the gateway: a SMART confidential client (client secret,
HTTP Basic at the token endpoint) for both FHIR bases, with its redirect URI on the workspace's
own address. The secret is generated once per data directory (mode 0600) and handed to the
workspace process as a file (MINDCHART_WORKSPACE_CLIENT_SECRET_FILE), never on a command line.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from gateway import admin

CLIENT_ID = "workspace"
# Its registered maximum; each sign-in asks for the part it needs (workspace/gateway_api.py).
SCOPE = ("user/Patient.rs user/Practitioner.rs user/CareTeam.rs user/Encounter.crus "
         "user/DocumentReference.crus user/Observation.crs")


def secret_file(data_dir: Path) -> Path:
    return data_dir / "demo" / "workspace-client-secret"


def load_or_make_secret(data_dir: Path) -> Path:
    path = secret_file(data_dir)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(32))
    return path


async def register(db: Any, workspace_url: str, secret: str) -> None:
    """Create the client once; a data directory keeps its secret, so a restart finds it valid."""
    if await db.clients.find_one({"_id": CLIENT_ID}) is not None:
        return
    await admin.create_client(
        db, client_id=CLIENT_ID, auth="client_secret", scope=SCOPE, audiences=["records", "psychnotes"],
        secret=secret, redirect_uris=[f"{workspace_url}/callback"], name="Mindchart workspace")
