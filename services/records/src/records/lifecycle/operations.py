"""The lifecycle's OperationDefinitions and their declaration in the CapabilityStatement
(R4 capabilitystatement `rest.resource.operation`: a name and the canonical URL of an
OperationDefinition, which records serves at `[base]/OperationDefinition/{id}`)."""

from __future__ import annotations

from typing import Any

JWKS_PATH = "/.well-known/jwks.json"  # records' document-signing keys, under the FHIR base


def _operation(code: str, title: str, description: str, base_url: str,
               out: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "resourceType": "OperationDefinition",
        "id": f"DocumentReference-{code}",
        "url": f"{base_url}/OperationDefinition/DocumentReference-{code}",
        "name": title.replace(" ", "").replace("-", ""),
        "title": title,
        "status": "active",
        "kind": "operation",
        "description": description,
        "code": code,
        "resource": ["DocumentReference"],
        "system": False, "type": False, "instance": True,
        "parameter": out,
    }


def operation_definitions(base_url: str) -> dict[str, dict[str, Any]]:
    definitions = [
        _operation(
            "sign", "Sign a progress note",
            "The note's author signs their draft (docStatus preliminary): it becomes docStatus "
            "final with authenticator the signer, and records writes a Provenance targeting that "
            "version whose signature is a JWS (detached payload) over the RFC 8785 canonical form "
            f"of the version, signed with the key published at {base_url}{JWKS_PATH}. From then on "
            "the note is locked: add an addendum (relatesTo appends) or a correction (replaces).",
            base_url,
            [{"name": "return", "use": "out", "min": 1, "max": "1", "type": "DocumentReference",
              "documentation": "The signed note"}]),
        _operation(
            "entered-in-error", "Mark a signed progress note entered in error",
            "The author of a signed note, or an administrator, marks it entered-in-error "
            "(docStatus and status) with a written reason, kept in a Provenance. The note stays "
            "readable by id and in its history; searches leave it out unless they ask for a status.",
            base_url,
            [{"name": "reason", "use": "in", "min": 1, "max": "1", "type": "string",
              "documentation": "Why the note was entered in error"},
             {"name": "return", "use": "out", "min": 1, "max": "1", "type": "DocumentReference",
              "documentation": "The note as marked"}]),
        _operation(
            "verify-signature", "Verify the signatures of a progress note",
            "Checks every signature records holds for the note against the stored bytes of the "
            "version it covers.",
            base_url,
            [{"name": "result", "use": "out", "min": 1, "max": "1", "type": "boolean",
              "documentation": "True when every signature verifies"},
             {"name": "message", "use": "out", "min": 1, "max": "1", "type": "string"},
             {"name": "signature", "use": "out", "min": 0, "max": "*",
              "documentation": "provenance, version, signer, role, valid, message",
              "part": [{"name": "valid", "use": "out", "min": 1, "max": "1", "type": "boolean"}]}]),
    ]
    return {d["id"]: d for d in definitions}


def declare(statement: dict[str, Any], base_url: str) -> dict[str, Any]:
    for rest in statement.get("rest", []):
        for resource in rest.get("resource", []):
            if resource.get("type") == "DocumentReference":
                resource.setdefault("operation", []).extend(
                    {"name": d["code"], "definition": d["url"]}
                    for d in operation_definitions(base_url).values())
    return statement




__all__ = ["JWKS_PATH", "declare", "operation_definitions"]
