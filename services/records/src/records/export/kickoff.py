"""What a `$export` kick-off asks for, parsed and checked before a job is queued.

Bulk Data Access 2.0.0 §bulk-data-kick-off-request: `_outputFormat` (three spellings), `_since`,
`_type`, `_typeFilter` (URL-encoded searches, comma = OR), `_elements` (experimental), `patient`
(POST `Parameters` only). Repeated parameters merge into one list. An unsupported parameter is a
400 OperationOutcome unless the client sent `Prefer: handling=lenient`, which lets us ignore it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl

from mindchart_core import errors
from records.resources import RESOURCES, ResourceDef
from records.search import extract, query

OUTPUT_FORMATS = ("application/fhir+ndjson", "application/ndjson", "ndjson")
KNOWN = ("_outputFormat", "_since", "_type", "_typeFilter", "_elements", "patient")
# Parameters any FHIR request may carry; they change nothing about an export.
IGNORED = ("_format", "_pretty")
# A `_typeFilter` is a search that selects resources, nothing that shapes a page (Bulk Data 2.0
# §_typeFilter: no `_include`, `_sort`, ...).
NOT_IN_TYPE_FILTER = ("_include", "_revinclude", "_sort", "_count", "_cursor", "_summary",
                      "_elements", "_total", "_contained", "_containedType")
_ELEMENT = re.compile(r"^(?:([A-Z][A-Za-z]{1,63})\.)?([a-z][A-Za-z0-9]{0,63})$")
_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


@dataclass
class ExportRequest:
    level: str  # "system" | "patient" | "group"
    types: list[str]  # the types the job exports, in order
    explicit_types: bool
    type_filters: dict[str, list[str]] = field(default_factory=dict)  # type -> query strings
    since: datetime | None = None
    elements: list[str] | None = None  # "element" or "Type.element"
    patients: list[str] | None = None  # ids, from `patient`
    ignored: list[str] = field(default_factory=list)


def lenient(prefer: str | None) -> bool:
    return "handling=lenient" in (prefer or "").replace(" ", "").lower()


def _split(values: list[str]) -> list[str]:
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def parameters_body(body: Any) -> list[tuple[str, Any]]:
    """A kick-off `Parameters` body as (name, value) pairs (Bulk Data 2.0 §POST kick-off)."""
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise errors.Invalid("POST $export takes a Parameters resource")
    pairs: list[tuple[str, Any]] = []
    for item in body.get("parameter") or []:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise errors.Invalid("Every Parameters.parameter needs a name")
        values = [v for k, v in item.items() if k.startswith("value")]
        if len(values) != 1:
            raise errors.Invalid(f"Parameter {item['name'][:64]} needs exactly one value[x]")
        pairs.append((item["name"], values[0]))
    return pairs


def _patient_id(value: Any) -> str:
    ref = value.get("reference") if isinstance(value, dict) else value
    if not isinstance(ref, str):
        raise errors.Invalid("patient takes a Reference to a Patient")
    kind, _, ident = ref.rpartition("/")
    if (kind and not kind.endswith("Patient")) or not _ID.match(ident):
        raise errors.Invalid("patient takes a Reference to a Patient")
    return ident


def type_filter(definition: ResourceDef, text: str, base_url: str) -> query.SearchRequest:
    """One `_typeFilter` query, parsed exactly as a search on that type would be (strictly)."""
    items = parse_qsl(text, keep_blank_values=True)
    for name, _ in items:
        if name.split(":")[0] in NOT_IN_TYPE_FILTER:
            raise errors.Invalid(f"_typeFilter may not use {name[:64]}")
    request = query.parse(definition, items, base_url=base_url, strict=True, resources=RESOURCES)
    if not request.filter:
        raise errors.Invalid(f"_typeFilter for {definition.type} selects nothing")
    return request


def parse(level: str, pairs: list[tuple[str, Any]], *, post: bool, lenient_handling: bool,
          base_url: str) -> ExportRequest:
    collected: dict[str, list[Any]] = {}
    ignored: list[str] = []

    def unsupported(message: str) -> None:
        if not lenient_handling:
            raise errors.Invalid(message + " (send Prefer: handling=lenient to ignore it)",
                                 code="not-supported")
        ignored.append(message)

    for name, value in pairs:
        if name in IGNORED:
            continue
        if name not in KNOWN:
            unsupported(f"Unsupported $export parameter '{name[:64]}'")
            continue
        if name == "patient" and (not post or level == "system"):
            unsupported("patient is accepted in a POST Patient or Group kick-off only")
            continue
        collected.setdefault(name, []).append(value)

    for fmt in collected.get("_outputFormat", []):
        if fmt not in OUTPUT_FORMATS:
            raise errors.Invalid(f"Unsupported _outputFormat; use one of {', '.join(OUTPUT_FORMATS)}",
                                 code="not-supported")

    since = None
    if "_since" in collected:
        if len(collected["_since"]) > 1:
            raise errors.Invalid("_since may be given once")
        text = str(collected["_since"][0])
        try:
            if len(text) < 10:
                raise ValueError
            since = extract.date_range(text)[0]
        except (ValueError, OverflowError):
            raise errors.Invalid("_since must be a FHIR instant") from None

    candidates = [d.type for d in RESOURCES.values() if level == "system" or d.patient_compartment]
    explicit = "_type" in collected
    types = candidates
    if explicit:
        types = []
        for name in _split([str(v) for v in collected["_type"]]):
            if name not in candidates:
                where = "this server" if name not in RESOURCES else "a Patient compartment"
                unsupported(f"_type {name[:64]} is not a resource type of {where}")
            elif name not in types:
                types.append(name)

    filters: dict[str, list[str]] = {}
    for raw in _split([str(v) for v in collected.get("_typeFilter", [])]):
        kind, sep, text = raw.partition("?")
        if not sep or kind not in RESOURCES:
            raise errors.Invalid(f"_typeFilter must be Type?query with a supported Type: '{raw[:80]}'")
        if kind not in types:
            continue  # a filter on a type not exported narrows nothing
        type_filter(RESOURCES[kind], text, base_url)  # 400 now, not in the worker
        filters.setdefault(kind, []).append(text)

    elements = None
    if "_elements" in collected:
        elements = _split([str(v) for v in collected["_elements"]])
        for element in elements:
            match = _ELEMENT.match(element)
            if match is None or (match.group(1) and match.group(1) not in RESOURCES):
                raise errors.Invalid(f"Invalid _elements entry '{element[:64]}'")

    patients = None
    if "patient" in collected:
        patients = sorted({_patient_id(v) for v in collected["patient"]})

    return ExportRequest(level=level, types=types, explicit_types=explicit, type_filters=filters,
                         since=since, elements=elements, patients=patients, ignored=ignored)


__all__ = ["OUTPUT_FORMATS", "ExportRequest", "lenient", "parameters_body", "parse", "type_filter"]
