"""MongoDB query semantics in Python: the one answer to "what would MongoDB match" for every
service. Phase 2 of the two-phase queries (records.store, gateway.audit_store) evaluates the
whole filter with it over the candidates an index-matched phase 1 returned; it covers exactly
the filters those build (records' search/policy filters, the gateway's audit and accounting
filters), and tests/integration/test_records_matcher.py checks it against the datastore.

Supported, as MongoDB 8 defines them (docs: "Query and Projection Operators", "Comparison/Sort
Order", "Query an Array"): `$and` `$or` `$nor`; `$eq` `$ne` `$in` `$nin` `$gt` `$gte` `$lt` `$lte`
`$exists` `$elemMatch` (operator form) `$not` `$regex`; plain values as equality; dotted paths
through arrays of documents; an array field matches when any element does (and, for equality,
when the whole array does); comparisons only between values of one BSON type bracket (a range on
strings never matches a number). Anything else raises `UnsupportedFilter`: a filter this module
cannot evaluate must never silently match or silently miss.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from bson.objectid import ObjectId


class UnsupportedFilter(ValueError):
    """A filter uses an operator, path or operand the matcher does not implement."""


_MISSING = object()
_RANGE = {"$gt", "$gte", "$lt", "$lte"}


# BSON comparison order brackets (MongoDB "Comparison/Sort Order"), checked in this order: bool
# before numbers, since a Python bool is an int.
_BRACKETS: tuple[tuple[type | tuple[type, ...], int], ...] = (
    (type(None), 1), (bool, 8), ((int, float), 2), (str, 3), (dict, 4), (list, 5), (bytes, 6),
    (ObjectId, 7), (datetime, 9),
)


def _bracket(value: Any) -> int:
    for kinds, bracket in _BRACKETS:
        if isinstance(value, kinds):
            return bracket
    raise UnsupportedFilter(f"Values of type {type(value).__name__} are not supported")


def _scalar(value: Any) -> Any:
    """Comparable form: BSON dates hold UTC milliseconds, whatever Python's datetime carried."""
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value.replace(microsecond=value.microsecond // 1000 * 1000)
    return value


def _operand(value: Any) -> Any:
    if isinstance(value, dict | list) or (value is not None and _bracket(value) in (4, 5, 6)):
        raise UnsupportedFilter("Documents and arrays as operands are not supported")
    return _scalar(value)


def _resolve(doc: Any, parts: list[str]) -> tuple[list[Any], bool]:
    """Values at a dotted path (arrays of documents are descended into), and whether some branch
    of the path was missing (which equality with null counts as a match)."""
    if not parts:
        return [doc], False
    if not isinstance(doc, dict):
        return [], True
    head, rest = parts[0], parts[1:]
    value = doc.get(head, _MISSING)
    if value is _MISSING:
        return [], True
    if rest and isinstance(value, list):
        found: list[Any] = []
        missing = False
        for item in value:
            if isinstance(item, dict):
                values, gap = _resolve(item, rest)
                found += values
                missing = missing or gap
        return found, missing
    return _resolve(value, rest)


def _equal(value: Any, operand: Any) -> bool:
    if operand is None:
        return value is None
    if value is None or _bracket(value) != _bracket(operand):
        return False
    return bool(_scalar(value) == operand)


def _compare(op: str, value: Any, operand: Any) -> bool:
    if value is None or _bracket(value) != _bracket(operand) or _bracket(value) in (4, 5):
        return False
    left = _scalar(value)
    if op == "$gt":
        return bool(left > operand)
    if op == "$gte":
        return bool(left >= operand)
    if op == "$lt":
        return bool(left < operand)
    return bool(left <= operand)


def _candidates(values: list[Any]) -> list[Any]:
    """What an operator is applied to: each value, and each element of an array value."""
    out: list[Any] = []
    for value in values:
        if isinstance(value, list):
            out += value
        out.append(value)
    return out


def _matches_eq(values: list[Any], missing: bool, operand: Any) -> bool:
    if operand is None and (missing or not values):
        return True
    return any(_equal(v, operand) for v in _candidates(values) if not isinstance(v, list))


def _element_matches(element: Any, condition: dict[str, Any]) -> bool:
    """`$elemMatch` with operators only: every operator holds for this one element."""
    for op, operand in condition.items():
        if op == "$eq":
            ok = _equal(element, _operand(operand))
        elif op == "$ne":
            ok = not _equal(element, _operand(operand))
        elif op in _RANGE:
            ok = _compare(op, element, _range_operand(operand))
        elif op == "$in":
            ok = any(_equal(element, _operand(o)) for o in _list(op, operand))
        elif op == "$nin":
            ok = not any(_equal(element, _operand(o)) for o in _list(op, operand))
        else:
            raise UnsupportedFilter(f"{op} inside $elemMatch is not supported")
        if not ok:
            return False
    return True


def _list(op: str, operand: Any) -> list[Any]:
    if not isinstance(operand, list):
        raise UnsupportedFilter(f"{op} needs an array")
    return operand


def _range_operand(operand: Any) -> Any:
    if operand is None:
        raise UnsupportedFilter("Ranges against null are not supported")
    return _operand(operand)


def _operator(op: str, operand: Any, values: list[Any], missing: bool) -> bool:
    if op == "$eq":
        return _matches_eq(values, missing, _operand(operand))
    if op == "$ne":
        return not _matches_eq(values, missing, _operand(operand))
    if op == "$in":
        return any(_matches_eq(values, missing, _operand(o)) for o in _list(op, operand))
    if op == "$nin":
        return not any(_matches_eq(values, missing, _operand(o)) for o in _list(op, operand))
    if op in _RANGE:
        bound = _range_operand(operand)
        return any(_compare(op, v, bound) for v in _candidates(values) if not isinstance(v, list))
    if op == "$exists":
        if not isinstance(operand, bool):
            raise UnsupportedFilter("$exists needs true or false")
        return bool(values) == operand
    if op == "$elemMatch":
        if not isinstance(operand, dict) or not operand or not all(k.startswith("$") for k in operand):
            raise UnsupportedFilter("Only the operator form of $elemMatch is supported")
        return any(isinstance(v, list) and any(_element_matches(e, operand) for e in v) for v in values)
    if op == "$not":
        if not isinstance(operand, dict) or not operand or not all(k.startswith("$") for k in operand):
            raise UnsupportedFilter("$not needs an operator expression")
        return not _condition(operand, values, missing)
    if op == "$regex":
        if not isinstance(operand, str):
            raise UnsupportedFilter("$regex needs a string pattern")
        pattern = _pattern(operand)
        return any(isinstance(v, str) and pattern.search(v) is not None for v in _candidates(values))
    raise UnsupportedFilter(f"Operator {op} is not supported")


_PATTERNS: dict[str, re.Pattern[str]] = {}


def _pattern(source: str) -> re.Pattern[str]:
    compiled = _PATTERNS.get(source)
    if compiled is None:
        if len(_PATTERNS) > 1024:
            _PATTERNS.clear()
        compiled = _PATTERNS[source] = re.compile(source)
    return compiled


def _condition(condition: dict[str, Any], values: list[Any], missing: bool) -> bool:
    return all(_operator(op, operand, values, missing) for op, operand in condition.items())


def _field(path: str, condition: Any, doc: dict[str, Any]) -> bool:
    parts = path.split(".")
    if any(not p or p.isdigit() or p.startswith("$") for p in parts):
        raise UnsupportedFilter(f"Path {path!r} is not supported")
    values, missing = _resolve(doc, parts)
    if isinstance(condition, dict):
        keys = list(condition)
        if keys and all(k.startswith("$") for k in keys):
            return _condition(condition, values, missing)
        raise UnsupportedFilter("Equality with an embedded document is not supported")
    return _matches_eq(values, missing, _operand(condition))


def _clauses(op: str, operand: Any) -> list[dict[str, Any]]:
    if not isinstance(operand, list) or not operand or not all(isinstance(c, dict) for c in operand):
        raise UnsupportedFilter(f"{op} needs a non-empty array of filters")
    return operand


def matches(filt: dict[str, Any], doc: dict[str, Any]) -> bool:
    """Whether `doc` matches `filt` as MongoDB would decide it."""
    for key, value in filt.items():
        if key == "$and":
            ok = all(matches(c, doc) for c in _clauses(key, value))
        elif key == "$or":
            ok = any(matches(c, doc) for c in _clauses(key, value))
        elif key == "$nor":
            ok = not any(matches(c, doc) for c in _clauses(key, value))
        elif key.startswith("$"):
            raise UnsupportedFilter(f"Top-level operator {key} is not supported")
        else:
            ok = _field(key, value, doc)
        if not ok:
            return False
    return True


def compile_filter(filt: dict[str, Any]) -> Callable[[dict[str, Any]], bool]:
    """A predicate for `filt`; checks the whole filter is supported before any document is seen."""
    check(filt)
    return lambda doc: matches(filt, doc)


def check(filt: dict[str, Any]) -> None:
    """Raise UnsupportedFilter unless every operator and operand in `filt` is implemented."""
    for key, value in filt.items():
        if key in ("$and", "$or", "$nor"):
            for clause in _clauses(key, value):
                check(clause)
        elif key.startswith("$"):
            raise UnsupportedFilter(f"Top-level operator {key} is not supported")
        else:
            if isinstance(value, dict):
                _check_condition(value)
            _field(key, value, {})


def _check_condition(condition: dict[str, Any]) -> None:
    for op, operand in condition.items():
        if op in ("$not", "$elemMatch") and isinstance(operand, dict):
            _check_condition(operand)
            if op == "$elemMatch":
                for inner, bound in operand.items():
                    _element_matches(0, {inner: bound})
        elif op in ("$in", "$nin"):
            for item in _list(op, operand):
                _operand(item)
        _operator(op, operand, [], True)


__all__ = ["UnsupportedFilter", "check", "compile_filter", "matches"]
