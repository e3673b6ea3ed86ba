"""HTTP handlers of $meta, $meta-add and $meta-delete (records/meta/operations.py), mounted before
records.routes (whose `/{type}/{id}` would match these URLs)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from mindchart_core import errors, fhirjson
from records import routes as fhir_routes
from records.meta import operations
from records.settings import RecordsSettings

router = APIRouter(prefix="/fhir")


async def _no_input(request: Request, settings: RecordsSettings) -> None:
    if request.method == "POST":
        await fhirjson.read_no_input(request, "$meta", settings.max_body_bytes)


@router.get("/$meta")
@router.post("/$meta")
async def meta_system(request: Request, store: fhir_routes.StoreDep,
                      settings: fhir_routes.SettingsDep) -> Response:
    """R4 Resource-meta at system level: what is in use across the types the caller may search."""
    await _no_input(request, settings)
    return fhirjson.FhirResponse(await operations.in_use(store, None))


@router.get("/{resource_type}/$meta")
@router.post("/{resource_type}/$meta")
async def meta_type(resource_type: str, request: Request, store: fhir_routes.StoreDep,
                    settings: fhir_routes.SettingsDep) -> Response:
    definition = fhir_routes.definition_of(resource_type)
    await _no_input(request, settings)
    return fhirjson.FhirResponse(await operations.in_use(store, definition))


@router.get("/{resource_type}/{resource_id}/$meta")
@router.post("/{resource_type}/{resource_id}/$meta")
async def meta_instance(resource_type: str, resource_id: str, request: Request,
                        store: fhir_routes.StoreDep, settings: fhir_routes.SettingsDep) -> Response:
    definition = fhir_routes.definition_of(resource_type)
    await _no_input(request, settings)
    stored = await store.read(definition, resource_id)
    return fhirjson.FhirResponse(operations.parameters(operations.meta_of(stored)))


@router.get("/{resource_type}/{resource_id}/_history/{version}/$meta")
@router.post("/{resource_type}/{resource_id}/_history/{version}/$meta")
async def meta_version(resource_type: str, resource_id: str, version: str, request: Request,
                       store: fhir_routes.StoreDep, settings: fhir_routes.SettingsDep) -> Response:
    """R4 Resource-meta "as a special case" on a historical version."""
    definition = fhir_routes.definition_of(resource_type)
    await _no_input(request, settings)
    if not version.isdigit() or len(version) > 12:
        raise errors.NotFound("Unknown version")
    stored = await store.vread(definition, resource_id, int(version))
    return fhirjson.FhirResponse(operations.parameters(operations.meta_of(stored)))


@router.post("/{resource_type}/{resource_id}/$meta-add")
async def meta_add(resource_type: str, resource_id: str, request: Request,
                   store: fhir_routes.StoreDep, settings: fhir_routes.SettingsDep) -> Response:
    definition = fhir_routes.definition_of(resource_type)
    body = await fhirjson.read_json_body(request, settings.max_body_bytes)
    return fhirjson.FhirResponse(await operations.change(store, definition, resource_id, body,
                                                         delete=False))


@router.post("/{resource_type}/{resource_id}/$meta-delete")
async def meta_delete(resource_type: str, resource_id: str, request: Request,
                      store: fhir_routes.StoreDep, settings: fhir_routes.SettingsDep) -> Response:
    definition = fhir_routes.definition_of(resource_type)
    body = await fhirjson.read_json_body(request, settings.max_body_bytes)
    return fhirjson.FhirResponse(await operations.change(store, definition, resource_id, body,
                                                         delete=True))


@router.post("/{resource_type}/{resource_id}/_history/{version}/$meta-add")
@router.post("/{resource_type}/{resource_id}/_history/{version}/$meta-delete")
async def meta_change_version(resource_type: str, resource_id: str, version: str) -> Response:
    """R4 4.0.1 defines $meta-add/-delete on the resource, not its history; records keeps every
    stored version as written (operations.py), so a historical version's meta never changes."""
    fhir_routes.definition_of(resource_type)
    raise errors.FhirError("A historical version's meta does not change: use "
                           f"{resource_type[:64]}/{{id}}/$meta-add or $meta-delete on the resource",
                           status=400, code="not-supported")
