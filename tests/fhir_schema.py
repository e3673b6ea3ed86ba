"""Validate what the servers return against HL7's official FHIR R4 JSON schema (tests/schema/).

The schema's `ResourceList` is a `oneOf` over ~150 resource types; checking it literally is slow
and its errors are useless, so contained resources (Bundle entries, outcomes) are dispatched on
their `resourceType` to that type's own definition. That is the same check, done faster: every
definition pins `resourceType` with `const`, so exactly one branch of the `oneOf` can ever match.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft6Validator

SCHEMA_FILE = Path(__file__).parent / "schema" / "fhir.schema.json"
_ANY_RESOURCE = {"$ref": "#/definitions/ResourceList"}


def _add_r4_technical_correction(node: Any) -> None:
    """The file is HL7's 4.0.0 schema; 4.0.1 (the R4 technical correction) only added "4.0.1" to
    the FHIRVersion code lists (CapabilityStatement.fhirVersion and the like). Add it back."""
    if isinstance(node, dict):
        enum = node.get("enum")
        if isinstance(enum, list) and "4.0.0" in enum and "4.0.1" not in enum:
            enum.append("4.0.1")
        for child in node.values():
            _add_r4_technical_correction(child)
    elif isinstance(node, list):
        for child in node:
            _add_r4_technical_correction(child)


@cache
def _definitions() -> dict[str, Any]:
    schema = json.loads(SCHEMA_FILE.read_text())
    definitions: dict[str, Any] = copy.deepcopy(schema["definitions"])
    _add_r4_technical_correction(definitions)
    # Contained resources are checked one by one below, against their own type.
    definitions["ResourceList"] = {"type": "object", "required": ["resourceType"]}
    return definitions


@cache
def _validator(resource_type: str) -> Draft6Validator:
    definitions = _definitions()
    if resource_type not in definitions or "resourceType" not in definitions[resource_type].get(
        "properties", {}
    ):
        raise AssertionError(f"{resource_type!r} is not an R4 resource type")
    schema = {"$ref": f"#/definitions/{resource_type}", "definitions": definitions}
    return Draft6Validator(schema)


def _nested_resources(resource: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    found: list[tuple[str, dict[str, Any]]] = []
    for i, item in enumerate(resource.get("contained", [])):
        found.append((f"contained[{i}]", item))
    if resource.get("resourceType") == "Bundle":
        for i, entry in enumerate(resource.get("entry", [])):
            if isinstance(entry.get("resource"), dict):
                found.append((f"entry[{i}].resource", entry["resource"]))
            outcome = entry.get("response", {}).get("outcome")
            if isinstance(outcome, dict):
                found.append((f"entry[{i}].response.outcome", outcome))
    return found


def schema_errors(resource: Any, where: str = "") -> list[str]:
    """Every schema violation in a resource and the resources it carries ([] when valid)."""
    if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
        return [f"{where or 'body'}: not a FHIR resource"]
    errors = [
        f"{where}{'.' if where else ''}{'/'.join(str(p) for p in e.absolute_path)}: {e.message[:300]}"
        for e in _validator(resource["resourceType"]).iter_errors(resource)
    ]
    for path, nested in _nested_resources(resource):
        errors.extend(schema_errors(nested, f"{where}{'.' if where else ''}{path}"))
    return errors


def assert_valid(resource: Any) -> Any:
    """Fail the test with every violation listed; return the resource for chaining."""
    problems = schema_errors(resource)
    assert not problems, "Invalid against the FHIR R4 JSON schema:\n" + "\n".join(problems[:20])
    return resource


__all__ = ["SCHEMA_FILE", "assert_valid", "schema_errors"]
