"""psychnotes' CapabilityStatement, built from the app's route table (R4 capabilitystatement).

`build(routes, ...)` reads every route under the FHIR base: `[Type]` (search-type on GET, create
on POST), `[Type]/_search` (search-type), `[Type]/{id}` (read, update, patch, delete),
`[Type]/{id}/_history` (history-instance), `[Type]/{id}/_history/{vid}` (vread), and operations
at `[base]/$op`, `[Type]/$op` and `[Type]/{id}/$op` (R4 http.html and operations.html). Each
operation route must have its OperationDefinition in operations.py, and a GET route only an
operation with `affectsState: false`; any other route shape is refused. The app calls `build`
when it is created, so a route nobody declared stops the service from starting rather than
going missing from `/metadata`. Routes with `include_in_schema=False` (the catch-all, the
405-only edits of a Consent) are not capabilities and are skipped, as are `metadata` itself and
the `.well-known` documents.

What a route cannot say is stated here, next to the code it describes: the search parameters
(from notes_service.SEARCH_PARAMS and consents.SEARCH_PARAMS, each of which must have an entry in
SEARCH_PARAM_DEFINITIONS) and which interactions pass the consent gate (CONSENT_GATED; the e2e
test tries each without a consent token).

Security (R4 capabilitystatement `rest.security`): the service code SMART-on-FHIR
(restful-security-service), CORS, the OAuth endpoints (the SMART oauth-uris extension, which
SMART App Launch 2.x deprecates in favour of `[base]/.well-known/smart-configuration`, served by
the gateway for this base too), and the consent-token requirement, in `description` and in the
extension CONSENT_TOKEN_EXTENSION.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from starlette.routing import BaseRoute

from psychnotes import consents, notes_service
from psychnotes.capability import operations
from psychnotes.capability.operations import CONSENT_TOKEN_HEADER, Operation

SP = "http://hl7.org/fhir/SearchParameter"
# name -> (type, canonical SearchParameter or None, documentation) per resource type.
SEARCH_PARAM_DEFINITIONS: dict[str, dict[str, tuple[str, str | None, str]]] = {
    "DocumentReference": {
        "patient": ("reference", f"{SP}/clinical-patient", "The token's patient only"),
        "subject": ("reference", f"{SP}/DocumentReference-subject", "The token's patient only"),
        "_id": ("token", f"{SP}/Resource-id", "Comma-separated ids"),
        "date": ("date", f"{SP}/DocumentReference-date", "Prefixes eq, ge, gt, le, lt"),
        "author": ("reference", f"{SP}/DocumentReference-author", "Practitioner/<id>"),
        "status": ("token", f"{SP}/DocumentReference-status",
                   "Without it a search leaves entered-in-error notes out"),
        "relatesto": ("reference", f"{SP}/DocumentReference-relatesto",
                      "A note's addenda and corrections"),
        "_lastUpdated": ("date", f"{SP}/Resource-lastUpdated",
                         "When the note's current version was written; prefixes eq, ge, gt, le, lt"),
        "_tag": ("token", f"{SP}/Resource-tag",
                 "meta.tag: system|code, code, |code or system|; comma-separated alternatives"),
        "_security": ("token", f"{SP}/Resource-security",
                      "meta.security: every note carries V, PSYTHPN and NOAUTH (set by the server)"),
    },
    "Consent": {
        "patient": ("reference", f"{SP}/clinical-patient", "Exactly one patient"),
        "subject": ("reference", None, "A synonym of patient"),
    },
}
# Search result and paging parameters: not search parameters (R4 search.html §3.1.1).
RESULT_PARAMS = frozenset({"_count", "_cursor", "_format"})
SEARCH_PARAMS = {"DocumentReference": notes_service.SEARCH_PARAMS - RESULT_PARAMS,
                 "Consent": consents.SEARCH_PARAMS - RESULT_PARAMS}
# (resource type, interaction or $operation) that need a Consent-Token (45 CFR 164.508(a)(2);
# notes_service.gate): every read of a note.
CONSENT_GATED = frozenset({("DocumentReference", "read"), ("DocumentReference", "vread"),
                           ("DocumentReference", "history-instance"),
                           ("DocumentReference", "search-type"),
                           ("DocumentReference", "$verify-signature")})
CONSENT_TOKEN_EXTENSION = "https://mindchart.dev/fhir/StructureDefinition/consent-token"
INTERACTION_ORDER = ("read", "vread", "update", "patch", "delete", "history-instance",
                     "history-type", "create", "search-type")
RESOURCE_DOCUMENTATION = {
    "DocumentReference": (
        "Psychotherapy notes (45 CFR 164.501), kept apart from the medical record, encrypted at "
        "rest and labelled meta.security V + PSYTHPN + NOAUTH. The treating practitioner (a "
        "member of an active CareTeam in records) writes them. Lifecycle: a note written with "
        "docStatus preliminary is a draft its author may change; $sign makes it final and locks "
        "it; an addendum is a new note with relatesTo appends, a correction one with relatesTo "
        "replaces (signing it supersedes the original); $entered-in-error retracts a signed note. "
        "Every read needs a Consent-Token header."),
    "Consent": (
        "The patient's authorizations (45 CFR 164.508(c)) that release psychotherapy notes. "
        "Recorded with create, put in force with $attest when someone other than the patient "
        "recorded them, ended with $revoke; never edited (PUT, PATCH and DELETE answer 405)."),
}


class UndeclaredRoute(RuntimeError):
    """A route the CapabilityStatement cannot state: declare it (operations.py) or hide it."""


@dataclass(frozen=True)
class Capability:
    resource: str | None
    interaction: str  # R4 restful-interaction code, or "$<operation code>"
    operation: Operation | None = None


def _is_variable(segment: str) -> bool:
    return segment.startswith("{") and segment.endswith("}")


def classify(method: str, path: str) -> Capability | None:
    """What `method path` (relative to the FHIR base, e.g. `/Consent/{consent_id}/$revoke`)
    serves; None for what is not a FHIR interaction (`metadata`, `.well-known/...`)."""
    parts = [p for p in path.split("/") if p]
    if not parts or parts[0] in ("metadata", ".well-known"):
        return None
    if parts[-1].startswith("$"):
        code = parts[-1][1:]
        resource = parts[0] if len(parts) > 1 else None
        instance = len(parts) == 3 and _is_variable(parts[1])
        if len(parts) > 3 or (len(parts) == 3 and not instance):
            raise UndeclaredRoute(f"{method} {path}: not an operation URL R4 defines")
        found = operations.find(resource, code)
        if found is None or found.instance != instance:
            raise UndeclaredRoute(f"{method} {path} has no OperationDefinition "
                                  "(psychnotes/capability/operations.py)")
        if method == "GET" and found.affects_state:
            raise UndeclaredRoute(f"GET {path}: only an operation with affectsState false may be "
                                  "invoked with GET (R4 operations.html)")
        return Capability(resource, f"${code}", found)
    resource, rest = parts[0], parts[1:]
    shapes: dict[tuple[int, str], str] = {
        (0, "GET"): "search-type", (0, "POST"): "create",
        (1, "GET"): "read", (1, "PUT"): "update", (1, "PATCH"): "patch", (1, "DELETE"): "delete",
    }
    if rest == ["_search"] and method == "POST":
        return Capability(resource, "search-type")
    if rest == ["_history"] and method == "GET":
        return Capability(resource, "history-type")
    if len(rest) == 2 and _is_variable(rest[0]) and rest[1] == "_history" and method == "GET":
        return Capability(resource, "history-instance")
    if (len(rest) == 3 and _is_variable(rest[0]) and rest[1] == "_history"
            and _is_variable(rest[2]) and method == "GET"):
        return Capability(resource, "vread")
    if (len(rest) == 0 or _is_variable(rest[0])) and len(rest) <= 1 and (len(rest), method) in shapes:
        return Capability(resource, shapes[(len(rest), method)])
    raise UndeclaredRoute(f"{method} {path}: not a FHIR interaction the CapabilityStatement can state")


def served(routes: Iterable[BaseRoute], prefix: str) -> set[Capability]:
    """Every capability of the routes under `prefix` (the FHIR base path)."""
    found: set[Capability] = set()
    for route in routes:
        path = getattr(route, "path", "")
        if not path.startswith(prefix) or not getattr(route, "include_in_schema", True):
            continue
        for method in sorted(getattr(route, "methods", None) or ()):
            if method == "HEAD":
                continue
            capability = classify(method, path[len(prefix):])
            if capability is not None:
                found.add(capability)
    return found


def _operation_entry(operation: Operation, base_url: str) -> dict[str, Any]:
    return {"name": operation.code, "definition": f"{base_url}/OperationDefinition/{operation.id}"}


def _gated(resource: str, interaction: str) -> dict[str, Any]:
    if (resource, interaction) in CONSENT_GATED:
        return {"documentation": f"Needs a {CONSENT_TOKEN_HEADER} header covering the note"}
    return {}


def _resource(resource: str, capabilities: set[Capability], base_url: str) -> dict[str, Any]:
    mine = [c for c in capabilities if c.resource == resource]
    interactions = {c.interaction for c in mine if c.operation is None}
    ops = sorted((c.operation for c in mine if c.operation is not None), key=lambda o: o.code)
    params = SEARCH_PARAM_DEFINITIONS.get(resource, {})
    missing = sorted(set(SEARCH_PARAMS.get(resource, ())) - set(params))
    if missing:
        raise UndeclaredRoute(f"{resource} search parameters without a definition: {missing}")
    entry: dict[str, Any] = {
        "type": resource,
        **({"documentation": RESOURCE_DOCUMENTATION[resource]}
           if resource in RESOURCE_DOCUMENTATION else {}),
        "interaction": [{"code": code, **_gated(resource, code)}
                        for code in INTERACTION_ORDER if code in interactions],
        "versioning": "versioned-update" if "update" in interactions else "versioned",
        "readHistory": "vread" in interactions,
        "updateCreate": False,
        "conditionalCreate": False,
        "conditionalRead": "not-supported",
        "conditionalUpdate": False,
        "conditionalDelete": "not-supported",
    }
    if "search-type" in interactions:
        entry["searchParam"] = [
            {"name": name, "type": kind, **({"definition": url} if url else {}),
             "documentation": text}
            for name in sorted(SEARCH_PARAMS.get(resource, ()))
            for kind, url, text in (params[name],)]
    if ops:
        entry["operation"] = [{**_operation_entry(o, base_url), **_gated(resource, f"${o.code}")}
                              for o in ops]
    return entry


def _security(base_url: str, issuer: str) -> dict[str, Any]:
    oauth = issuer.rstrip("/") + "/oauth"
    mint = [operations.find("Consent", "consent-token"), operations.find(None, "consent-token")]
    return {
        "cors": True,
        "service": [{"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
            "code": "SMART-on-FHIR"}]}],
        "description": (
            "SMART App Launch 2.2 (discovery at [base]/.well-known/smart-configuration): every "
            "request but this statement, the OperationDefinitions and the signing keys at "
            f"[base]{operations.JWKS_PATH} needs an access token whose audience is this base. "
            f"On top of it, every read of a psychotherapy note (read, vread, history, search, "
            f"$verify-signature) needs a `{CONSENT_TOKEN_HEADER}` HTTP header: a short-lived "
            "consent token that psychnotes mints with Consent/{id}/$consent-token (under the "
            "patient's authorization) or $consent-token (a 45 CFR 164.508(a)(2) exception), bound "
            "to the caller, the patient, the purpose and the notes, and checked against the live "
            "authorization on every use. Without one a read is 403; a forged, expired or foreign "
            f"one is 401 with WWW-Authenticate: {CONSENT_TOKEN_HEADER}. Patient-context tokens "
            "never read psychotherapy notes (outside the right of access, 164.524(a)(1)(i))."),
        "extension": [
            {"url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
             "extension": [
                 {"url": "authorize", "valueUri": f"{oauth}/authorize"},
                 {"url": "token", "valueUri": f"{oauth}/token"},
                 {"url": "introspect", "valueUri": f"{oauth}/introspect"},
                 {"url": "revoke", "valueUri": f"{oauth}/revoke"},
             ]},
            {"url": CONSENT_TOKEN_EXTENSION, "extension": [
                {"url": "header", "valueString": CONSENT_TOKEN_HEADER},
                *({"url": "mintedBy", "valueCanonical": f"{base_url}/OperationDefinition/{o.id}"}
                  for o in mint if o is not None),
            ]},
        ],
    }


def build(routes: Iterable[BaseRoute], prefix: str, base_url: str, issuer: str) -> dict[str, Any]:
    capabilities = served(routes, prefix)
    resources = sorted({c.resource for c in capabilities if c.resource is not None})
    system_ops = sorted((c.operation for c in capabilities
                         if c.resource is None and c.operation is not None), key=lambda o: o.code)
    rest: dict[str, Any] = {
        "mode": "server",
        "documentation": "Psychotherapy notes and the authorizations that release them",
        "security": _security(base_url, issuer),
        "resource": [_resource(r, capabilities, base_url) for r in resources],
    }
    if system_ops:
        rest["operation"] = [_operation_entry(o, base_url) for o in system_ops]
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-12-02",
        "publisher": "Mindchart",
        "kind": "instance",
        "software": {"name": "Mindchart psychnotes", "version": "0.1.0"},
        "implementation": {"description": "Mindchart psychotherapy-notes vault", "url": base_url},
        "fhirVersion": "4.0.1",
        "format": ["json", "application/fhir+json"],
        "rest": [rest],
    }


__all__ = ["CONSENT_GATED", "CONSENT_TOKEN_EXTENSION", "SEARCH_PARAM_DEFINITIONS", "Capability",
           "UndeclaredRoute", "build", "classify", "served"]
