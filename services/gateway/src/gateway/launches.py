"""EHR launch contexts (SMART App Launch 2.2 §ehr-launch): the EHR opens the app with
`?iss=<fhir base>&launch=<opaque>`; the opaque value is minted here (CLI or API) and stands for a
patient, optionally an encounter, a user and a client. The app sends it back in the authorize
request, and the gateway puts the context into the token response.
"""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from gateway import store
from gateway.settings import GatewaySettings

_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


class LaunchError(ValueError):
    """Refused launch input; the message is safe to show."""


async def create_launch(
    db: store.Db, settings: GatewaySettings, *, patient: str, encounter: str | None = None,
    client_id: str | None = None, username: str | None = None, audience: str = "records",
    launch_url: str | None = None,
) -> dict[str, Any]:
    patient = patient.removeprefix("Patient/")
    encounter = encounter.removeprefix("Encounter/") if encounter else None
    if not _ID.match(patient) or (encounter is not None and not _ID.match(encounter)):
        raise LaunchError("patient and encounter must be FHIR ids, e.g. Patient/123 or 123")
    if client_id is not None and await store.get_client(db, client_id) is None:
        raise LaunchError(f"no client {client_id} is registered")
    if username is not None and await store.get_user(db, username) is None:
        raise LaunchError(f"no user {username} exists")
    launch_id = secrets.token_urlsafe(24)
    now = datetime.now(UTC)
    expires = now + timedelta(seconds=settings.launch_seconds)
    await store.put_launch(db, {"_id": launch_id, "patient": patient, "encounter": encounter,
                                "client_id": client_id, "username": username, "created": now,
                                "expires": expires})
    iss = settings.audience_for(audience)
    result: dict[str, Any] = {"launch": launch_id, "iss": iss, "patient": patient,
                              "encounter": encounter, "client_id": client_id, "username": username,
                              "expires": expires.isoformat()}
    if launch_url:
        sep = "&" if "?" in launch_url else "?"
        result["launch_url"] = f"{launch_url}{sep}{urlencode({'iss': iss, 'launch': launch_id})}"
    return result
