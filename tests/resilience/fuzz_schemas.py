"""The OpenAPI documents the fuzz tests hand to schemathesis.

The services serve no /openapi.json (`openapi_url=None` in mindchart_core.service_app), and what
FastAPI would derive from their routes is thin: every handler reads its body itself, so no
operation has a request body, and the FHIR routes are catch-alls (`/fhir/{resource_type}/{resource_id}`)
whose parameters are bare strings. So each document starts from that skeleton (FastAPI's own
`get_openapi` over the service's real routes, built in a subprocess so the test process imports no
service) and is filled in from what the running server says about itself:

- records: the CapabilityStatement (`GET /fhir/metadata`, FHIR R4 capabilitystatement.html) names
  each resource type, its interactions and its search parameters with their types
  (search.html#ptypes); `{resource_type}` routes are expanded into one path per type, each with
  its search parameters and a request body from HL7's R4 JSON schema (tests/schema/fhir.schema.json)
  for that type, cut off a few levels deep so generation stays fast;
- psychnotes: the same for its two types (DocumentReference, Consent) and its operations' Parameters;
- gateway: the OAuth endpoints' form parameters from RFC 6749 §4.1.1/§4.1.3/§4.4.2/§6, RFC 7662
  §2.1, RFC 7009 §2.1, RFC 7521 §4.2 (client assertions) and SMART App Launch 2.2 (`aud`, `launch`,
  PKCE per RFC 7636 §4.3);
- workspace: its own routes as FastAPI sees them (form fields added for its posts).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

FHIR_SCHEMA = Path(__file__).resolve().parents[1] / "schema" / "fhir.schema.json"
# Elements left out of generated bodies: recursive or bulky (extensions on every element,
# contained resources, narrative XHTML) and already covered by tests/resilience/test_bad_input.py.
SKIPPED_ELEMENTS = {"extension", "modifierExtension", "contained", "text"}
BODY_DEPTH = 3
# Elements per generated object (the resource's first ones after the boilerplate, in HL7's order,
# and every required one): schemathesis builds its strategies per draw, and each element of a
# FHIR datatype costs time on every example.
TOP_ELEMENTS, NESTED_ELEMENTS = 14, 5
BOILERPLATE = {"id", "meta", "implicitRules", "language"}

# FHIR R4 search.html#prefix: a date, number or quantity value may start with one of these.
PREFIXED_DATE = ("^(eq|ne|gt|lt|ge|le|sa|eb|ap)?-?[0-9]{1,4}(-[0-9]{1,2}(-[0-9]{1,2}(T[0-9]{1,2}:[0-9]{2}"
                 "(:[0-9]{2}(\\.[0-9]{1,9})?)?(Z|[+-][0-9]{2}:[0-9]{2})?)?)?)?$")
TOKEN = "^([!-~]{0,20}\\|)?[!-~]{0,20}$"
FHIR_ID = {"type": "string", "pattern": "^[A-Za-z0-9\\-\\.]{1,64}$"}
SEARCH_RESULT_PARAMS: dict[str, dict[str, Any]] = {  # search.html#return: every type accepts them
    "_count": {"type": "integer"},
    "_sort": {"type": "string"},
    "_include": {"type": "string"},
    "_revinclude": {"type": "string"},
    "_summary": {"type": "string", "enum": ["true", "false", "count", "data", "text", "x"]},
    "_elements": {"type": "string"},
    "_total": {"type": "string"},
    "_format": {"type": "string"},
}
PARAM_SCHEMAS: dict[str, dict[str, Any]] = {  # search.html#ptypes
    "date": {"anyOf": [{"type": "string", "pattern": PREFIXED_DATE}, {"type": "string"}]},
    "token": {"anyOf": [{"type": "string", "pattern": TOKEN}, {"type": "string"}]},
    "quantity": {"anyOf": [{"type": "string", "pattern": "^(gt|lt|ge|le|eq)?-?[0-9]{1,6}(\\.[0-9]+)?"
                                                        "(\\|[!-~]{0,10}\\|[!-~]{0,10})?$"},
                           {"type": "string"}]},
    "reference": {"anyOf": [{"type": "string", "pattern": "^([A-Z][a-z]{2,12}/)?[A-Za-z0-9\\-\\.]{1,20}$"},
                            {"type": "string"}]},
}
JSON_PATCH = {  # RFC 6902 §4
    "type": "array",
    "items": {"type": "object", "required": ["op", "path"], "properties": {
        "op": {"type": "string", "enum": ["add", "remove", "replace", "move", "copy", "test"]},
        "path": {"type": "string", "pattern": "^(/[a-zA-Z0-9_~-]{0,12}){0,4}$"},
        "from": {"type": "string"},
        "value": {},
    }},
}


# -- the skeleton: FastAPI's view of a service's routes ---------------------------------------

def route_skeletons(services: tuple[str, ...], data_dir: Path) -> dict[str, dict[str, Any]]:
    """`get_openapi` over each service's real routes, computed in one child Python (create_app
    only, no lifespan: nothing connects to a datastore; keys it makes go to `data_dir`)."""
    program = (
        "import importlib, json, sys\n"
        "from fastapi.openapi.utils import get_openapi\n"
        "out = {}\n"
        "for name in sys.argv[1:]:\n"
        "    app = importlib.import_module(name + '.app').create_app()\n"
        "    out[name] = get_openapi(title=app.title, version='1', routes=app.routes)\n"
        "print(json.dumps(out))\n"
    )
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", program, *services],
                            capture_output=True, text=True, timeout=180, check=False,
                            env={**os.environ, "MINDCHART_DATA_DIR": str(data_dir)})
    assert result.returncode == 0, result.stderr[-2000:]
    docs: dict[str, dict[str, Any]] = json.loads(result.stdout)
    for doc in docs.values():
        doc["openapi"] = "3.0.3"
        doc.pop("components", None)
    return docs


# -- bodies from HL7's R4 JSON schema ----------------------------------------------------------

@cache
def _definitions() -> dict[str, Any]:
    return dict(json.loads(FHIR_SCHEMA.read_text())["definitions"])


def _element(prop: dict[str, Any], depth: int) -> dict[str, Any]:
    if "$ref" in prop:
        return _definition(prop["$ref"].rsplit("/", 1)[-1], depth)
    if prop.get("type") == "array":
        return {"type": "array", "maxItems": 3, "items": _element(prop.get("items", {}), depth)}
    return {k: v for k, v in prop.items() if k != "description"}


def _definition(name: str, depth: int, top: bool = False) -> dict[str, Any]:
    if name == "ResourceList":  # a contained or inline resource (Bundle.entry.resource, ...)
        return {"type": "object"}
    found = _definitions()[name]
    if "properties" not in found:  # a primitive: its JSON type and the spec's regex
        return {k: v for k, v in found.items() if k != "description"}
    if depth <= 0:
        return {"type": "object"}
    wanted = [k for k in found["properties"] if not k.startswith("_") and k not in SKIPPED_ELEMENTS
              and k not in BOILERPLATE]
    keep = set(wanted[:TOP_ELEMENTS if top else NESTED_ELEMENTS]) | set(found.get("required", []))
    properties = {k: _element(v, depth - 1) for k, v in found["properties"].items() if k in keep}
    out: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    if found.get("required"):
        out["required"] = list(found["required"])
    return out


def resource_body(resource_type: str, depth: int = BODY_DEPTH) -> dict[str, Any]:
    """A JSON schema for `resource_type` as HL7 publishes it, `resourceType` required, cut to
    `depth` levels (deeper elements: any object)."""
    schema = _definition(resource_type, depth, top=True)
    schema["required"] = sorted({"resourceType", *schema.get("required", [])})
    return schema


def _fhir_body(resource_type: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/fhir+json": {"schema": resource_body(resource_type)}}}


def _patch_body() -> dict[str, Any]:
    return {"required": True, "content": {"application/json-patch+json": {"schema": JSON_PATCH}}}


def _form_body(fields: dict[str, dict[str, Any]], required: tuple[str, ...] = ()) -> dict[str, Any]:
    schema = {"type": "object", "properties": fields, "required": list(required)}
    return {"required": True, "content": {"application/x-www-form-urlencoded": {"schema": schema}}}


def _query(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema}


def _op_name(path: str, method: str) -> str:
    return f"{method.upper()} {path}"


# -- records and psychnotes: filled in from the CapabilityStatement -----------------------------

def search_params(capability_resource: dict[str, Any]) -> list[dict[str, Any]]:
    params = [_query(p["name"], PARAM_SCHEMAS.get(p["type"], {"type": "string"}))
              for p in capability_resource.get("searchParam", []) if p["name"] != "_has"]
    return params + [_query(name, schema) for name, schema in SEARCH_RESULT_PARAMS.items()]


def _path_parameters(path: str, known_ids: list[str]) -> list[dict[str, Any]]:
    names = [part[1:-1] for part in path.split("/") if part.startswith("{") and part.endswith("}")]
    out = []
    for name in names:
        schema: dict[str, Any] = copy.deepcopy(FHIR_ID)
        if name == "version":
            schema = {"anyOf": [{"type": "string", "pattern": "^[0-9]{1,3}$"}, FHIR_ID]}
        elif known_ids:  # ids that exist, so reads and writes get past "not found" too
            schema = {"anyOf": [{"type": "string", "enum": known_ids}, FHIR_ID]}
        out.append({"name": name, "in": "path", "required": True, "schema": schema})
    return out


def fhir_openapi(skeleton: dict[str, Any], capability: dict[str, Any], *,
                 known_ids: list[str] | None = None, types: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The skeleton with every `{resource_type}` route expanded per type the CapabilityStatement
    lists (only the interactions it declares for that type; only `types` when given), search
    parameters on searches and conditional writes, and FHIR bodies on writes, `$validate` and
    operations."""
    ids = known_ids or []
    resources = {r["type"]: r for r in capability["rest"][0].get("resource", [])}
    expanded = [t for t in resources if types is None or t in types]
    interactions = {t: {i["code"] for i in r.get("interaction", [])} for t, r in resources.items()}
    # interaction needed per (path shape, method), capabilitystatement.html#interaction
    needs = {
        ("/{resource_type}", "get"): "search-type", ("/{resource_type}", "post"): "create",
        ("/{resource_type}", "put"): "update", ("/{resource_type}", "patch"): "patch",
        ("/{resource_type}", "delete"): "delete",
        ("/{resource_type}/{resource_id}", "get"): "read",
        ("/{resource_type}/{resource_id}", "put"): "update",
        ("/{resource_type}/{resource_id}", "patch"): "patch",
        ("/{resource_type}/{resource_id}", "delete"): "delete",
        ("/{resource_type}/_search", "post"): "search-type",
        ("/{resource_type}/_history", "get"): "history-type",
        ("/{resource_type}/{resource_id}/_history", "get"): "history-instance",
        ("/{resource_type}/{resource_id}/_history/{version}", "get"): "vread",
        ("/{resource_type}/$validate", "post"): "create",
        ("/{resource_type}/{resource_id}/$validate", "post"): "read",
    }
    paths: dict[str, dict[str, Any]] = {}
    for path, methods in skeleton["paths"].items():
        base, _, rest = path.partition("/{resource_type}")
        if not _:
            for method in methods:
                resource_type = _type_in(path, resources)
                _fill(paths.setdefault(path, {}), path, method, resource_type,
                      resources.get(resource_type or ""), ids)
            continue
        for resource_type in expanded:
            concrete = f"{base}/{resource_type}{rest}"
            for method in methods:
                needed = needs.get(("/{resource_type}" + rest, method))
                if needed is None or needed not in interactions[resource_type]:
                    continue
                if method in skeleton["paths"].get(concrete, {}):
                    continue  # the service has a route of its own for it
                _fill(paths.setdefault(concrete, {}), concrete, method, resource_type,
                      resources[resource_type], ids)
    return {**skeleton, "paths": {p: m for p, m in paths.items() if m}}


def _type_in(path: str, resources: dict[str, Any]) -> str | None:
    for part in path.split("/"):
        if part in resources:
            return part
    return None


def _fill(target: dict[str, Any], path: str, method: str, resource_type: str | None,
          capability_resource: dict[str, Any] | None, ids: list[str]) -> None:
    op = {"operationId": _op_name(path, method), "responses": {"default": {"description": "any"}}}
    last = path.rstrip("/").rsplit("/", 1)[-1]
    params = _path_parameters(path, ids)
    is_instance = path.endswith("}") and resource_type is not None and "_history" not in path
    if last == "_search" and capability_resource:
        fields = {p["name"]: p["schema"] for p in search_params(capability_resource)}
        op["requestBody"] = _form_body(fields)
    elif last.startswith("$") or last == "_history" or "/_history/" in path:
        if method == "post":
            body = "Parameters" if last != "$validate" or resource_type is None else resource_type
            op["requestBody"] = _fhir_body(body)
        if last == "_history":
            params += [_query("_since", PARAM_SCHEMAS["date"]), _query("_count", {"type": "integer"})]
        elif method == "get" and last.startswith("$"):
            params += [_query(name, {"type": "string"}) for name in ("_since", "_type", "_outputFormat",
                                                                       "patient", "start", "end")]
    elif resource_type is not None and last == resource_type:  # type level
        if method in ("get", "put", "patch", "delete") and capability_resource:
            params += search_params(capability_resource)
        if method in ("post", "put"):
            op["requestBody"] = _fhir_body(resource_type)
        elif method == "patch":
            op["requestBody"] = _patch_body()
    elif is_instance:
        if method == "put":
            op["requestBody"] = _fhir_body(resource_type or "Resource")
        elif method == "patch":
            op["requestBody"] = _patch_body()
        elif method == "get":
            params += [_query("_elements", {"type": "string"}), _query("_summary", {"type": "string"})]
    elif path.rstrip("/").endswith("/fhir") and method == "post":
        op["requestBody"] = _fhir_body("Bundle")  # batch / transaction
    if method in ("put", "patch", "delete"):
        params.append({"name": "If-Match", "in": "header", "required": False,
                       "schema": {"anyOf": [{"type": "string", "pattern": "^W/\"[0-9]{1,3}\"$"},
                                            {"type": "string"}]}})
    if method == "post" and resource_type is not None and last == resource_type:
        params.append({"name": "If-None-Exist", "in": "header", "required": False,
                       "schema": {"type": "string", "pattern": "^[a-z_-]{1,12}=[!-~]{0,20}$"}})
    if params:
        op["parameters"] = params
    target[method] = op


# -- gateway: the OAuth endpoints' parameters ----------------------------------------------------

def _text(pattern: str | None = None, enum: list[str] | None = None) -> dict[str, Any]:
    """A form or query string. Bounded, so that negative generation has something to break
    (an unbounded string has no invalid form, and hypothesis searches in vain for one)."""
    text: dict[str, Any] = {"type": "string", "maxLength": 512}
    if enum:
        return {"anyOf": [{"type": "string", "enum": enum}, text]}
    return {**text, "pattern": pattern} if pattern else text


def oauth_openapi(skeleton: dict[str, Any], *, client_ids: list[str], redirect_uris: list[str],
                  audiences: list[str]) -> dict[str, Any]:
    """The gateway's own routes (not the proxied FHIR ones, fuzzed through records' and psychnotes'
    documents) with the form and query parameters each takes."""
    client = _text(enum=client_ids)
    scope = _text(enum=["system/*.rs", "system/Patient.rs", "openid fhirUser launch/patient patient/*.rs",
                        "user/*.cruds offline_access", "system/AuditEvent.rs"])
    authorize = {
        "response_type": _text(enum=["code", "token"]), "client_id": client,
        "redirect_uri": _text(enum=redirect_uris), "scope": scope, "state": _text(),
        "aud": _text(enum=audiences), "code_challenge": _text("^[A-Za-z0-9_-]{0,64}$"),
        "code_challenge_method": _text(enum=["S256", "plain"]), "launch": _text(),
    }
    token = {
        "grant_type": _text(enum=["authorization_code", "client_credentials", "refresh_token",
                                  "password"]),
        "code": _text(), "redirect_uri": _text(enum=redirect_uris), "code_verifier": _text(),
        "client_id": client, "client_secret": _text(), "refresh_token": _text(), "scope": scope,
        "client_assertion_type": _text(enum=["urn:ietf:params:oauth:client-assertion-type:jwt-bearer"]),
        "client_assertion": _text("^[A-Za-z0-9_-]{0,40}\\.[A-Za-z0-9_-]{0,40}\\.[A-Za-z0-9_-]{0,40}$"),
    }
    introspect = {"token": _text(), "token_type_hint": _text(enum=["access_token", "refresh_token"]),
                  "client_id": client, "client_secret": _text()}
    forms: dict[tuple[str, str], dict[str, Any]] = {
        # RFC 6749 §4.1.3/§4.4.2/§6: grant_type REQUIRED; RFC 7662 §2.1 and RFC 7009 §2.1: token
        ("/oauth/token", "post"): _form_body(token, ("grant_type",)),
        ("/oauth/introspect", "post"): _form_body(introspect, ("token",)),
        ("/oauth/revoke", "post"): _form_body(introspect, ("token",)),
        ("/oauth/authorize", "post"): _form_body(authorize, ("response_type", "client_id")),
        # the gateway's own sign-in pages (gateway/authorize.py): `session` is the flow's CSRF token
        ("/oauth/authorize/login", "post"): _form_body(
            {"session": _text(), "username": _text(), "password": _text()}, ("session",)),
        ("/oauth/authorize/patient", "post"): _form_body(
            {"session": _text(), "choose": _text(), "name": _text(), "patient": _text()}, ("session",)),
        ("/oauth/authorize/approve", "post"): _form_body(
            {"session": _text(), "scope": scope, "decision": _text(enum=["approve", "deny"])},
            ("session",)),
        ("/oauth/launch", "post"): {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "properties": {"patient": _text(), "encounter": _text(),
                                             "client_id": client, "launch_url": _text()}}}}},
    }
    queries: dict[tuple[str, str], dict[str, dict[str, Any]]] = {
        ("/oauth/authorize", "get"): authorize,
        # `wait` is left out: every case would be held up to 25 s (route-level bad values are
        # tests/e2e/test_gateway_replicas.py's).
        ("/oauth/revocations", "get"): {"since": {"anyOf": [{"type": "string", "format": "date-time"},
                                                            {"type": "string"}]},
                                        "cursor": _text()},
        ("/audit/AuditEvent", "get"): {"date": PARAM_SCHEMAS["date"], "patient": PARAM_SCHEMAS["reference"],
                                       "agent": _text(), "entity": _text(), "outcome": _text(),
                                       "subtype": PARAM_SCHEMAS["token"], "_count": {"type": "integer"}},
        ("/audit/Patient/{patient_id}/$disclosures", "get"): {"date": PARAM_SCHEMAS["date"],
                                                              "start": _text(), "end": _text()},
    }
    paths: dict[str, dict[str, Any]] = {}
    for path, methods in skeleton["paths"].items():
        for method in methods:
            op: dict[str, Any] = {"operationId": _op_name(path, method),
                                  "responses": {"default": {"description": "any"}}}
            params = _path_parameters(path, [])
            params += [_query(name, schema) for name, schema in queries.get((path, method), {}).items()]
            if params:
                op["parameters"] = params
            if (path, method) in forms:
                op["requestBody"] = forms[(path, method)]
            paths.setdefault(path, {})[method] = op
    return {**skeleton, "paths": paths}


# -- workspace: its routes, with the forms its pages post ---------------------------------------

def workspace_openapi(skeleton: dict[str, Any], *, patient_ids: list[str]) -> dict[str, Any]:
    note_form = _form_body({name: _text() for name in (  # what workspace/routes/notes.py reads
        "csrf", "action", "template", "encounter", "session_date", "session_kind", "start", "end", "kind",
        "text", "new_phrase", "phrase_section", "private_text", "safety", "safety_ack", "version",
        "subjective", "assessment", "plan", "phq9_1", "phq9_9")},
        ("csrf",))
    paths: dict[str, dict[str, Any]] = {}
    for path, methods in skeleton["paths"].items():
        for method, original in methods.items():
            op: dict[str, Any] = {"operationId": _op_name(path, method),
                                  "responses": {"default": {"description": "any"}}}
            params = _path_parameters(path, patient_ids)
            params += [p for p in original.get("parameters", []) if p["in"] == "query"]
            if params:
                op["parameters"] = params
            if method == "post":
                op["requestBody"] = note_form
            paths.setdefault(path, {})[method] = op
    return {**skeleton, "paths": paths}


__all__ = ["fhir_openapi", "oauth_openapi", "resource_body", "route_skeletons", "search_params",
           "workspace_openapi"]
