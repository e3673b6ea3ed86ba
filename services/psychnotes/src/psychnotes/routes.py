"""Psychnotes FHIR surface. Writes by the treating practitioner; every read is refused unless a
consent token grants it (45 CFR 164.508(a)(2)). The consent-token flow is its own issue: until it
lands, every read, vread, search and history answers 403.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from mindchart_core import errors, fhirjson, tokens, validation
from mindchart_core.tokens import AccessToken
from psychnotes import labels, store
from psychnotes.settings import PsychnotesSettings

router = APIRouter(prefix="/psychnotes/fhir")


async def caller(request: Request) -> AccessToken:
    fhirjson.negotiate(request)
    token: AccessToken = await request.app.state.verifier.verify(tokens.bearer_token(request))
    return token


CallerDep = Annotated[AccessToken, Depends(caller)]


def _settings(request: Request) -> PsychnotesSettings:
    settings: PsychnotesSettings = request.app.state.settings
    return settings


@router.post("/DocumentReference")
async def create_note(request: Request, token: CallerDep) -> Response:
    if not token.scope.allows("DocumentReference", "create"):
        raise errors.Forbidden("The granted scopes do not permit creating psychotherapy notes")
    author = token.fhir_user_ref
    if not author or not author.startswith("Practitioner/"):
        raise errors.Forbidden("Only a practitioner (fhirUser) may write psychotherapy notes")
    settings = _settings(request)
    body = await fhirjson.read_json_body(request, settings.max_body_bytes)
    resource = validation.validate_resource(body, "DocumentReference")
    subject = resource.get("subject", {}).get("reference", "")
    if not subject.startswith("Patient/"):
        raise errors.Unprocessable("subject must reference the Patient (Patient/id)",
                                   expression=["DocumentReference.subject"])
    note_id = str(uuid.uuid4())
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    resource = labels.label({**resource, "id": note_id})
    resource["meta"].update(versionId="1", lastUpdated=now)
    resource["author"] = [{"reference": author}]
    await store.insert_note(request.app.state.db, note_id, resource, patient=subject, author=author)
    return Response(
        status_code=201,
        headers={"Location": f"{settings.public_base_url}/DocumentReference/{note_id}/_history/1",
                 "ETag": 'W/"1"'},
    )


@router.api_route("/{rest:path}", methods=["GET"])
async def refuse_reads(token: CallerDep) -> Response:
    raise errors.Forbidden(
        "Psychotherapy notes are released only with a consent token (45 CFR 164.508(a)(2))"
    )
