"""Parse FHIR search parameters (R4 search.html) into MongoDB filters over extracted values.

Values from the client only ever become scalar operands of `$eq`/`$in`/range operators on field
names we chose, so operator injection (`{"$where": ...}`, `$gt` in a value) has nowhere to go.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from mindchart_core import errors
from records.resources import ResourceDef, SearchParam
from records.search import extract

DEFAULT_COUNT = 20
MAX_COUNT = 1000
MAX_VALUES = 50  # comma-separated alternatives in one parameter
MAX_VALUE_LENGTH = 2048
MAX_SORT_KEYS = 5
PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")
DATE_PREFIXES = PREFIXES
RESULT_PARAMS = {"_count", "_cursor", "_format", "_sort", "_summary", "_elements", "_total",
                 "_include", "_revinclude", "_pretty"}
SUMMARY_VALUES = ("true", "false", "text", "data", "count")
_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_TYPE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
_PARAM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-.]{0,63}(?::[A-Za-z0-9\-]{1,64})?$")
_ELEMENT = re.compile(r"^[A-Za-z][A-Za-z0-9]{0,63}$")
# Values shaped like MongoDB operators or JSON documents: never data, always an attack or a bug.
_HOSTILE_VALUE = re.compile(
    r"^\s*[\[{]\s*[\"'$]|\$(?:where|ne|eq|gt|gte|lt|lte|in|nin|regex|expr|function|or|and|nor|not"
    r"|exists|elemMatch|jsonSchema|accumulator)\b|\x00"
)


def hostile(value: str) -> bool:
    return bool(_HOSTILE_VALUE.search(value))


LAST_UPDATED = SearchParam("lastUpdated", "date", ("meta.lastUpdated",))


@dataclass(frozen=True)
class Cursor:
    """An opaque paging position: the sort key and id of the row a page ends (or starts) at."""

    backwards: bool
    keys: list[Any]
    id: str

    def encode(self) -> str:
        raw = orjson.dumps([1 if self.backwards else 0, self.keys, self.id])
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @staticmethod
    def decode(text: str) -> Cursor:
        try:
            if len(text) > 1024:
                raise ValueError
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            backwards, keys, ident = orjson.loads(raw)
            if backwards not in (0, 1) or not isinstance(keys, list) or not isinstance(ident, str):
                raise ValueError
            if not all(k is None or isinstance(k, str | int | float) for k in keys):
                raise ValueError
        except (ValueError, TypeError, orjson.JSONDecodeError):
            raise errors.Invalid("Invalid paging cursor") from None
        return Cursor(bool(backwards), keys, ident)


@dataclass(frozen=True)
class SortKey:
    name: str  # `_id`, `_lastUpdated` or a search parameter
    descending: bool
    param: SearchParam | None  # None for `_id`


@dataclass(frozen=True)
class Include:
    """`_include=Source:param[:Target]` or `_revinclude=Source:param[:Target]` (R4 search §3.3)."""

    source: str
    param: str
    target: str | None
    reverse: bool
    iterate: bool


@dataclass
class SearchRequest:
    filter: dict[str, Any]
    count: int = DEFAULT_COUNT
    cursor: Cursor | None = None
    applied: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    sort: list[SortKey] = field(default_factory=list)
    includes: list[Include] = field(default_factory=list)
    summary: str | None = None
    elements: list[str] | None = None
    total: str | None = None
    # Chained and `_has` parameters (records.search.chain), resolved through the store's policy
    # into `filter` before the search runs; a store refuses a request that still has some.
    chains: list[Any] = field(default_factory=list)


def and_clauses(clauses: list[dict[str, Any]]) -> dict[str, Any]:
    kept = [c for c in clauses if c]
    if not kept:
        return {}
    return kept[0] if len(kept) == 1 else {"$and": kept}


def sort_field(param: SearchParam | None) -> str:
    """The stored (indexed) field a parameter is searched and sorted on."""
    if param is None:
        return "_id"
    return f"sp.{param.name}_lo" if param.type == "date" else f"sp.{param.name}"


def _sort_value(doc: dict[str, Any], key: SortKey) -> Any:
    if key.param is None:
        return str(doc["_id"])
    name = sort_field(key.param).removeprefix("sp.")
    value = doc.get("sp", {}).get(name)
    if isinstance(value, list) and key.param.type == "token":
        value = [v for v in value if "|" not in v]  # order tokens by their codes
    if isinstance(value, list):
        value = (max(value) if key.descending else min(value)) if value else None
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")  # fixed width: sorts as text
    return value


def sort_key(keys: list[SortKey], doc: dict[str, Any]) -> list[Any]:
    return [_sort_value(doc, k) for k in keys]


def compare_keys(keys: list[SortKey], a: tuple[list[Any], str], b: tuple[list[Any], str]) -> int:
    """Order by each key (missing values last either way), then by id for a total order."""
    for key, va, vb in zip(keys, a[0], b[0], strict=False):
        if va == vb:
            continue
        if va is None or vb is None:
            return 1 if va is None else -1
        if type(va) is not type(vb) and not (isinstance(va, int | float) and isinstance(vb, int | float)):
            va, vb = str(va), str(vb)
        result = -1 if va < vb else 1
        return -result if key.descending else result
    return (a[1] > b[1]) - (a[1] < b[1])


# Which conjunct drives a query. SecantusDB's planner picks an index only when the *whole* filter
# matches one, so the store sends the driving conjunct alone (phase 1, an IXSCAN) and evaluates the
# whole filter on the candidates it returns (phase 2, mindchart_core.matcher).
_DRIVER_RANK = (("_id",), ("id",), ("sp.patient", "sp.subject", "sp.target"), ("c",),
                ("sp.identifier",))
_EQUALITY_OPS = {"$in", "$eq"}
_RANGE_OPS = {"$gt", "$gte", "$lt", "$lte"}


def _conjuncts(filt: dict[str, Any]) -> list[dict[str, Any]]:
    if not filt:
        return []
    if set(filt) == {"$and"}:
        return [c for clause in filt["$and"] for c in _conjuncts(clause)]
    return [{k: v} for k, v in filt.items()]


def driving_clause(filt: dict[str, Any], indexed: set[str] | frozenset[str]) -> dict[str, Any] | None:
    """The conjunct of `filt` that selects candidates through a single-field index: equality beats
    range, and compartment-like fields (id, patient, c) beat everything else. Every document
    matching `filt` matches it. None: no index applies (the query must scan).

    Each kind was checked with explain() on SecantusDB: equality, `$in` and ranges are IXSCANs;
    `$elemMatch` is a COLLSCAN, so an `$elemMatch` of bounds drives as the plain range (a superset:
    an element within both bounds satisfies each bound); ranges on `_id` scan (DESIGN.md)."""
    equal: list[dict[str, Any]] = []
    ranged: list[dict[str, Any]] = []
    for clause in _conjuncts(filt):
        (name, condition), = clause.items()
        if name.startswith("$") or name not in indexed:
            continue
        if not isinstance(condition, dict):
            if not isinstance(condition, list):
                equal.append(clause)
        elif set(condition) <= _EQUALITY_OPS and len(condition) == 1:
            equal.append(clause)
        elif condition and set(condition) <= _RANGE_OPS and name != "_id":
            ranged.append(clause)
        elif (set(condition) == {"$elemMatch"} and isinstance(condition["$elemMatch"], dict)
              and condition["$elemMatch"] and set(condition["$elemMatch"]) <= _RANGE_OPS):
            ranged.append({name: dict(condition["$elemMatch"])})
    for group in _DRIVER_RANK:
        for clause in equal:
            if next(iter(clause)) in group:
                return clause
    if equal:
        return equal[0]
    return ranged[0] if ranged else None


def driving_field(filt: dict[str, Any], indexed: set[str] | frozenset[str]) -> str | None:
    clause = driving_clause(filt, indexed)
    return next(iter(clause)) if clause else None


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


def _prefixed(value: str) -> tuple[str, str]:
    if value[:2] in PREFIXES and len(value) > 2 and not value[2].isalpha():
        return value[:2], value[2:]
    return "eq", value


def _date_clause(name: str, value: str) -> dict[str, Any]:
    """R4 search.html §3.1.1.4: compare the value's range [lo, hi) with the stored range."""
    prefix, text = _prefixed(value)
    try:
        lo, hi = extract.date_range(text)
    except (ValueError, OverflowError):
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
    prefix, text = _prefixed(value)
    number = text.split("|")[0]
    try:
        amount = float(number)
    except ValueError:
        raise errors.Invalid(f"Invalid quantity value for {name}") from None
    if amount != amount or amount in (float("inf"), float("-inf")):
        raise errors.Invalid(f"Invalid quantity value for {name}")
    target = f"sp.{name}"
    if prefix == "ap":  # approximately: within 10% (R4 search.html §3.1.1.1)
        low, high = sorted((amount * 0.9, amount * 1.1))
        return {target: {"$elemMatch": {"$gte": low, "$lte": high}}}
    ops = {"eq": "$eq", "ne": "$ne", "gt": "$gt", "lt": "$lt", "ge": "$gte", "le": "$lte",
           "sa": "$gt", "eb": "$lt"}
    return {target: {ops[prefix]: amount}}


def _reference_value(param: SearchParam, value: str, base_url: str) -> str:
    ref = extract.relative_reference(value, base_url)
    if "/" not in ref:
        if not param.target:
            raise errors.Invalid(f"{param.name} needs a typed reference (Type/id)")
        ref = f"{param.target}/{ref}"
    kind, _, ident = ref.partition("/")
    if not _TYPE.match(kind) or not _ID.match(ident):
        raise errors.Invalid(f"Invalid reference value for {param.name}")
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
    if any(not v for v in values):
        raise errors.Invalid(f"Empty value in {param.name}")
    if param.type == "token":
        if modifier not in ("", "not"):
            raise errors.Invalid(f"Modifier :{modifier} is not supported on {param.name}")
        op = "$nin" if modifier == "not" else "$in"
        return {field_name: {op: values}}
    if param.type == "reference":
        if modifier and not _TYPE.match(modifier):
            raise errors.Invalid(f"Modifier :{modifier} is not supported on {param.name}")
        refs = [_reference_value(param, f"{modifier}/{v}" if modifier else v, base_url)
                for v in values]
        return {field_name: {"$in": refs}}
    if param.type == "string":
        alternatives: list[dict[str, Any]] = []
        for v in values:
            norm = extract.normalize_string(v)
            if modifier == "exact":
                alternatives.append({f"{field_name}_x": v.strip()})
            elif modifier == "contains":
                alternatives.append({field_name: {"$regex": re.escape(norm)}})
            elif modifier == "":  # starts-with as a range, so an index answers it
                if not norm:
                    raise errors.Invalid(f"Empty value in {param.name}")
                upper = norm[:-1] + chr(ord(norm[-1]) + 1)
                # $elemMatch: both bounds must hold for one value, not across a name's parts.
                alternatives.append({field_name: {"$elemMatch": {"$gte": norm, "$lt": upper}}})
            else:
                raise errors.Invalid(f"Modifier :{modifier} is not supported on {param.name}")
        return alternatives[0] if len(alternatives) == 1 else {"$or": alternatives}
    if modifier:
        raise errors.Invalid(f"Modifier :{modifier} is not supported on {param.name}")
    builder = _date_clause if param.type == "date" else _quantity_clause
    clauses = [builder(param.name, v) for v in values]
    return clauses[0] if len(clauses) == 1 else {"$or": clauses}


def special_clause(name: str, modifier: str, value: str) -> dict[str, Any] | None:
    if name == "_id":
        ids = _split(value)
        if modifier or not all(_ID.match(i) for i in ids):
            raise errors.Invalid("Invalid _id value")
        return {"_id": {"$in": ids}}
    if name == "_lastUpdated":
        if modifier:
            raise errors.Invalid(f"Modifier :{modifier} is not supported on _lastUpdated")
        clauses = [_date_clause("lastUpdated", v) for v in _split(value)]
        return clauses[0] if len(clauses) == 1 else {"$or": clauses}
    if name in ("_security", "_tag"):
        if modifier not in ("", "not"):
            raise errors.Invalid(f"Modifier :{modifier} is not supported on {name}")
        return {f"sp.{name}": {"$nin" if modifier == "not" else "$in": _split(value)}}
    return None


def _parse_sort(definition: ResourceDef, value: str) -> list[SortKey]:
    keys: list[SortKey] = []
    for item in _split(value)[:MAX_SORT_KEYS + 1]:
        descending = item.startswith("-")
        name = item.removeprefix("-")
        if name == "_id":
            keys.append(SortKey(name, descending, None))
        elif name == "_lastUpdated":
            keys.append(SortKey(name, descending, LAST_UPDATED))
        elif (param := definition.param(name)) is not None:
            keys.append(SortKey(name, descending, param))
        else:
            raise errors.Invalid(f"Cannot sort {definition.type} by '{name[:64]}'")
    if len(keys) > MAX_SORT_KEYS:
        raise errors.Invalid(f"At most {MAX_SORT_KEYS} _sort keys")
    return keys


def _parse_include(definition: ResourceDef, value: str, *, reverse: bool, iterate: bool,
                   resources: dict[str, ResourceDef]) -> list[Include]:
    if value == "*" and not reverse:
        return [Include(definition.type, p.name, None, False, iterate)
                for p in definition.params if p.type == "reference" and p.name != "patient"]
    source, _, rest = value.partition(":")
    param_name, _, target = rest.partition(":")
    source_def = resources.get(source)
    param = source_def.param(param_name) if source_def is not None else None
    if param is None or param.type != "reference":
        raise errors.Invalid(f"Unsupported {'_revinclude' if reverse else '_include'} '{value[:80]}'")
    if target and target not in resources:
        raise errors.Invalid(f"Unsupported include target type '{target[:64]}'")
    if not reverse and not iterate and source != definition.type:
        raise errors.Invalid(f"_include must start with {definition.type} (or use :iterate)")
    return [Include(source, param_name, target or None, reverse, iterate)]


def parse(
    definition: ResourceDef,
    items: list[tuple[str, str]],
    *,
    base_url: str,
    strict: bool = False,
    resources: dict[str, ResourceDef] | None = None,
) -> SearchRequest:
    """Query-string pairs → filter. Repeated parameters AND; commas OR (R4 search.html §2.1.1.3)."""
    request = SearchRequest(filter={})
    clauses: list[dict[str, Any]] = []
    for raw_name, value in items:
        if raw_name.startswith("_has:") or "." in raw_name:  # records.search.chain's, not here
            raise errors.Invalid("Chained and _has parameters are not supported here")
        if not _PARAM_NAME.match(raw_name):
            raise errors.Invalid("Invalid search parameter name")
        if len(value) > MAX_VALUE_LENGTH or _HOSTILE_VALUE.search(value):
            raise errors.Invalid(f"Invalid value for search parameter {raw_name}")
        name, _, modifier = raw_name.partition(":")
        if name == "_count":
            request.count = parse_count(value)
            request.applied.append((raw_name, value))
        elif name == "_cursor":
            request.cursor = Cursor.decode(value)
        elif name == "_sort":
            request.sort = _parse_sort(definition, value)
            request.applied.append((raw_name, value))
        elif name in ("_include", "_revinclude"):
            if modifier not in ("", "iterate", "recurse"):
                raise errors.Invalid(f"Unsupported modifier on {name}")
            request.includes += _parse_include(
                definition, value, reverse=name == "_revinclude", iterate=bool(modifier),
                resources=resources or {definition.type: definition},
            )
            request.applied.append((raw_name, value))
        elif name == "_summary":
            if value not in SUMMARY_VALUES:
                raise errors.Invalid(f"_summary must be one of {', '.join(SUMMARY_VALUES)}")
            request.summary = value
            request.applied.append((raw_name, value))
        elif name == "_elements":
            elements = _split(value)
            if not all(_ELEMENT.match(e) for e in elements):
                raise errors.Invalid("Invalid _elements value")
            request.elements = elements
            request.applied.append((raw_name, value))
        elif name == "_total":
            if value not in ("none", "estimate", "accurate"):
                raise errors.Invalid("_total must be none, estimate or accurate")
            request.total = value
            request.applied.append((raw_name, value))
        elif name in RESULT_PARAMS:
            continue
        elif not value:
            raise errors.Invalid(f"Parameter {name} has no value")
        elif (special := special_clause(name, modifier, value)) is not None:
            clauses.append(special)
            request.applied.append((raw_name, value))
        elif (param := definition.param(name)) is not None:
            clauses.append(param_clause(param, modifier, value, base_url))
            request.applied.append((raw_name, value))
        elif strict:
            raise errors.Invalid(f"Unknown search parameter '{name[:64]}' for {definition.type}")
        else:
            request.ignored.append(raw_name)
    request.filter = and_clauses(clauses)
    return request


def last_updated_fields(when: datetime) -> dict[str, Any]:
    lo, hi = extract.date_range(when.isoformat(timespec="milliseconds"))
    return {"lastUpdated_lo": lo, "lastUpdated_hi": hi}
