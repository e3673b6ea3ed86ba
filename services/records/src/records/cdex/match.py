"""`Patient/$match` (FHIR R4 operation-patient-match): a payer resolves its member to our Patient.

Input `Parameters`: `resource` (a Patient, 1..1), `onlyCertainMatches` (boolean), `count`
(integer). Output: a `searchset` Bundle, best first, each entry with `search.score` (0..1) and the
`http://hl7.org/fhir/StructureDefinition/match-grade` extension on `entry.search` (certain |
probable | possible). CDex 2.1 says data sources SHALL let a payer resolve its member by search and
SHOULD offer `$match`; candidates come through the caller's policy-bound store, so a client sees
no Patient here that its search could not find.

The match score, documented so a payer can judge it (weights add up to 1):

    identifier (same system|value, e.g. the member id)   0.50
    birthDate equal                                       0.25
    family name equal (case-insensitive)                  0.15
    a given name equal (case-insensitive)                 0.07
    gender equal                                          0.03

Grade: `certain` at 0.90 or more (identifier + birthDate + family, at least), `probable` at 0.70
or more, `possible` at 0.40 or more; below 0.40 a candidate is not returned. Candidates are the
Patients sharing an identifier with the input, or, when none does, those with the same
birthDate and family name (so a score of at least 0.40 is possible). `onlyCertainMatches` keeps
only `certain` matches, and none when more than one is certain (R4: "should not return the results
with this flag set" when multiple match).
"""

from __future__ import annotations

from typing import Any

import orjson

from mindchart_core import errors
from records.resources import RESOURCES
from records.search import query
from records.store import ResourceStore

MATCH_GRADE = "http://hl7.org/fhir/StructureDefinition/match-grade"
WEIGHTS = {"identifier": 0.50, "birthDate": 0.25, "family": 0.15, "given": 0.07, "gender": 0.03}
GRADES = ((0.90, "certain"), (0.70, "probable"), (0.40, "possible"))
MAX_MATCHES = 20


def _identifiers(patient: dict[str, Any]) -> set[str]:
    return {f"{i.get('system', '')}|{i['value']}" for i in patient.get("identifier", [])
            if isinstance(i, dict) and isinstance(i.get("value"), str)}


def _names(patient: dict[str, Any], part: str) -> set[str]:
    found: set[str] = set()
    for name in patient.get("name", []):
        if not isinstance(name, dict):
            continue
        values = name.get(part)
        for value in values if isinstance(values, list) else [values]:
            if isinstance(value, str) and value.strip():
                found.add(value.strip().lower())
    return found


def score(wanted: dict[str, Any], candidate: dict[str, Any]) -> float:
    """The documented match score of `candidate` for `wanted` (module docstring)."""
    total = 0.0
    if _identifiers(wanted) & _identifiers(candidate):
        total += WEIGHTS["identifier"]
    if wanted.get("birthDate") and wanted.get("birthDate") == candidate.get("birthDate"):
        total += WEIGHTS["birthDate"]
    if _names(wanted, "family") & _names(candidate, "family"):
        total += WEIGHTS["family"]
    if _names(wanted, "given") & _names(candidate, "given"):
        total += WEIGHTS["given"]
    if wanted.get("gender") and wanted.get("gender") == candidate.get("gender"):
        total += WEIGHTS["gender"]
    return round(total, 2)


def grade(value: float) -> str | None:
    return next((g for floor, g in GRADES if value >= floor), None)


def _parameters(body: Any) -> tuple[dict[str, Any], bool, int]:
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise errors.Invalid("Patient/$match takes a Parameters resource")
    wanted, certain_only, count = None, False, MAX_MATCHES
    for p in body.get("parameter", []):
        if not isinstance(p, dict):
            continue
        if p.get("name") == "resource":
            wanted = p.get("resource")
        elif p.get("name") == "onlyCertainMatches":
            certain_only = p.get("valueBoolean") is True
        elif p.get("name") == "count":
            value = p.get("valueInteger")
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise errors.Invalid("count must be a positive integer")
            count = min(value, MAX_MATCHES)
    if not isinstance(wanted, dict) or wanted.get("resourceType") != "Patient":
        raise errors.Invalid("Patient/$match needs a 'resource' parameter holding a Patient")
    return wanted, certain_only, count


async def _candidates(store: ResourceStore, wanted: dict[str, Any], base_url: str) -> list[dict[str, Any]]:
    definition = RESOURCES["Patient"]
    searches: list[list[tuple[str, str]]] = [[("identifier", i)] for i in sorted(_identifiers(wanted))]
    family = sorted(_names(wanted, "family"))
    if not searches:
        if not (wanted.get("birthDate") and family):
            raise errors.Unprocessable(
                "Patient/$match needs an identifier, or a birthDate and a family name")
        searches = [[("birthdate", str(wanted["birthDate"])), ("family:exact", f)] for f in family]
    found: dict[str, dict[str, Any]] = {}
    for items in searches:
        request = query.parse(definition, items, base_url=base_url, strict=True)
        request.count = MAX_MATCHES * 2
        for stored in (await store.search(definition, request)).resources:
            found[stored.id] = orjson.loads(stored.raw or b"{}")
    return list(found.values())


async def match(store: ResourceStore, body: Any, base_url: str) -> dict[str, Any]:
    wanted, certain_only, count = _parameters(body)
    graded = []
    for candidate in await _candidates(store, wanted, base_url):
        value = score(wanted, candidate)
        if (level := grade(value)) is not None:
            graded.append((value, level, candidate))
    graded.sort(key=lambda g: (-g[0], g[2]["id"]))
    if certain_only:
        graded = [g for g in graded if g[1] == "certain"]
        if len(graded) > 1:
            graded = []
    entries = [{
        "fullUrl": f"{base_url}/Patient/{candidate['id']}", "resource": candidate,
        "search": {"mode": "match", "score": value,
                   "extension": [{"url": MATCH_GRADE, "valueCode": level}]},
    } for value, level, candidate in graded[:count]]
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "total": len(entries)}
    if entries:
        bundle["entry"] = entries
    return bundle
