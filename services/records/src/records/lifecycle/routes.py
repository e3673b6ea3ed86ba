"""HTTP handlers of the note lifecycle, its OperationDefinitions, and its wiring into records.

`install(app)` (from records/app.py, before records.routes: its `/{type}/{id}` would match these
URLs) loads records' signing key and adds the routes; the OperationDefinitions served at
`[base]/OperationDefinition/{id}` and declared in the CapabilityStatement are in operations.py.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from starlette.responses import JSONResponse, Response

from mindchart_core import errors, fhirjson
from records import routes as fhir_routes
from records import service as fhir_service
from records.amendments import routes as amendment_routes
from records.cdex import capability as cdex_capability
from records.lifecycle import keys, service
from records.lifecycle.operations import JWKS_PATH, operation_definitions
from records.settings import RecordsSettings

router = APIRouter(prefix="/fhir")


def install(app: FastAPI) -> None:
    settings: RecordsSettings = app.state.settings
    app.state.signing_keys = keys.load(settings)
    app.include_router(router)


def _keys(request: Request) -> keys.SigningKeys:
    loaded: keys.SigningKeys = request.app.state.signing_keys
    return loaded


@router.get(JWKS_PATH)
async def signing_jwks(request: Request) -> Response:
    """Records' document-signing public keys (JWK Set, RFC 7517 §5), public like /metadata."""
    return JSONResponse(_keys(request).jwks(), headers={"Access-Control-Allow-Origin": "*",
                                                        "Cache-Control": "max-age=300"},
                        media_type="application/jwk-set+json")


@router.get("/OperationDefinition/{definition_id}")
async def operation_definition(definition_id: str, request: Request,
                               settings: fhir_routes.SettingsDep) -> Response:
    fhirjson.negotiate(request)
    found = operation_definitions(settings.public_base_url).get(definition_id) or \
        cdex_capability.operation_definitions(settings.public_base_url).get(definition_id) or \
        amendment_routes.operation_definitions(settings.public_base_url).get(definition_id)
    if found is None:
        raise errors.NotFound("Unknown OperationDefinition")
    return fhirjson.FhirResponse(found)


@router.post("/DocumentReference/{note_id}/$sign")
async def sign(note_id: str, request: Request, store: fhir_routes.StoreDep,
               settings: fhir_routes.SettingsDep) -> Response:
    await fhirjson.read_no_input(request, "$sign", settings.max_body_bytes)
    signed, _ = await service.sign(store, _keys(request), note_id,
                                   settings.public_base_url + JWKS_PATH)
    return fhir_service.resource_response(signed, settings.public_base_url,
                                          prefer=request.headers.get("prefer"))


@router.post("/DocumentReference/{note_id}/$entered-in-error")
async def entered_in_error(note_id: str, request: Request, store: fhir_routes.StoreDep,
                           settings: fhir_routes.SettingsDep) -> Response:
    """Parameters with `reason` (valueString): the author or an administrator retracts a note."""
    body = await fhirjson.read_json_body(request, settings.max_body_bytes)
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise errors.Invalid("$entered-in-error takes a Parameters resource with a 'reason'")
    reason = next((p.get("valueString") for p in body.get("parameter") or []
                   if isinstance(p, dict) and p.get("name") == "reason"), None)
    if not isinstance(reason, str):
        raise errors.Invalid("$entered-in-error needs a 'reason' (valueString)")
    marked = await service.entered_in_error(store, note_id, reason)
    return fhir_service.resource_response(marked, settings.public_base_url,
                                          prefer=request.headers.get("prefer"))


@router.get("/DocumentReference/{note_id}/$verify-signature")
@router.post("/DocumentReference/{note_id}/$verify-signature")
async def verify_signature(note_id: str, request: Request, store: fhir_routes.StoreDep) -> Response:
    return fhirjson.FhirResponse(await service.verify_signature(store, _keys(request), note_id))


__all__ = ["install", "router"]
