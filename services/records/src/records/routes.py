"""Thin FHIR REST handlers for records; the work is in service.py and store.py."""

from __future__ import annotations

import re
import uuid
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request
from pymongo.asynchronous.client_session import AsyncClientSession
from starlette.responses import Response

from mindchart_core import errors, fhirjson, tokens, validation
from records import bundles, cdex, patch, service, subscriptions
from records import meta as resource_meta
from records.amendments import appended
from records.amendments import routes as amendments
from records.export import declare as declare_bulk_export
from records.lifecycle.operations import declare as declare_lifecycle
from records.policy import AccessPolicy
from records.resources import RESOURCES, ResourceDef
from records.search import query
from records.settings import RecordsSettings
from records.store import ResourceStore, StoredResource

router = APIRouter(prefix="/fhir")
JSON_PATCH = frozenset({"application/json-patch+json"})


def settings_of(request: Request) -> RecordsSettings:
    settings: RecordsSettings = request.app.state.settings
    return settings


async def get_store(request: Request) -> ResourceStore:
    """Verify the caller's token (again: we trust no network) and bind the store to its policy."""
    fhirjson.negotiate(request)
    token = await request.app.state.verifier.verify(tokens.bearer_token(request))
    policy = AccessPolicy(token=token, base_url=settings_of(request).public_base_url)
    return ResourceStore(request.app.state.mongo, request.app.state.db, policy)


async def _settings(request: Request) -> RecordsSettings:
    """settings_of as a dependency. Async on purpose: FastAPI runs a plain `def` dependency in a
    worker thread, a thread hand-off on every request for a dictionary lookup."""
    return settings_of(request)


StoreDep = Annotated[ResourceStore, Depends(get_store)]
SettingsDep = Annotated[RecordsSettings, Depends(_settings)]


def definition_of(resource_type: str) -> ResourceDef:
    definition = RESOURCES.get(resource_type)
    if definition is None:
        raise errors.NotFound(f"Resource type '{resource_type[:64]}' is not supported here")
    return definition


async def incoming_resource(request: Request, definition: ResourceDef,
                            settings: RecordsSettings) -> dict[str, Any]:
    body = await fhirjson.read_json_body(request, settings.max_body_bytes)
    return validation.validate_resource(body, definition.type)


@router.get("/metadata")
async def metadata(request: Request, settings: SettingsDep) -> Response:
    fhirjson.negotiate(request)
    statement = service.capability_statement(
        settings.public_base_url, settings.issuer, list(RESOURCES.values())
    )
    declare_bulk_export(statement)  # Bulk Data operations (records/export)
    cdex.declare(statement, settings.public_base_url)  # Da Vinci CDex parts (records/cdex)
    declare_lifecycle(statement, settings.public_base_url)  # $sign, $verify-signature
    amendments.declare(statement, settings.public_base_url)  # 164.526 requests (records/amendments)
    subscriptions.declare(statement)  # topic-based Subscription (records/subscriptions)
    resource_meta.declare(statement)  # $meta, $meta-add, $meta-delete (records/meta)
    return fhirjson.FhirResponse(statement, headers={"Access-Control-Allow-Origin": "*"})


@router.post("")
@router.post("/")
async def batch_or_transaction(request: Request, store: StoreDep, settings: SettingsDep) -> Response:
    """R4 http.html §transaction: a batch or transaction Bundle posted to the base."""
    body = await fhirjson.read_json_body(request, settings.max_body_bytes)
    result = await bundles.process(store, body, settings.public_base_url,
                                   prefer=request.headers.get("prefer"))
    return fhirjson.FhirResponse(result)


@router.post("/{resource_type}/_search")
async def search_post(resource_type: str, request: Request, store: StoreDep,
                      settings: SettingsDep) -> Response:
    definition = definition_of(resource_type)
    ctype = request.headers.get("content-type", "").split(";")[0].strip()
    if ctype not in ("application/x-www-form-urlencoded", ""):
        raise errors.UnsupportedMediaType("POST _search takes application/x-www-form-urlencoded")
    form = await request.form()
    items = list(request.query_params.multi_items()) + [(k, str(v)) for k, v in form.multi_items()]
    return await service.search_type(store, definition, items, settings.public_base_url,
                                     strict=_strict(request))


@router.post("/{resource_type}/$validate")
async def validate_type(resource_type: str, request: Request, store: StoreDep,
                        settings: SettingsDep) -> Response:
    """R4 Resource $validate at type level: an OperationOutcome, stores nothing."""
    definition = definition_of(resource_type)
    _may_validate(store, definition)
    body = await fhirjson.read_json_body(request, settings.max_body_bytes)
    return fhirjson.FhirResponse(service.validate_outcome(body, definition))


@router.post("/{resource_type}/{resource_id}/$validate")
async def validate_instance(resource_type: str, resource_id: str, request: Request, store: StoreDep,
                            settings: SettingsDep) -> Response:
    """$validate against an existing resource (404 when the caller cannot see it)."""
    definition = definition_of(resource_type)
    await store.read(definition, resource_id)
    body = await fhirjson.read_json_body(request, settings.max_body_bytes)
    outcome = service.validate_outcome(body, definition)
    same_type = isinstance(body, dict) and body.get("resourceType") == definition.type
    if same_type and body.get("id") != resource_id:
        outcome["issue"].append({"severity": "error", "code": "invalid",
                                 "diagnostics": "The resource id must match the id in the URL"})
        outcome["issue"] = [i for i in outcome["issue"] if i["severity"] != "information"]
    return fhirjson.FhirResponse(outcome)


def _may_validate(store: ResourceStore, definition: ResourceDef) -> None:
    scopes = store.policy.token.scope
    if not any(scopes.allows(definition.type, i) for i in ("create", "update", "read")):
        raise errors.InsufficientScope(f"The granted scopes do not permit $validate on {definition.type}")


@router.get("/DocumentReference/$docref")
@router.post("/DocumentReference/$docref")
async def docref(request: Request, store: StoreDep, settings: SettingsDep) -> Response:
    """US Core $docref: GET with query parameters, or POST with a Parameters resource."""
    items = list(request.query_params.multi_items())
    if request.method == "POST":
        body = await fhirjson.read_json_body(request, settings.max_body_bytes)
        if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
            raise errors.Invalid("POST $docref takes a Parameters resource")
        for p in body.get("parameter", []):
            if not isinstance(p, dict):
                continue
            value = next((v for k, v in p.items() if k.startswith("value")), None)
            if isinstance(value, dict) and "coding" in value:  # type as a CodeableConcept
                coding = value["coding"][0]
                value = f"{coding.get('system', '')}|{coding.get('code', '')}"
            if isinstance(p.get("name"), str) and isinstance(value, str):
                items.append((p["name"], value))
    return fhirjson.FhirResponse(await service.docref(store, items, settings.public_base_url))


@router.get("/_history")
async def history_system(request: Request, store: StoreDep, settings: SettingsDep) -> Response:
    """R4 http.html §history: `GET [base]/_history[?_since=&_count=]`, every type the caller may see."""
    body = await service.history_bundle(store, None, None, list(request.query_params.multi_items()),
                                        settings.public_base_url)
    return fhirjson.FhirResponse(body)


@router.get("/{resource_type}/_history")
async def history_type(resource_type: str, request: Request, store: StoreDep,
                       settings: SettingsDep) -> Response:
    definition = definition_of(resource_type)
    body = await service.history_bundle(store, definition, None, list(request.query_params.multi_items()),
                                        settings.public_base_url)
    return fhirjson.FhirResponse(body)


@router.get("/{resource_type}/{resource_id}/_history")
async def history_instance(resource_type: str, resource_id: str, request: Request, store: StoreDep,
                           settings: SettingsDep) -> Response:
    definition = definition_of(resource_type)
    body = await service.history_bundle(store, definition, resource_id,
                                        list(request.query_params.multi_items()), settings.public_base_url)
    return fhirjson.FhirResponse(body)


@router.get("/{resource_type}/{resource_id}/_history/{version}")
async def vread(resource_type: str, resource_id: str, version: str, store: StoreDep,
                settings: SettingsDep) -> Response:
    definition = definition_of(resource_type)
    if not version.isdigit() or len(version) > 12:
        raise errors.NotFound("Unknown version")
    stored = await store.vread(definition, resource_id, int(version))
    return service.resource_response(stored, settings.public_base_url,
                                     links=await appended.link_header(store, stored,
                                                                      settings.public_base_url))


@router.get("/{resource_type}/{resource_id}")
async def read(resource_type: str, resource_id: str, request: Request, store: StoreDep,
               settings: SettingsDep) -> Response:
    definition = definition_of(resource_type)
    shaping = query.parse(definition, [(k, v) for k, v in request.query_params.multi_items()
                                       if k in ("_summary", "_elements")], base_url="")
    stored = await store.read(definition, resource_id)
    return service.resource_response(stored, settings.public_base_url, summary=shaping.summary,
                                     elements=shaping.elements,
                                     links=await appended.link_header(store, stored,
                                                                      settings.public_base_url))


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
    prefer = request.headers.get("prefer")
    criteria = request.headers.get("if-none-exist")
    if criteria is not None:  # conditional create: 0 → create, 1 → 200 with it, >1 → 412
        stored, created = await service.match_or_create(store, definition, resource, criteria,
                                                        settings.public_base_url)
    else:
        stored, created = await store.create(definition, resource), True
    return service.resource_response(stored, settings.public_base_url, status=201 if created else 200,
                                     location=True, prefer=prefer)


@router.put("/{resource_type}")
async def conditional_update(resource_type: str, request: Request, store: StoreDep,
                             settings: SettingsDep) -> Response:
    """R4 http.html §cond-update: PUT [type]?criteria; 0 matches → create, 1 → update, >1 → 412."""
    definition = definition_of(resource_type)
    resource = await incoming_resource(request, definition, settings)
    criteria, if_match = request.url.query, fhirjson.if_match_version(request)

    async def once(session: AsyncClientSession) -> tuple[StoredResource, bool]:
        # Claimed first, so concurrent conditional updates with these criteria run one at a time.
        await store.claim(definition, service.criteria_key(criteria), session)
        found = await service.matching(store, definition, criteria, settings.public_base_url, session)
        if len(found) > 1:
            raise errors.PreconditionFailed("The criteria match more than one resource")
        if found:
            target = found[0].id
            if resource.get("id") not in (None, target):
                raise errors.Invalid("The body's id does not match the resource the criteria found")
        else:
            target = resource.get("id") or str(uuid.uuid4())
        return await store.update(definition, target, {**resource, "id": target}, if_match, session=session)

    stored, created = await store.atomically(once)
    return service.resource_response(stored, settings.public_base_url, status=201 if created else 200,
                                     location=created, prefer=request.headers.get("prefer"))


@router.put("/{resource_type}/{resource_id}")
async def update(resource_type: str, resource_id: str, request: Request, store: StoreDep,
                 settings: SettingsDep) -> Response:
    definition = definition_of(resource_type)
    if not re.fullmatch(r"[A-Za-z0-9\-.]{1,64}", resource_id):
        raise errors.Invalid("Invalid resource id")
    resource = await incoming_resource(request, definition, settings)
    if resource.get("id") != resource_id:
        raise errors.Invalid("The body's id must match the id in the URL")
    stored, created = await store.update(definition, resource_id, resource,
                                         fhirjson.if_match_version(request))
    return service.resource_response(stored, settings.public_base_url, status=201 if created else 200,
                                     location=created, prefer=request.headers.get("prefer"))


@router.patch("/{resource_type}/{resource_id}")
async def json_patch(resource_type: str, resource_id: str, request: Request, store: StoreDep,
                     settings: SettingsDep) -> Response:
    """R4 http.html §patch with JSON Patch; the patched resource is validated like any update."""
    definition = definition_of(resource_type)
    operations = await fhirjson.read_json_body(request, settings.max_body_bytes,
                                               media_types=JSON_PATCH)
    return await _patch(definition, resource_id, operations, request, store, settings)


@router.patch("/{resource_type}")
async def conditional_patch(resource_type: str, request: Request, store: StoreDep,
                            settings: SettingsDep) -> Response:
    """R4 http.html §patch: `PATCH [type]?criteria` patches the one match; none → 404, several →
    412 (as conditional update), all through the caller's policy."""
    definition = definition_of(resource_type)
    operations = await fhirjson.read_json_body(request, settings.max_body_bytes,
                                               media_types=JSON_PATCH)
    found = await service.matching(store, definition, request.url.query, settings.public_base_url)
    if len(found) > 1:
        raise errors.PreconditionFailed("The criteria match more than one resource")
    if not found:
        raise errors.NotFound(f"No {definition.type} matches the criteria")
    return await _patch(definition, found[0].id, operations, request, store, settings)


async def _patch(definition: ResourceDef, resource_id: str, operations: Any, request: Request,
                 store: ResourceStore, settings: RecordsSettings) -> Response:
    current = await store.read(definition, resource_id, interaction="patch")
    wanted = fhirjson.if_match_version(request)
    if wanted is not None and wanted != current.version:
        raise errors.PreconditionFailed("If-Match does not match the current version")
    patched = patch.apply(orjson.loads(current.raw or b"{}"), operations,
                          max_bytes=settings.max_body_bytes)
    try:
        validation.validate_resource(patched, definition.type)
    except errors.FhirError as problem:
        raise errors.Unprocessable(f"The patched resource is invalid: {problem.diagnostics}",
                                   expression=problem.expression) from None
    stored, _ = await store.update(definition, resource_id, patched, current.version)
    return service.resource_response(stored, settings.public_base_url, prefer=request.headers.get("prefer"))


@router.delete("/{resource_type}")
async def conditional_delete(resource_type: str, request: Request, store: StoreDep,
                             settings: SettingsDep) -> Response:
    """R4 http.html §conditional-delete, `conditionalDelete: single`: one match is deleted; no
    match is the ordinary delete of nothing (204, which also tells nothing about resources the
    caller may not see); several are 412 Precondition Failed ("A server may choose to delete all
    the matching resources, or it may choose to return a 412"). Checked and deleted in one
    transaction that first claims the criteria, as conditional updates are."""
    definition = definition_of(resource_type)
    criteria, if_match = request.url.query, fhirjson.if_match_version(request)

    async def once(session: AsyncClientSession) -> None:
        await store.claim(definition, service.criteria_key(criteria), session)
        found = await service.matching(store, definition, criteria, settings.public_base_url, session)
        if len(found) > 1:
            raise errors.PreconditionFailed("The criteria match more than one resource")
        if found:
            await store.delete(definition, found[0].id, if_match, session=session)

    await store.atomically(once)
    return Response(status_code=204)


@router.delete("/{resource_type}/{resource_id}")
async def delete(resource_type: str, resource_id: str, request: Request, store: StoreDep) -> Response:
    await store.delete(definition_of(resource_type), resource_id, fhirjson.if_match_version(request))
    return Response(status_code=204)


def _strict(request: Request) -> bool:
    return "handling=strict" in request.headers.get("prefer", "").replace(" ", "").lower()
