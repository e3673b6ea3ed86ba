"""Structural validation of incoming FHIR R4 resources.

`fhir.resources` R4B models check structure, cardinality and primitive formats. They do not check
required code bindings, empty arrays/objects/strings or JSON nulls, which R4 json.html forbids, so
those checks live here. Validation happens once, on write; reads never re-model stored JSON.
"""

from __future__ import annotations

import importlib
from functools import cache
from typing import Any

import pydantic

from mindchart_core import errors

MAX_DEPTH = 24  # deeper than any R4 resource needs; bounds recursion on hostile input

# Required bindings the models leave unchecked (R4 ValueSets, binding strength "required").
REQUIRED_CODES: dict[tuple[str, str], frozenset[str]] = {
    ("DocumentReference", "status"): frozenset({"current", "superseded", "entered-in-error"}),
    ("DocumentReference", "docStatus"): frozenset(
        {"preliminary", "final", "amended", "entered-in-error"}
    ),
    ("Observation", "status"): frozenset(
        {"registered", "preliminary", "final", "amended", "corrected", "cancelled",
         "entered-in-error", "unknown"}
    ),
    ("Encounter", "status"): frozenset(
        {"planned", "arrived", "triaged", "in-progress", "onleave", "finished", "cancelled",
         "entered-in-error", "unknown"}
    ),
    ("Consent", "status"): frozenset(
        {"draft", "proposed", "active", "rejected", "inactive", "entered-in-error"}
    ),
    ("Group", "type"): frozenset(
        {"person", "animal", "practitioner", "device", "medication", "substance"}
    ),
    ("Patient", "gender"): frozenset({"male", "female", "other", "unknown"}),
    ("Practitioner", "gender"): frozenset({"male", "female", "other", "unknown"}),
}

_MODULE_NAMES = {
    "DocumentReference": "documentreference",
    "OperationOutcome": "operationoutcome",
    "AuditEvent": "auditevent",
}


@cache
def model_for(resource_type: str) -> type[pydantic.BaseModel] | None:
    module_name = _MODULE_NAMES.get(resource_type, resource_type.lower())
    try:
        module = importlib.import_module(f"fhir.resources.R4B.{module_name}")
    except ImportError:
        return None
    model = getattr(module, resource_type, None)
    return model if isinstance(model, type) else None


def _check_json_shape(value: Any, path: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise errors.Structure("Resource is nested too deeply", expression=[path])
    if value is None:
        raise errors.Structure("JSON null is not allowed in FHIR resources", expression=[path])
    if isinstance(value, dict):
        if not value:
            raise errors.Structure("Empty objects are not allowed", expression=[path])
        for key, child in value.items():
            if not isinstance(key, str) or key.startswith("$"):
                raise errors.Structure("Invalid element name", expression=[path])
            _check_json_shape(child, f"{path}.{key}", depth + 1)
    elif isinstance(value, list):
        if not value:
            raise errors.Structure("Empty arrays are not allowed", expression=[path])
        for i, child in enumerate(value):
            _check_json_shape(child, f"{path}[{i}]", depth + 1)
    elif isinstance(value, str) and not value.strip():
        raise errors.Structure("Empty or blank strings are not allowed", expression=[path])


def validate_resource(body: Any, expected_type: str | None = None) -> dict[str, Any]:
    """Validate a client-sent resource; raise Invalid/Structure/Unprocessable, return the body."""
    if not isinstance(body, dict):
        raise errors.Structure("Body must be a JSON object (a FHIR resource)")
    resource_type = body.get("resourceType")
    if not isinstance(resource_type, str):
        raise errors.Structure("Missing resourceType")
    if expected_type is not None and resource_type != expected_type:
        raise errors.Invalid(
            f"resourceType '{resource_type[:64]}' does not match the endpoint ({expected_type})"
        )
    _check_json_shape(body, resource_type, 0)
    model = model_for(resource_type)
    if model is None:
        raise errors.Invalid(f"Unknown resourceType '{resource_type[:64]}'")
    try:
        model.model_validate(body)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if not str(p).startswith("function-"))
        kind = first["type"]
        message = "Unknown element" if kind == "extra_forbidden" else str(first["msg"])[:200]
        raise errors.Structure(
            f"{message} at {resource_type}.{where}", expression=[f"{resource_type}.{where}"]
        ) from None
    except (ValueError, TypeError, RecursionError):
        raise errors.Structure(f"Invalid {resource_type}") from None
    for (rtype, element), allowed in REQUIRED_CODES.items():
        if rtype == resource_type and allowed and element in body and body[element] not in allowed:
            raise errors.Structure(
                f"{rtype}.{element} must be one of: {', '.join(sorted(allowed))}",
                expression=[f"{rtype}.{element}"],
            )
    return body
