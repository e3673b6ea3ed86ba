"""`_summary` and `_elements` (R4 search.html §3.1.1.5-6): subsets of stored resources.

Which elements are "summary" and which are mandatory comes from the R4(B) models' element
metadata, so no per-type list is kept here. A subsetted resource is tagged SUBSETTED (R4
v3-ObservationValue) so no client mistakes it for the whole record.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import orjson

from mindchart_core import validation

SUBSETTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED",
             "display": "subsetted"}
_ALWAYS = frozenset({"resourceType", "id", "meta"})


@cache
def _elements_flagged(resource_type: str, flag: str) -> frozenset[str]:
    model = validation.model_for(resource_type)
    if model is None:
        return frozenset()
    names = set()
    for name, info in model.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if extra.get(flag) or (flag == "element_required" and info.is_required()):
            names.add(info.alias or name)
    return frozenset(names)


def summary_elements(resource_type: str) -> frozenset[str]:
    return _elements_flagged(resource_type, "summary_element_property") | _ALWAYS


def mandatory_elements(resource_type: str) -> frozenset[str]:
    return _elements_flagged(resource_type, "element_required") | _ALWAYS


def _tagged(resource: dict[str, Any]) -> dict[str, Any]:
    meta = dict(resource.get("meta", {}))
    tags = [t for t in meta.get("tag", []) if t.get("code") != "SUBSETTED"]
    meta["tag"] = [*tags, SUBSETTED]
    return {**resource, "meta": meta}


def subset(raw: bytes, summary: str | None, elements: list[str] | None) -> bytes:
    """The stored JSON, reduced as `_summary`/`_elements` ask; untouched when they ask nothing."""
    if (summary in (None, "false")) and not elements:
        return raw
    resource: dict[str, Any] = orjson.loads(raw)
    kind = resource["resourceType"]
    if summary == "true":
        keep = summary_elements(kind)
    elif summary == "text":
        keep = mandatory_elements(kind) | {"text"}
    elif summary == "data":
        keep = frozenset(resource) - {"text"}
    else:
        keep = mandatory_elements(kind) | frozenset(elements or ())
    return _reduced(resource, keep)


def subset_to(raw: bytes, keep: frozenset[str] | None) -> bytes:
    """The stored resource reduced to the root elements `keep`, tagged; untouched for None."""
    if keep is None:
        return raw
    return _reduced(orjson.loads(raw), keep)


def _reduced(resource: dict[str, Any], keep: frozenset[str]) -> bytes:
    return orjson.dumps(_tagged({k: v for k, v in resource.items() if k in keep}))


__all__ = ["SUBSETTED", "mandatory_elements", "subset", "subset_to", "summary_elements"]
