"""Structural validation of incoming FHIR R4 resources.

`fhir.resources` R4B models check structure, cardinality and primitive formats. They do not check
required code bindings, empty arrays/objects/strings or JSON nulls, which R4 json.html forbids, so
those checks live here. Validation happens once, on write; reads never re-model stored JSON.
"""

from __future__ import annotations

import datetime as dt
import decimal
import importlib
import types
import typing
from functools import cache
from typing import Any

import pydantic
from fhir.resources.R4B import get_fhir_model_class

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


# -- typed primitives -------------------------------------------------------------------------
# R4 datatypes.html, primitive types table: boolean is a JSON boolean; integer, positiveInt,
# unsignedInt and decimal are JSON numbers;
# every other primitive (string, code, uri, date, dateTime, instant, time ...) a
# JSON string. The models coerce ("yes" -> True, "21" -> 21, 5 -> 1970-01-01T00:00:05Z), which
# would store JSON that strict clients reject, so the JSON types are checked here first.

_KIND_BOOLEAN, _KIND_INTEGER, _KIND_DECIMAL, _KIND_STRING = "boolean", "integer", "decimal", "string"
_JSON_TYPE_NAMES = {_KIND_BOOLEAN: "a JSON boolean", _KIND_INTEGER: "a JSON integer",
                    _KIND_DECIMAL: "a JSON number", _KIND_STRING: "a JSON string"}


def _element_kind(annotation: Any) -> str | type[pydantic.BaseModel] | None:
    """What an element of this annotation must be: a primitive kind, a model to walk, or None
    (a contained resource, resolved by its resourceType)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _element_kind(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType, list, typing.List):  # noqa: UP006
        kinds = [_element_kind(a) for a in typing.get_args(annotation) if a is not type(None)]
        return kinds[0] if kinds else _KIND_STRING
    if annotation is bool:
        return _KIND_BOOLEAN
    if annotation is int:
        return _KIND_INTEGER
    if annotation in (float, decimal.Decimal):
        return _KIND_DECIMAL
    if annotation in (str, bytes, dt.date, dt.datetime, dt.time):
        return _KIND_STRING
    name = getattr(annotation, "__name__", "")
    if name == "ResourceType":
        return None
    if name.endswith("Type") and name != "Type":
        try:
            model = get_fhir_model_class(name[:-4])
        except (KeyError, ValueError, AttributeError):
            return _KIND_STRING
        return model if isinstance(model, type) else _KIND_STRING
    return _KIND_STRING


@cache
def _element_kinds(model: type[pydantic.BaseModel]) -> dict[str, Any]:
    kinds: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        key = info.alias or name
        if key.startswith("_") or name.endswith("__ext") or name == "fhir_comments":
            continue
        kinds[key] = _element_kind(info.annotation)
    return kinds


def _primitive_ok(kind: str, value: Any) -> bool:
    if kind == _KIND_BOOLEAN:
        return isinstance(value, bool)
    if kind == _KIND_INTEGER:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == _KIND_DECIMAL:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, str)


def _check_primitives(value: dict[str, Any], model: type[pydantic.BaseModel], path: str) -> None:
    kinds = _element_kinds(model)
    for key, child in value.items():
        kind = kinds.get(key)
        if key == "resourceType" or key not in kinds:
            continue  # unknown elements are the model's to refuse
        where = f"{path}.{key}"
        for i, item in enumerate(child if isinstance(child, list) else [child]):
            at = f"{where}[{i}]" if isinstance(child, list) else where
            if kind is None:
                if isinstance(item, dict) and isinstance(item.get("resourceType"), str):
                    inner = model_for(item["resourceType"])
                    if inner is not None:
                        _check_primitives(item, inner, at)
            elif isinstance(kind, str):
                if not _primitive_ok(kind, item):
                    raise errors.Structure(f"{at} must be {_JSON_TYPE_NAMES[kind]}", expression=[at])
            elif isinstance(item, dict):
                _check_primitives(item, kind, at)


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
    _check_primitives(body, model, resource_type)
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
