"""Who treats whom: an active `CareTeam` in records, asked over HTTP through the gateway.

Being on the patient's care team is what makes a practitioner "treating": only a member writes
psychotherapy notes for the patient (45 CFR 164.501: notes recorded by a mental health
professional "documenting or analyzing the contents of conversation during a private counseling
session"; they can only be the treating professional's) and records an authorization for them.
Having written a note proves nothing: the relationship comes from outside the notes, maintained
by the EHR or a records administrator.

psychnotes authenticates as its own SMART Backend Services client (`records_client_id`,
private_key_jwt with the key from keys.load_records_client_key, scope `system/CareTeam.rs`), so
each lookup is an ordinary, audited request at the gateway. Services never import each other.

`GET [records]/CareTeam?patient=Patient/x&participant=Practitioner/y&status=active` (R4
CareTeam search parameters `patient`, `participant`, `status`); the answer is checked again
here (status active, the participant and subject as asked). A membership found is remembered for
`care_team_cache_seconds`; a non-membership is never remembered (a new team member can write at
once). If records or the gateway cannot answer, the write is refused with 503: fail closed.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import structlog
from joserfc import jwt
from joserfc.jwk import ECKey

from mindchart_core import errors
from psychnotes.settings import PsychnotesSettings

log = structlog.get_logger(__name__)
SCOPE = "system/CareTeam.rs"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


class CareTeams:
    def __init__(self, settings: PsychnotesSettings, key: ECKey) -> None:
        self.settings = settings
        self.key = key
        self._token: tuple[str, float] | None = None  # (access token, monotonic expiry)
        self._members: dict[tuple[str, str], float] = {}  # (patient, practitioner) -> until
        self._http = httpx.AsyncClient(timeout=10.0, follow_redirects=False)

    async def close(self) -> None:
        await self._http.aclose()

    def _assertion(self) -> str:
        """SMART Backend Services §authentication JWT: iss = sub = client id, aud = token URL."""
        now = int(time.time())
        claims = {"iss": self.settings.records_client_id, "sub": self.settings.records_client_id,
                  "aud": f"{self.settings.issuer.rstrip('/')}/oauth/token",  # the issuer's token URL
                  "iat": now, "exp": now + 120,
                  "jti": uuid.uuid4().hex}
        return jwt.encode({"alg": "ES384", "kid": self.key.kid, "typ": "JWT"}, claims, self.key,
                          algorithms=["ES384"])

    async def _access_token(self) -> str:
        if self._token is not None and time.monotonic() < self._token[1]:
            return self._token[0]
        response = await self._http.post(self.settings.token_url, data={
            "grant_type": "client_credentials", "scope": SCOPE,
            "aud": f"{self.settings.issuer.rstrip('/')}/fhir",  # records' public base
            "client_assertion_type": JWT_BEARER, "client_assertion": self._assertion()})
        if response.status_code != 200:
            raise httpx.HTTPError(f"token endpoint answered {response.status_code}")
        body = response.json()
        token = str(body["access_token"])
        lifetime = float(body.get("expires_in", 60))
        self._token = (token, time.monotonic() + max(lifetime - 30, lifetime / 2))
        return token

    async def is_member(self, patient: str, practitioner: str) -> bool:
        """Whether `practitioner` (Practitioner/<id>) is on an active care team of `patient`
        (Patient/<id>). Raises 503 when records cannot be asked: never a guess."""
        key = (patient, practitioner)
        if self._members.get(key, 0.0) > time.monotonic():
            return True
        try:
            found = await self._ask(patient, practitioner)
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            log.warning("care_team_unavailable", error_type=type(exc).__name__)
            self._token = None
            raise errors.Unavailable("Whether you are on this patient's care team cannot be "
                                     "checked right now; nothing was written. Try again later.",
                                     headers={"Retry-After": "5"}) from None
        if found:
            self._members[key] = time.monotonic() + self.settings.care_team_cache_seconds
        return found

    async def _ask(self, patient: str, practitioner: str) -> bool:
        for attempt in range(2):
            response = await self._http.get(
                f"{self.settings.records_base_url.rstrip('/')}/CareTeam",
                params={"patient": patient, "participant": practitioner, "status": "active",
                        "_count": "10"},
                headers={"Authorization": f"Bearer {await self._access_token()}",
                         "Accept": "application/fhir+json"})
            if response.status_code == 401 and attempt == 0:
                self._token = None  # expired or revoked meanwhile: one fresh token
                continue
            if response.status_code != 200:
                raise httpx.HTTPError(f"records answered {response.status_code}")
            bundle = response.json()
            if bundle.get("resourceType") != "Bundle":
                raise ValueError("not a Bundle")
            return any(_lists(entry.get("resource", {}), patient, practitioner)
                       for entry in bundle.get("entry", []))
        return False


def _lists(team: dict[str, Any], patient: str, practitioner: str) -> bool:
    """The answer checked again: an active CareTeam of this patient naming this practitioner."""
    if team.get("resourceType") != "CareTeam" or team.get("status") != "active":
        return False
    subject = str(team.get("subject", {}).get("reference", ""))
    if subject != patient and not subject.endswith(f"/{patient}"):
        return False
    for participant in team.get("participant", []):
        member = str(participant.get("member", {}).get("reference", ""))
        if member == practitioner or member.endswith(f"/{practitioner}"):
            return True
    return False
