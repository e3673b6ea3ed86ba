"""`Patient/{id}/$everything` (R4 patient-operation-everything): the patient's compartment in
records, type by type, paged with opaque cursors.

Every type's query is the caller's access filter (AccessPolicy.filter_for) AND `c = id`, so it
returns no more than searches on each type would; types the token does not cover are skipped.
`start`/`end` narrow resources that carry a clinical date (those without one stay in, per the
operation definition, and so do statements of disagreement and rebuttals, which follow their
note); `_since` narrows by `meta.lastUpdated`; `_type` picks types; `_count` pages.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from starlette.responses import Response

from mindchart_core import errors, fhirjson, tokens
from records.amendments import appended
from records.export import store
from records.policy import AccessPolicy
from records.resources import RESOURCES, ResourceDef
from records.search import extract, query

router = APIRouter(prefix="/fhir")
DEFAULT_COUNT = 50
# The search parameter holding each type's clinical date, for start/end.
CARE_DATE = {"Encounter": "date", "Observation": "date", "DocumentReference": "date",
             "Condition": "onset-date", "Provenance": "recorded"}


def compartment_types() -> list[ResourceDef]:
    return sorted((d for d in RESOURCES.values() if d.patient_compartment),
                  key=lambda d: (d.type != "Patient", d.type))


def _date(name: str, value: str | None) -> tuple[datetime, datetime] | None:
    if value is None:
        return None
    try:
        return extract.date_range(value)
    except (ValueError, OverflowError):
        raise errors.Invalid(f"{name} must be a FHIR date") from None


def _care_clause(definition: ResourceDef, start: tuple[datetime, datetime] | None,
                 end: tuple[datetime, datetime] | None) -> dict[str, Any]:
    param = CARE_DATE.get(definition.type)
    if param is None or (start is None and end is None):
        return {}
    undated: dict[str, Any] = {f"sp.{param}_lo": {"$exists": False}}
    if definition.type == "DocumentReference":
        # A statement of disagreement or rebuttal is dated when filed but goes wherever its note
        # goes (45 CFR 164.526(d)(5), records/amendments/appended.py): never cut off by start/end.
        undated = {"$or": [undated, {"sp.category": {"$in": appended.CATEGORY_TOKENS}}]}
    clauses = []
    if start is not None:
        clauses.append({"$or": [{f"sp.{param}_hi": {"$gt": start[0]}}, undated]})
    if end is not None:
        clauses.append({"$or": [{f"sp.{param}_lo": {"$lt": end[1]}}, undated]})
    return store.and_(*clauses)


@router.get("/Patient/{patient_id}/$everything")
async def everything(patient_id: str, request: Request) -> Response:
    fhirjson.negotiate(request)
    token = await request.app.state.verifier.verify(tokens.bearer_token(request))
    base_url = str(request.app.state.settings.public_base_url).rstrip("/")
    policy = AccessPolicy(token=token, base_url=base_url)
    db: store.Db = request.app.state.db
    params = request.query_params
    patient = await store.find_one(db, "Patient", store.and_(
        {"_id": patient_id}, policy.filter_for(RESOURCES["Patient"], "read")))
    if patient is None:
        raise errors.NotFound(f"Patient/{patient_id[:64]} is not known")

    start, end = _date("start", params.get("start")), _date("end", params.get("end"))
    since = _date("_since", params.get("_since"))
    count = query.parse_count(params.get("_count")) if "_count" in params else DEFAULT_COUNT
    types = compartment_types()
    if "_type" in params:
        wanted = {t.strip() for v in params.getlist("_type") for t in v.split(",") if t.strip()}
        unknown = wanted - {d.type for d in types}
        if unknown:
            raise errors.Invalid(f"_type {sorted(unknown)[0][:64]} is not in a Patient compartment")
        types = [d for d in types if d.type in wanted]
    cursor = query.Cursor.decode(params["_cursor"]) if "_cursor" in params else None
    first = int(cursor.keys[0]) if cursor and cursor.keys and isinstance(cursor.keys[0], int) else 0

    found: list[tuple[str, str, bytes]] = []
    next_cursor: query.Cursor | None = None
    for index in range(first, len(types)):
        definition = types[index]
        if not token.scope.allows(definition.type, "search-type"):
            continue
        if len(found) >= count:
            next_cursor = query.Cursor(False, [index], "")
            break
        clauses = [policy.filter_for(definition, "search-type"), {"c": patient_id},
                   _care_clause(definition, start, end)]
        if since is not None:
            clauses.append({"sp.lastUpdated_lo": {"$gt": since[0]}})
        if cursor is not None and index == first and cursor.id:
            clauses.append({"_id": {"$gt": cursor.id}})
        room = count - len(found)
        docs = await store.compartment_page(db, definition.type, store.and_(*clauses), room + 1)
        found += [(definition.type, str(d["_id"]), bytes(d["raw"])) for d in docs[:room]]
        if len(docs) > room:
            next_cursor = query.Cursor(False, [index], str(docs[room - 1]["_id"])) if room else \
                query.Cursor(False, [index], "")
            break

    applied = [(k, v) for k, v in params.multi_items() if k in ("start", "end", "_since", "_type")]
    applied.append(("_count", str(count)))
    url = f"{base_url}/Patient/{patient_id}/$everything"
    here = applied + ([("_cursor", cursor.encode())] if cursor else [])
    links = [{"relation": "self", "url": f"{url}?{urlencode(here)}"}]
    if next_cursor is not None:
        after = [*applied, ("_cursor", next_cursor.encode())]
        links.append({"relation": "next", "url": f"{url}?{urlencode(after)}"})
    head = fhirjson.dumps({"resourceType": "Bundle", "type": "searchset", "link": links})[:-1]
    entries = [b'{"fullUrl":' + fhirjson.dumps(f"{base_url}/{kind}/{ident}") + b',"resource":'
               + raw + b',"search":{"mode":"match"}}' for kind, ident, raw in found]
    body = head + (b',"entry":[' + b",".join(entries) + b"]}" if entries else b"}")
    return fhirjson.FhirResponse(body)


__all__ = ["router"]
