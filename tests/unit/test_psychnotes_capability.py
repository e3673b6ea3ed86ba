"""psychnotes' CapabilityStatement is built from its route table, so it cannot drift: a route it
cannot state (an operation without an OperationDefinition, a GET on one that changes state, a
search parameter without a definition) stops the build, and with it the service's start."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import APIRouter
from starlette.routing import BaseRoute

from mindchart_core import validation
from psychnotes import notes_service, routes
from psychnotes.capability import operations, statement
from psychnotes.capability import routes as capability_routes
from psychnotes.lifecycle import routes as lifecycle_routes

BASE = "https://example.org/psychnotes/fhir"


def app_routes(*extra: BaseRoute) -> list[BaseRoute]:
    return [*capability_routes.router.routes, *lifecycle_routes.router.routes, *extra,
            *routes.router.routes]


def build(route_list: list[BaseRoute]) -> dict[str, Any]:
    return statement.build(route_list, "/psychnotes/fhir", BASE, "https://example.org")


def extra_route(method: str, path: str) -> BaseRoute:
    router = APIRouter(prefix="/psychnotes/fhir")
    router.add_api_route(path, lambda: None, methods=[method])
    return router.routes[0]


def test_the_statement_and_every_definition_are_valid_r4() -> None:
    built = build(app_routes())
    validation.validate_resource(built, "CapabilityStatement")
    for definition in operations.definitions(BASE).values():
        validation.validate_resource(definition, "OperationDefinition")


@pytest.mark.parametrize(("method", "path", "problem"), [
    ("POST", "/DocumentReference/{note_id}/$shred", "has no OperationDefinition"),
    ("POST", "/$sign", "has no OperationDefinition"),  # defined on an instance, not the system
    ("GET", "/DocumentReference/{note_id}/$sign", "affectsState false"),
    ("GET", "/DocumentReference/{note_id}/attachments/{n}", "not a FHIR interaction"),
])
def test_a_route_it_cannot_state_stops_the_build(method: str, path: str, problem: str) -> None:
    with pytest.raises(statement.UndeclaredRoute, match=problem.replace("$", r"\$")):
        build(app_routes(extra_route(method, path)))


def test_a_search_parameter_without_a_definition_stops_the_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(statement.SEARCH_PARAMS, "DocumentReference",
                        notes_service.SEARCH_PARAMS | {"category"})
    with pytest.raises(statement.UndeclaredRoute, match="category"):
        build(app_routes())


def test_a_new_route_appears_in_the_statement() -> None:
    before = build(app_routes())["rest"][0]["resource"]
    after = build(app_routes(extra_route("GET", "/Consent/{consent_id}/_history")))["rest"][0]["resource"]
    codes = {r["type"]: {i["code"] for i in r["interaction"]} for r in (before + after)[len(before):]}
    assert "history-instance" in codes["Consent"]
    assert "history-instance" not in {i["code"] for r in before if r["type"] == "Consent"
                                      for i in r["interaction"]}
