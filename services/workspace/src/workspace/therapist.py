"""The signed-in therapist as routes see them: their session, their records API, and which
patients are theirs.

Records lets any practitioner of the practice read every patient (records/policy.py); the
workspace narrows that to the therapist's own caseload, the patients they have sessions with
(an Encounter naming them as participant) or whose active CareTeam they are on, plus the patient
chosen in this sign-in (the gateway's patient picker or the EHR launch). Anyone else's patient
pages answer 404.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from workspace import pages, sessions, store
from workspace.gateway_api import ApiError, FhirApi, Gateway

_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


@dataclass
class Therapist:
    request: Request
    cookie: str
    session: dict[str, Any]
    practitioner: str  # Practitioner/<id>
    records: FhirApi

    @property
    def csrf(self) -> str:
        return str(self.session["csrf"])

    @property
    def db(self) -> Any:
        return self.request.app.state.db

    async def form(self) -> dict[str, str]:
        """The posted form, refused (403) without this session's CSRF token."""
        values, _ = await self.form_lists()
        return values

    async def form_lists(self) -> tuple[dict[str, str], dict[str, list[str]]]:
        limit = self.request.app.state.settings.max_body_bytes
        declared = self.request.headers.get("content-length", "")
        if not declared.isdigit() or int(declared) > limit:
            raise pages.TooLarge
        form = await self.request.form()
        values = {k: str(v) for k, v in form.items()}
        sessions.check_csrf(self.session, values)
        return values, {k: [str(v) for v in form.getlist(k)] for k in form}

    async def psychnotes(self) -> FhirApi | None:
        token = await sessions.access_token(self.request, self.cookie, self.session, "psychnotes")
        if token is None:
            return None
        gateway: Gateway = self.request.app.state.gateway
        return gateway.fhir("psychnotes", token)

    async def preferences(self) -> dict[str, Any]:
        return await store.get_preferences(self.db, self.practitioner)

    async def caseload(self) -> list[str]:
        """Patient ids: this sign-in's patient, the active care teams this therapist is on, and
        those with an Encounter naming them."""
        encounters = await self.records.search("Encounter", [
            ("practitioner", self.practitioner), ("_count", "200")])
        try:
            encounters += await self.records.search("CareTeam", [
                ("participant", self.practitioner), ("status", "active"), ("_count", "200")])
        except ApiError:
            pass  # a records server without CareTeam: sessions alone make the caseload
        ids: list[str] = []
        chosen = self.session.get("patient")
        if chosen:
            ids.append(str(chosen))
        for encounter in encounters:
            ref = str(encounter.get("subject", {}).get("reference", ""))
            pid = ref.removeprefix("Patient/")
            if ref.startswith("Patient/") and pid not in ids:
                ids.append(pid)
        return ids

    async def patient(self, patient_id: str) -> dict[str, Any]:
        """The patient, if on this therapist's caseload; else 404 (the same for a missing one)."""
        if not _ID.match(patient_id) or patient_id not in await self.caseload():
            raise pages.NotFoundPage
        return await self.records.read("Patient", patient_id)


async def signed_in(request: Request) -> Therapist:
    cookie, session = await sessions.current(request)
    token = await sessions.access_token(request, cookie, session, "records")
    if token is None:
        await store.delete_session(request.app.state.db, cookie)
        raise sessions.NotSignedIn
    gateway: Gateway = request.app.state.gateway
    return Therapist(request, cookie, session, session["user"]["fhir_user"],
                     gateway.fhir("records", token))


def patient_name(patient: dict[str, Any]) -> str:
    for name in patient.get("name", []):
        text = name.get("text") or " ".join([*name.get("given", []), name.get("family", "")]).strip()
        if text:
            return str(text)
    return f"Patient {patient.get('id', '')}"
