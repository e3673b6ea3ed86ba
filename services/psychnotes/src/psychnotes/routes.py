"""Psychnotes FHIR surface: thin handlers; the interactions are in notes_service.py,
consents.py and minting.py, the rules in policy.py, notes.py and consent.py.

Writes: the treating practitioner creates, updates (author only, history kept) and soft-deletes
notes; `$sign`, `$entered-in-error` and `$verify-signature` are in lifecycle/routes.py.
Reads (read, vread, search, history) need a `Consent-Token` header on top of the access
token, checked for every note returned (45 CFR 164.508(a)(2); shared/DESIGN.md "Consent token").
A missing consent token is 403 (the caller is known but not authorized); a presented token that
is forged, expired or not ours is 401 with `WWW-Authenticate: Consent-Token`. Only the exact
`Consent-Token` header counts: look-alikes (`X-Consent-Token`, query parameters) are ignored.

Authorizations: `POST Consent` records one (the patient, or a care-team member: then it stays
`proposed`), `POST Consent/{id}/$attest` (a second person, compliance role) puts a proposed one in
force, `GET Consent?patient=` and `GET Consent/{id}` show one to its patient, recorder, attester,
named recipients and the compliance role (policy.consent_reader), `POST Consent/{id}/$revoke`
revokes it (status inactive, effective at once). A Consent is never edited (PUT/PATCH/DELETE: 405).
Tokens: `POST Consent/{id}/$consent-token`, `POST $consent-token` (164.508(a)(2) exceptions);
`POST $revoke-consent-token` (Parameters `jti` or `token`) ends an exception grant at once, for
its grantee or the compliance role (service.revoke_exception).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from mindchart_core import asgi, errors, fhirjson, tokens
from psychnotes import consents, minting, notes_service, service
from psychnotes.consent_token import ConsentToken

router = APIRouter(prefix="/psychnotes/fhir")
CONSENT_TOKEN_HEADER = "consent-token"


async def context(request: Request) -> service.Context:
    """Verify the caller's access token (again: we trust no network) and bind the vault to it."""
    fhirjson.negotiate(request)
    state = request.app.state
    try:
        token = await state.verifier.verify(tokens.bearer_token(request))
    except errors.FhirError as exc:
        # Also recorded here, not only at the gateway: a call straight at psychnotes is audited too.
        await service.record_unauthenticated(state.db, state.settings,
                                             asgi.request_id_of(request.scope), exc.diagnostics)
        raise
    return service.Context(db=state.db, audit_log=state.audit_log, keyring=state.keyring,
                           signing_key=state.signing_key,
                           settings=state.settings, token=token,
                           request_id=asgi.request_id_of(request.scope),
                           care_teams=state.care_teams, consent_tokens=state.consent_tokens,
                           bases=state.bases)


ContextDep = Annotated[service.Context, Depends(context)]


async def body_of(request: Request, ctx: service.Context) -> object:
    return await fhirjson.read_json_body(request, ctx.settings.max_body_bytes)


def presented_tokens(request: Request) -> list[str]:
    return request.headers.getlist(CONSENT_TOKEN_HEADER)


async def gated(request: Request, ctx: service.Context, action: str) -> ConsentToken:
    return await notes_service.gate(ctx, presented_tokens(request), action)


# -- notes --------------------------------------------------------------------------------------

@router.post("/DocumentReference")
async def create_note(request: Request, ctx: ContextDep) -> Response:
    return await notes_service.create_note(ctx, await body_of(request, ctx))


@router.post("/DocumentReference/_search")
async def search_notes_post(request: Request, ctx: ContextDep) -> Response:
    token = await gated(request, ctx, "search")
    ctype = request.headers.get("content-type", "").split(";")[0].strip()
    if ctype not in ("application/x-www-form-urlencoded", ""):
        raise errors.UnsupportedMediaType("POST _search takes application/x-www-form-urlencoded")
    form = await request.form()
    items = list(request.query_params.multi_items()) + [(k, str(v)) for k, v in form.multi_items()]
    return await notes_service.search_notes(ctx, token, items)


@router.get("/DocumentReference")
async def search_notes(request: Request, ctx: ContextDep) -> Response:
    token = await gated(request, ctx, "search")
    return await notes_service.search_notes(ctx, token, list(request.query_params.multi_items()))


@router.get("/DocumentReference/{note_id}/_history/{version}")
async def vread_note(note_id: str, version: str, request: Request, ctx: ContextDep) -> Response:
    token = await gated(request, ctx, "vread")
    return await notes_service.vread_note(ctx, token, note_id, version)


@router.get("/DocumentReference/{note_id}/_history")
async def note_history(note_id: str, request: Request, ctx: ContextDep) -> Response:
    token = await gated(request, ctx, "history")
    return await notes_service.note_history(ctx, token, note_id)


@router.get("/DocumentReference/{note_id}")
async def read_note(note_id: str, request: Request, ctx: ContextDep) -> Response:
    token = await gated(request, ctx, "read")
    return await notes_service.read_note(ctx, token, note_id)


@router.put("/DocumentReference/{note_id}")
async def update_note(note_id: str, request: Request, ctx: ContextDep) -> Response:
    return await notes_service.update_note(ctx, note_id, await body_of(request, ctx),
                                     fhirjson.if_match_version(request))


@router.delete("/DocumentReference/{note_id}")
async def delete_note(note_id: str, ctx: ContextDep) -> Response:
    return await notes_service.delete_note(ctx, note_id)


# -- authorizations and consent tokens ----------------------------------------------------------

@router.post("/Consent")
async def create_consent(request: Request, ctx: ContextDep) -> Response:
    return await consents.create_consent(ctx, await body_of(request, ctx))


@router.get("/Consent")
async def search_consents(request: Request, ctx: ContextDep) -> Response:
    return await consents.search_consents(ctx, list(request.query_params.multi_items()))


@router.get("/Consent/{consent_id}")
async def read_consent(consent_id: str, ctx: ContextDep) -> Response:
    return await consents.read_consent(ctx, consent_id)


@router.post("/Consent/{consent_id}/$revoke")
async def revoke_consent(consent_id: str, ctx: ContextDep) -> Response:
    return await consents.revoke_consent(ctx, consent_id)


@router.post("/Consent/{consent_id}/$attest")
async def attest_consent(consent_id: str, ctx: ContextDep) -> Response:
    return await consents.attest_consent(ctx, consent_id)


@router.api_route("/Consent/{consent_id}", methods=["PUT", "PATCH", "DELETE"],
                  include_in_schema=False)  # refused: not in the CapabilityStatement
async def edit_consent(consent_id: str, ctx: ContextDep) -> Response:
    raise errors.MethodNotAllowed(
        "An authorization is not edited: revoke it with POST Consent/{id}/$revoke and record a "
        "new one")


@router.post("/Consent/{consent_id}/$consent-token")
async def consent_token_from_consent(consent_id: str, request: Request, ctx: ContextDep) -> Response:
    return await minting.mint_from_consent(ctx, consent_id, await body_of(request, ctx))


@router.post("/$consent-token")
async def consent_token_for_exception(request: Request, ctx: ContextDep) -> Response:
    return await minting.mint_for_exception(ctx, await body_of(request, ctx))


@router.post("/$revoke-consent-token")
async def revoke_exception_grant(request: Request, ctx: ContextDep) -> Response:
    return await minting.revoke_exception(ctx, await body_of(request, ctx))


@router.api_route("/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
                  include_in_schema=False)  # not a capability (capability/statement.py)
async def anything_else(request: Request, rest: str, ctx: ContextDep) -> Response:
    if request.method == "GET":
        # A read of anything else still goes through the gate first: nothing here answers an
        # unauthorized reader differently from an authorized one.
        await gated(request, ctx, "read")
    raise errors.NotFound("Not found")
