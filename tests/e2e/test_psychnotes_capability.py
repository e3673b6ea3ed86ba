"""psychnotes describes itself through the gateway, as FHIR R4 http.html#capabilities asks of
every server: `GET /psychnotes/fhir/metadata` (no token needed, like records') is an R4
CapabilityStatement that states exactly the routes psychnotes serves, its security (SMART and the
consent token), and one `operation` per operation whose OperationDefinition psychnotes serves.
The gateway's metrics then name those operations."""

from __future__ import annotations

import re
import uuid
from typing import Any

import httpx

from mindchart_core import validation
from psychnotes import app as psychnotes_app
from tests.conftest import RunningStack
from tests.e2e.test_psychnotes import headers, marker, user_token, write_note
from tests.fhir_schema import assert_valid

PREFIX = "/psychnotes/fhir"
FHIR_JSON = {"Accept": "application/fhir+json"}


def metadata(live: RunningStack) -> dict[str, Any]:
    response = httpx.get(f"{live.psychnotes}/metadata", headers=FHIR_JSON)  # no token at all
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    return dict(response.json())


def test_metadata_is_a_valid_r4_capability_statement_without_a_token(live: RunningStack) -> None:
    statement = metadata(live)
    assert_valid(statement)  # HL7's R4 JSON schema
    validation.validate_resource(statement, "CapabilityStatement")  # fhir.resources + bindings
    assert statement["fhirVersion"] == "4.0.1" and statement["kind"] == "instance"
    assert statement["implementation"]["url"] == live.psychnotes
    security = statement["rest"][0]["security"]
    assert security["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"
    assert "Consent-Token" in security["description"]
    extensions = {e["url"]: e for e in security["extension"]}
    oauth = {e["url"]: e["valueUri"] for e in extensions[
        "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"]["extension"]}
    assert oauth["token"] == f"{live.gateway_url}/oauth/token"
    consent = extensions["https://mindchart.dev/fhir/StructureDefinition/consent-token"]["extension"]
    assert {"url": "header", "valueString": "Consent-Token"} in consent
    minted_by = [e["valueCanonical"] for e in consent if e["url"] == "mintedBy"]
    assert minted_by and all(httpx.get(url, headers=FHIR_JSON).status_code == 200 for url in minted_by)
    by_type = {r["type"]: r for r in statement["rest"][0]["resource"]}
    notes = by_type["DocumentReference"]
    assert {p["name"] for p in notes["searchParam"]} == {
        "patient", "subject", "_id", "date", "author", "status", "relatesto", "_lastUpdated", "_tag",
        "_security"}
    assert {p["name"] for p in by_type["Consent"]["searchParam"]} == {"patient", "subject"}
    # A Consent is never edited: its 405 routes are not capabilities.
    assert {i["code"] for i in by_type["Consent"]["interaction"]} == {"read", "create", "search-type"}


def test_every_operation_resolves_to_its_operation_definition(live: RunningStack) -> None:
    rest = metadata(live)["rest"][0]
    declared = [(None, entry) for entry in rest.get("operation", [])] + [
        (resource["type"], entry) for resource in rest["resource"] for entry in resource.get("operation", [])]
    assert len(declared) == 8
    for resource_type, entry in declared:
        assert entry["definition"].startswith(f"{live.psychnotes}/OperationDefinition/")
        response = httpx.get(entry["definition"], headers=FHIR_JSON)  # public, through the gateway
        assert response.status_code == 200, (entry, response.text)
        definition = response.json()
        assert_valid(definition)
        validation.validate_resource(definition, "OperationDefinition")
        assert definition["url"] == entry["definition"] and definition["code"] == entry["name"]
        if resource_type is None:
            assert definition["system"] is True and "resource" not in definition
        else:
            assert definition["resource"] == [resource_type] and definition["system"] is False
        assert definition.get("parameter") or definition["code"] == "sign", definition
    consent_token = httpx.get(f"{live.psychnotes}/OperationDefinition/consent-token").json()
    assert {p["name"] for p in consent_token["parameter"] if p["use"] == "in"} >= {"basis", "patient"}
    unknown = httpx.get(f"{live.psychnotes}/OperationDefinition/no-such-operation", headers=FHIR_JSON)
    assert unknown.status_code == 404 and unknown.json()["resourceType"] == "OperationOutcome"


# -- the route-drift check: the statement against psychnotes' own route table ----------------------

ROUTE_SHAPES = (  # (path pattern relative to the base, {method: interaction}); groups: type, op
    (r"/\$(?P<op>[\w-]+)", None),
    (r"/(?P<type>[A-Z]\w+)/\$(?P<op>[\w-]+)", None),
    (r"/(?P<type>[A-Z]\w+)/\{\w+\}/\$(?P<op>[\w-]+)", None),
    (r"/(?P<type>[A-Z]\w+)", {"GET": "search-type", "POST": "create"}),
    (r"/(?P<type>[A-Z]\w+)/_search", {"POST": "search-type"}),
    (r"/(?P<type>[A-Z]\w+)/\{\w+\}", {"GET": "read", "PUT": "update", "PATCH": "patch",
                                      "DELETE": "delete"}),
    (r"/(?P<type>[A-Z]\w+)/\{\w+\}/_history", {"GET": "history-instance"}),
    (r"/(?P<type>[A-Z]\w+)/\{\w+\}/_history/\{\w+\}", {"GET": "vread"}),
)


def routed_capabilities() -> set[tuple[str | None, str]]:
    """What psychnotes' routers serve, read off their routes (the app includes exactly these)."""
    found: set[tuple[str | None, str]] = set()
    for route in [route for router in psychnotes_app.ROUTERS for route in router.routes]:
        path = str(getattr(route, "path", "")).removeprefix(PREFIX)
        if not getattr(route, "include_in_schema", True) or path in ("/metadata", "") or \
                path.startswith("/.well-known/"):
            continue
        for pattern, by_method in ROUTE_SHAPES:
            matched = re.fullmatch(pattern, path)
            if matched:
                for method in getattr(route, "methods", set()) - {"HEAD"}:
                    name = f"${matched['op']}" if by_method is None else by_method[method]
                    found.add((matched.groupdict().get("type"), name))
                break
        else:
            raise AssertionError(f"a route of unknown shape: {path}")
    return found


def test_the_statement_states_exactly_the_routes_psychnotes_serves(live: RunningStack) -> None:
    rest = metadata(live)["rest"][0]
    stated = {(None, f"${o['name']}") for o in rest.get("operation", [])}
    for resource in rest["resource"]:
        stated |= {(resource["type"], i["code"]) for i in resource["interaction"]}
        stated |= {(resource["type"], f"${o['name']}") for o in resource.get("operation", [])}
    served = routed_capabilities()
    assert ("DocumentReference", "$sign") in served and (None, "$consent-token") in served
    assert stated == served


def test_what_it_says_needs_a_consent_token_does_and_the_rest_does_not(live: RunningStack) -> None:
    """Each interaction the statement marks as needing a Consent-Token is refused without one
    (403), with one exception-free control: a create by the author needs none."""
    therapist = user_token(live, "Practitioner/th-capability")
    patient = f"w-cap-{uuid.uuid4().hex[:6]}"
    note_id = write_note(live, therapist, patient, marker("capability"))  # create: no consent token
    notes = {r["type"]: r for r in metadata(live)["rest"][0]["resource"]}["DocumentReference"]
    gated = {i["code"] for i in notes["interaction"] if "Consent-Token" in i.get("documentation", "")}
    gated |= {f"${o['name']}" for o in notes["operation"] if "Consent-Token" in o.get("documentation", "")}
    assert gated == {"read", "vread", "history-instance", "search-type", "$verify-signature"}
    url = f"{live.psychnotes}/DocumentReference"
    asked = {"read": f"{url}/{note_id}", "vread": f"{url}/{note_id}/_history/1",
             "history-instance": f"{url}/{note_id}/_history", "search-type": f"{url}?patient={patient}",
             "$verify-signature": f"{url}/{note_id}/$verify-signature"}
    for interaction, target in asked.items():
        refused = httpx.get(target, headers=headers(therapist))
        assert refused.status_code == 403, (interaction, refused.text)
        assert refused.json()["resourceType"] == "OperationOutcome"


def test_the_gateway_names_psychnotes_operations_in_its_metrics(live: RunningStack) -> None:
    therapist = user_token(live, "Practitioner/th-cap-metrics")
    patient = f"w-capm-{uuid.uuid4().hex[:6]}"
    note_id = write_note(live, therapist, patient, marker("cap-metrics"), docStatus="preliminary")
    signed = httpx.post(f"{live.psychnotes}/DocumentReference/{note_id}/$sign", headers=headers(therapist))
    assert signed.status_code == 200, signed.text
    invented = httpx.post(f"{live.psychnotes}/DocumentReference/{note_id}/$shred-{uuid.uuid4().hex[:6]}",
                          headers=headers(therapist))
    assert invented.status_code == 404
    metrics = httpx.get(f"{live.direct_url('gateway')}/metrics").text
    assert 'route="/psychnotes/fhir/{type}/{id}/$sign"' in metrics
    assert 'route="/psychnotes/fhir/metadata"' in metrics
    assert "$shred" not in metrics and note_id not in metrics
