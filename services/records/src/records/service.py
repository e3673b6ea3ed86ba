"""Records interactions: load through the policy-bound store, answer in FHIR R4 JSON.

R4 http.html: create → 201 + Location + ETag + Last-Modified; read → ETag (`W/"<vid>"`); search →
Bundle `searchset` with `self`/`next` links built from the parameters actually applied.
"""

from __future__ import annotations

from datetime import datetime
from email.utils import format_datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode

from pymongo.asynchronous.client_session import AsyncClientSession
from starlette.responses import Response

from mindchart_core import errors, fhirjson, validation
from records import subsetting
from records.amendments import appended
from records.resources import RESOURCES, ResourceDef
from records.search import chain, extract, query
from records.store import MAX_INCLUDES, ResourceStore, Session, StoredResource, instant


def resource_headers(stored: StoredResource, base_url: str, *, location: bool = False) -> dict[str, str]:
    headers = {
        "ETag": stored.etag,
        "Last-Modified": format_datetime(stored.last_updated, usegmt=True),
    }
    if location:
        headers["Location"] = (
            f"{base_url}/{stored.resource_type}/{stored.id}/_history/{stored.version}"
        )
    return headers


def resource_response(
    stored: StoredResource, base_url: str, *, status: int = 200, location: bool = False,
    prefer: str | None = None, summary: str | None = None, elements: list[str] | None = None,
    links: dict[str, str] | None = None,
) -> Response:
    """R4 http.html §Prefer: return=minimal | representation | OperationOutcome. `links`: a
    `Link` header (a note's appended amendment documents, records/amendments/appended.py)."""
    headers = {**resource_headers(stored, base_url, location=location), **(links or {})}
    wanted = (prefer or "").replace(" ", "").lower()
    if "return=minimal" in wanted:
        return Response(status_code=status, headers=headers)
    if "return=operationoutcome" in wanted:
        outcome = {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "information", "code": "informational",
                       "diagnostics": f"{stored.resource_type}/{stored.id} version {stored.version} stored"}],
        }
        return fhirjson.FhirResponse(outcome, status_code=status, headers=headers)
    raw = subsetting.subset(stored.raw or b"{}", summary, elements)
    return fhirjson.FhirResponse(raw, status_code=status, headers=headers)


def _link(relation: str, url: str) -> dict[str, str]:
    return {"relation": relation, "url": url}


def _type_url(base_url: str, definition: ResourceDef) -> str:
    return f"{base_url}/{definition.type}"


def _query_url(url: str, params: list[tuple[str, str]]) -> str:
    return f"{url}?{urlencode(params)}" if params else url


def parse_search(definition: ResourceDef, items: list[tuple[str, str]], base_url: str, *,
                 strict: bool) -> query.SearchRequest:
    return chain.parse_search(definition, items, base_url, strict=strict)


async def search_type(
    store: ResourceStore, definition: ResourceDef, items: list[tuple[str, str]],
    base_url: str, *, strict: bool,
) -> Response:
    request = parse_search(definition, items, base_url, strict=strict)
    return fhirjson.FhirResponse(await search_bundle(store, definition, request, base_url))


async def search_bundle(
    store: ResourceStore, definition: ResourceDef, request: query.SearchRequest, base_url: str,
) -> bytes:
    """A `searchset` Bundle (R4 search.html §3.1.3): `self` lists only the parameters applied;
    `next`/`previous` carry keyset cursors, so pages do not shift when others write meanwhile."""
    type_url = _type_url(base_url, definition)
    applied = list(request.applied)
    if request.count != query.DEFAULT_COUNT and not any(k == "_count" for k, _ in applied):
        applied.append(("_count", str(request.count)))
    paging = applied if any(k == "_count" for k, _ in applied) else [
        *applied, ("_count", str(request.count))]
    head: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
    await chain.apply(store, definition, request)
    if request.summary == "count":
        head["total"] = await store.count(definition, request)
        head["link"] = [_link("self", _query_url(type_url, applied))]
        return bundle_bytes(head, [])
    page = await store.search(definition, request)
    links = [_link("self", _query_url(type_url, [*applied, *(
        [("_cursor", request.cursor.encode())] if request.cursor else [])]))]
    if request.cursor is not None:
        links.append(_link("first", _query_url(type_url, paging)))
    if page.previous_cursor is not None:
        links.append(_link("previous", _query_url(type_url, [
            *paging, ("_cursor", page.previous_cursor.encode())])))
    if page.next_cursor is not None:
        links.append(_link("next", _query_url(type_url, [*paging, ("_cursor", page.next_cursor.encode())])))
    if request.total == "none":
        pass
    elif page.total is not None:
        head["total"] = page.total
    elif request.total == "accurate" or request.count == 0:
        head["total"] = await store.count(definition, request)
    elif request.cursor is None and page.next_cursor is None:
        head["total"] = len(page.resources)
    head["link"] = links
    entries = [
        entry_bytes(f"{base_url}/{s.resource_type}/{s.id}",
                    subsetting.subset(s.raw or b"{}", request.summary, request.elements),
                    search=b'{"mode":"match"}')
        for s in page.resources
    ]
    extra = await included(store, request.includes, page.resources)
    # 45 CFR 164.526(d)(5): a note's statement of disagreement and rebuttal go wherever it goes.
    listed = {(r.resource_type, r.id) for r in [*page.resources, *extra]}
    extra += [d for d in await appended.material(store, page.resources)
              if (d.resource_type, d.id) not in listed]
    for s in extra:
        entries.append(entry_bytes(f"{base_url}/{s.resource_type}/{s.id}", s.raw or b"{}",
                                   search=b'{"mode":"include"}'))
    return bundle_bytes(head, entries)


async def included(store: ResourceStore, includes: list[query.Include],
                   page: list[StoredResource]) -> list[StoredResource]:
    """`_include`/`_revinclude` (R4 search.html §3.3), `:iterate` one level further. Each
    resource comes through the policy-bound store, so includes see no more than a search would."""
    seen = {(r.resource_type, r.id) for r in page}
    found: list[StoredResource] = []

    async def one_pass(active: list[query.Include], sources: list[StoredResource]) -> None:
        for inc in active:
            results: list[StoredResource] = []
            if inc.reverse:
                refs = [f"{r.resource_type}/{r.id}" for r in sources
                        if inc.target in (None, r.resource_type)]
                if refs:
                    results = await store.referring(RESOURCES[inc.source], inc.param, refs)
            else:
                wanted: dict[str, list[str]] = {}
                for r in sources:
                    if r.resource_type != inc.source:
                        continue
                    for ref in (r.sp or {}).get(inc.param, []):
                        kind, _, ident = ref.partition("/")
                        if kind in RESOURCES and inc.target in (None, kind):
                            wanted.setdefault(kind, []).append(ident)
                for kind, ids in wanted.items():
                    results += await store.read_many(RESOURCES[kind], sorted(set(ids)))
            for r in results:
                if (r.resource_type, r.id) not in seen and len(found) < MAX_INCLUDES:
                    seen.add((r.resource_type, r.id))
                    found.append(r)

    if includes:
        await one_pass(includes, page)
        first_level = list(found)
        iterating = [i for i in includes if i.iterate]
        if iterating and first_level:
            await one_pass(iterating, first_level)
    return found


async def history_bundle(
    store: ResourceStore, definition: ResourceDef | None, resource_id: str | None,
    items: list[tuple[str, str]], base_url: str,
) -> bytes:
    """R4 http.html §history: newest first; a deletion is an entry without a resource. With no
    definition, the whole system's history (`GET [base]/_history`)."""
    since: datetime | None = None
    count = query.DEFAULT_COUNT
    cursor: query.Cursor | None = None
    applied: list[tuple[str, str]] = []
    for name, value in items:
        if name == "_since":
            try:
                since = extract.date_range(value)[0]
            except (ValueError, OverflowError):
                raise errors.Invalid("_since must be an instant") from None
            applied.append((name, value))
        elif name == "_count":
            count = query.parse_count(value)
            applied.append((name, value))
        elif name == "_cursor":
            cursor = query.Cursor.decode(value)
    if definition is None:
        entries_found, nxt = await store.system_history(since=since, count=count, cursor=cursor)
        url = f"{base_url}/_history"
    else:
        entries_found, nxt = await store.history(definition, resource_id, since=since, count=count,
                                                 cursor=cursor)
        url = f"{base_url}/{definition.type}" + (f"/{resource_id}" if resource_id else "") + "/_history"
    links = [_link("self", _query_url(url, applied))]
    if nxt is not None:
        paging = applied if any(k == "_count" for k, _ in applied) else [*applied, ("_count", str(count))]
        links.append(_link("next", _query_url(url, [*paging, ("_cursor", nxt.encode())])))
    head: dict[str, Any] = {"resourceType": "Bundle", "type": "history", "link": links}
    if resource_id is not None and cursor is None and nxt is None:
        head["total"] = len(entries_found)
    entries = []
    for s in entries_found:
        status = {"POST": "201 Created", "PUT": "200 OK", "DELETE": "204 No Content"}[s.method]
        request = {"method": s.method,
                   "url": s.resource_type if s.method == "POST" else f"{s.resource_type}/{s.id}"}
        response = {"status": status, "etag": s.etag, "lastModified": instant(s.last_updated)}
        entries.append(entry_bytes(f"{base_url}/{s.resource_type}/{s.id}", s.raw,
                                   request=fhirjson.dumps(request), response=fhirjson.dumps(response)))
    return bundle_bytes(head, entries)


async def matching(store: ResourceStore, definition: ResourceDef, criteria: str,
                   base_url: str, session: Session = None) -> list[StoredResource]:
    """Up to two matches of a conditional interaction's criteria (R4 http.html §cond-update)."""
    items = parse_qsl(criteria.lstrip("?"), keep_blank_values=True)
    request = parse_search(definition, items, base_url, strict=True)
    if not request.filter and not request.chains:
        raise errors.Invalid("Conditional criteria must include at least one search parameter")
    await chain.apply(store, definition, request)
    request.count, request.sort, request.includes = 2, [], []
    return (await store.search(definition, request, session)).resources


def criteria_key(criteria: str) -> str:
    """The same criteria however written: parameters in one order, one encoding."""
    return urlencode(sorted(parse_qsl(criteria.lstrip("?"), keep_blank_values=True)))


async def match_or_create(store: ResourceStore, definition: ResourceDef, resource: dict[str, Any],
                          criteria: str, base_url: str) -> tuple[StoredResource, bool]:
    """Conditional create (If-None-Exist): the match, or the new resource (created: True). The
    check and the create run in one transaction that first claims the criteria, so concurrent
    requests with the same criteria create one resource between them."""
    async def once(session: AsyncClientSession) -> tuple[StoredResource, bool]:
        await store.claim(definition, criteria_key(criteria), session)
        found = await matching(store, definition, criteria, base_url, session)
        if len(found) > 1:
            raise errors.PreconditionFailed("If-None-Exist matches more than one resource")
        if found:
            return found[0], False
        return await store.create(definition, resource, session=session), True
    return await store.atomically(once)


async def docref(store: ResourceStore, items: list[tuple[str, str]], base_url: str) -> bytes:
    """US Core $docref (DocumentReference/$docref): a patient's notes, optionally within
    start/end and of a type, as a searchset. It is a search underneath, so the same policy and
    indexes apply."""
    params = dict(items)
    if not params.get("patient"):
        raise errors.Invalid("$docref needs a patient")
    search: list[tuple[str, str]] = [("patient", params["patient"])]
    if params.get("start"):
        search.append(("date", f"ge{params['start']}"))
    if params.get("end"):
        search.append(("date", f"le{params['end']}"))
    if params.get("type"):
        search.append(("type", params["type"]))
    search += [(k, v) for k, v in items if k in ("_count", "_cursor")]
    definition = RESOURCES["DocumentReference"]
    return await search_bundle(store, definition, parse_search(definition, search, base_url, strict=True),
                               base_url)


def validate_outcome(body: Any, definition: ResourceDef) -> dict[str, Any]:
    """`$validate` (R4 resource-operation-validate): always an OperationOutcome listing issues."""
    resource = body
    if isinstance(body, dict) and body.get("resourceType") == "Parameters":
        resource = next((p.get("resource") for p in body.get("parameter", [])
                         if isinstance(p, dict) and p.get("name") == "resource"), None)
        if resource is None:
            raise errors.Invalid("$validate Parameters need a 'resource' parameter")
    try:
        validation.validate_resource(resource, definition.type)
    except errors.FhirError as problem:
        issue: dict[str, Any] = {"severity": "error", "code": problem.code,
                                 "diagnostics": problem.diagnostics}
        if problem.expression:
            issue["expression"] = problem.expression
        return {"resourceType": "OperationOutcome", "issue": [issue]}
    return {"resourceType": "OperationOutcome", "issue": [{
        "severity": "information", "code": "informational",
        "diagnostics": f"No issues found validating this {definition.type}"}]}


def entry_bytes(full_url: str, raw: bytes | None, **parts: bytes) -> bytes:
    """One Bundle entry spliced from stored JSON bytes: the resource is never re-serialised."""
    body = b'{"fullUrl":' + fhirjson.dumps(full_url)
    if raw is not None:
        body += b',"resource":' + raw
    for name, value in parts.items():
        body += b',"' + name.encode() + b'":' + value
    return body + b"}"


def bundle_bytes(head: dict[str, Any], entries: list[bytes]) -> bytes:
    """A Bundle spliced from entry bytes: entries are never parsed or re-serialised."""
    opening = fhirjson.dumps(head)[:-1]
    if not entries:
        return opening + b"}"
    return opening + b',"entry":[' + b",".join(entries) + b"]}"


# What routes.py implements, stated once for the CapabilityStatement.
TYPE_INTERACTIONS = ("read", "vread", "update", "patch", "delete", "history-instance",
                     "history-type", "create", "search-type")
SYSTEM_INTERACTIONS = ("transaction", "batch", "history-system")
COMMON_SEARCH_PARAMS = (
    ("_id", "token", "Resource-id"), ("_lastUpdated", "date", "Resource-lastUpdated"),
    ("_security", "token", "Resource-security"), ("_tag", "token", "Resource-tag"),
)
# R4 search.html §2.1.1.4.5-6: chaining and `_has` one level deep (records.search.chain); R4's
# CapabilityStatement has no element for chaining, so the reference parameters say it.
CHAIN_DOCUMENTATION = ("Chainable one level: name[:Type].param=value (e.g. patient.identifier=...), "
                       "resolved through the caller's access policy")
HAS_PARAM = {"name": "_has", "type": "special",
             "documentation": "Reverse chaining one level: _has:Type:reference:param=value"}
VALIDATE_OPERATION = {"name": "validate", "definition": "http://hl7.org/fhir/OperationDefinition/Resource-validate"}


def _capability_resource(d: ResourceDef) -> dict[str, Any]:
    references = [p for p in d.params if p.type == "reference"]
    revincludes = sorted(f"{other.type}:{p.name}" for other in RESOURCES.values()
                         for p in other.params if p.type == "reference" and other.type != d.type
                         and (p.target in (None, d.type)))
    return {
        "type": d.type,
        "supportedProfile": list(d.profiles),
        "interaction": [{"code": c} for c in TYPE_INTERACTIONS],
        "versioning": "versioned-update",
        "readHistory": True,
        "updateCreate": True,
        "conditionalCreate": True,
        "conditionalRead": "not-supported",
        "conditionalUpdate": True,
        "conditionalDelete": "single",
        "searchInclude": ["*", *(f"{d.type}:{p.name}" for p in references)],
        "searchRevInclude": revincludes,
        "searchParam": [
            {"name": p.name, "definition": p.definition, "type": p.type,
             **({"documentation": CHAIN_DOCUMENTATION} if p.type == "reference" else {})}
            for p in d.params
        ] + [{"name": name, "type": kind, "definition": f"http://hl7.org/fhir/SearchParameter/{ref}"}
             for name, kind, ref in COMMON_SEARCH_PARAMS] + [HAS_PARAM],
        "operation": [VALIDATE_OPERATION, *({"name": name, "definition": url} for name, url in d.operations)],
    }


def capability_statement(base_url: str, issuer: str, resources: list[ResourceDef]) -> dict[str, Any]:
    """Generated from the declarations, so it states exactly what is implemented (R4 capabilitystatement)."""
    oauth = issuer.rstrip("/") + "/oauth"
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-22",
        "publisher": "Mindchart",
        "kind": "instance",
        "instantiates": ["http://hl7.org/fhir/us/core/CapabilityStatement/us-core-server"],
        "software": {"name": "Mindchart records", "version": "0.1.0"},
        "implementation": {"description": "Mindchart progress notes and measures", "url": base_url},
        "fhirVersion": "4.0.1",
        "format": ["json"],
        "patchFormat": ["application/json-patch+json"],
        "rest": [{
            "mode": "server",
            "security": {
                "cors": True,
                "service": [{"coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                    "code": "SMART-on-FHIR"}]}],
                "extension": [{
                    "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                    "extension": [
                        {"url": "authorize", "valueUri": f"{oauth}/authorize"},
                        {"url": "token", "valueUri": f"{oauth}/token"},
                        {"url": "introspect", "valueUri": f"{oauth}/introspect"},
                        {"url": "revoke", "valueUri": f"{oauth}/revoke"},
                    ],
                }],
            },
            "resource": [_capability_resource(d) for d in resources],
            "interaction": [{"code": c} for c in SYSTEM_INTERACTIONS],
        }],
    }


__all__ = ["bundle_bytes", "capability_statement", "entry_bytes", "history_bundle", "included",
           "instant", "matching", "resource_response", "search_bundle", "search_type",
           "validate_outcome"]
