"""JSON Patch (RFC 6902) for FHIR resources (R4 http.html §patch), applied to a copy.

The server owns `id`, `resourceType` and `meta.versionId`/`meta.lastUpdated`; a patch that touches
them is refused (422) rather than silently overridden.

The patched document is bounded as the patch is applied: the resource's size plus the size of every
value an operation writes (`add`, `replace`, `copy`) may not exceed `max_bytes` (the largest body a
client may PUT). Without it, a kilobyte of `copy` operations doubling an array doubles the document
each time (RFC 6902 §4.5: copy adds "the value at the specified location" to the target), and
30 of them ask for gigabytes. Counting written values rather than the net size keeps the work
bounded too: an op that removes does not earn another copy. Refused with 422 `too-costly`.
"""

from __future__ import annotations

import copy
from typing import Any

import orjson

from mindchart_core import errors

MAX_OPERATIONS = 500
_PROTECTED = ("/id", "/resourceType", "/meta/versionId", "/meta/lastUpdated")


def _pointer(path: Any) -> list[str]:
    if not isinstance(path, str) or (path and not path.startswith("/")):
        raise errors.Invalid("A JSON Patch path must be a JSON Pointer such as /status")
    if path in ("", "/"):
        raise errors.Unprocessable("A JSON Patch may not replace the whole resource")
    for protected in _PROTECTED:
        if path == protected or path.startswith(protected + "/") or protected.startswith(path + "/"):
            raise errors.Unprocessable(f"A JSON Patch may not change {protected}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]


def _parent(doc: Any, parts: list[str]) -> tuple[Any, str]:
    node = doc
    for part in parts[:-1]:
        node = _child(node, part)
    return node, parts[-1]


def _child(node: Any, part: str) -> Any:
    if isinstance(node, dict) and part in node:
        return node[part]
    if isinstance(node, list) and part.isdigit() and int(part) < len(node):
        return node[int(part)]
    raise errors.Unprocessable(f"JSON Patch path segment '{part[:64]}' does not exist")


def _get(doc: Any, parts: list[str]) -> Any:
    node = doc
    for part in parts:
        node = _child(node, part)
    return node


def _add(doc: Any, parts: list[str], value: Any) -> None:
    parent, key = _parent(doc, parts)
    if isinstance(parent, dict):
        parent[key] = value
    elif isinstance(parent, list):
        if key == "-":
            parent.append(value)
        elif key.isdigit() and int(key) <= len(parent):
            parent.insert(int(key), value)
        else:
            raise errors.Unprocessable(f"JSON Patch index '{key[:16]}' is out of range")
    else:
        raise errors.Unprocessable("JSON Patch target is not a container")


def _remove(doc: Any, parts: list[str]) -> Any:
    parent, key = _parent(doc, parts)
    value = _child(parent, key)
    if isinstance(parent, dict):
        del parent[key]
    else:
        del parent[int(key)]
    return value


class _Budget:
    """The bytes a patch may still write (JSON-serialized size, as the resource is stored)."""

    def __init__(self, resource: dict[str, Any], max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.left = max_bytes - len(orjson.dumps(resource))

    def spend(self, value: Any) -> None:
        self.left -= len(orjson.dumps(value))
        if self.left < 0:
            raise errors.FhirError(
                f"The patched resource would exceed {self.max_bytes} bytes", status=422,
                code="too-costly")


def apply(resource: dict[str, Any], operations: Any, *, max_bytes: int) -> dict[str, Any]:
    """The patched copy of `resource`; raise Invalid (bad patch) or Unprocessable (cannot apply,
    or the result would exceed `max_bytes`)."""
    if not isinstance(operations, list) or not operations:
        raise errors.Invalid("A JSON Patch body is a non-empty array of operations")
    if len(operations) > MAX_OPERATIONS:
        raise errors.Invalid(f"At most {MAX_OPERATIONS} JSON Patch operations")
    budget = _Budget(resource, max_bytes)
    doc = copy.deepcopy(resource)
    for operation in operations:
        if not isinstance(operation, dict) or not isinstance(operation.get("op"), str):
            raise errors.Invalid("Each JSON Patch operation is an object with an 'op'")
        op = operation["op"]
        parts = _pointer(operation.get("path"))
        if op in ("add", "replace", "test") and "value" not in operation:
            raise errors.Invalid(f"JSON Patch '{op}' needs a value")
        if op == "add":
            budget.spend(operation["value"])
            _add(doc, parts, copy.deepcopy(operation["value"]))
        elif op == "remove":
            _remove(doc, parts)
        elif op == "replace":
            budget.spend(operation["value"])
            _remove(doc, parts)
            _add(doc, parts, copy.deepcopy(operation["value"]))
        elif op == "move":
            _add(doc, parts, _remove(doc, _pointer(operation.get("from"))))
        elif op == "copy":
            value = _get(doc, _pointer(operation.get("from")))
            budget.spend(value)  # before the copy is made: the bomb never takes the memory
            _add(doc, parts, copy.deepcopy(value))
        elif op == "test":
            if _get(doc, parts) != operation["value"]:
                raise errors.Unprocessable(f"JSON Patch test failed at {operation['path'][:100]}")
        else:
            raise errors.Invalid(f"Unknown JSON Patch op '{op[:16]}'")
    return doc


__all__ = ["apply"]
