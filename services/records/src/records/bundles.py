"""Batch and transaction Bundles posted to the base (R4 http.html §transaction).

A batch runs each entry on its own and reports each outcome. A transaction is all or nothing: ids
are assigned first, `urn:uuid:` references anywhere in the entries are rewritten to them, and every
write runs in one MongoDB transaction; the first failure aborts it and the client gets that
failure as an OperationOutcome. Every entry goes through the same policy-bound store as a single
request would, so a Bundle cannot do what its parts could not.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import PyMongoError

from mindchart_core import errors, validation
from records import service
from records.resources import RESOURCES, ResourceDef
from records.search import query
from records.store import CONFLICT_RETRY_SECONDS, ResourceStore, StoredResource, instant

MAX_ENTRIES = 200
_ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "GET": 3}
_STATUS = {200: "200 OK", 201: "201 Created", 204: "204 No Content"}


@dataclass
class Entry:
    index: int
    method: str
    definition: ResourceDef
    resource_id: str | None
    criteria: str
    resource: dict[str, Any] | None
    full_url: str | None
    if_none_exist: str | None
    if_match: int | None
    assigned_id: str | None = None
    existing: StoredResource | None = None  # a conditional create that matched


def _fail(index: int, problem: errors.FhirError) -> errors.FhirError:
    return errors.FhirError(f"Bundle.entry[{index}]: {problem.diagnostics}", status=problem.status,
                            code=problem.code, expression=[f"Bundle.entry[{index}]"])


def _parse_entry(index: int, raw: Any, base_url: str) -> Entry:
    if not isinstance(raw, dict) or not isinstance(raw.get("request"), dict):
        raise errors.Invalid("Each entry needs a request")
    request = raw["request"]
    method = request.get("method")
    if method not in _ORDER:
        raise errors.FhirError(f"Method {str(method)[:10]} is not supported in a Bundle entry",
                               status=400, code="not-supported")
    url = str(request.get("url", ""))
    if url.startswith(base_url.rstrip("/") + "/"):
        url = url[len(base_url.rstrip("/")) + 1:]
    parts = urlsplit(url)
    if parts.scheme or parts.netloc:
        raise errors.Invalid("Entry URLs must be relative to this server's base")
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise errors.Invalid(f"Unsupported entry URL '{url[:100]}'")
    definition = RESOURCES.get(path[0])
    if definition is None:
        raise errors.NotFound(f"Resource type '{path[0][:64]}' is not supported here")
    resource_id = path[1] if len(path) == 2 else None
    if resource_id is not None and not query._ID.match(resource_id):
        raise errors.Invalid("Invalid resource id in entry URL")
    resource = raw.get("resource")
    if method in ("POST", "PUT"):
        if not isinstance(resource, dict):
            raise errors.Invalid(f"A {method} entry needs a resource")
        if resource_id is None and method == "POST" and parts.query:
            raise errors.Invalid("POST entries take conditions in ifNoneExist, not in the URL")
    elif method == "DELETE" and resource_id is None:
        raise errors.FhirError("Conditional delete is not supported", status=400, code="not-supported")
    if method == "PUT" and resource_id is None and not parts.query:
        raise errors.Invalid("PUT entries need Type/id or Type?criteria")
    if_match = None
    if request.get("ifMatch"):
        digits = str(request["ifMatch"]).removeprefix("W/").strip('"')
        if not digits.isdigit():
            raise errors.Invalid('ifMatch must be an ETag such as W/"3"')
        if_match = int(digits)
    full_url = raw.get("fullUrl") if isinstance(raw.get("fullUrl"), str) else None
    return Entry(index, method, definition, resource_id, parts.query,
                 resource if isinstance(resource, dict) else None, full_url,
                 request.get("ifNoneExist"), if_match)


def _rewrite(node: Any, mapping: dict[str, str]) -> Any:
    """Replace every `urn:uuid:` placeholder with the id the server assigned."""
    if isinstance(node, dict):
        return {k: _rewrite(v, mapping) for k, v in node.items()}
    if isinstance(node, list):
        return [_rewrite(v, mapping) for v in node]
    if isinstance(node, str) and node in mapping:
        return mapping[node]
    return node


def _conditional_references(node: Any, found: set[str]) -> set[str]:
    """`Type?criteria` references (R4 http.html §trules: conditional references)."""
    if isinstance(node, dict):
        ref = node.get("reference")
        if isinstance(ref, str) and "?" in ref and ref.split("?", 1)[0] in RESOURCES:
            found.add(ref)
        for value in node.values():
            _conditional_references(value, found)
    elif isinstance(node, list):
        for value in node:
            _conditional_references(value, found)
    return found


def _unresolved(node: Any) -> str | None:
    if isinstance(node, dict):
        ref = node.get("reference")
        if isinstance(ref, str) and ref.startswith("urn:uuid:"):
            return ref
        return next((u for v in node.values() if (u := _unresolved(v))), None)
    if isinstance(node, list):
        return next((u for v in node if (u := _unresolved(v))), None)
    return None


def _response(stored: StoredResource, base_url: str, status: int, *, with_resource: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {"fullUrl": f"{base_url}/{stored.resource_type}/{stored.id}"}
    if with_resource and stored.raw is not None:
        entry["resource"] = orjson.loads(stored.raw)
    entry["response"] = {
        "status": _STATUS[status],
        "location": f"{stored.resource_type}/{stored.id}/_history/{stored.version}",
        "etag": stored.etag, "lastModified": instant(stored.last_updated),
    }
    return entry


async def _execute(store: ResourceStore, e: Entry, base_url: str, session: AsyncClientSession | None,
                   with_resource: bool) -> dict[str, Any]:
    definition = e.definition
    if e.method == "GET":
        if e.resource_id is not None:
            stored = await store.read(definition, e.resource_id)
            return _response(stored, base_url, 200, with_resource=True)
        request = service.parse_search(definition, query_items(e.criteria), base_url, strict=False)
        bundle = await service.search_bundle(store, definition, request, base_url)
        return {"resource": orjson.loads(bundle), "response": {"status": "200 OK"}}
    if e.method == "DELETE":
        assert e.resource_id is not None
        await store.delete(definition, e.resource_id, e.if_match, session=session)
        return {"response": {"status": "204 No Content"}}
    assert e.resource is not None
    resource = validation.validate_resource(e.resource, definition.type)
    if e.method == "POST":
        if e.existing is None and e.if_none_exist:
            found = await service.matching(store, definition, e.if_none_exist, base_url)
            if len(found) > 1:
                raise errors.PreconditionFailed("ifNoneExist matches more than one resource")
            e.existing = found[0] if found else None
        if e.existing is not None:
            return _response(e.existing, base_url, 200, with_resource=with_resource)
        body = {k: v for k, v in resource.items() if k != "id"}
        stored = await store.create(definition, body, resource_id=e.assigned_id, session=session)
        return _response(stored, base_url, 201, with_resource=with_resource)
    target = e.resource_id
    if target is None:  # conditional update
        if session is not None:  # one at a time per criteria, as for PUT [type]?criteria
            await store.claim(definition, service.criteria_key(e.criteria or ""), session)
        found = await service.matching(store, definition, e.criteria, base_url, session)
        if len(found) > 1:
            raise errors.PreconditionFailed("The update criteria match more than one resource")
        target = found[0].id if found else (resource.get("id") or str(uuid.uuid4()))
    if resource.get("id") not in (None, target):
        raise errors.Invalid("The resource id must match the entry URL")
    stored, created = await store.update(definition, target, {**resource, "id": target}, e.if_match,
                                         session=session)
    return _response(stored, base_url, 201 if created else 200, with_resource=with_resource)


def query_items(criteria: str) -> list[tuple[str, str]]:
    return parse_qsl(criteria, keep_blank_values=True)


async def process(store: ResourceStore, body: Any, base_url: str, *, prefer: str | None) -> dict[str, Any]:
    if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
        raise errors.Invalid("POST to the base takes a Bundle of type batch or transaction")
    kind = body.get("type")
    if kind not in ("batch", "transaction"):
        raise errors.Invalid("Bundle.type must be batch or transaction")
    raw_entries = body.get("entry", [])
    if not isinstance(raw_entries, list):
        raise errors.Structure("Bundle.entry must be an array")
    if len(raw_entries) > MAX_ENTRIES:
        raise errors.PayloadTooLarge(f"At most {MAX_ENTRIES} entries per Bundle")
    validation.validate_resource({k: v for k, v in body.items() if k != "entry"}, "Bundle")
    with_resource = "return=minimal" not in (prefer or "").replace(" ", "").lower()
    if kind == "batch":
        return {"resourceType": "Bundle", "type": "batch-response",
                "entry": [await _batch_entry(store, i, e, base_url, with_resource)
                          for i, e in enumerate(raw_entries)]}
    deadline, attempt = time.monotonic() + CONFLICT_RETRY_SECONDS, 0
    while True:
        try:
            return {"resourceType": "Bundle", "type": "transaction-response",
                    "entry": await _transaction(store, raw_entries, base_url, with_resource)}
        except (_Rerun, PyMongoError) as exc:
            if isinstance(exc, PyMongoError) and not exc.has_error_label("TransientTransactionError"):
                raise
            if time.monotonic() > deadline:
                raise errors.Conflict(
                    "Concurrent requests kept changing what this transaction depends on; retry") from None
        attempt += 1
        await asyncio.sleep(random.uniform(0, min(0.25, 0.01 * 2 ** attempt)))  # noqa: S311 - jitter


class _Rerun(Exception):
    """A concurrent write changed what the transaction's conditions match: run it again."""



async def _batch_entry(store: ResourceStore, index: int, raw: Any, base_url: str,
                       with_resource: bool) -> dict[str, Any]:
    try:
        entry = _parse_entry(index, raw, base_url)
        if entry.method == "POST":
            entry.assigned_id = str(uuid.uuid4())
        return await _execute(store, entry, base_url, None, with_resource)
    except errors.FhirError as problem:
        return {"response": {"status": f"{problem.status}", "outcome": problem.outcome()}}


async def _transaction(store: ResourceStore, raw_entries: list[Any], base_url: str,
                       with_resource: bool) -> list[dict[str, Any]]:
    entries: list[Entry] = []
    for i, raw in enumerate(raw_entries):
        try:
            entries.append(_parse_entry(i, raw, base_url))
        except errors.FhirError as problem:
            raise _fail(i, problem) from None
    mapping: dict[str, str] = {}
    for e in entries:
        if e.full_url and e.full_url in mapping:
            raise _fail(e.index, errors.Invalid("Duplicate fullUrl in the transaction"))
        try:
            if e.method == "POST":
                if e.if_none_exist:
                    found = await service.matching(store, e.definition, e.if_none_exist, base_url)
                    if len(found) > 1:
                        raise errors.PreconditionFailed("ifNoneExist matches more than one resource")
                    e.existing = found[0] if found else None
                e.assigned_id = e.existing.id if e.existing else str(uuid.uuid4())
                if e.full_url and e.full_url.startswith("urn:uuid:"):
                    mapping[e.full_url] = f"{e.definition.type}/{e.assigned_id}"
            elif e.method == "PUT" and e.resource_id and e.full_url and e.full_url.startswith("urn:uuid:"):
                mapping[e.full_url] = f"{e.definition.type}/{e.resource_id}"
        except errors.FhirError as problem:
            raise _fail(e.index, problem) from None
    for e in entries:  # conditional references resolve to exactly one match the caller may see
        for ref in sorted(_conditional_references(e.resource, set())):
            if ref in mapping:
                continue
            kind, _, criteria = ref.partition("?")
            try:
                found = await service.matching(store, RESOURCES[kind], criteria, base_url)
            except errors.FhirError as problem:
                raise _fail(e.index, problem) from None
            if len(found) != 1:
                raise _fail(e.index, errors.PreconditionFailed(
                    f"Conditional reference {ref[:80]} matches {len(found)} resources, not one"))
            mapping[ref] = f"{kind}/{found[0].id}"
    for e in entries:
        if e.resource is not None:
            e.resource = _rewrite(e.resource, mapping)
            if (missing := _unresolved(e.resource)) is not None:
                raise _fail(e.index, errors.Invalid(f"Reference {missing[:60]} is not in the transaction"))
    # DELETE, POST, PUT, GET (R4 http.html §transaction); resources that take their compartment
    # from their targets (Provenance) are written after the targets.
    order = sorted(entries, key=lambda e: (_ORDER[e.method], bool(e.definition.compartment_from_targets),
                                           e.index))
    results: dict[int, dict[str, Any]] = {}
    async with store.transaction() as session:
        # ifNoneExist was resolved above, outside the transaction: claim each criteria and check
        # again inside it, so a concurrent request cannot create a match in between (else rerun).
        for e in entries:
            if e.method == "POST" and e.if_none_exist:
                await store.claim(e.definition, service.criteria_key(e.if_none_exist), session)
                found = await service.matching(store, e.definition, e.if_none_exist, base_url, session)
                if [f.id for f in found] != ([e.existing.id] if e.existing else []):
                    raise _Rerun
        for e in order:
            if e.method == "GET":
                continue
            try:
                results[e.index] = await _execute(store, e, base_url, session, with_resource)
            except errors.FhirError as problem:
                raise _fail(e.index, problem) from None
    for e in order:
        if e.method == "GET":
            try:
                results[e.index] = await _execute(store, e, base_url, None, with_resource)
            except errors.FhirError as problem:
                results[e.index] = {"response": {"status": f"{problem.status}",
                                                 "outcome": problem.outcome()}}
    return [results[e.index] for e in entries]


__all__ = ["MAX_ENTRIES", "process"]
