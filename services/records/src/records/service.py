"""Records interactions: load through the policy-bound store, answer in FHIR R4 JSON.

R4 http.html: create → 201 + Location + ETag + Last-Modified; read → ETag (`W/"<vid>"`); search →
Bundle `searchset` with `self`/`next` links built from the parameters actually applied.
"""

from __future__ import annotations

from email.utils import format_datetime
from typing import Any
from urllib.parse import urlencode

from starlette.responses import Response

from mindchart_core import fhirjson
from records.resources import ResourceDef
from records.search import query
from records.store import ResourceStore, StoredResource, instant


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
    prefer: str | None = None,
) -> Response:
    """R4 http.html §Prefer: return=minimal | representation | OperationOutcome."""
    headers = resource_headers(stored, base_url, location=location)
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
    return fhirjson.FhirResponse(stored.raw, status_code=status, headers=headers)


def _link(relation: str, url: str) -> dict[str, str]:
    return {"relation": relation, "url": url}


async def search_type(
    store: ResourceStore, definition: ResourceDef, items: list[tuple[str, str]],
    base_url: str, *, strict: bool,
) -> Response:
    request = query.parse(definition, items, base_url=base_url, strict=strict)
    page, has_more = await store.search(definition, request)
    type_url = f"{base_url}/{definition.type}"
    self_url = f"{type_url}?{urlencode(request.applied)}" if request.applied else type_url
    links = [_link("self", self_url)]
    if has_more and page:
        nxt = [*request.applied, ("_cursor", page[-1].id)]
        if not any(k == "_count" for k, _ in request.applied):
            nxt.append(("_count", str(request.count)))
        links.append(_link("next", f"{type_url}?{urlencode(nxt)}"))
    head: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
    if request.cursor is None and not has_more:
        head["total"] = len(page)
    elif request.count == 0 or any(k == "_total" and v == "accurate" for k, v in items):
        head["total"] = await store.count(definition, request)
    head["link"] = links
    return fhirjson.FhirResponse(bundle_bytes(head, [
        (f"{type_url}/{s.id}", s.raw or b"{}", "match") for s in page
    ]))


def bundle_bytes(head: dict[str, Any], entries: list[tuple[str, bytes, str]]) -> bytes:
    """A Bundle spliced from stored JSON bytes: entries are never parsed or re-serialised."""
    opening = fhirjson.dumps(head)[:-1]
    if not entries:
        return opening + b"}"
    parts = [
        b'{"fullUrl":' + fhirjson.dumps(url) + b',"resource":' + raw
        + b',"search":{"mode":"' + mode.encode() + b'"}}'
        for url, raw, mode in entries
    ]
    return opening + b',"entry":[' + b",".join(parts) + b"]}"


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
            "resource": [
                {
                    "type": d.type,
                    "supportedProfile": list(d.profiles),
                    "interaction": [{"code": c} for c in
                                    ("create", "read", "vread", "update", "search-type")],
                    "versioning": "versioned",
                    "readHistory": True,
                    "updateCreate": True,
                    "searchParam": [
                        {"name": p.name, "definition": p.definition, "type": p.type}
                        for p in d.params
                    ] + [{"name": "_id", "type": "token",
                          "definition": "http://hl7.org/fhir/SearchParameter/Resource-id"},
                         {"name": "_lastUpdated", "type": "date",
                          "definition": "http://hl7.org/fhir/SearchParameter/Resource-lastUpdated"}],
                }
                for d in resources
            ],
        }],
    }


__all__ = ["bundle_bytes", "capability_statement", "instant", "resource_response", "search_type"]
