"""Thin FHIR REST handlers for records; the work is in service.py and store.py."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from mindchart_core import errors, fhirjson, tokens, validation
from records import service
from records.policy import AccessPolicy
from records.resources import RESOURCES, ResourceDef
from records.settings import RecordsSettings
from records.store import ResourceStore

router = APIRouter(prefix="/fhir")
_ETAG = re.compile(r'^(?:W/)?"(\d+)"$')


def settings_of(request: Request) -> RecordsSettings:
    settings: RecordsSettings = request.app.state.settings
    return settings


async def get_store(request: Request) -> ResourceStore:
    """Verify the caller's token (again: we trust no network) and bind the store to its policy."""
    fhirjson.negotiate(request)
    token = await request.app.state.verifier.verify(tokens.bearer_token(request))
    policy = AccessPolicy(token=token, base_url=settings_of(request).public_base_url)
    return ResourceStore(request.app.state.mongo, request.app.state.db, policy)


StoreDep = Annotated[ResourceStore, Depends(get_store)]
SettingsDep = Annotated[RecordsSettings, Depends(settings_of)]


def definition_of(resource_type: str) -> ResourceDef:
    definition = RESOURCES.get(resource_type)
    if definition is None:
        raise errors.NotFound(f"Resource type '{resource_type[:64]}' is not supported here")
    return definition


def if_match_version(request: Request) -> int | None:
    header = request.headers.get("if-match")
    if header is None:
        return None
    match = _ETAG.match(header.strip())
    if match is None:
        raise errors.Invalid('If-Match must be an ETag such as W/"3"')
    return int(match.group(1))


async def incoming_resource(request: Request, definition: ResourceDef, settings: RecordsSettings) -> dict[str, Any]:
    body = await fhirjson.read_json_body(request, settings.max_body_bytes)
    return validation.validate_resource(body, definition.type)


@router.get("/metadata")
async def metadata(request: Request, settings: SettingsDep) -> Response:
    fhirjson.negotiate(request)
    statement = service.capability_statement(
        settings.public_base_url, settings.issuer, list(RESOURCES.values())
    )
    return fhirjson.FhirResponse(statement, headers={"Access-Control-Allow-Origin": "*"})


@router.post("/{resource_type}/_search")
async def search_post(resource_type: str, request: Request, store: StoreDep, settings: SettingsDep) -> Response:
    definition = definition_of(resource_type)
    ctype = request.headers.get("content-type", "").split(";")[0].strip()
    if ctype not in ("application/x-www-form-urlencoded", ""):
        raise errors.UnsupportedMediaType("POST _search takes application/x-www-form-urlencoded")
    form = await request.form()
    items = list(request.query_params.multi_items()) + [(k, str(v)) for k, v in form.multi_items()]
    return await service.search_type(store, definition, items, settings.public_base_url,
                                     strict=_strict(request))


@router.get("/{resource_type}/{resource_id}/_history/{version}")
async def vread(resource_type: str, resource_id: str, version: str, store: StoreDep, settings: SettingsDep) -> Response:
    definition = definition_of(resource_type)
    if not version.isdigit():
        raise errors.NotFound("Unknown version")
    stored = await store.vread(definition, resource_id, int(version))
    return service.resource_response(stored, settings.public_base_url)


@router.get("/{resource_type}/{resource_id}")
async def read(resource_type: str, resource_id: str, store: StoreDep, settings: SettingsDep) -> Response:
    stored = await store.read(definition_of(resource_type), resource_id)
    return service.resource_response(stored, settings.public_base_url)


@router.get("/{resource_type}")
async def search(resource_type: str, request: Request, store: StoreDep, settings: SettingsDep) -> Response:
    definition = definition_of(resource_type)
    return await service.search_type(store, definition, list(request.query_params.multi_items()),
                                     settings.public_base_url, strict=_strict(request))


@router.post("/{resource_type}")
async def create(resource_type: str, request: Request, store: StoreDep, settings: SettingsDep) -> Response:
    definition = definition_of(resource_type)
    resource = await incoming_resource(request, definition, settings)
    resource.pop("id", None)  # R4 http.html §create: the server SHALL ignore a client id
    stored = await store.create(definition, resource)
    return service.resource_response(stored, settings.public_base_url, status=201, location=True,
                                     prefer=request.headers.get("prefer"))


@router.put("/{resource_type}/{resource_id}")
async def update(resource_type: str, resource_id: str, request: Request, store: StoreDep, settings: SettingsDep) -> Response:
    definition = definition_of(resource_type)
    if not re.fullmatch(r"[A-Za-z0-9\-.]{1,64}", resource_id):
        raise errors.Invalid("Invalid resource id")
    resource = await incoming_resource(request, definition, settings)
    if resource.get("id") != resource_id:
        raise errors.Invalid("The body's id must match the id in the URL")
    stored, created = await store.update(definition, resource_id, resource, if_match_version(request))
    return service.resource_response(stored, settings.public_base_url, status=201 if created else 200,
                                     location=created, prefer=request.headers.get("prefer"))


@router.delete("/{resource_type}/{resource_id}")
async def delete(resource_type: str, resource_id: str, store: StoreDep) -> Response:
    await store.delete(definition_of(resource_type), resource_id)
    return Response(status_code=204)


def _strict(request: Request) -> bool:
    return "handling=strict" in request.headers.get("prefer", "").replace(" ", "").lower()
