"""Parse FHIR search parameters (R4 search.html) into MongoDB filters over extracted values.

Values from the client only ever become scalar operands of `$eq`/`$in`/range operators on field
names we chose, so operator injection (`{"$where": ...}`, `$gt` in a value) has nowhere to go.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from mindchart_core import errors
from records.resources import ResourceDef, SearchParam
from records.search import extract

DEFAULT_COUNT = 20
MAX_COUNT = 1000
MAX_VALUES = 50  # comma-separated alternatives in one parameter
DATE_PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")
RESULT_PARAMS = {"_count", "_cursor", "_format", "_sort", "_summary", "_elements", "_total",
                 "_include", "_revinclude", "_pretty"}
_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


@dataclass
class SearchRequest:
    filter: dict[str, Any]
    count: int = DEFAULT_COUNT
    cursor: str | None = None
    applied: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def parse_count(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_COUNT
    if not raw.isdigit():
        raise errors.Invalid("_count must be a non-negative integer")
    count = int(raw)
    if count > MAX_COUNT:
        raise errors.Invalid(f"_count may be at most {MAX_COUNT}")
    return count


def _split(value: str) -> list[str]:
    parts = [v.replace("\\,", ",") for v in re.split(r"(?<!\\),", value)]
    if len(parts) > MAX_VALUES:
        raise errors.Invalid(f"At most {MAX_VALUES} comma-separated values per parameter")
    return parts


def _date_clause(name: str, value: str) -> dict[str, Any]:
    prefix = value[:2] if value[:2] in DATE_PREFIXES else "eq"
    text = value[2:] if value[:2] in DATE_PREFIXES else value
    try:
        lo, hi = extract.date_range(text)
    except ValueError:
        raise errors.Invalid(f"Invalid date value for {name}") from None
    flo, fhi = f"sp.{name}_lo", f"sp.{name}_hi"
    clauses: dict[str, dict[str, Any]] = {
        "eq": {flo: {"$gte": lo}, fhi: {"$lte": hi}},
        "ap": {flo: {"$lt": hi}, fhi: {"$gt": lo}},
        "gt": {fhi: {"$gt": hi}},
        "ge": {fhi: {"$gt": lo}},
        "lt": {flo: {"$lt": lo}},
        "le": {flo: {"$lt": hi}},
        "sa": {flo: {"$gte": hi}},
        "eb": {fhi: {"$lte": lo}},
    }
    if prefix == "ne":
        return {"$nor": [clauses["eq"]]}
    return clauses[prefix]


def _quantity_clause(name: str, value: str) -> dict[str, Any]:
    prefix = value[:2] if value[:2] in DATE_PREFIXES else "eq"
    number = (value[2:] if value[:2] in DATE_PREFIXES else value).split("|")[0]
    try:
        amount = float(number)
    except ValueError:
        raise errors.Invalid(f"Invalid quantity value for {name}") from None
    ops = {"eq": "$eq", "ne": "$ne", "gt": "$gt", "lt": "$lt", "ge": "$gte", "le": "$lte",
           "sa": "$gt", "eb": "$lt", "ap": "$eq"}
    return {f"sp.{name}": {ops[prefix]: amount}}


def _reference_value(param: SearchParam, value: str, base_url: str) -> str:
    ref = extract.relative_reference(value, base_url)
    if "/" not in ref:
        if not param.target:
            raise errors.Invalid(f"{param.name} needs a typed reference (Type/id)")
        ref = f"{param.target}/{ref}"
    return ref


def param_clause(
    param: SearchParam, modifier: str, value: str, base_url: str
) -> dict[str, Any]:
    """One `name[:modifier]=v1,v2` parameter as a filter (alternatives are ORed)."""
    field_name = f"sp.{param.name}"
    if modifier == "missing":
        if value not in ("true", "false"):
            raise errors.Invalid(":missing takes true or false")
        target = f"{field_name}_lo" if param.type == "date" else field_name
        return {target: {"$exists": value == "false"}}
    values = _split(value)
    if param.type == "token":
        if modifier not in ("", "not"):
            raise errors.Invalid(f"Modifier :{modifier} is not supported on {param.name}")
        op = "$nin" if modifier == "not" else "$in"
        return {field_name: {op: values}}
    if param.type == "reference":
        if modifier and not modifier[0].isupper():
            raise errors.Invalid(f"Modifier :{modifier} is not supported on {param.name}")
        refs = [_reference_value(param, f"{modifier}/{v}" if modifier else v, base_url)
                for v in values]
        return {field_name: {"$in": refs}}
    if param.type == "string":
        alternatives = []
        for v in values:
            norm = extract.normalize_string(v)
            if modifier == "exact":
                alternatives.append({field_name: v.casefold().strip()})
            elif modifier == "contains":
                alternatives.append({field_name: {"$regex": re.escape(norm)}})
            elif modifier == "":
                alternatives.append({field_name: {"$regex": "^" + re.escape(norm)}})
            else:
                raise errors.Invalid(f"Modifier :{modifier} is not supported on {param.name}")
        return alternatives[0] if len(alternatives) == 1 else {"$or": alternatives}
    if modifier:
        raise errors.Invalid(f"Modifier :{modifier} is not supported on {param.name}")
    builder = _date_clause if param.type == "date" else _quantity_clause
    clauses = [builder(param.name, v) for v in values]
    return clauses[0] if len(clauses) == 1 else {"$or": clauses}


def _special_clause(name: str, value: str) -> dict[str, Any] | None:
    if name == "_id":
        ids = _split(value)
        if not all(_ID.match(i) for i in ids):
            raise errors.Invalid("Invalid _id value")
        return {"_id": {"$in": ids}}
    if name == "_lastUpdated":
        clauses = []
        for v in _split(value):
            clause = _date_clause("lastUpdated", v)
            clauses.append(clause)
        return clauses[0] if len(clauses) == 1 else {"$or": clauses}
    if name in ("_security", "_tag"):
        return {f"sp.{name}": {"$in": _split(value)}}
    return None


def parse(
    definition: ResourceDef,
    items: list[tuple[str, str]],
    *,
    base_url: str,
    strict: bool = False,
) -> SearchRequest:
    """Query-string pairs → filter. Repeated parameters AND; commas OR (R4 search.html §2.1.1.3)."""
    request = SearchRequest(filter={})
    clauses: list[dict[str, Any]] = []
    for raw_name, value in items:
        name, _, modifier = raw_name.partition(":")
        if name == "_count":
            request.count = parse_count(value)
            request.applied.append((raw_name, value))
            continue
        if name == "_cursor":
            if not _ID.match(value):
                raise errors.Invalid("Invalid paging cursor")
            request.cursor = value
            continue
        if name in RESULT_PARAMS:
            continue
        if not value:
            raise errors.Invalid(f"Parameter {name} has no value")
        special = _special_clause(name, value)
        if special is not None:
            clauses.append(special)
            request.applied.append((raw_name, value))
            continue
        param = definition.param(name)
        if param is None:
            if strict:
                raise errors.Invalid(f"Unknown search parameter '{name[:64]}' for {definition.type}")
            request.ignored.append(raw_name)
            continue
        clauses.append(param_clause(param, modifier, value, base_url))
        request.applied.append((raw_name, value))
    if clauses:
        request.filter = clauses[0] if len(clauses) == 1 else {"$and": clauses}
    return request


def last_updated_fields(when: datetime) -> dict[str, Any]:
    lo, hi = extract.date_range(when.isoformat(timespec="milliseconds"))
    return {"lastUpdated_lo": lo, "lastUpdated_hi": hi}
