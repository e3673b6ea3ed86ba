"""`GET [base]/metadata` and `GET [base]/OperationDefinition/{id}`: public, like records' and
like the SMART discovery document (the gateway lets both through without a token, proxy
`needs_token`). A client reads them before it holds a token, to learn that this base is
SMART-protected and that reads need a consent token; they describe the server, never a patient
(Inferno's CapabilityStatement test reads `/metadata` with no authorization). Included before
psychnotes.routes, whose catch-all would otherwise demand a token here."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from starlette.responses import Response

from mindchart_core import errors, fhirjson
from psychnotes.capability import operations, statement
from psychnotes.settings import PsychnotesSettings

PREFIX = "/psychnotes/fhir"
router = APIRouter(prefix=PREFIX)
CORS = {"Access-Control-Allow-Origin": "*"}


def install(app: FastAPI, settings: PsychnotesSettings, routers: Iterable[APIRouter]) -> None:
    """Build the statement from the routers the app includes (statement.build refuses a route it
    cannot declare, so the service does not start with one). The routers' own route lists, not
    `app.routes`: FastAPI keeps an included router there as one opaque entry."""
    served = [route for router in routers for route in router.routes]
    app.state.capability_statement = statement.build(served, PREFIX, settings.base_url,
                                                     settings.issuer)
    app.state.operation_definitions = operations.definitions(settings.base_url)


@router.get("/metadata")
async def capability_statement(request: Request) -> Response:
    """R4 http.html#capabilities (`mode` other than full is not supported and ignored)."""
    fhirjson.negotiate(request)
    found: dict[str, Any] = request.app.state.capability_statement
    return fhirjson.FhirResponse(found, headers=CORS)


@router.get("/OperationDefinition/{definition_id}")
async def operation_definition(definition_id: str, request: Request) -> Response:
    fhirjson.negotiate(request)
    found = request.app.state.operation_definitions.get(definition_id)
    if found is None:
        raise errors.NotFound("Unknown OperationDefinition")
    return fhirjson.FhirResponse(found, headers=CORS)
