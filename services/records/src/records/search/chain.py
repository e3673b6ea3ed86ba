"""Chained parameters and reverse chaining (`_has`), R4 search.html §2.1.1.4.5 "Chained
parameters" and §2.1.1.4.6 "Reverse Chaining":

- `DocumentReference?patient.identifier=urn:mrn|123`, `DocumentReference?subject:Patient.name=peter`:
  a reference parameter, an optional `:Type` modifier (needed when the reference may point at
  more than one type), `.`, and a search parameter of the referenced type;
- `Patient?_has:Observation:patient:code=44261-6`: resources that are referred to by an
  Observation, through its `patient` parameter, whose `code` matches.

Resolved one level deep, in two steps and always through the caller's access policy (records'
two-phase design, README "Search cost follows the answer"): the inner search runs first, as the
caller, on the other type (`ResourceStore.chain_values`: policy filter ANDed, deleted excluded),
and gives ids; the outer search then filters by those ids on an indexed reference field (or
`_id`). A resource the caller may not see never contributes an id, so a chain cannot become an
existence oracle: its answer is the same as if that resource did not exist.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mindchart_core import errors
from records.resources import RESOURCES, ResourceDef
from records.search import query

if TYPE_CHECKING:
    from records.store import ResourceStore

_TYPE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]{0,63}$")


@dataclass(frozen=True)
class Chain:
    """One chained or `_has` parameter, parsed; `inner` is the filter on `other`."""

    written: str  # the parameter as the client wrote it (for the Bundle's self link)
    reverse: bool  # `_has`
    reference: str  # the reference parameter: on the outer type, or on `other` when reverse
    other: str  # the referenced type (chain) or the referring type (`_has`)
    inner: dict[str, Any]


def is_chain(raw_name: str) -> bool:
    return raw_name.startswith("_has:") or "." in raw_name


def parse_search(definition: ResourceDef, items: list[tuple[str, str]], base_url: str, *,
                 strict: bool) -> query.SearchRequest:
    """query.parse for the plain parameters, this module for the chained ones."""
    plain = [(k, v) for k, v in items if not is_chain(k)]
    request = query.parse(definition, plain, base_url=base_url, strict=strict, resources=RESOURCES)
    for raw_name, value in items:
        if is_chain(raw_name):
            if len(raw_name) > 200 or len(value) > query.MAX_VALUE_LENGTH or query.hostile(value):
                raise errors.Invalid("Invalid chained search parameter")
            request.chains.append(parse(definition, raw_name, value, base_url))
            request.applied.append((raw_name, value))
    return request


def _inner_clause(other: ResourceDef, name_and_modifier: str, value: str, base_url: str) -> dict[str, Any]:
    name, _, modifier = name_and_modifier.partition(":")
    if not _NAME.match(name) or (modifier and not _NAME.match(modifier)):
        raise errors.Invalid("Invalid chained search parameter")
    special = query.special_clause(name, modifier, value)
    if special is not None:
        return special
    param = other.param(name)
    if param is None:
        raise errors.Invalid(f"Unknown search parameter '{name[:64]}' for {other.type} in a chain")
    return query.param_clause(param, modifier, value, base_url)


def parse(definition: ResourceDef, raw_name: str, value: str, base_url: str) -> Chain:
    """`ref[:Type].param[:modifier]` or `_has:Type:ref:param[:modifier]` → Chain (or 400)."""
    if not value:
        raise errors.Invalid(f"Parameter {raw_name[:80]} has no value")
    if raw_name.startswith("_has:"):
        parts = raw_name.split(":")
        if len(parts) not in (4, 5) or parts[3] == "_has" or "." in raw_name:
            raise errors.Invalid("_has takes _has:Type:reference:parameter (one level)")
        _, source_type, reference, *inner = parts
        source = RESOURCES.get(source_type)
        ref_param = source.param(reference) if source is not None else None
        if source is None or ref_param is None or ref_param.type != "reference":
            raise errors.Invalid(f"Unsupported _has parameter '{raw_name[:80]}'")
        if ref_param.target not in (None, definition.type):
            raise errors.Invalid(f"{source_type}.{reference} does not refer to {definition.type}")
        return Chain(raw_name, True, reference, source_type,
                     _inner_clause(source, ":".join(inner), value, base_url))
    head, _, tail = raw_name.partition(".")
    if "." in tail:
        raise errors.Invalid("Chained parameters are supported one level deep")
    reference, _, type_modifier = head.partition(":")
    param = definition.param(reference)
    if param is None or param.type != "reference":
        raise errors.Invalid(f"'{reference[:64]}' is not a reference parameter of {definition.type}")
    target = type_modifier or param.target
    if not target:
        raise errors.Invalid(f"{reference} may refer to several types: write {reference}:Type.{tail}")
    if not _TYPE.match(target) or target not in RESOURCES or (param.target not in (None, target)):
        raise errors.Invalid(f"Unsupported chain target type '{target[:64]}'")
    return Chain(raw_name, False, reference, target, _inner_clause(RESOURCES[target], tail, value, base_url))


async def resolve(store: ResourceStore, definition: ResourceDef, chains: list[Chain]) -> list[dict[str, Any]]:
    """Each chain as a filter on the outer type, by ids the caller may see."""
    clauses: list[dict[str, Any]] = []
    for chain in chains:
        other = RESOURCES[chain.other]
        if chain.reverse:
            refs = await store.chain_values(other, chain.inner, f"sp.{chain.reference}")
            prefix = f"{definition.type}/"
            ids = sorted({r.removeprefix(prefix) for r in refs if r.startswith(prefix)})
            clauses.append({"_id": {"$in": ids}})
        else:
            ids = await store.chain_values(other, chain.inner, "_id")
            clauses.append({f"sp.{chain.reference}": {"$in": [f"{chain.other}/{i}" for i in ids]}})
    return clauses


async def apply(store: ResourceStore, definition: ResourceDef, request: query.SearchRequest) -> None:
    """Turn a request's chains into ordinary (indexed) clauses of its filter."""
    if not request.chains:
        return
    clauses = await resolve(store, definition, request.chains)
    request.filter = query.and_clauses([request.filter, *clauses])
    request.chains = []
