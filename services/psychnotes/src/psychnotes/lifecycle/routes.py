"""HTTP handlers of the psychotherapy-note lifecycle (service.py) and psychnotes' document-signing
JWK Set. Included before psychnotes.routes, whose catch-all would otherwise answer these URLs."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from mindchart_core import fhirjson
from mindchart_core.signatures import SigningKeys
from psychnotes import routes
from psychnotes.lifecycle import service
from psychnotes.lifecycle.keys import JWKS_PATH

router = APIRouter(prefix="/psychnotes/fhir")


def _keys(request: Request) -> SigningKeys:
    loaded: SigningKeys = request.app.state.document_keys
    return loaded


@router.get(JWKS_PATH)
async def signing_jwks(request: Request) -> Response:
    """The public keys that verify psychnotes' note signatures (JWK Set, RFC 7517 §5): public,
    like records' (the gateway lets `.well-known/jwks.json` through without a token)."""
    return JSONResponse(_keys(request).jwks(), headers={"Access-Control-Allow-Origin": "*",
                                                        "Cache-Control": "max-age=300"},
                        media_type="application/jwk-set+json")


@router.post("/DocumentReference/{note_id}/$sign")
async def sign_note(note_id: str, request: Request, ctx: routes.ContextDep) -> Response:
    await fhirjson.read_no_input(request, "$sign", ctx.settings.max_body_bytes)
    return await service.sign(ctx, _keys(request), note_id)


@router.post("/DocumentReference/{note_id}/$entered-in-error")
async def entered_in_error(note_id: str, request: Request, ctx: routes.ContextDep) -> Response:
    """Parameters with `reason` (valueString): the author retracts a signed note."""
    return await service.entered_in_error(ctx, note_id, await routes.body_of(request, ctx))


@router.get("/DocumentReference/{note_id}/$verify-signature")
@router.post("/DocumentReference/{note_id}/$verify-signature")
async def verify_signature(note_id: str, request: Request, ctx: routes.ContextDep) -> Response:
    token = await routes.gated(request, ctx, "verify-signature")
    return await service.verify_signature(ctx, token, _keys(request), note_id)
